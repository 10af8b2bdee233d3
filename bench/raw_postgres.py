"""The hardware's pace: raw PostgreSQL on rows shaped like the ledger's stored events.

Every figure of `make bench` (bench/targets.py) is printed beside one of these, measured in the
same run, so the ratio stays meaningful while other work loads the machine.

The table is eventsourcing 9.5's events table (eventsourcing/postgres.py
`PostgresApplicationRecorder`): originator_id uuid, originator_version bigint, topic text,
state bytea, notification_id bigserial; PRIMARY KEY (originator_id, originator_version) and a
UNIQUE index on notification_id. Rows: a fresh uuid per row (version 1), a topic like the
ledger's, a STATE_BYTES-byte state. Plain INSERTs: no table lock and no NOTIFY (those are what
the library adds, and what the ratio is meant to expose).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator

import psutil
import psycopg

from bench.http_load import children_cpu_seconds
from bench.together import run_together
from storage import postgres_conninfo

STATE_BYTES = 300
TOPIC = "ledger.domain:Session.Requested"
TABLE = "stored_events"
DDL = (
    'CREATE TABLE "{schema}".stored_events (originator_id uuid NOT NULL, '
    "originator_version bigint NOT NULL, topic text, state bytea, notification_id bigserial, "
    "PRIMARY KEY (originator_id, originator_version)) WITH (autovacuum_enabled = true, "
    "autovacuum_vacuum_threshold = 100000000, autovacuum_vacuum_scale_factor = 0.5, "
    "autovacuum_analyze_threshold = 1000, autovacuum_analyze_scale_factor = 0.01)",
    'CREATE UNIQUE INDEX stored_events_notification_id_idx ON "{schema}".stored_events '
    "(notification_id ASC)",
)
INSERT = 'INSERT INTO "{schema}".stored_events (originator_id, originator_version, topic, state) ' \
         "VALUES (%s, %s, %s, %s)"


@contextmanager
def raw_schema(base_url: str) -> Iterator[str]:
    """A fresh schema holding an empty events table; yields its name; dropped afterwards."""
    schema = "bench_raw_" + uuid.uuid4().hex[:8]
    with psycopg.connect(postgres_conninfo(base_url), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        for statement in DDL:
            conn.execute(statement.format(schema=schema))
    try:
        yield schema
    finally:
        with psycopg.connect(postgres_conninfo(base_url), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def row() -> tuple:
    """One event-shaped row: (uuid, version 1, topic, STATE_BYTES random bytes)."""
    return uuid.uuid4(), 1, TOPIC, os.urandom(STATE_BYTES)


def insert_rate(base_url: str, clients: int, rows_per_transaction: int,
                seconds: float) -> tuple[float, int]:
    """(rows/s, rows) committed by `clients` threads (one connection each), each committing
    `rows_per_transaction` rows per transaction (executemany) for about `seconds` seconds."""
    with raw_schema(base_url) as schema:
        sql = INSERT.format(schema=schema)
        counts = [0] * clients
        deadline = [0.0]

        def client(index: int, ready: threading.Barrier) -> None:
            with psycopg.connect(postgres_conninfo(base_url)) as conn:
                ready.wait()
                while time.perf_counter() < deadline[0]:
                    rows = [row() for _ in range(rows_per_transaction)]
                    with conn.transaction(), conn.cursor() as cursor:
                        cursor.executemany(sql, rows)
                    counts[index] += rows_per_transaction

        def arm() -> float:
            deadline[0] = time.perf_counter() + seconds
            return time.perf_counter()

        elapsed = run_together(clients, client, arm)
        return sum(counts) / elapsed, sum(counts)


def server_cpu(base_url: str) -> Callable[[], float] | None:
    """A function giving the PostgreSQL server's CPU seconds so far (its postmaster, the
    children it has reaped, and its live children: backends, WAL writer, checkpointer,
    autovacuum; psutil), or None when the server's processes are not visible here (another
    host or PID namespace). The whole server counts, every database and client of it: the
    bench's own connections, and on a shared machine anybody else's."""
    with psycopg.connect(postgres_conninfo(base_url)) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    try:
        server = psutil.Process(backend)
        postmaster = server.parent()
        if postmaster is None or not all(p.name() in ("postgres", "postmaster")
                                         for p in (server, postmaster)):
            return None
    except psutil.Error:
        return None

    def seconds() -> float:
        times = postmaster.cpu_times()  # its own, then its reaped children's
        return (times.user + times.system + times.children_user + times.children_system
                + children_cpu_seconds(postmaster.pid))

    return seconds


def scan_rate(base_url: str, schema: str, table: str = TABLE) -> tuple[int, float]:
    """(rows, rows/s) reading every row of `schema`.`table` (an events table) in notification
    order into Python: a server-side cursor, 5,000 rows a fetch, nothing decoded. This is what
    a replay must read at the least."""
    with psycopg.connect(postgres_conninfo(base_url)) as conn:
        started = time.perf_counter()
        with conn.cursor(name="scan") as cursor:
            cursor.itersize = 5000
            cursor.execute(f'SELECT notification_id, originator_id, originator_version, '
                           f'topic, state FROM "{schema}".{table} ORDER BY notification_id')
            count = sum(1 for _ in cursor)
        return count, count / (time.perf_counter() - started)


def vacuum(base_url: str, schema: str, table: str = TABLE) -> None:
    """VACUUM ANALYZE a freshly bulk-loaded table, as autovacuum would have by the time a
    store of this size is replayed (hint bits set, statistics current)."""
    with psycopg.connect(postgres_conninfo(base_url), autocommit=True) as conn:
        conn.execute(f'VACUUM ANALYZE "{schema}".{table}')
