"""Reading many aggregates' events with one query: the event store's recorders for PostgreSQL
and SQLite with `select_streams`, which the ledger uses to load a unit of work's aggregates
together (ledger/application.py `Ledger.load_many`; docs/design.md, Write path).

With `snapshots` (the name of the application's snapshots table, in the same database), the same
statement also reads, for each id not known yet (`after` 0), its latest snapshot, and then only
the events after the snapshot's version: the snapshot comes first in that id's list, as the
record it is stored as (its topic is the snapshot class's; the mapper decodes it to a Snapshot,
whose `mutate` rebuilds the aggregate).

Each recorder is the library's own with one read-only method added; writes, the table lock and
the notification order are untouched. PostgreSQL's is set on the gated factory
(storage/gated_postgres.py); SQLite's through `APPLICATION_RECORDER_TOPIC`
(storage/environment.py).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence
from uuid import UUID

import psycopg
from eventsourcing.persistence import (InterfaceError, Notification, OperationalError,
                                       ProgrammingError, StoredEvent)
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import retry
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Composed, Identifier

SQLITE_CHUNK = 400  # ids per SQLite statement (two parameters each; SQLite allows 32,766)


# One aggregate's events after a version, as a LATERAL subquery per requested id. OFFSET 0
# keeps PostgreSQL from pulling it up into a join: on a table not yet analyzed (a new store,
# the first minute after a bulk import; autovacuum analyzes later) the planner otherwise
# hash-joins the ids against a sequential scan of the whole events table, a cost that grows
# with the log (3-4 ms at 20k events against 0.2 ms by the index; docs/design.md).
EVENTS_AFTER = ("SELECT originator_id, originator_version, topic, state FROM {schema}.{table} "
                "WHERE originator_id = k.id AND originator_version > {after} "
                "ORDER BY originator_version OFFSET 0")


def _grouped(records: list[StoredEvent]) -> dict[UUID, list[StoredEvent]]:
    streams: dict[UUID, list[StoredEvent]] = {}
    for record in records:
        streams.setdefault(record.originator_id, []).append(record)
    return streams


class PostgresStreamsRecorder(PostgresApplicationRecorder):
    """PostgresApplicationRecorder + `select_streams`, and the library's insert with the rows
    sent as four arrays (one per column) instead of one array of a composite type: psycopg
    dumps a composite array element by element in Python (about 30 µs CPU a row, 10 % of a
    tick). Same statement shape otherwise: table lock, NOTIFY, one INSERT …
    SELECT FROM unnest(…) RETURNING notification_id, in the rows' order. The arrays go in
    psycopg's binary format (`%b`): its text format quotes every element with a regex (15 µs a
    row against 3 µs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.insert_columns_statement = SQL(
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%b::{id_type}[], %b::bigint[], %b::text[], %b::bytea[]) "
            "RETURNING notification_id"
        ).format(schema=Identifier(self.datastore.schema),
                 table=Identifier(self.events_table_name),
                 id_type=Identifier(self.datastore.originator_id_type))

    def _insert_stored_events(self, curs: Any, stored_events: Sequence[StoredEvent],
                              **kwargs: Any) -> None:
        self._lock_table(curs)
        self._notify_channel(curs)
        curs.execute(self.insert_columns_statement,
                     ([e.originator_id for e in stored_events],
                      [e.originator_version for e in stored_events],
                      [e.topic for e in stored_events],
                      [e.state for e in stored_events]), prepare=True)

    def _fetch_ids_after_insert_events(self, curs: Any, stored_events: Sequence[StoredEvent],
                                       **kwargs: Any) -> Sequence[int] | None:
        """The library's method (the inserted rows' notification ids, in the rows' order;
        eventsourcing's ProgrammingError if they cannot be read) with the rows read as tuples:
        its dict rows were 3 % of a tick's CPU."""
        assert curs.statusmessage and curs.statusmessage.startswith("INSERT"), curs.statusmessage
        curs.row_factory = tuple_row  # applies to the result just returned, too
        try:
            return [notification_id for notification_id, in curs.fetchall()]
        except psycopg.ProgrammingError as exc:
            raise ProgrammingError("Couldn't get all notification IDs "
                                   f"(expected {len(stored_events)})") from exc

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def select_notifications(self, start: int | None, limit: int, stop: int | None = None,
                             topics: Sequence[str] = (), *, inclusive_of_start: bool = True
                             ) -> list[Notification]:
        """The library's `select_notifications` (same arguments and result: the events with
        start ≤ (or <) notification id ≤ stop, of `topics` if given, in notification order,
        at most `limit`) read as plain tuples: psycopg's dict rows were 6 % of the service's
        CPU under batches, where three followers (projector, audit, webhook deriver) read
        every event."""
        conditions, params = [], []
        if start is not None:
            conditions.append("notification_id >= %s" if inclusive_of_start
                              else "notification_id > %s")
            params.append(start)
        if stop is not None:
            conditions.append("notification_id <= %s")
            params.append(stop)
        if topics:
            conditions.append("topic = ANY(%s)")
            params.append(list(topics))
        where = SQL(" WHERE " + " AND ".join(conditions)) if conditions else SQL("")
        statement = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state "
            "FROM {schema}.{table}{where} ORDER BY notification_id LIMIT %s"
        ).format(schema=Identifier(self.datastore.schema),
                 table=Identifier(self.events_table_name), where=where)
        with (self.datastore.get_connection() as conn,
              conn.cursor(row_factory=tuple_row) as curs):
            curs.execute(statement, (*params, limit), prepare=True)
            return [Notification(id=notification_id, originator_id=originator_id,
                                 originator_version=version, topic=topic, state=bytes(state))
                    for notification_id, originator_id, version, topic, state in curs.fetchall()]

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def select_streams(self, after: Mapping[UUID, int],
                       snapshots: str | None = None) -> dict[UUID, list[StoredEvent]]:
        """{aggregate id: its stored events with version > after[id], in version order} for
        every id that has some, in one statement (the primary key indexes serve each id).
        With `snapshots` (a table name): for an id whose after[id] is 0, its latest snapshot
        (if any) first, then only the events after it."""
        if not after:
            return {}
        statement = self.streams_statement(snapshots if not all(after.values()) else None)
        ids = list(after)
        # Plain tuples: psycopg's dict rows cost 5 % of a tick's CPU here.
        with (self.datastore.get_connection() as conn,
              conn.cursor(row_factory=tuple_row) as curs):
            curs.execute(statement, (ids, [after[i] for i in ids]), prepare=True)
            return _grouped([StoredEvent(originator_id=originator_id,
                                         originator_version=version, topic=topic,
                                         state=bytes(state))
                             for originator_id, version, topic, state in curs.fetchall()])

    def streams_statement(self, snapshots: str | None) -> Composed:
        """The statement of `select_streams`, taking two arrays (ids, after-versions): with
        `snapshots`, each id at 0 starts from its latest snapshot in that table."""
        names = {"schema": Identifier(self.datastore.schema),
                 "table": Identifier(self.events_table_name)}
        if snapshots is None:
            return SQL(
                "SELECT e.originator_id, e.originator_version, e.topic, e.state "
                "FROM unnest(%b::uuid[], %b::bigint[]) AS k(id, after) "
                f"CROSS JOIN LATERAL ({EVENTS_AFTER}) AS e ORDER BY 1, 2"
            ).format(after=SQL("k.after"), **names)
        return SQL(
            "WITH k AS (SELECT * FROM unnest(%b::uuid[], %b::bigint[]) AS k(id, after)), "
            "s AS (SELECT l.* FROM k CROSS JOIN LATERAL ("
            "  SELECT originator_id, originator_version, topic, state FROM {schema}.{snaps} "
            "  WHERE originator_id = k.id ORDER BY originator_version DESC LIMIT 1) AS l "
            "  WHERE k.after = 0) "
            "SELECT originator_id, originator_version, topic, state FROM s "
            "UNION ALL "
            "SELECT e.originator_id, e.originator_version, e.topic, e.state "
            "FROM k LEFT JOIN s ON s.originator_id = k.id "
            f"CROSS JOIN LATERAL ({EVENTS_AFTER}) AS e ORDER BY 1, 2"
        ).format(snaps=Identifier(snapshots),
                 after=SQL("GREATEST(k.after, COALESCE(s.originator_version, 0))"), **names)


