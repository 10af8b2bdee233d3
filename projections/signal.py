"""PostgreSQL wake-ups and leadership for the background projector (projections/projector.py).

One thread per process with its own connection: LISTENs on the event store's NOTIFY channel
(eventsourcing's insert function notifies it in every write transaction, from any process) and
calls `wake()` on each notification, at most every `poll_seconds` otherwise; and holds, or
keeps trying for, a session-level advisory lock per schema: the process that holds it is the
one whose background thread projects, so several workers do not decode the same batches only
to lose the tracking compare-and-set. If that process dies its connection closes, the lock is
released and another worker's next poll takes it. Losing the connection drops leadership until
it is re-opened (bounded backoff); a catch-up run by anyone else (the tick, a reader) stays
correct regardless, through the per-projection transaction lock and the tracking CAS.
"""

from __future__ import annotations

import logging
import threading

from projections.store import advisory_key
from storage import connect_options, postgres_conninfo, postgres_parts

log = logging.getLogger("ledger.projections")
RECONNECT_MAX_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 3


class PostgresSignal:
    """`leader` (bool, read by the projector's thread) and `wake()` calls, until `close()`."""

    def __init__(self, database_url: str, channel: str | None, wake, poll_seconds: float) -> None:
        self.url, self.channel, self.wake = database_url, channel, wake
        self.poll_seconds = max(0.01, poll_seconds)
        self.key = advisory_key(postgres_parts(database_url)["schema"], "background-projector")
        self.leader = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="projector-signal", daemon=True)

    def start(self) -> "PostgresSignal":
        self._thread.start()
        return self

    def _run(self) -> None:
        delay = self.poll_seconds
        while not self._stop.is_set():  # a service loop: ends with close()
            try:
                self._listen()
                delay = self.poll_seconds
            except Exception as exc:  # noqa: BLE001 - reconnect with a bounded backoff
                log.warning("projector signal connection lost (%s); retrying in %.1f s",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__, delay)
            self.leader = False
            self.wake()  # whatever happened meanwhile, look once
            self._stop.wait(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _listen(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(postgres_conninfo(self.url), autocommit=True,
                             **connect_options(CONNECT_TIMEOUT_SECONDS)) as conn:
            if self.channel:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            while not self._stop.is_set():
                if not self.leader:
                    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
                    self.leader = bool(row and row[0])
                    if self.leader:
                        log.info("this process runs the background projector")
                        self.wake()
                for _ in conn.notifies(timeout=self.poll_seconds, stop_after=1):
                    self.wake()

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening; the connection closes, releasing the leadership lock."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
