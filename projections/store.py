"""The view store: one connection to SQLite or PostgreSQL, beside the event store.

SQL is written once with `?` placeholders; the PostgreSQL store rewrites them to `%s`.
Instants are `timestamptz` on PostgreSQL and fixed-width ISO-8601 UTC text on SQLite
(`2026-11-02T08:00:00.000000+00:00`), so `<=`/`ORDER BY` work as instants on both.
Key columns use byte order (`COLLATE "C"` on PostgreSQL, BINARY on SQLite), which is also
Python's `str` order, so replay verification can merge two sorted streams.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from storage import connect_options, is_postgres, postgres_conninfo, postgres_parts, sqlite_path

BUSY_TIMEOUT_SECONDS = 30
STORE_TIMEOUT_SECONDS = 3  # bound on (re)connecting to PostgreSQL: an outage answers fast
COPY_MIN_ROWS = 1000  # PostgreSQL upserts of at least this many rows go through COPY
QUERY_KEYS_CHUNK = 500  # keys per SQLite query_keys statement (below its 999-parameter floor)


def utc(moment: datetime) -> datetime:
    """The same instant in UTC; raises ValueError for a naive datetime (ambiguous)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("instants must be timezone-aware")
    return moment.astimezone(timezone.utc)


def iso_utc(moment: datetime) -> str:
    """Fixed-width ISO-8601 UTC text of an aware datetime (lexical order = time order)."""
    return utc(moment).isoformat(timespec="microseconds")


class Store:
    """One database connection for the views. Not shared between processes.

    Use `with store.locked():` around every use from several threads, `transaction()` for
    writes (one atomic unit) and `snapshot()` for consistent multi-statement reads.
    """

    kind = ""
    ddl_types: dict[str, str] = {}

    def __init__(self) -> None:
        self._mutex = threading.RLock()

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._mutex:
            yield

    def ts(self, moment: datetime | None) -> Any:
        """An instant as a query parameter."""
        raise NotImplementedError

    def from_ts(self, value: Any) -> datetime | None:
        """An instant read from a column, as an aware UTC datetime."""
        raise NotImplementedError

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        raise NotImplementedError

    def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        raise NotImplementedError

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        raise NotImplementedError

    def query_keys(self, table: str, cols: Sequence[str], key: str,
                   values: Sequence[Any]) -> list[tuple]:
        """The rows (tuples in `cols` order, in no particular order) of `table` whose `key`
        column is one of `values`: a query per QUERY_KEYS_CHUNK values (SQLite's bound on
        parameters); one query on PostgreSQL, an index probe per key (PostgresStore)."""
        out: list[tuple] = []
        for i in range(0, len(values), QUERY_KEYS_CHUNK):
            chunk = values[i:i + QUERY_KEYS_CHUNK]
            out += self.query(f"SELECT {', '.join(cols)} FROM {table} "
                              f"WHERE {key} IN ({', '.join('?' * len(chunk))})", chunk)
        return out

    def upsert(self, table: str, keys: Sequence[str], cols: Sequence[str], sets: str,
               rows: list[Sequence[Any]]) -> None:
        """Insert `rows` (tuples in `cols` order, unique per `keys`); a row whose key exists
        runs `sets` (SQL, e.g. "n = t.n + excluded.n") instead. Inside the caller's
        transaction."""
        self._insert_or(table, keys, cols, f"DO UPDATE SET {sets}", rows)

    def insert_new(self, table: str, keys: Sequence[str], cols: Sequence[str],
                   rows: list[Sequence[Any]]) -> None:
        """Insert `rows` (tuples in `cols` order); a row whose `keys` already exist (in the
        table or earlier in `rows`) is skipped and the stored row left untouched (ON CONFLICT
        DO NOTHING). Inside the caller's transaction."""
        self._insert_or(table, keys, cols, "DO NOTHING", rows)

    def _insert_or(self, table: str, keys: Sequence[str], cols: Sequence[str], action: str,
                   rows: list[Sequence[Any]]) -> None:
        """INSERT … ON CONFLICT (`keys`) `action`, a statement per row."""
        if rows:
            self.executemany(
                f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                f"ON CONFLICT ({', '.join(keys)}) {action}", rows)

    def insert(self, table: str, cols: Sequence[str], rows: list[Sequence[Any]]) -> None:
        """Append `rows` (tuples in `cols` order) to `table`. Inside the caller's
        transaction."""
        if rows:
            self.executemany(f"INSERT INTO {table} ({', '.join(cols)}) "
                             f"VALUES ({', '.join('?' * len(cols))})", rows)

    def delete_keys(self, table: str, key: str, values: list[Any]) -> None:
        """Delete the rows whose `key` column is one of `values`."""
        self.executemany(f"DELETE FROM {table} WHERE {key} = ?", [(v,) for v in values])

    def transaction(self, durable: bool = False):
        """Context manager: one write transaction, rolled back on any exception. `durable`:
        its commit survives a power loss (what a request acknowledges: a webhook endpoint, a
        resend), whatever the connection's default (a follower's derived rows may lose their
        last commits and are derived again)."""
        raise NotImplementedError

    def snapshot(self):
        """Context manager: a read-only transaction with one consistent snapshot."""
        raise NotImplementedError

    def lock(self, name: str) -> None:
        """Serialise writers of projection `name` until the transaction ends (PG only)."""

    def close(self) -> None:
        raise NotImplementedError