class SQLiteStreamsRecorder(SQLiteApplicationRecorder):
    """SQLiteApplicationRecorder + `select_streams`."""

    def select_streams(self, after: Mapping[UUID, int],
                       snapshots: str | None = None) -> dict[UUID, list[StoredEvent]]:
        """{aggregate id: its stored events with version > after[id], in version order} for
        every id that has some; one read transaction, SQLITE_CHUNK ids per statement. With
        `snapshots` (a table name): for an id whose after[id] is 0, its latest snapshot (if
        any) first, then only the events after it."""
        ids = list(after)
        records: list[StoredEvent] = []
        with self.datastore.transaction(commit=False) as c:
            for start in range(0, len(ids), SQLITE_CHUNK):
                chunk = ids[start:start + SQLITE_CHUNK]
                keys = ",".join("(?,?)" for _ in chunk)
                params = [p for i in chunk for p in (i.hex, after[i])]
                c.execute(self._streams_statement(keys, snapshots if 0 in
                                                  (after[i] for i in chunk) else None), params)
                records += [StoredEvent(originator_id=self.convert_originator_id(row["originator_id"]),
                                        originator_version=row["originator_version"],
                                        topic=row["topic"], state=row["state"])
                            for row in c.fetchall()]
        return _grouped(records)

    def _streams_statement(self, keys: str, snapshots: str | None) -> str:
        """The SELECT of `select_streams` for one chunk (`keys`: its VALUES placeholders)."""
        if snapshots is None:
            return (f"WITH k(id, after) AS (VALUES {keys}) "  # noqa: S608 - placeholders only
                    f"SELECT e.originator_id, e.originator_version, e.topic, e.state "
                    f"FROM k JOIN {self.events_table_name} AS e "
                    f"ON e.originator_id = k.id AND e.originator_version > k.after "
                    f"ORDER BY e.originator_id, e.originator_version")
        return (f"WITH k(id, after) AS (VALUES {keys}), "  # noqa: S608 - placeholders only
                f"s AS (SELECT n.originator_id, n.originator_version, n.topic, n.state "
                f"  FROM k JOIN {snapshots} AS n ON n.originator_id = k.id "
                f"  AND n.originator_version = (SELECT MAX(originator_version) FROM {snapshots} "
                f"  WHERE originator_id = k.id) WHERE k.after = 0) "
                f"SELECT originator_id, originator_version, topic, state FROM s "
                f"UNION ALL "
                f"SELECT e.originator_id, e.originator_version, e.topic, e.state "
                f"FROM k LEFT JOIN s ON s.originator_id = k.id "
                f"JOIN {self.events_table_name} AS e ON e.originator_id = k.id "
                f"AND e.originator_version > MAX(k.after, COALESCE(s.originator_version, 0)) "
                f"ORDER BY 1, 2")
