"""Which aggregate ids the legacy log already holds, one query per bounded chunk.

`LegacyLedger.load` answers for one id per query; a re-run or resumed import asks for every row,
so the importer asks in bulk: PostgreSQL `originator_id = ANY(%s)`, SQLite `IN (?, …)`, on the
recorder's own events table (public attributes of eventsourcing 9.5's recorders). Any other
recorder (POPO) falls back to one `load` per id.
"""

from __future__ import annotations

from typing import Iterable
from uuid import UUID

from eventsourcing.postgres import PostgresAggregateRecorder
from eventsourcing.sqlite import SQLiteAggregateRecorder
from psycopg.sql import SQL, Identifier

CHUNK = 500  # ids per query: far below SQLite's bound-parameter limit


def stored_ids(app, ids: Iterable[UUID]) -> set[UUID]:
    """The subset of `ids` that has a first event (version 1) in `app`'s log."""
    wanted = list(ids)
    found: set[UUID] = set()
    for start in range(0, len(wanted), CHUNK):
        found |= _stored_chunk(app, wanted[start:start + CHUNK])
    return found


def _stored_chunk(app, ids: list[UUID]) -> set[UUID]:
    recorder = app.recorder
    if isinstance(recorder, PostgresAggregateRecorder):
        query = SQL("SELECT originator_id FROM {}.{} WHERE originator_version = 1"
                    " AND originator_id = ANY(%s)").format(
            Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name))
        params: list = [ids]
    elif isinstance(recorder, SQLiteAggregateRecorder):
        query = (f"SELECT originator_id FROM {recorder.events_table_name} WHERE "
                 f"originator_version = 1 AND originator_id IN ({','.join('?' * len(ids))})")
        params = [i.hex for i in ids]
    else:
        return {i for i in ids if app.load(i) is not None}
    with recorder.datastore.transaction(commit=False) as cursor:
        cursor.execute(query, params)
        return {_uuid(row["originator_id"]) for row in cursor.fetchall()}


def _uuid(value) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))
