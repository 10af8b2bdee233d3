"""Leader election for the tick: a PostgreSQL session advisory lock on a dedicated connection.

Only the holder ticks, so several API workers don't repeat work. Correctness never depends on
it: every tick decision is idempotent by construction (billing-rules.md I1, I9).
"""

from __future__ import annotations

import logging
import zlib

from storage import connect_options

log = logging.getLogger(__name__)


def lock_key(schema: str) -> int:
    """Advisory lock id of the tick of the ledger in `schema`: one leader per ledger, not per DB."""
    return zlib.crc32(f"ledger-tick:{schema}".encode())


class AlwaysLeader:
    """The embedded SQLite default runs one process: it is always the leader."""

    def is_leader(self) -> bool:
        return True

    def close(self) -> None:
        return None


class PostgresLeader:
    """Holds `pg_try_advisory_lock(key)` on its own connection while the process lives.

    A dead process's connection closes and frees the lock, so another worker takes over.
    """

    def __init__(self, conninfo: str, key: int, timeout_seconds: int = 5) -> None:
        self._conninfo = conninfo
        self._key = key
        self._timeout_seconds = timeout_seconds
        self._conn = None
        self._held = False
        self.last_error: str | None = None  # why the last is_leader() could not ask the database

    def is_leader(self) -> bool:
        """True if this process holds the lock (acquiring it if free); False on any DB error."""
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self._conninfo, autocommit=True,
                                             **connect_options(self._timeout_seconds))
                self._held = False
            if self._held:
                self._conn.execute("SELECT 1")  # the lock lives as long as this connection
            else:
                self._held = bool(self._conn.execute(
                    "SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()[0])
            self.last_error = None
            return self._held
        except psycopg.Error as exc:
            self.last_error = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            self.close()
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._held = None, False
