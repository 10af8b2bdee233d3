"""Large stores for `make bench`, generated in bounded time: many patients with settled text
sessions in their history, and (optionally) one text session each whose first block is due.

Ingesting a million events through HTTP at today's pace would take hours, so the events are
decided by the ledger's own code (`Ledger.ingest` and `Ledger.tick`, every rule and guard as in
the service) against aggregates kept in memory, and written in large chunks: COPY on
PostgreSQL, one executemany per chunk on SQLite, into the application recorder's own events
table, in the order they were decided; then the snapshots the service's saves would write for
them (`Ledger._write_snapshots`). The result is a store the service, the tick and
`ledger replay --verify` accept as genuine (bench/targets.py checks replay --verify on it).

Timeline (all patients in step, so recorded times never go backwards):
- T0: doctor i registered (one doctor per patient: a doctor has one live session at a time),
  patient i granted a 30-day pool with `TEXT_UNITS` text units.
- Round r = 0 … rounds−1, at T0 + (r+1) h: a text session requested, activated 30 s later, ended
  by the patient at 8 min (1 unit owed); a tick at +30 min settles it.
- Due (optional), at T0 + (rounds+1) h: a text session requested, activated at +30 s, activity at
  +9.5 min; at `as_of` = activation + 12 min its block 1 is due (one charge per session; its idle
  deadline, activity + 10 min, is later).
"""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable
from uuid import UUID

from eventsourcing.application import ProcessingEvent

from ledger.application import Ledger
from ledger.domain import Receipt, Session
from ledger.rules import Policy
from storage import is_postgres, persistence_env, postgres_conninfo, postgres_parts, sqlite_path

T0 = datetime(2026, 11, 2, 8, tzinfo=timezone.utc)
TEXT_UNITS = 40  # ≥ rounds + 3 (the due session holds blocks 1 and 2, then 3)
FLUSH_EVENTS = 20_000  # domain events buffered before a chunk is written
TICK_CHUNK = 5_000  # sessions handed to one Ledger.tick call (its max_steps is 20,000)
Progress = Callable[[str], None]


