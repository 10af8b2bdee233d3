"""Bulk inserts of audit rows (projections/store.py `Store.insert`): on PostgreSQL one INSERT of
a binary array per column (it was COPY, whose rows psycopg formats one by one in Python),
executemany on SQLite (in-process). Inside the caller's transaction."""

from __future__ import annotations

from typing import Any, Sequence


def insert_rows(store: Any, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
    """Append `rows` (tuples in `columns` order) to `table`."""
    store.insert(table, columns, rows)


def tune(store: Any) -> Any:
    """A larger page cache for the audit's SQLite connection (its tables grow with the log)."""
    if store.kind == "sqlite":
        store.execute("PRAGMA cache_size = -65536")  # 64 MiB
    return store