class SQLiteStore(Store):
    """A separate `sqlite3` connection to the ledger's file: WAL, busy timeout, BEGIN IMMEDIATE.

    Commits are `synchronous=NORMAL` (WAL: safe from a crash of the process, but the last
    commits may roll back on a power loss until a later commit or checkpoint syncs the WAL),
    except a `transaction(durable=True)`, which commits `FULL` (its WAL frames synced, as
    the event store's commits are). sqlite.org/pragma.html#pragma_synchronous."""

    kind = "sqlite"
    ddl_types = {"TS": "TEXT", "KEY": "TEXT", "BOOL": "INTEGER"}

    def __init__(self, path: str) -> None:
        super().__init__()
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                    timeout=BUSY_TIMEOUT_SECONDS)
        self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_SECONDS * 1000}")
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")

    def ts(self, moment: datetime | None) -> str | None:
        return None if moment is None else iso_utc(moment)

    def from_ts(self, value: Any) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        if rows:
            self.conn.executemany(sql, rows)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[None]:
        if durable:  # the level cannot change inside a transaction; the caller holds locked()
            self.conn.execute("PRAGMA synchronous=FULL")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        finally:
            if durable:
                self.conn.execute("PRAGMA synchronous=NORMAL")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


class PostgresStore(Store):
    """A psycopg 3 connection whose search_path is the ledger's schema; TimeZone UTC.

    `derived=True`: the connection of a follower whose every write is derived from the event
    log and committed together with its tracking position, and whose in-memory state is
    checked against that position (the projector, the webhook deriver, the audit): it commits asynchronously (`synchronous_commit = off`), so it does not wait for
    the WAL flush nor make the request path's durable commits queue behind its flushes. A
    server crash can lose its last commits (at most about three `wal_writer_delay`s), and
    with them their tracking position: they are derived again from the log, the same rows
    and message ids. A durable commit that read them (the dispatcher's claim of a delivery)
    flushes them first, since the WAL is flushed in order. docs/design.md."""

    kind = "postgres"
    ddl_types = {"TS": "timestamptz", "KEY": 'text COLLATE "C"', "BOOL": "boolean"}

    def __init__(self, url: str, derived: bool = False) -> None:
        super().__init__()
        self.url, self.schema = url, postgres_parts(url)["schema"]
        self.derived = derived
        self._types: dict[str, dict[str, str]] = {}
        self._conn = self._connect()

    def _connect(self) -> Any:
        import psycopg
        from psycopg import sql

        conn = psycopg.connect(postgres_conninfo(self.url), autocommit=True,
                               **connect_options(STORE_TIMEOUT_SECONDS))
        schema = sql.Identifier(self.schema)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        conn.execute(sql.SQL("SET search_path TO {}").format(schema))
        conn.execute("SET TIME ZONE 'UTC'")
        if self.derived:
            conn.execute("SET synchronous_commit TO off")
        return conn

    @property
    def conn(self) -> Any:
        """The connection, re-opened if the previous one broke (server restart, network)."""
        if self._conn.broken:
            self._conn.close()
            self._conn = self._connect()
        return self._conn

    @staticmethod
    def _sql(statement: str) -> str:
        return statement.replace("?", "%s")

    def ts(self, moment: datetime | None) -> datetime | None:
        return None if moment is None else utc(moment)

    def from_ts(self, value: Any) -> datetime | None:
        return None if value is None else value.astimezone(timezone.utc)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(self._sql(sql), params).rowcount

    def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)

    def query(self, sql: str, params: Sequence[Any] = (), prepare: bool | None = None
              ) -> list[tuple]:
        """As Store.query; outside a transaction a connection found broken (the server
        restarted, the network dropped it) is re-opened and the read tried once more.
        `prepare`: psycopg's (None: a server-side prepared statement from the fifth use on;
        False: never, so PostgreSQL plans each execution for its parameters)."""
        from psycopg import OperationalError, pq

        conn = self.conn
        idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
        try:
            return conn.execute(self._sql(sql), params, prepare=prepare).fetchall()
        except OperationalError:
            if not (idle and conn.broken):
                raise
        return self.conn.execute(self._sql(sql), params, prepare=prepare).fetchall()

    def query_binary(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """As `query`, the results in PostgreSQL's binary format (bytea without hex)."""
        with self.conn.cursor(binary=True) as cur:
            return cur.execute(self._sql(sql), params).fetchall()

    def _insert_or(self, table: str, keys: Sequence[str], cols: Sequence[str], action: str,
                   rows: list[Sequence[Any]]) -> None:
        """As Store._insert_or (behind `upsert` and `insert_new`); from COPY_MIN_ROWS rows on,
        COPY into a temporary staging table then one INSERT … SELECT … ON CONFLICT (a round
        trip per row costs more)."""
        if not rows:
            return
        if len(rows) < COPY_MIN_ROWS:
            self._insert_columns(table, keys, cols, action, rows)
            return
        stage, columns = f"stage_{table}", ", ".join(cols)
        with self.conn.cursor() as cur:
            cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table}) "
                        "ON COMMIT DELETE ROWS")
            with cur.copy(f"COPY {stage} ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {stage} "
                        f"ON CONFLICT ({', '.join(keys)}) {action}")
            cur.execute(f"TRUNCATE {stage}")

    def _insert_columns(self, table: str, keys: Sequence[str], cols: Sequence[str], action: str,
                        rows: list[Sequence[Any]]) -> None:
        """The insert … ON CONFLICT as ONE statement taking a binary array per column (INSERT …
        SELECT FROM unnest(…)): executemany sent a statement per row (about 4× the client CPU;
        the tick's and batches' catch-ups flush tens to hundreds of rows per table), and a
        multi-row VALUES text is re-parsed by psycopg on every call (it caches only short
        statements). The arrays are cast to the columns' own types, read once per table from
        the catalog. A value psycopg cannot put in a binary array falls back to executemany
        (nothing sent)."""
        import psycopg

        types = self._column_types(table)
        arrays = ", ".join(f"%b::{types[col]}[]" for col in cols)
        try:
            self.conn.execute(
                f"INSERT INTO {table} ({', '.join(cols)}) SELECT * FROM unnest({arrays}) "
                f"ON CONFLICT ({', '.join(keys)}) {action}",
                [list(column) for column in zip(*rows)])
        except psycopg.ProgrammingError as exc:
            if exc.sqlstate is not None:  # the server refused: not an adaptation problem
                raise
            super()._insert_or(table, keys, cols, action, rows)

    def insert(self, table: str, cols: Sequence[str], rows: list[Sequence[Any]]) -> None:
        """As Store.insert, as ONE statement taking a binary array per column (as
        `_insert_columns`): a sixth of executemany's client CPU, two thirds of COPY's (whose
        rows psycopg formats one by one in Python). A value psycopg cannot put in a binary
        array falls back to executemany (nothing sent)."""
        import psycopg

        if not rows:
            return
        types = self._column_types(table)
        arrays = ", ".join(f"%b::{types[col]}[]" for col in cols)
        try:
            self.conn.execute(f"INSERT INTO {table} ({', '.join(cols)}) "
                              f"SELECT * FROM unnest({arrays})",
                              [list(column) for column in zip(*rows)])
        except psycopg.ProgrammingError as exc:
            if exc.sqlstate is not None:  # the server refused: not an adaptation problem
                raise
            super().insert(table, cols, rows)

    def _column_types(self, table: str) -> dict[str, str]:
        """{column: its SQL type} of a view table (in the search path), cached."""
        types = self._types.get(table)
        if types is None:
            types = self._types[table] = dict(self.conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                (table,)).fetchall())
        return types

    # A lookup by keys probes the key's index once per key, whatever the table's statistics
    # say. As `key = ANY(array)` it was planned once: psycopg prepares a statement from its
    # fifth execution on, and PostgreSQL then keeps a generic plan made with the table's
    # statistics of that time until it analyses the table again. The followers' tables start
    # empty and grow fast, so that plan was a scan of every row, kept while they grew: in a
    # 15-s run of batches the webhook deriver's four lookups (notifications/units.py) took
    # 4–6 ms a call and a fifth of the server's time (pg_stat_statements; docs/benchmarks.md,
    # the tenth stop). Planned for each call instead (never prepared), `= ANY` of a few
    # hundred keys on a table without fresh statistics is still a scan; a probe per key
    # (a lateral subquery the planner cannot flatten: OFFSET 0) is not. Keys are text (every
    # caller's: the units tables' ids).

    def query_keys(self, table: str, cols: Sequence[str], key: str,
                   values: Sequence[Any]) -> list[tuple]:
        if not values:
            return []
        return self.query(
            f"SELECT {', '.join('found.' + c for c in cols)} FROM unnest(?::text[]) AS wanted(k) "
            f"CROSS JOIN LATERAL (SELECT {', '.join(cols)} FROM {table} "
            f"WHERE {table}.{key} = wanted.k OFFSET 0) AS found", (list(values),), prepare=False)

    def delete_keys(self, table: str, key: str, values: list[Any]) -> None:
        if values:
            self.conn.execute(f"DELETE FROM {table} WHERE {key} = ANY(%s)", (list(values),))

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[None]:
        with self.conn.transaction():
            if durable and self.derived:
                self.conn.execute("SET LOCAL synchronous_commit TO on")
            yield

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        conn = self.conn
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield

    def lock(self, name: str) -> None:
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key(self.schema, name),))

    def close(self) -> None:
        self._conn.close()


def advisory_key(schema: str, name: str) -> int:
    """A signed 64-bit advisory-lock key for (schema, projection name)."""
    digest = hashlib.sha256(f"projections:{schema}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def open_store(database_url: str, derived: bool = False) -> Store:
    """`sqlite:///path` or `postgresql://…?schema=name` → a Store; `derived`: a follower's
    store of rows derived from the log (PostgresStore; SQLite ignores it)."""
    if is_postgres(database_url):
        return PostgresStore(database_url, derived=derived)
    return SQLiteStore(sqlite_path(database_url))
