"""Whether the database answers: a per-process gate that turns an outage into a fast refusal.

eventsourcing retries a failed PostgreSQL call 10 times and waits up to the pool timeout on
each, so without a gate one request during an outage hangs for minutes. The gate is told when a
connection cannot be had (`failed`); from then on `check()` raises StoreUnavailable at once,
probing the database (one short connection) at most once per `probe_interval_seconds`, until a
probe succeeds. StoreUnavailable is not an eventsourcing OperationalError, so the library's
retry loop does not repeat it. `is_unavailable(exc)` says whether an exception means "the store
cannot be reached or is too busy now (e.g. a connection pool timed out); the same request may
succeed later" (API: 503 `retry_later`; tick: skipped).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Callable

import psycopg
from eventsourcing.persistence import ConnectionUnavailableError, InterfaceError, OperationalError

PROBE_INTERVAL_SECONDS = 1.0


class StoreUnavailable(Exception):
    """The event store cannot be reached now (connection refused, pool timeout, gate closed)."""


def connect_options(timeout_seconds: int) -> dict[str, int]:
    """libpq options for every connection the service opens: a bounded connect and TCP
    keepalives, so a silently lost peer is noticed in about timeout + 10 s, not hours."""
    return {"connect_timeout": max(1, int(timeout_seconds)), "keepalives": 1,
            "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}


class StoreGate:
    """Per-process knowledge of whether one database answers. Thread-safe.

    `probe()` returns normally if the database answers and raises otherwise (it must be
    bounded by its own connect timeout).
    """

    def __init__(self, probe: Callable[[], None],
                 probe_interval_seconds: float = PROBE_INTERVAL_SECONDS) -> None:
        self._probe = probe
        self._interval = probe_interval_seconds
        self._probing = threading.Lock()
        self._up = True
        self._last_probe = float("-inf")
        self.last_error: str | None = None

    @property
    def up(self) -> bool:
        """False from a failed connection until a probe succeeds."""
        return self._up

    def failed(self, error: BaseException | str, probed: bool = False) -> None:
        """A connection could not be had; `probed`: this failure counts as this interval's probe."""
        self._up = False
        self.last_error = str(error)[:300]
        if probed:
            self._last_probe = time.monotonic()

    def verify(self) -> None:
        """Probe now: return if the database answers; else close the gate and raise
        StoreUnavailable (a connection just broke, and retrying would only wait)."""
        try:
            self._probe()
        except Exception as exc:  # noqa: BLE001 - any failure to answer means down
            self.failed(exc, probed=True)
            raise StoreUnavailable(f"the event store is unreachable: {exc}") from None

    def check(self) -> None:
        """Return if the store is up (probing it if due); raise StoreUnavailable otherwise."""
        if self._up:
            return
        if not self._probing.acquire(blocking=False):  # another thread is probing: don't queue
            raise StoreUnavailable(f"the event store is unreachable: {self.last_error}")
        try:
            if time.monotonic() - self._last_probe < self._interval:
                raise StoreUnavailable(f"the event store is unreachable: {self.last_error}")
            self._last_probe = time.monotonic()
            try:
                self._probe()
            except Exception as exc:  # noqa: BLE001 - any failure to answer keeps it down
                self.last_error = str(exc)[:300]
                raise StoreUnavailable(f"the event store is unreachable: {exc}") from None
            self._up, self.last_error = True, None
        finally:
            self._probing.release()


_gates: dict[str, StoreGate] = {}
_gates_lock = threading.Lock()


def gate_for(conninfo: str, timeout_seconds: int = 3) -> StoreGate:
    """The process's gate for the PostgreSQL database of `conninfo` (one per database)."""
    with _gates_lock:
        gate = _gates.get(conninfo)
        if gate is None:
            gate = StoreGate(lambda: probe_postgres(conninfo, timeout_seconds))
            _gates[conninfo] = gate
        return gate


def probe_postgres(conninfo: str, timeout_seconds: int) -> None:
    """Open one connection and run SELECT 1; raises psycopg.OperationalError if unreachable."""
    with psycopg.connect(conninfo, autocommit=True,
                         **connect_options(timeout_seconds)) as conn:
        conn.execute("SELECT 1")


_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "unable to open database",
                     "disk i/o error")


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) means the store is unreachable or
    too busy now: a closed gate, psycopg connection failures and pool timeouts, a locked or
    unopenable SQLite file. Not constraint violations or bad SQL (SQLite reports "no such
    table" as an OperationalError too), which retrying cannot cure."""
    seen = 0
    while exc is not None and seen < 8:  # bounded walk of the cause chain
        if isinstance(exc, (StoreUnavailable, psycopg.OperationalError, psycopg.InterfaceError,
                            ConnectionUnavailableError)):  # a pool timeout, e.g. SQLite's writer
            return True
        if isinstance(exc, sqlite3.OperationalError):
            return any(text in str(exc).lower() for text in _SQLITE_TRANSIENT)
        cause = exc.__cause__ or exc.__context__
        if cause is None and isinstance(exc, (OperationalError, InterfaceError)):
            return any(text in str(exc).lower() for text in _SQLITE_TRANSIENT) or \
                "connection" in str(exc).lower()
        exc, seen = cause, seen + 1
    return False


def probe_store(url: str, timeout_seconds: int = 3) -> None:
    """Raise (psycopg.OperationalError) unless the database of `url` answers; SQLite files are
    local and always answer here."""
    from storage.urls import is_postgres, postgres_conninfo

    if is_postgres(url):
        probe_postgres(postgres_conninfo(url), timeout_seconds)
