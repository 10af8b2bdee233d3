"""Bulk inserts of audit rows: COPY on PostgreSQL (one round trip for a batch), executemany on
SQLite (in-process). Inside the caller's transaction."""

from __future__ import annotations

from typing import Any, Sequence


def insert_rows(store: Any, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
    """Append `rows` (tuples in `columns` order) to `table`."""
    if not rows:
        return
    if store.kind == "postgres":
        with store.conn.cursor() as cursor:
            with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        return
    store.executemany(f"INSERT INTO {table} ({', '.join(columns)}) "
                      f"VALUES ({', '.join('?' * len(columns))})", rows)


def tune(store: Any) -> Any:
    """A larger page cache for the audit's SQLite connection (its tables grow with the log)."""
    if store.kind == "sqlite":
        store.execute("PRAGMA cache_size = -65536")  # 64 MiB
    return store
