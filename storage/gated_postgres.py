"""eventsourcing's PostgreSQL persistence with a fail-fast gate: `PERSISTENCE_MODULE` =
`storage.gated_postgres:GatedPostgresFactory` (set by `persistence_env`).

Every connection the event store takes goes through `StoreGate.check()` (storage/availability.py):
while the database is known to be unreachable, a call fails at once with StoreUnavailable
instead of waiting out eventsourcing's ten retries of the pool timeout each. A pool timeout
closes the gate; the next probe that connects opens it again, so the service recovers without a
restart. New connections get a bounded connect and TCP keepalives (`connect_options`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from eventsourcing.persistence import OperationalError
from eventsourcing.postgres import PostgresDatastore, PostgresFactory
from psycopg_pool import PoolTimeout

from storage.availability import StoreGate, StoreUnavailable, connect_options, gate_for
from storage.streams import PostgresStreamsRecorder

STORE_TIMEOUT_SECONDS = "LEDGER_STORE_TIMEOUT_SECONDS"  # environment key read by the factory


class GatedPostgresDatastore(PostgresDatastore):
    """A PostgresDatastore whose connections pass the process's StoreGate first."""

    gate: StoreGate

    @contextmanager
    def get_connection(self) -> Iterator[Any]:
        self.gate.check()
        used = None
        try:
            with super().get_connection() as conn:
                used = conn
                yield conn
        except OperationalError as exc:
            if isinstance(exc.__cause__, PoolTimeout):  # no connection could be had in time
                self.gate.failed(exc, probed=True)
                raise StoreUnavailable(f"the event store is unreachable: {exc}") from exc
            if used is not None and used.broken:
                # A pooled connection died: the server restarted (a retry on a fresh connection
                # succeeds) or is gone (a retry would wait out the pool). One probe tells which.
                self.gate.verify()
            raise


class GatedPostgresFactory(PostgresFactory):
    """PostgresFactory whose datastore is a GatedPostgresDatastore, and whose application
    recorder also reads many aggregates' events at once (storage/streams.py)."""

    application_recorder_class = PostgresStreamsRecorder

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        datastore = self.datastore
        # The base factory builds its PostgresDatastore inline; the subclass adds only a method
        # and an attribute, so re-classing the instance is exact and keeps every argument.
        datastore.__class__ = GatedPostgresDatastore
        timeout = int(self.env.get(STORE_TIMEOUT_SECONDS) or 3)
        kwargs = datastore.pool.kwargs  # the pool is not open yet: new connections get these
        datastore.gate = gate_for(_conninfo(kwargs), timeout)
        kwargs.update(connect_options(timeout))


def _conninfo(kwargs: dict) -> str:
    """A libpq connection string of the pool's target (the gate's key and probe)."""
    parts = {"host": kwargs["host"], "port": kwargs["port"], "dbname": kwargs["dbname"],
             "user": kwargs["user"]}
    if kwargs.get("password"):
        parts["password"] = kwargs["password"]
    return " ".join(f"{key}={value}" for key, value in parts.items())


def pool_usage(datastore: Any) -> dict[str, int] | None:
    """`{"size", "idle", "max", "waiting"}` connections of an eventsourcing PostgreSQL
    datastore's pool (psycopg_pool statistics); None for other stores."""
    pool = getattr(datastore, "pool", None)
    get_stats = getattr(pool, "get_stats", None)
    if get_stats is None:
        return None
    stats = get_stats()
    return {"size": stats.get("pool_size", 0), "idle": stats.get("pool_available", 0),
            "max": stats.get("pool_max", 0), "waiting": stats.get("requests_waiting", 0)}
