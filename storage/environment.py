"""The eventsourcing persistence environment of a database URL, schema creation and the
start-up DDL lock."""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from pathlib import Path

from storage.availability import connect_options
from storage.gated_postgres import STORE_TIMEOUT_SECONDS
from storage.urls import is_postgres, postgres_conninfo, postgres_parts, sqlite_path


# The stored format stays eventsourcing's JSON; only decoding is faster (storage/transcoder.py).
TRANSCODER = {"TRANSCODER_TOPIC": "storage.transcoder:FastJSONTranscoder"}


def persistence_env(url: str, timeout_seconds: int = 3) -> dict[str, str]:
    """eventsourcing environment for a database URL; creates the SQLite folder or PG schema.

    PostgreSQL goes through the fail-fast gate (storage/gated_postgres.py): `timeout_seconds`
    bounds the wait for a pool connection and each connect, so an outage is answered within
    about that time instead of hanging.
    """
    if is_postgres(url):
        p = postgres_parts(url)
        ensure_postgres_schema(url, timeout_seconds)
        return {**TRANSCODER, "PERSISTENCE_MODULE": "storage.gated_postgres:GatedPostgresFactory",
                STORE_TIMEOUT_SECONDS: str(timeout_seconds),
                "POSTGRES_CONNECT_TIMEOUT": str(timeout_seconds),
                "POSTGRES_DBNAME": p["dbname"],
                "POSTGRES_HOST": p["host"], "POSTGRES_PORT": p["port"], "POSTGRES_USER": p["user"],
                "POSTGRES_PASSWORD": p["password"], "POSTGRES_SCHEMA": p["schema"],
                "POSTGRES_LOCK_TIMEOUT": "10", "POSTGRES_POOL_SIZE": "5",
                "POSTGRES_MAX_OVERFLOW": "20"}
    path = sqlite_path(url)
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return {**TRANSCODER, "PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": path,
            "SQLITE_LOCK_TIMEOUT": "30",
            "APPLICATION_RECORDER_TOPIC": "storage.streams:SQLiteStreamsRecorder"}


def ensure_postgres_schema(url: str, timeout_seconds: int = 3) -> None:
    """CREATE SCHEMA IF NOT EXISTS (eventsourcing requires it to exist)."""
    import psycopg

    schema = postgres_parts(url)["schema"]
    with psycopg.connect(postgres_conninfo(url), autocommit=True,
                         **connect_options(timeout_seconds)) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')


@contextmanager
def ddl_lock(url: str, timeout_seconds: int = 10):
    """Serialise table creation across processes: several workers starting at once on a fresh
    PostgreSQL schema otherwise race in CREATE … IF NOT EXISTS ("tuple concurrently updated").
    A no-op for SQLite."""
    if not is_postgres(url):
        yield
        return
    import psycopg

    key = zlib.crc32(f"ledger-ddl:{postgres_parts(url)['schema']}".encode())
    with psycopg.connect(postgres_conninfo(url), autocommit=True,
                         **connect_options(timeout_seconds)) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
