"""Where an aggregate's events sit in the ledger's log, and which backend event recorded them.

A position is the event's notification id (the order of the whole log; docs/audit.md). The
backend `event_id` of a session event is the id of the `Receipt` written in the same commit:
the ledger saves a decision's events and then its receipt in one transaction (ledger/application.py
`Ledger.ingest`), so the receipt is the first one after the event, recorded at the same instant,
and its result names the session. Events the tick wrote (charges, timeouts, settlement) have
no receipt in their commit: `event_ids` gives them none.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import get_topic

from ledger.domain import Receipt

RECEIPT_TOPIC = get_topic(Receipt.Recorded)
COMMIT_SCAN = 64  # positions after an event searched for its commit's receipt
MAX_EVENTS = 2000  # an aggregate's events shown on one page


def positions(ledger: Any, aggregate_id: UUID) -> dict[int, int]:
    """originator_version → position of every stored event of `aggregate_id` (one indexed
    query; empty for an in-memory store, which has no positions to show)."""
    recorder = ledger.recorder
    if isinstance(recorder, SQLiteApplicationRecorder):
        sql = (f"SELECT rowid AS position, originator_version FROM {recorder.events_table_name} "
               "WHERE originator_id = ? ORDER BY originator_version LIMIT ?")
        params: tuple = (aggregate_id.hex, MAX_EVENTS)
    elif isinstance(recorder, PostgresApplicationRecorder):
        table = f'"{recorder.datastore.schema}"."{recorder.events_table_name}"'
        sql = (f"SELECT notification_id AS position, originator_version FROM {table} "
               "WHERE originator_id = %s ORDER BY originator_version LIMIT %s")
        params = (aggregate_id, MAX_EVENTS)
    else:
        return {}
    with recorder.datastore.transaction(commit=False) as cursor:
        cursor.execute(sql, params)
        return {int(row["originator_version"]): int(row["position"]) for row in cursor.fetchall()}


def event_ids(ledger: Any, session_id: str, events: list[Any],
              where: dict[int, int]) -> dict[int, dict]:
    """originator_version → {"event_id", "type"} of the backend event whose commit wrote each
    of the session's `events` (see the module docstring); versions the tick wrote are absent."""
    found: dict[int, dict] = {}
    cache: dict[int, dict | None] = {}
    for event in events:
        position = where.get(event.originator_version)
        if position is None:
            continue
        receipt = _receipt_after(ledger, position, cache)
        if receipt is None:
            continue
        result = receipt.result or {}
        if result.get("session_id") == session_id and receipt.created_on == event.timestamp:
            found[event.originator_version] = {"event_id": receipt.event_id,
                                               "type": receipt.event_type}
    return found


def _receipt_after(ledger: Any, position: int, cache: dict[int, Any]) -> Any | None:
    """The first Receipt stored after `position` and within COMMIT_SCAN positions of it (one
    notification read, filtered by topic), or None."""
    if position in cache:
        return cache[position]
    rows = ledger.recorder.select_notifications(start=position, limit=1,
                                                stop=position + COMMIT_SCAN,
                                                topics=(RECEIPT_TOPIC,), inclusive_of_start=False)
    receipt = ledger.repository.get(rows[0].originator_id, version=1) if rows else None
    cache[position] = receipt
    return receipt
