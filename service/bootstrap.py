"""Wiring: database URL → eventsourcing environment → Ledger application."""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, unquote, urlparse
from datetime import datetime

from ledger.service import Ledger
from service.settings import Settings


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def postgres_parts(url: str) -> dict[str, str]:
    """host, port, dbname, user, password, schema of a postgresql:// URL."""
    parsed = urlparse(url)
    schema = parse_qs(parsed.query).get("schema", ["public"])[0]
    return {"host": parsed.hostname or "127.0.0.1", "port": str(parsed.port or 5432),
            "dbname": unquote(parsed.path.lstrip("/")) or "postgres",
            "user": unquote(parsed.username or "postgres"),
            "password": unquote(parsed.password or ""), "schema": schema}


def postgres_conninfo(url: str) -> str:
    """A libpq connection string for psycopg (schema excluded)."""
    p = postgres_parts(url)
    return (f"host={p['host']} port={p['port']} dbname={p['dbname']} user={p['user']}"
            + (f" password={p['password']}" if p["password"] else ""))


def sqlite_path(url: str) -> str:
    """The file path of a sqlite:///path URL (`:memory:` allowed)."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"unsupported database URL {url!r}: use sqlite:///path or postgresql://")
    return url[len("sqlite:///"):]


def persistence_env(url: str) -> dict[str, str]:
    """eventsourcing environment for a database URL; creates the SQLite folder or PG schema."""
    if is_postgres(url):
        p = postgres_parts(url)
        ensure_postgres_schema(url)
        return {"PERSISTENCE_MODULE": "eventsourcing.postgres", "POSTGRES_DBNAME": p["dbname"],
                "POSTGRES_HOST": p["host"], "POSTGRES_PORT": p["port"], "POSTGRES_USER": p["user"],
                "POSTGRES_PASSWORD": p["password"], "POSTGRES_SCHEMA": p["schema"],
                "POSTGRES_LOCK_TIMEOUT": "10", "POSTGRES_POOL_SIZE": "5",
                "POSTGRES_MAX_OVERFLOW": "20"}
    path = sqlite_path(url)
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": path,
            "SQLITE_LOCK_TIMEOUT": "30"}


def ensure_postgres_schema(url: str) -> None:
    """CREATE SCHEMA IF NOT EXISTS (eventsourcing requires it to exist)."""
    import psycopg

    schema = postgres_parts(url)["schema"]
    with psycopg.connect(postgres_conninfo(url), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')


def build_ledger(settings: Settings, clock: Callable[[], datetime]) -> Ledger:
    """The Ledger application for these settings, with `clock` injected."""
    env = persistence_env(settings.database_url)
    return Ledger(env=env, clock=clock, policy=settings.policy())


@contextmanager
def ddl_lock(url: str):
    """Serialise table creation across processes: several workers starting at once on a fresh
    PostgreSQL schema otherwise race in CREATE … IF NOT EXISTS ("tuple concurrently updated").
    A no-op for SQLite."""
    if not is_postgres(url):
        yield
        return
    import psycopg

    key = zlib.crc32(f"ledger-ddl:{postgres_parts(url)['schema']}".encode())
    with psycopg.connect(postgres_conninfo(url), autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def open_ledger(settings: Settings, clock: Callable[[], datetime],
                projector_factory: Callable | None = None):
    """(Ledger, Projector) on the configured store; table creation is serialised across
    processes (ddl_lock). `projector_factory(ledger, url, policy)` defaults to Projector."""
    if projector_factory is None:
        from projections import Projector as projector_factory
    with ddl_lock(settings.database_url):
        ledger = build_ledger(settings, clock)
        try:
            return ledger, projector_factory(ledger, settings.database_url, settings.policy())
        except BaseException:
            ledger.close()
            raise