class Clock:
    """The generator's clock: moved to each event's time (never backwards)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def at(self, moment: datetime) -> None:
        self.now = max(self.now, moment)


class MemoryLedger(Ledger):
    """The Ledger deciding against aggregates held in memory; `save` collects the new domain
    events (in decision order, with the aggregates they came from) instead of writing them, and
    `take()` hands them over as one eventsourcing ProcessingEvent.

    Only for generating a store from valid input: a refused event would leave its partial
    changes on the in-memory aggregates, so the generator lets every refusal propagate. It
    relies on the Ledger loading every aggregate through `load`/`load_many`, writing through
    `save` and handing a unit's saved aggregates to `_remember`; a write path that reads the
    repository directly would find the store empty and refuse.
    Receipts and settled sessions are written but not kept (no later event reads them: every
    event id is fresh, and nothing follows a settlement).
    """

    name = Ledger.name  # the same events table (eventsourcing names it after the class)

    def __init__(self, env: dict, clock: Clock, policy: Policy) -> None:
        super().__init__(env=env, clock=clock, policy=policy)
        self.live: dict[UUID, Any] = {}
        self.chunk = ProcessingEvent()

    def load(self, aggregate_id: UUID) -> Any:
        return self.live.get(aggregate_id)

    def load_many(self, aggregate_ids: Any, shared: bool = False) -> dict[UUID, Any]:
        return {aggregate_id: self.live.get(aggregate_id) for aggregate_id in aggregate_ids}

    def save(self, *objs: Any, **kwargs: Any) -> list:
        """Collect the events of these aggregates or domain events (a unit of work saves its
        events; `_remember` then hands over the aggregates they came from)."""
        self.chunk.collect_events(*objs)
        for obj in objs:
            if hasattr(obj, "pending_events"):  # an aggregate (the event-by-event path)
                self._keep(obj)
        return []

    def _remember(self, unit: Any) -> None:
        for aggregate_id in {event.originator_id for event in unit.events}:
            aggregate = unit.current.get(aggregate_id)
            if aggregate is not None:
                self._keep(aggregate)

    def _keep(self, aggregate: Any) -> None:
        if isinstance(aggregate, Receipt) or (isinstance(aggregate, Session)
                                              and aggregate.settled):
            self.live.pop(aggregate.id, None)
        else:
            self.live[aggregate.id] = aggregate

    @property
    def pending(self) -> int:
        return len(self.chunk.events)

    def take(self) -> ProcessingEvent:
        chunk, self.chunk = self.chunk, ProcessingEvent()
        return chunk

    def snapshot(self, written: ProcessingEvent) -> None:
        """Write the snapshots the service's saves would have written for these events (the
        long-lived aggregates whose streams they took past a multiple of the interval), from
        the aggregates held in memory, which are as these events left them; after the events
        are written."""
        self._write_snapshots(written.events, self.live)


@dataclass
class StoreInfo:
    """A generated store: its URL, events table, stored events, patients, settled and due
    sessions, the instant its due blocks are due by, and the seconds it took to generate."""

    url: str
    table: str
    events: int
    patients: int
    settled: int
    due: int
    as_of: datetime
    seconds: float


def generate(url: str, patients: int, rounds: int, due: bool,
             progress: Progress = lambda line: None) -> StoreInfo:
    """Write the store described in the module docstring into the empty store at `url`."""
    if rounds + 3 > TEXT_UNITS:
        raise ValueError(f"at most {TEXT_UNITS - 3} settled sessions per patient")
    started = time.perf_counter()
    clock = Clock()
    ledger = MemoryLedger(persistence_env(url), clock, Policy())
    writer = ChunkWriter(ledger, url)
    try:
        _generate(ledger, clock, writer, patients, rounds, due, progress)
        writer.flush()
        analyze(url, [writer.table] + ([ledger.snapshots.recorder.events_table_name]
                                       if ledger.snapshots is not None else []))
        as_of = _due_as_of(rounds)
        info = StoreInfo(url, writer.table, writer.written, patients, patients * rounds,
                         patients if due else 0, as_of, time.perf_counter() - started)
    finally:
        ledger.close()
    return info


def events_per_patient(rounds: int, due: bool) -> float:
    """Stored events per patient of this shape (measured on 20 patients in memory)."""
    clock = Clock()
    ledger = MemoryLedger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock, Policy())
    counter = _Counter(ledger)
    _generate(ledger, clock, counter, 20, rounds, due, lambda line: None)
    ledger.close()
    return counter.count / 20


def patients_for(events: int, rounds: int) -> int:
    """How many patients with `rounds` settled sessions make about `events` stored events."""
    return max(1, math.ceil(events / events_per_patient(rounds, False)))


class _Counter:
    def __init__(self, ledger: MemoryLedger) -> None:
        self.ledger, self.count = ledger, 0

    def maybe_flush(self) -> None:
        self.count += len(self.ledger.take().events)


def _generate(ledger: MemoryLedger, clock: Clock, writer: Any, patients: int, rounds: int,
              due: bool, progress: Progress) -> None:
    ids = _Ids()
    for i in range(patients):
        _ingest(ledger, clock, ids, "doctor.registered", T0,
                {"doctor_id": f"d{i}", "country": "MW" if i % 2 else "KE"})
        _ingest(ledger, clock, ids, "subscription.granted", T0, {
            "payment_reference": f"pay{i}", "owner_id": f"p{i}", "starts_at": T0.isoformat(),
            "plan": {"name": "Bench Text", "price_minor": 1_000_000, "currency": "MWK",
                     "units": {"text": TEXT_UNITS, "voice": 0, "video": 0}, "seats": 1,
                     "duration_days": 30}})
        writer.maybe_flush()
    for round_ in range(rounds):
        at = T0 + timedelta(hours=round_ + 1)
        sessions = [f"s{i}r{round_}" for i in range(patients)]
        for i, sid in enumerate(sessions):
            _session(ledger, clock, ids, sid, i, at, end_after=timedelta(minutes=8))
            writer.maybe_flush()
        _settle(ledger, clock, writer, at + timedelta(minutes=30), sessions)
        progress(f"  generated round {round_ + 1}/{rounds} ({patients:,} sessions settled)")
    if due:
        at = T0 + timedelta(hours=rounds + 1)
        for i in range(patients):
            _session(ledger, clock, ids, f"s{i}due", i, at, end_after=None)
            writer.maybe_flush()


def _due_as_of(rounds: int) -> datetime:
    """The instant by which every due session's block 1 is due (see the module docstring)."""
    return T0 + timedelta(hours=rounds + 1, seconds=30, minutes=12)


