"""Recorded time: when the ledger decided what it stored, by its own (injected) clock.

Every stored event carries a `timestamp`. The eventsourcing library stamps it with the wall
clock as the event is created; the ledger's aggregates stamp it instead with the instant the
command that created it was decided, read once from the ledger's clock (UTC, whole seconds):
`Ledger.ingest` and the tick wrap each decision in `recording_at(now)`, so every event of one
command carries the same recorded time, and a simulation's manual clock records simulated time.
Outside such a command (a script building aggregates by hand) the library's wall clock applies.

Recorded time is not event time: `occurred_at` and the instants inside events say when something
happened; the recorded time says when the ledger learnt it (docs/audit.md, "Two times").
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Iterator

from eventsourcing.domain import Aggregate, datetime_now_with_tzinfo

_recorded_at: ContextVar[datetime | None] = ContextVar("recorded_at", default=None)


@contextmanager
def recording_at(moment: datetime) -> Iterator[datetime]:
    """Stamp every ledger event created inside the block with `moment` (aware UTC datetime)."""
    if moment.tzinfo is None:
        raise ValueError("recorded time must be timezone-aware")
    token = _recorded_at.set(moment)
    try:
        yield moment
    finally:
        _recorded_at.reset(token)


def recorded_now() -> datetime:
    """The recorded time of an event created now: the enclosing command's, else the wall clock
    (the library's default, for aggregates built outside a ledger command)."""
    moment = _recorded_at.get()
    return moment if moment is not None else datetime_now_with_tzinfo()


class LedgerAggregate(Aggregate):
    """Base of the ledger's aggregates: their events carry the recorded time (`recorded_now`).

    Adds no event of its own; stored topics stay `ledger.<module>:<Aggregate>.<Event>`.
    """

    class Event(Aggregate.Event):
        @staticmethod
        def create_timestamp() -> datetime:
            return recorded_now()

    class Created(Event, Aggregate.Created):
        pass

    class Snapshot(Aggregate.Snapshot):
        """A snapshot of a ledger aggregate (docs/design.md, Write path), stamped with the
        recorded time like the events: the ledger reads no wall clock for what it stores."""

        @staticmethod
        def create_timestamp() -> datetime:
            return recorded_now()
