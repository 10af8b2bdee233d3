"""The event logs the audit follows, and how far each can safely be read.

A `Log` is one eventsourcing application's notification log under a chain name: `ledger` (the
Ledger's events) or `legacy` (imported legacy facts and reconciliation adjustments, a separate
store: legacy/log.py). Positions are notification ids: increasing, not dense.

Safe head (docs/audit.md "How far behind the head"): a follower must never pass a position
that a transaction still running could fill, or it would skip an event committed late (a hash
chain cannot take it back in). PostgreSQL: the head is read, then the transactions holding a
write lock on the events table at that moment (`pg_locks`: an INSERT takes RowExclusiveLock
before it draws its notification id, so every id at or below the head that is not yet visible
belongs to one of them); the head is safe once each of them has ended — committed (now
visible) or rolled back (a permanent gap). That wait is bounded (`SAFE_HEAD_WAIT_SECONDS`); a
follower that times out stays where it is and retries at its next poll. SQLite: one writer at a
time and commit in rowid order, so the visible head is safe at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, Sequence

from eventsourcing.postgres import PostgresApplicationRecorder

from projections.stored import StoredRow, select_rows

PAGE = 2000  # notifications per read
SAFE_HEAD_WAIT_SECONDS = 15.0  # at most this long for writers in flight (PG lock_timeout is 10)
# A stored event: a tuple (position, originator_id, originator_version, topic, state) with those
# attributes (`id` for the position), which the mapper decodes.
Row = StoredRow
_WRITE_MODES = ("RowExclusiveLock", "ShareRowExclusiveLock", "ExclusiveLock",
                "AccessExclusiveLock")


@dataclass
class Log:
    """One stored event log: `chain` name and the eventsourcing application that holds it."""

    chain: str
    app: Any

    @property
    def recorder(self) -> Any:
        return self.app.recorder

    def head(self) -> int:
        """The highest visible position (0 for an empty log)."""
        return int(self.recorder.max_notification_id() or 0)

    def safe_head(self, wait_seconds: float = SAFE_HEAD_WAIT_SECONDS) -> int | None:
        """A position no running transaction can still fill below; None if writers in flight
        did not finish within `wait_seconds` (try again later)."""
        if not isinstance(self.recorder, PostgresApplicationRecorder):
            return self.head()
        head, writers = self._head_and_writers()
        deadline = time.monotonic() + wait_seconds
        pause = 0.001
        while writers:
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            writers = self._still_writing(writers)
        return head

    def _table(self) -> str:
        recorder = self.recorder
        return f'"{recorder.datastore.schema}"."{recorder.events_table_name}"'

    def _head_and_writers(self) -> tuple[int, list[str]]:
        """The head, then (after it) the transactions holding a write lock on the table."""
        head = self.head()
        with self.recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute("SELECT DISTINCT virtualtransaction FROM pg_locks WHERE granted "
                           "AND relation = to_regclass(%s) AND mode = ANY(%s) "
                           "AND pid <> pg_backend_pid()", (self._table(), list(_WRITE_MODES)))
            return head, [row["virtualtransaction"] for row in cursor.fetchall()]

    def _still_writing(self, writers: list[str]) -> list[str]:
        with self.recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute("SELECT DISTINCT virtualtransaction FROM pg_locks WHERE granted "
                           "AND relation = to_regclass(%s) AND virtualtransaction = ANY(%s)",
                           (self._table(), writers))
            return [row["virtualtransaction"] for row in cursor.fetchall()]

    def pages(self, after: int, stop: int, page: int = PAGE,
              topics: Sequence[str] = ()) -> Iterator[list[Row]]:
        """Stored events with after < position ≤ stop, in position order, `page` at a time
        (at most stop / page + 1 pages: each full page advances at least `page` ids); each a
        `Row` (projections/stored.py `select_rows`: about a fifth of the client CPU of the
        library's `select_notifications`, which the audit paid for every event of the log)."""
        for _ in range(max(0, stop - after) // page + 2):
            if after >= stop:
                return
            rows = select_rows(self.recorder, after, stop, page, topics)
            if rows:
                yield rows
            if len(rows) < page:
                return
            after = rows[-1].id

    def decode(self, row: Row) -> Any:
        """The domain event of a stored row."""
        return self.app.mapper.to_domain_event(row)

    def recorded_at(self, notification: Any) -> datetime:
        """The recorded time (`timestamp`) of a stored event (a Notification or a `Row`),
        in UTC."""
        event = self.app.mapper.to_domain_event(notification)
        return event.timestamp.astimezone(timezone.utc)

    def notification_at(self, position: int) -> Any | None:
        """The stored event at `position`, or None."""
        rows = self.recorder.select_notifications(start=position, limit=1, stop=position)
        return rows[0] if rows else None

