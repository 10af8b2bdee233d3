"""Tracking of the audit followers: where each stands, advanced exactly once.

Like the projector (projections/projector.py): a follower applies a batch and moves its
tracking row in ONE transaction, with a compare-and-set from the position it read the batch at.
If the row has moved (another process applied that batch first) the transaction is rolled
back and the follower re-reads; on PostgreSQL an advisory transaction lock per follower makes
concurrent followers queue instead of racing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from audit import schema


class LostRace(Exception):
    """The tracking row moved since the batch was read: roll back and re-read."""


@dataclass(frozen=True)
class Tracked:
    """A follower's tracking row: last applied `position`, and for a chain its head link (hex),
    chained `events` and the head's recorded time; for the history the running maximum of
    recorded times."""

    name: str
    position: int
    link: str | None
    events: int
    recorded_at: datetime | None


def create_tables(store: Any) -> None:
    """Create the audit tables if absent (idempotent; serialised by the store's DDL lock)."""
    types = schema.ddl_types(store)
    with store.locked(), store.transaction():
        store.lock("audit-ddl")
        for statement in schema.ALL:
            store.execute(statement.format(**types))


def read(store: Any, name: str) -> Tracked:
    """The tracking row `name`; position 0 (nothing applied) if there is none yet."""
    with store.locked():
        rows = store.query("SELECT position, link, events, recorded_at FROM audit_tracking "
                           "WHERE name = ?", (name,))
    if not rows:
        return Tracked(name, 0, None, 0, None)
    position, link, events, recorded_at = rows[0]
    return Tracked(name, int(position), link, int(events), store.from_ts(recorded_at))


def advance(store: Any, old: Tracked, new: Tracked) -> None:
    """Inside the caller's transaction: move `old.name` from old.position to new.position
    (greater), or raise LostRace if another process moved it first."""
    assert new.position > old.position, "tracking only moves forward"
    changed = store.execute(
        "UPDATE audit_tracking SET position = ?, link = ?, events = ?, recorded_at = ? "
        "WHERE name = ? AND position = ?",
        (new.position, new.link, new.events, store.ts(new.recorded_at), old.name, old.position))
    if changed == 0 and old.position == 0:
        changed = store.execute(
            "INSERT INTO audit_tracking (name, position, link, events, recorded_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
            (new.name, new.position, new.link, new.events, store.ts(new.recorded_at)))
    if changed != 1:
        raise LostRace(old.name)
