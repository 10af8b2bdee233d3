"""The ledger's stored events read as plain rows, for the followers (projector, audit).

`select_rows` is the library's `select_notifications` (same range, topics and order) read on
PostgreSQL with one prepared statement in the binary format, each row a `StoredRow` tuple:
the library's own builds a frozen Notification dataclass per row (a setattr per field) and
reads bytea as hex text, about four times the client CPU, which every follower paid for every
event it reads. A `StoredRow` has the attributes the mapper decodes and a stall report names.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from eventsourcing.persistence import InterfaceError, OperationalError
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import retry
from psycopg.rows import tuple_row


class StoredRow(NamedTuple):
    """A stored event: its position (notification id) and what the mapper decodes."""

    id: int
    originator_id: Any
    originator_version: int
    topic: str
    state: bytes


@retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)  # as the library's
def select_rows(recorder: Any, after: int, stop: int, limit: int,
                topics: Sequence[str] = ()) -> list[StoredRow]:
    """Up to `limit` stored events with after < id <= stop (of `topics` if given), in id
    order, from `recorder` (an application recorder: PostgreSQL, or SQLite through its own
    select_notifications)."""
    if not isinstance(recorder, PostgresApplicationRecorder):
        return [StoredRow(n.id, n.originator_id, n.originator_version, n.topic, n.state)
                for n in recorder.select_notifications(start=after, limit=limit, stop=stop,
                                                       topics=topics, inclusive_of_start=False)]
    table = f'"{recorder.datastore.schema}"."{recorder.events_table_name}"'
    where = " AND topic = ANY(%s)" if topics else ""
    params = (after, stop, list(topics), limit) if topics else (after, stop, limit)
    statement = ("SELECT notification_id, originator_id, originator_version, topic, state "
                 f"FROM {table} WHERE notification_id > %s AND notification_id <= %s{where} "
                 "ORDER BY notification_id LIMIT %s")
    with (recorder.datastore.get_connection() as conn,
          conn.cursor(row_factory=tuple_row, binary=True) as cursor):
        cursor.execute(statement, params, prepare=True)
        return list(map(StoredRow._make, cursor.fetchall()))