class _Ids:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"g{self.n}"


def _ingest(ledger: MemoryLedger, clock: Clock, ids: _Ids, kind: str, at: datetime,
            payload: dict) -> None:
    clock.at(at)
    ledger.ingest(ids.next(), kind, at, payload)


def _session(ledger: MemoryLedger, clock: Clock, ids: _Ids, sid: str, i: int, at: datetime,
             end_after: timedelta | None) -> None:
    """A text session of patient i with doctor i: requested at `at`, activated 30 s later;
    ended by the patient `end_after` later, or (None) kept alive by activity at +9.5 min."""
    _ingest(ledger, clock, ids, "session.requested", at,
            {"session_id": sid, "kind": "text", "patient_id": f"p{i}", "doctor_id": f"d{i}"})
    started = at + timedelta(seconds=30)
    _ingest(ledger, clock, ids, "text.activated", started, {"session_id": sid})
    if end_after is None:
        _ingest(ledger, clock, ids, "session.activity", started + timedelta(minutes=9, seconds=30),
                {"session_id": sid})
    else:
        _ingest(ledger, clock, ids, "session.ended", started + end_after,
                {"session_id": sid, "ended_by": "patient", "reason": "completed"})


def _settle(ledger: MemoryLedger, clock: Clock, writer: Any, as_of: datetime,
            sessions: list[str]) -> None:
    clock.at(as_of)
    for first in range(0, len(sessions), TICK_CHUNK):
        report = ledger.tick(as_of, sessions[first:first + TICK_CHUNK])
        if report.failed or report.more:
            raise RuntimeError(f"generator tick failed: {report.failed[:3]}")
        writer.maybe_flush()


class ChunkWriter:
    """Writes the MemoryLedger's new events into the recorder's events table in chunks, in
    decision order (so notification ids follow it)."""

    def __init__(self, ledger: MemoryLedger, url: str) -> None:
        self.ledger, self.url, self.written = ledger, url, 0
        self.table = ledger.recorder.events_table_name

    def maybe_flush(self) -> None:
        if self.ledger.pending >= FLUSH_EVENTS:
            self.flush()

    def flush(self) -> None:
        chunk = self.ledger.take()
        stored = [self.ledger.mapper.to_stored_event(e) for e in chunk.events]
        if stored:
            write_rows(self.url, self.table, [(s.originator_id, s.originator_version, s.topic,
                                                s.state) for s in stored])
            self.written += len(stored)
            self.ledger.snapshot(chunk)


def analyze(url: str, tables: list[str]) -> None:
    """Planner statistics for the written tables (PostgreSQL), as autovacuum gives a live store:
    a bulk-loaded table has none until it runs, and without them the planner reads the whole
    events index for each `select_streams` (measured: 410 ms instead of 21 ms for 1,000 ids of a
    188,000-event store, JIT compilation included)."""
    if not is_postgres(url):
        return
    import psycopg

    schema = postgres_parts(url)["schema"]
    with psycopg.connect(postgres_conninfo(url), autocommit=True) as conn:
        for table in tables:
            conn.execute(f'ANALYZE "{schema}".{table}')


def write_rows(url: str, table: str, rows: Iterable[tuple]) -> None:
    """Append (originator_id, version, topic, state) rows to the events table, in order."""
    if is_postgres(url):
        import psycopg

        schema = postgres_parts(url)["schema"]
        with psycopg.connect(postgres_conninfo(url)) as conn, conn.cursor() as cursor:
            with cursor.copy(f'COPY "{schema}".{table} (originator_id, originator_version, '
                             "topic, state) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        return
    with sqlite3.connect(sqlite_path(url)) as conn:
        conn.executemany(f"INSERT INTO {table} (originator_id, originator_version, topic, state) "
                         "VALUES (?, ?, ?, ?)", [(r[0].hex, r[1], r[2], r[3]) for r in rows])
