"""The ledger application: idempotent ingestion of backend events, the tick, and reads.

`Ledger.ingest(event_id, type, occurred_at, payload)` records one event exactly once (I8): the
receipt aggregate `Receipt(event_id)` is saved in the same transaction as every aggregate the
event changes, so a concurrent duplicate loses on the receipt's primary key and returns the
stored result. A lost optimistic race is retried a bounded number of times, then answered with
RetryLater; it is never reported as a business refusal.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Mapping, Sequence
from uuid import UUID

import orjson
from eventsourcing.application import Application, LRUCache, ProcessingEvent
from eventsourcing.domain import CanMutateAggregate
from eventsourcing.persistence import IntegrityError

from ledger import errors
from ledger.appointments import APPOINTMENT_KINDS, Appointment
from ledger.billing import (Step, Unit, Work, apply_step, choose_pool, complete_appointment,
                            copy_aggregate, end_session, hold_ahead, next_step)
from ledger.consultations import Consultation, MoneyWallet, PriceList, TopUp
from ledger.domain import Doctor, Patient, Pool, Receipt, Session, Wallet
from ledger.marketplace import Marketplace
from ledger.input_rules import occurred_at_window, payload_instant_window, within
from ledger.recording import LedgerAggregate, fold, recording_at
from ledger.rules import BLOCK_SECONDS, KINDS, Policy, presence_group, utc_seconds
from ledger.tariff import rate_at

log = logging.getLogger("ledger")
Clock = Callable[[], datetime]
MAX_ATTEMPTS = 8  # optimistic retries per command before answering retry_later
UNIT_ATTEMPTS = 2  # a batch unit lost to a concurrent writer is re-decided once, then event by event
TICK_UNIT_STEPS = 250  # tick decisions saved per transaction (a lost race redoes at most these)
AGGREGATE_CACHE_SIZE = 20_000  # aggregates kept per process, brought up to date on every load
SNAPSHOT_INTERVAL = 20  # events between snapshots of a long-lived aggregate (docs/design.md)
# The aggregates whose streams grow without bound (one per party or purchase, for ever);
# the others (receipts, sessions, consultations, appointments, top-ups) stay short.
SNAPSHOTTED: tuple[type[LedgerAggregate], ...] = (Pool, Patient, Doctor, Wallet, MoneyWallet,
                                                  PriceList)
END_BY = ("patient", "doctor", "system")
# Legacy minimums (§7); the service takes LEDGER_WITHDRAWAL_MINIMUMS (runtime/settings.py).
WITHDRAWAL_MINIMUM_MINOR = {"MWK": 5_000_000, "USD": 7_000}


@dataclass(frozen=True)
class Accepted:
    """Result of one ingested event: `result` is the stored body; `replayed` on a re-post.

    `position`: the highest notification id (global log position) the save of this event wrote,
    None when replayed; a reader that has applied the log up to it sees this event's effects.
    """

    result: dict
    replayed: bool = False
    position: int | None = None


Item = tuple[str, str, datetime, dict]  # (event_id, type, occurred_at, payload) of one event


class _Fallback(Exception):
    """A unit of work met something only the one-decision-at-a-time path can judge (an
    unexpected error, possibly a domain guard tripping on a snapshot a concurrent writer
    moved: `stale`): nothing of the unit was saved; it is redone decision by decision."""

    def __init__(self, key: str, unit: Unit | None = None) -> None:
        super().__init__(key)
        self.stale = _quietly_stale(unit) if unit is not None else False


def _quietly_stale(unit: Unit) -> bool:
    """unit.stale(), or False if even that cannot be read (the fallback path will tell)."""
    try:
        return unit.stale()
    except Exception:  # noqa: BLE001 - only an observation for the conflict count
        return False


class _LostRace(Exception):
    """A concurrent writer recorded one of the unit's events first: re-decide the unit."""


def project_events(aggregate: Any, events: Iterable[Any]) -> Any:
    """eventsourcing's `project_aggregate` without its per-event runtime Protocol check
    (`isinstance(e, CanMutateProtocol)`, about 2 µs an event: see docs/design.md, Write path):
    every stored event of the ledger is an eventsourcing aggregate event, which can mutate;
    each is applied by `fold` (the library's `mutate` without its per-call layers)."""
    for domain_event in events:
        aggregate = fold(aggregate, domain_event)
    return aggregate


@dataclass
class TickReport:
    """What one tick did, as data and as lines.

    `steps`: one dict per decision, in the order taken: {"session_id", "action" ("charge" |
    "end" | "settle"), "block" (the block charged, or at whose start the balance ran out; else
    None), "units" (1 per charge; units owed at settlement; else 0), "pool_id" (the pool a charge
    was taken from; else None), "reason" (the end's reason; else None), "ended_at" (ISO, ends
    only)}; `pools`: {"pool_id", "payment_reference", "forfeited": {bucket: units}} per expired
    pool; `failures`: {"session_id", "error"} (or "consultation_id"). `consultation_steps`: one
    dict per priced-consultation step (ledger/marketplace.py `ConsultationTick`). The human lines
    (`charged`, `ended`, `settled`, `expired`, `failed`, `consultations`) are for the CLI and the
    logs. `more`: work is left for the next tick.
    """

    as_of: datetime
    charged: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    pools: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    consultations: list[str] = field(default_factory=list)  # §10 steps, as lines
    consultation_steps: list[dict] = field(default_factory=list)  # §10 steps, as data
    conflicts: int = 0
    more: bool = False

    def as_dict(self) -> dict:
        """The structured report `POST /v1/ticks` answers (no human lines)."""
        counts = {"charged": sum(1 for s in self.steps if s["action"] == "charge"),
                  "ended": sum(1 for s in self.steps if s["action"] == "end"),
                  "settled": sum(1 for s in self.steps if s["action"] == "settle"),
                  "expired": len(self.pools), "failed": len(self.failures),
                  "consultations": len(self.consultation_steps)}
        return {"as_of": self.as_of.isoformat(), "steps": self.steps, "expired": self.pools,
                "failed": self.failures, "consultations": self.consultation_steps,
                "counts": counts, "conflicts": self.conflicts, "more": self.more}

    def record(self, session_id: str, step: Step, session: Session, line: str) -> None:
        """Add what one step did to `session` (as saved) to the data and the lines."""
        lines = {"charge": self.charged, "timeout": self.ended, "settle": self.settled}
        lines[step.action].append(f"{session_id}: {line}")
        base = {"session_id": session_id, "block": None, "units": 0, "pool_id": None,
                "reason": None, "ended_at": None}
        if step.action == "settle":
            self.steps.append({**base, "action": "settle",
                               "units": session.settlement["units_owed"]})
            return
        if step.action == "charge" and step.block in session.charges:
            self.steps.append({**base, "action": "charge", "block": step.block, "units": 1,
                               "pool_id": session.charges[step.block]})
        if step.action == "timeout":
            self.steps.append({**base, "action": "end", "reason": step.reason,
                               "ended_at": step.ended_at.isoformat()})
        elif session.end_reason == "balance_exhausted" and session.ended_at \
                and session.ended_at <= self.as_of:
            self.ended.append(f"{session_id}: balance_exhausted at {session.ended_at.isoformat()}")
            first_unpaid = int((session.ended_at - session.started_at).total_seconds()) \
                // BLOCK_SECONDS + 1
            self.steps.append({**base, "action": "end", "reason": "balance_exhausted",
                               "block": first_unpaid, "ended_at": session.ended_at.isoformat()})

    def absorb(self, other: "TickReport") -> None:
        """Append what `other` (a later part of the same tick) did; `more` is other's."""
        for name in ("charged", "ended", "settled", "expired", "failed", "steps", "pools",
                     "failures", "consultations", "consultation_steps"):
            getattr(self, name).extend(getattr(other, name))
        self.conflicts += other.conflicts
        self.more = other.more

    def fail(self, session_id: str, exc: Exception) -> None:
        self.failed.append(f"{session_id}: {type(exc).__name__}: {exc}")
        self.failures.append({"session_id": session_id, "error": type(exc).__name__})

    def expire(self, pool: Pool) -> None:
        self.expired.append(f"{pool.payment_reference}: forfeited {pool.forfeited}")
        self.pools.append({"pool_id": str(pool.id), "payment_reference": pool.payment_reference,
                           "forfeited": dict(pool.forfeited)})


# Payload fields naming an aggregate, and the aggregates they may name (prefetching only).
_PAYLOAD_IDS: dict[str, tuple[Callable[[str], UUID], ...]] = {
    "session_id": (Session.create_id, Consultation.create_id),
    "consultation_id": (Consultation.create_id,),
    "patient_id": (Patient.create_id,),
    "owner_id": (Patient.create_id,),
    "doctor_id": (Doctor.create_id,),
    "practitioner_id": (Doctor.create_id, PriceList.create_id),
    "payment_reference": (Pool.create_id, TopUp.create_id),
    "appointment_id": (Appointment.create_id,),
}


def _named_ids(payload: dict) -> list[UUID]:
    """Ids of the aggregates an event's payload names (a guess for prefetching; extra ids
    cost nothing but a lookup, missing ones are loaded when used)."""
    ids = []
    for field_name, ids_of in _PAYLOAD_IDS.items():
        value = payload.get(field_name)
        if isinstance(value, str):
            ids += [create_id(value) for create_id in ids_of]
    return ids


def _party_ids(session: Session, charging: bool = False) -> list[UUID]:
    """The patient, pools, doctor, appointment and wallet `session` may need; when `charging`
    (its next step charges a block) its patient and pools only: its doctor and wallet are not
    needed (a later step that needs them loads them on demand)."""
    ids = [Patient.create_id(session.patient_id)]
    ids += [UUID(p) for p in (*session.holds.values(), *session.charges.values())]
    if charging:
        return ids
    ids.append(Doctor.create_id(session.doctor_id))
    if session.appointment_id:
        ids.append(Appointment.create_id(session.appointment_id))
    if session.rate:
        ids.append(Wallet.create_id(session.doctor_id, session.rate["currency"]))
    return ids


def _prefetch_parties(unit: Unit, sessions: list[Session],
                      charging: frozenset[str] = frozenset()) -> None:
    """Read the parties of these sessions (`_party_ids`; those in `charging` charge a block),
    then their patients' pools: two queries, each only for what the unit does not hold."""
    unit.prefetch(i for s in sessions for i in _party_ids(s, s.session_id in charging))
    patients = [a for a in unit.current.values() if isinstance(a, Patient)]
    unit.prefetch(UUID(p) for patient in patients for p in patient.pool_ids)


def _worth_caching(aggregate: Any) -> bool:
    """Whether the aggregate cache keeps `aggregate` (loaded or just saved): not a receipt.
    A receipt is written once and read again only for a duplicate, which reads the store
    anyway (the version check); cached, one per event, receipts would fill the cache meant
    for the long-lived aggregates (docs/design.md, "Loading in O(1) of the history")."""
    return type(aggregate) is not Receipt


def _last_position(recordings: Iterable[Any]) -> int | None:
    """The highest notification id among eventsourcing Recordings (None if there are none)."""
    return max((r.notification.id for r in recordings), default=None)


def body_hash(event_type: str, occurred_at: datetime, payload: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of the event body; identifies 'the same event' (I8).
    The canonical JSON is `json.dumps(body, sort_keys=True, separators=(",", ":"))`'s bytes,
    stored in every receipt: it must never change. orjson writes them when it is known to
    write the same (`_orjson_canonical`), the standard library otherwise."""
    body = {"type": event_type, "occurred_at": occurred_at.isoformat(), "payload": payload}
    canonical = _orjson_canonical(body)
    if canonical is None:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def _orjson_canonical(body: dict) -> bytes | None:
    """orjson's sorted compact bytes of `body` when they are json.dumps's, else None: every
    value a str, int, bool, None, list or str-keyed dict (no float, whose repr may differ; no
    subclass), and the output plain ASCII without DEL (json.dumps escapes every other
    character as \\uXXXX, orjson writes it as UTF-8); an int beyond 64 bits makes orjson
    refuse. Control characters and quotes are escaped alike by both."""
    if not _json_scalars_only(body):
        return None
    try:
        canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return None
    return canonical if canonical.isascii() and b"\x7f" not in canonical else None


def _json_scalars_only(value: Any) -> bool:
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is dict:
        return all(type(k) is str and _json_scalars_only(v) for k, v in value.items())
    if kind is list:
        return all(_json_scalars_only(v) for v in value)
    return False


def session_view(session: Session) -> dict:
    """The short answer about a session carried by every event result (§3: paid_until)."""
    paid_until = session.paid_until()
    return {"session_id": session.session_id, "state": session.state,
            "paid_until": paid_until.isoformat() if paid_until else None}


def participant_roles(session: Session, identity: str) -> list[str]:
    """The roles a provider identity stands for: the patient or doctor id itself, or
    `patient:<id>`/`doctor:<id>` → that role; `*` → both (a two-party call whose legs the
    provider reports together, e.g. Twilio Voice); anything else → none."""
    if identity == "*":
        return ["patient", "doctor"]
    kind, _, bare = identity.partition(":")
    if bare and kind in ("patient", "doctor"):
        wanted = session.patient_id if kind == "patient" else session.doctor_id
        return [kind] if bare == wanted else []
    return [role for role, who in (("patient", session.patient_id), ("doctor", session.doctor_id))
            if identity == who][:1]


def presence_view(session: Session) -> dict:
    """The provider-derived connect/end of a call, as ISO strings or None."""
    state = session.presence_state()
    iso = lambda t: t.isoformat() if t else None  # noqa: E731
    return {"connected_at": iso(state.connected_at), "ended_at": iso(state.ended_at),
            "end_reason": state.end_reason, "decide_at": iso(state.decide_at)}


def stamped_rate(doctor: Doctor, bucket: str, at: datetime) -> dict:
    """The tariff rate stamped on a session at its billable start (§5)."""
    rate = rate_at(doctor.country, bucket, at)
    return {"tariff": rate.tariff, "amount_minor": rate.amount_minor, "currency": rate.currency,
            "pay_minor": rate.pay_minor, "commission_pct": rate.commission_pct,
            "country": doctor.country}


class Ledger(Application):
    """Event-sourced billing ledger. `clock` returns aware UTC datetimes (acceptance time).

    Aggregates load through a version-checked cache of `cache_size` aggregates (0: none):
    every load reads the events recorded since the cached version, so it costs one indexed
    query whatever the history's length, and sees every other writer's events
    (`load_many`; docs/design.md, Write path). An aggregate not cached starts from its latest
    snapshot: the long-lived ones (SNAPSHOTTED) are snapshotted by the save that takes their
    stream past each multiple of `snapshot_interval` events (0: no snapshots).
    """

    name = "Ledger"

    def __init__(self, env: dict | None = None, *, clock: Clock, policy: Policy = Policy(),
                 withdrawal_minimum_minor: dict[str, int] | None = None,
                 on_conflict: Callable[[str], None] | None = None,
                 cache_size: int = AGGREGATE_CACHE_SIZE,
                 snapshot_interval: int = SNAPSHOT_INTERVAL) -> None:
        """`on_conflict(operation)` ("ingest" or "tick") is called at each optimistic-concurrency
        retry: a plain observer, so the domain stays free of metrics libraries. `cache_size`:
        aggregates kept in memory (LRU), 0 for none. `snapshot_interval`: events between
        snapshots of a long-lived aggregate, 0 for none (nor are stored ones read then)."""
        # eventsourcing's snapshot store (its own table, outside the notification log).
        self.snapshotting_intervals = {cls: snapshot_interval for cls in SNAPSHOTTED
                                       } if snapshot_interval > 0 else {}
        super().__init__(env={**(env or {}),
                              "IS_SNAPSHOTTING_ENABLED": "y" if snapshot_interval > 0 else "n"})
        # Cached aggregates are never mutated: a load copies before applying new events and
        # hands out copies, so threads can share the cache without locks (the LRU locks itself).
        self._aggregates: LRUCache | None = LRUCache(maxsize=cache_size) if cache_size > 0 else None
        self.clock = clock
        self.on_conflict = on_conflict or (lambda operation: None)
        self.policy = policy
        self.withdrawal_minimum_minor = dict(withdrawal_minimum_minor or WITHDRAWAL_MINIMUM_MINOR)
        self._handlers: dict[str, Callable[[Work, datetime, dict, datetime], dict]] = {
            "doctor.registered": self._doctor_registered,
            "doctor.country_changed": self._doctor_country_changed,
            "subscription.granted": self._subscription_granted,
            "payment.refunded": self._payment_refunded,
            "member.added": self._member_added,
            "member.removed": self._member_removed,
            "session.requested": self._session_requested,
            "session.patient_message": self._patient_message,
            "text.activated": self._started,
            "call.ringing": self._call_ringing,
            "call.connected": self._started,
            "call.declined": self._call_declined,
            "call.participant_joined": self._presence,
            "call.participant_left": self._presence,
            "call.room_ended": self._presence,
            "session.activity": self._activity,
            "session.ended": self._session_ended,
            "appointment.booked": self._appointment_booked,
            "appointment.confirmed": self._appointment_step,
            "appointment.join_window_opened": self._appointment_step,
            "appointment.linked": self._appointment_linked,
            "appointment.cancelled": self._appointment_closed,
            "appointment.expired": self._appointment_closed,
            "appointment.no_show": self._appointment_closed,
            "withdrawal.requested": self._withdrawal_requested,
            "withdrawal.completed": self._withdrawal_finished,
            "withdrawal.rejected": self._withdrawal_finished,
        }
        # Priced consultations and money wallets (§10): their handlers, and §10's guards
        # around the unit-billed handlers they touch.
        self.marketplace = Marketplace(self.policy)
        self._handlers.update(self.marketplace.handlers(self._handlers))

    @property
    def event_types(self) -> tuple[str, ...]:
        return tuple(self._handlers)

    def save(self, *objs: Any, **kwargs: Any) -> list:
        """`Application.save` (one transaction; returns the recordings, each with its
        notification id) with cheaper collection: a domain event is recognised by its concrete
        base class, where the library asks two runtime-checkable Protocols per object, which was
        6.5 % of a tick's CPU (docs/design.md, Write path). Aggregates are collected as the
        library does, so snapshots and its cache see them."""
        processing_event = ProcessingEvent()
        for obj in objs:
            if isinstance(obj, CanMutateAggregate):
                processing_event.events.append(obj)
            elif obj is not None:
                processing_event.collect_events(obj)
        processing_event.saved_kwargs.update(kwargs)
        recordings = self._record(processing_event)
        self._take_snapshots(processing_event)
        self._notify(recordings)
        return recordings

    # ------------------------------------------------------------------------------ loading

    def load(self, aggregate_id: UUID) -> Any:
        """The current aggregate with this id (a private copy the caller may change), or None."""
        return self.load_many([aggregate_id])[aggregate_id]

    def load_many(self, aggregate_ids: Iterable[UUID], shared: bool = False) -> dict[UUID, Any]:
        """{id: the current aggregate (a private copy) or None} for these ids, read together:
        one query for all the events recorded after each cached version (from the start for
        an aggregate not cached), so the cost does not grow with the histories. `shared`:
        the caller never changes them (a Unit, which copies on use), so the cached objects
        themselves are returned."""
        ids = list(dict.fromkeys(aggregate_ids))
        cached = {i: self._cached(i) for i in ids}
        streams = self._read_streams({i: a.version if a is not None else 0
                                      for i, a in cached.items()})
        loaded = {}
        for aggregate_id in ids:
            aggregate, records = cached[aggregate_id], streams.get(aggregate_id)
            if records:
                start = copy_aggregate(aggregate) if aggregate is not None else None
                aggregate = project_events(start, map(self.mapper.to_domain_event, records))
                if self._aggregates is None or not _worth_caching(aggregate):
                    loaded[aggregate_id] = aggregate  # built for this call: no copy needed
                    continue
                self._aggregates.put(aggregate_id, aggregate)
            private = not shared and aggregate is not None
            loaded[aggregate_id] = copy_aggregate(aggregate) if private else aggregate
        return loaded

    def read_streams(self, aggregate_ids: Iterable[UUID]) -> dict[UUID, list]:
        """{id: its domain events in version order} for these ids, read together (one query
        where the recorder can, `_read_streams`): from its latest snapshot if it has one,
        else from version 1; ids with nothing stored are left out. For followers that fold
        aggregates to a version of their own (`ledger.recording.AggregateFollower`); the
        aggregate cache is not used."""
        streams = self._read_streams(dict.fromkeys(aggregate_ids, 0))
        return {i: list(map(self.mapper.to_domain_event, records))
                for i, records in streams.items() if records}

    def _cached(self, aggregate_id: UUID) -> Any:
        if self._aggregates is None:
            return None
        try:
            return self._aggregates.get(aggregate_id)
        except KeyError:
            return None

    def _read_streams(self, after: dict[UUID, int]) -> dict[UUID, Sequence]:
        """{id: stored records with version > after[id]}; for an id not known yet (after 0),
        its latest snapshot first (if any), then only the events after it. A snapshot is just a
        known version: what others wrote since is read as for a cached aggregate. One query
        where the recorder can (storage/streams.py), else two per id (the in-memory store)."""
        cold = self._snapshots_on and 0 in after.values()
        select_streams = getattr(self.recorder, "select_streams", None)
        if select_streams is not None and (len(after) > 1 or cold):
            table = self.snapshots.recorder.events_table_name if cold else None  # type: ignore
            return select_streams(after, snapshots=table)
        return {i: self._read_stream(i, v) for i, v in after.items()}

    @property
    def _snapshots_on(self) -> bool:
        return self.snapshots is not None and bool(self.snapshotting_intervals)

    def _read_stream(self, aggregate_id: UUID, after: int) -> list:
        """One id's records after `after` (its latest snapshot first when after is 0)."""
        start = []
        if after == 0 and self._snapshots_on:
            start = self.snapshots.recorder.select_events(aggregate_id, desc=True, limit=1)
            after = start[0].originator_version if start else 0
        return [*start, *self.recorder.select_events(aggregate_id, gt=after or None)]

    def _take_snapshots(self, processing_event: Any) -> None:
        """eventsourcing's hook after `save`: snapshots of the saved aggregates as they are in
        memory (the library would re-read each from the store first)."""
        self._write_snapshots(processing_event.events, processing_event.aggregates)

    def _write_snapshots(self, events: Sequence[Any], aggregates: Mapping[UUID, Any]) -> None:
        """Snapshot, in one write, each aggregate of a SNAPSHOTTED class whose just-saved
        `events` took its stream past a multiple of the interval, from `aggregates` (their
        state after those events). Snapshots are only a shortcut for loading: one whose state
        would not read back equal (`_stored_snapshot`), or that cannot be written, is skipped
        (logged); the saved events stand, and loads start from an earlier snapshot."""
        if not aggregates or not self._snapshots_on:
            return
        saved: dict[UUID, list[int]] = {}  # id -> [first version saved, last version saved]
        for event in events:
            saved.setdefault(event.originator_id, [event.originator_version, 0])[1] = \
                event.originator_version
        stored = []
        for aggregate_id, (first, last) in saved.items():
            aggregate = aggregates.get(aggregate_id)
            interval = self.snapshotting_intervals.get(type(aggregate))
            crossed = interval and last // interval > (first - 1) // interval
            if crossed and aggregate.version == last:
                stored.append(self._stored_snapshot(aggregate))
        stored = [record for record in stored if record is not None]
        if stored:
            try:
                self.snapshots.recorder.insert_events(stored)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - a shortcut missed, nothing lost
                log.warning("snapshots not written: %s: %s", type(exc).__name__, exc)

    def _stored_snapshot(self, aggregate: Any) -> Any:
        """The stored record of a snapshot of `aggregate` (stamped with its last event's recorded
        time), or None if its state would not decode back equal: JSON keeps no tuples or int
        keys, and an id-keyed dict whose keys are exactly `_type_` and `_data_` reads as a
        custom-type marker (ids may be chosen so); such an aggregate loads from events."""
        with recording_at(aggregate.modified_on):
            snapshot = type(aggregate).Snapshot.take(aggregate)
        record = self.mapper.to_stored_event(snapshot)
        try:
            faithful = self.mapper.to_domain_event(record).state == snapshot.state
        except Exception:  # noqa: BLE001 - unreadable is unfaithful
            faithful = False
        if not faithful:
            log.warning("snapshot of %s %s skipped: its state does not read back equal",
                        type(aggregate).__name__, aggregate.id)
            return None
        return record

    def get_session(self, session_id: str) -> Session:
        """Raises UnknownSession."""
        session = self.load(Session.create_id(session_id))
        if session is None:
            raise errors.UnknownSession(f"no session {session_id!r}")
        return session

    def session_with_events(self, session_id: str) -> tuple[Session, list]:
        """(the session, its stored events in version order) from ONE read of its stream, so
        that the state and a statement built from the events agree even while it is being
        written. Raises UnknownSession."""
        events = list(self.events.get(Session.create_id(session_id)))
        if not events:
            raise errors.UnknownSession(f"no session {session_id!r}")
        return project_events(None, events), events

    def get_receipt(self, event_id: str) -> Receipt | None:
        return self.load(Receipt.create_id(event_id))

    # ---------------------------------------------------------------------------- ingestion

    def ingest(self, event_id: str, event_type: str, occurred_at: datetime,
               payload: dict) -> Accepted:
        """Record one backend event exactly once; returns its result (I8).

        Raises IdempotencyConflict (same id, other body), OccurredAtOutOfRange, RetryLater and
        the business refusals of each handler. A refused event records nothing. A unit of one
        event (`ingest_batch`): its aggregates are read together, then saved in one transaction.
        """
        outcome = self.ingest_batch([(event_id, event_type, occurred_at, payload)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def ingest_alone(self, event_id: str, event_type: str, occurred_at: datetime,
                     payload: dict) -> Accepted:
        """`ingest` as its own decision, loading aggregates one by one and retrying a lost race
        up to MAX_ATTEMPTS times: the path every unit falls back to, and the reference the
        units are tested against (tests/test_write_path.py)."""
        occurred_at = utc_seconds(occurred_at)
        digest = body_hash(event_type, occurred_at, payload)
        for _ in range(MAX_ATTEMPTS):
            receipt = self.get_receipt(event_id)
            if receipt is not None:
                if receipt.body_hash != digest:
                    raise errors.IdempotencyConflict(f"event_id {event_id!r} was used with another body")
                return Accepted(receipt.result, replayed=True)
            now = utc_seconds(self.clock())
            self._check_age(occurred_at, now)
            handler = self._handlers.get(event_type)
            if handler is None:
                raise errors.InvalidEvent(f"unknown event type {event_type!r}")
            work = Work(self.load)
            try:
                with recording_at(now):  # every event of this decision: recorded time `now`
                    outcome = handler(work, occurred_at, {**payload, "_type": event_type}, now)
                    result = {"event_id": event_id, "type": event_type, **outcome}
                    receipt = Receipt(event_id=event_id, body_hash=digest,
                                      event_type=event_type, result=result)
            except errors.LedgerError:
                if self.get_receipt(event_id) is not None:
                    continue  # a concurrent duplicate committed first: answer with its result
                raise
            except (AssertionError, KeyError):
                if work.stale():
                    self.on_conflict("ingest")
                    continue  # decided on a snapshot another writer has moved: a lost race
                raise
            try:
                recordings = self.save(*work.to_save(), receipt)
            except IntegrityError:
                self.on_conflict("ingest")
                continue  # a concurrent writer won; reload everything and decide again
            return Accepted(result, position=_last_position(recordings))
        raise errors.RetryLater("too many concurrent writers; retry the same event")

    def ingest_batch(self, items: Sequence[Item],
                     fatal: Callable[[Exception], bool] = lambda exc: True,
                     ) -> list[Accepted | Exception]:
        """Record events in array order as ONE unit of work; per item, its Accepted or the
        exception that refused it (a LedgerError, or an unexpected error when not `fatal`).

        The outcomes are those of `ingest_alone` called on each item in turn (I8 and array
        order hold: a duplicate event_id later in the batch replays the earlier one's result; a
        refused event writes nothing), but every event is decided in memory against one shared
        set of aggregates and all are saved in one transaction. A unit lost to a concurrent
        writer is re-decided (UNIT_ATTEMPTS), then the batch goes event by event; so does a
        batch in which a decision raised something other than a refusal, or whose reads or
        save failed with an error that is not `fatal` (nothing of the unit is saved). A `fatal`
        error (e.g. the store is unreachable) is raised; on the event-by-event path the events
        before it are durable. Other unexpected errors are their item's outcome there, and the
        next items go on.
        """
        for _ in range(UNIT_ATTEMPTS):
            try:
                return self._ingest_unit(items)
            except (IntegrityError, _LostRace):
                self.on_conflict("ingest")
            except _Fallback as fallback:
                if fallback.stale:
                    self.on_conflict("ingest")
                break
            except Exception as exc:  # noqa: BLE001 - a read or the save failed: nothing saved
                if fatal(exc):
                    raise
                break
        return self._ingest_each(items, fatal)

    def _ingest_each(self, items: Sequence[Item],
                     fatal: Callable[[Exception], bool]) -> list[Accepted | Exception]:
        """The batch event by event, each its own transaction (the path before units)."""
        outcomes: list[Accepted | Exception] = []
        for item in items:
            try:
                outcomes.append(self.ingest_alone(*item))
            except errors.LedgerError as exc:
                outcomes.append(exc)
            except Exception as exc:  # noqa: BLE001 - the caller's `fatal` judges it
                if fatal(exc):
                    raise
                outcomes.append(exc)
        return outcomes

    def _ingest_unit(self, items: Sequence[Item]) -> list[Accepted | Exception]:
        """Decide every item against one Unit, then save all their events in one transaction.
        Raises IntegrityError or _LostRace (nothing saved; re-decide) or _Fallback."""
        unit = Unit(self.load, self.load_many)
        self._prefetch_items(unit, items)
        outcomes: list[Accepted | Exception] = []
        written: list[tuple[int, list]] = []  # (item index, the events its decision added)
        for index, (event_id, event_type, occurred_at, payload) in enumerate(items):
            try:
                accepted, events = self._decide_in_unit(unit, event_id, event_type,
                                                        occurred_at, payload)
            except errors.LedgerError as exc:
                outcomes.append(exc)
                continue
            outcomes.append(accepted)
            if events:
                written.append((index, events))
        if unit.events:
            positions = {id(r.domain_event): r.notification.id for r in self.save(*unit.events)}
            self._remember(unit)
            for index, events in written:
                position = max(positions.get(id(e)) or 0 for e in events) or None
                outcomes[index] = Accepted(outcomes[index].result, position=position)
        return outcomes

    def _decide_in_unit(self, unit: Unit, event_id: str, event_type: str,
                        occurred_at: datetime, payload: dict) -> tuple[Accepted, list]:
        """`ingest`'s decision for one item inside `unit`: (Accepted, the events it adds).
        Raises the refusals `ingest` raises; _LostRace when a refused event turns out to have
        been recorded meanwhile by a concurrent writer; _Fallback on any other error."""
        occurred_at = utc_seconds(occurred_at)
        digest = body_hash(event_type, occurred_at, payload)
        receipt = self._unit_receipt(unit, event_id)
        if receipt is not None:
            if receipt.body_hash != digest:
                raise errors.IdempotencyConflict(f"event_id {event_id!r} was used with another body")
            return Accepted(receipt.result, replayed=True), []
        now = utc_seconds(self.clock())
        self._check_age(occurred_at, now)
        handler = self._handlers.get(event_type)
        if handler is None:
            raise errors.InvalidEvent(f"unknown event type {event_type!r}")
        work = unit.work()
        try:
            with recording_at(now):  # every event of this decision: recorded time `now`
                outcome = handler(work, occurred_at, {**payload, "_type": event_type}, now)
                result = {"event_id": event_id, "type": event_type, **outcome}
                receipt = Receipt(event_id=event_id, body_hash=digest,
                                  event_type=event_type, result=result)
        except errors.LedgerError:
            if self.get_receipt(event_id) is not None:
                raise _LostRace(event_id) from None  # a concurrent duplicate committed first
            raise
        except Exception as exc:  # noqa: BLE001 - judged again on the one-by-one path
            raise _Fallback(event_id, unit) from exc
        work.add(receipt)
        return Accepted(result), unit.adopt(work)

    def _prefetch_items(self, unit: Unit, items: Sequence[Item]) -> None:
        """Read together what a batch's decisions will likely read: the receipts, the
        aggregates its payloads name and, as far as this process's cache knows them, their
        parties and pools (`_cached_parties`); then whatever parties and pools of the sessions
        and patients read are still missing (none when the cache knew them: one query in all,
        not three in a row)."""
        named = [i for item in items for i in _named_ids(item[3])]
        unit.prefetch([Receipt.create_id(item[0]) for item in items] + named
                      + self._cached_parties(named))
        _prefetch_parties(unit, [a for a in unit.current.values() if isinstance(a, Session)])

    def _cached_parties(self, ids: list[UUID]) -> list[UUID]:
        """The parties (`_party_ids`) of the sessions among `ids`, and the pools of the patients
        among `ids` and those parties, as the aggregate cache last saw them: only a guess of
        what to read in the same query (what is read is still read from the store, versions
        checked; a party the guess missed is read afterwards)."""
        known = [a for a in map(self._cached, ids) if a is not None]
        sessions = [a for a in known if isinstance(a, Session)]
        patients = [a for a in known if isinstance(a, Patient)] + [
            a for a in map(self._cached, (Patient.create_id(s.patient_id) for s in sessions))
            if a is not None]
        return ([i for s in sessions for i in _party_ids(s)]
                + [UUID(p) for patient in patients for p in patient.pool_ids])

    def _plan_page(self, unit: Unit, as_of: datetime, session_ids: list[str],
                   pool_ids: list[str]) -> dict[str, tuple[int, Step]]:
        """Read a tick page's sessions and pools, decide each session's next step ONCE
        ({session id: (the session's version, its step)} of the steps due by `as_of`), then
        read what those steps need: a charge its patient's pools, another step also the
        doctor, wallet and appointment."""
        unit.prefetch([Session.create_id(s) for s in session_ids] + [UUID(p) for p in pool_ids])
        due = self._due_sessions(as_of, session_ids, unit.current.get)
        charging = frozenset(sid for sid, (_, step) in due.items() if step.action == "charge")
        _prefetch_parties(unit, [session for session, _ in due.values()], charging)
        return {sid: (session.version, step) for sid, (session, step) in due.items()}

    def _due_sessions(self, as_of: datetime, session_ids: Iterable[str],
                      get: Callable[[UUID], Any]) -> dict[str, tuple[Session, Step]]:
        """{session id: (the session as read with `get`, its next step)} of the sessions whose
        next step is due by `as_of`, in the order given (the tick's candidates)."""
        due = {}
        for session_id in dict.fromkeys(session_ids):
            session = get(Session.create_id(session_id))
            step = next_step(session, self.policy) if session is not None else None
            if step is not None and step.due <= as_of:
                due[session_id] = session, step
        return due

    @staticmethod
    def _unit_receipt(unit: Unit, event_id: str) -> Receipt | None:
        """The receipt of `event_id` recorded earlier or earlier in this unit, or None."""
        try:
            return unit.peek(Receipt.create_id(event_id))
        except Exception as exc:  # noqa: BLE001 - judged again on the one-by-one path
            raise _Fallback(event_id) from exc

    @staticmethod
    def _check_age(occurred_at: datetime, now: datetime) -> None:
        """Raise OccurredAtOutOfRange outside [now − 35 days, now + 5 minutes] (input_rules)."""
        if not within(occurred_at, occurred_at_window(now)):
            raise errors.OccurredAtOutOfRange(
                f"occurred_at {occurred_at.isoformat()} is outside [now − 35 days, now + 5 minutes]")

    @staticmethod
    def _payload_instant(p: dict, name: str, at: datetime) -> datetime:
        """The payload instant `name` (aware datetime or ISO string) in UTC whole seconds;
        raises InstantOutOfRange beyond 366 days of the event's `at` (input_rules.py)."""
        value = p[name]
        moment = utc_seconds(value if isinstance(value, datetime)
                             else datetime.fromisoformat(str(value)))
        if not within(moment, payload_instant_window(at)):
            raise errors.InstantOutOfRange(
                f"{name} {moment.isoformat()} is more than 366 days from occurred_at "
                f"{at.isoformat()}", field=name)
        return moment

    def knows_patient(self, patient_id: str) -> bool:
        """Whether the ledger holds a patient record (a pool was granted or shared to them)."""
        return self._exists(Patient.create_id(patient_id))

    def knows_doctor(self, doctor_id: str) -> bool:
        """Whether the doctor was registered."""
        return self._exists(Doctor.create_id(doctor_id))

    def _exists(self, aggregate_id: UUID) -> bool:
        return next(iter(self.events.get(aggregate_id, limit=1)), None) is not None

    # ---------------------------------------------------------------------------- doctors

    def _doctor_registered(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        doctor = work.get(Doctor.create_id(p["doctor_id"]))
        if doctor is None:
            work.add(Doctor(doctor_id=p["doctor_id"], country=p["country"], at=at))
        elif doctor.country != p["country"]:
            doctor.change_country(country=p["country"], at=at)
            work.add(doctor)
        return {"doctor_id": p["doctor_id"], "country": p["country"]}

    def _doctor_country_changed(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        doctor = work.get(Doctor.create_id(p["doctor_id"]))
        if doctor is None:
            raise errors.UnknownDoctor(f"doctor {p['doctor_id']!r} is not registered")
        if doctor.country != p["country"]:
            doctor.change_country(country=p["country"], at=at)
            work.add(doctor)
        return {"doctor_id": p["doctor_id"], "country": p["country"]}

    # ------------------------------------------------------------------------------ pools

    def _subscription_granted(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        plan = p["plan"]
        starts_at = self._payload_instant(p, "starts_at", at)
        content = body_hash("grant", starts_at, {"owner_id": p["owner_id"], "plan": plan})
        pool = work.get(Pool.create_id(p["payment_reference"]))
        if pool is not None:
            if pool.content_hash != content:
                raise errors.PaymentConflict(
                    f"payment {p['payment_reference']!r} already granted a different pool")
            return self._pool_result(pool)
        # The legacy one-time 7-day extension of 30-day plans, applied at grant (§4).
        extension = 7 if int(plan["duration_days"]) == 30 else 0
        end = starts_at + timedelta(days=int(plan["duration_days"]) + extension)
        pool = Pool(payment_reference=p["payment_reference"], owner_id=p["owner_id"], plan=plan,
                    starts_at=starts_at, effective_end=end, extension_days=extension,
                    content_hash=content)
        work.add(pool, self._link(work, p["owner_id"], pool))
        return self._pool_result(pool)

    @staticmethod
    def _pool_result(pool: Pool) -> dict:
        return {"pool_id": str(pool.id), "payment_reference": pool.payment_reference,
                "effective_end": pool.effective_end.isoformat()}

    @staticmethod
    def _link(work: Work, patient_id: str, pool: Pool) -> Patient:
        patient = work.get(Patient.create_id(patient_id)) or Patient(patient_id=patient_id)
        patient.link_pool(pool_id=str(pool.id))
        return patient

    def _existing_pool(self, work: Work, payment_reference: str) -> Pool:
        pool = work.get(Pool.create_id(payment_reference))
        if pool is None:
            raise errors.UnknownSubscription(f"no subscription for payment {payment_reference!r}")
        return pool

    def _payment_refunded(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        pool = self._existing_pool(work, p["payment_reference"])
        pool.revoke()
        work.add(pool)
        return {**self._pool_result(pool), "revoked": dict(pool.revoked)}

    def _member_added(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        pool = self._existing_pool(work, p["payment_reference"])
        if pool.add_member(p["patient_id"], at):
            work.add(pool, self._link(work, p["patient_id"], pool))
        return {**self._pool_result(pool), "patient_id": p["patient_id"],
                "seats_taken": pool.active_member_count()}

    def _member_removed(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        pool = self._existing_pool(work, p["payment_reference"])
        pool.remove_member(p["patient_id"], at)
        work.add(pool)
        return {**self._pool_result(pool), "patient_id": p["patient_id"]}

    # --------------------------------------------------------------------------- sessions

    def _session_requested(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        sid, kind, patient_id = p["session_id"], p["kind"], p["patient_id"]
        if kind not in KINDS:
            raise errors.InvalidEvent(f"kind must be one of {KINDS}")
        if (existing := work.get(Session.create_id(sid))) is not None:
            raise errors.SessionExists(f"session {sid!r} was already requested",
                                       **existing.standing())
        doctor = work.get(Doctor.create_id(p["doctor_id"]))
        if doctor is None or not doctor.country:
            raise errors.UnknownDoctor(f"doctor {p['doctor_id']!r} has no recorded country")
        patient = work.get(Patient.create_id(patient_id))
        group = presence_group(kind)
        if patient is not None and group in patient.live:
            raise errors.SessionConflict(
                f"patient has live session {patient.live[group]!r} of the same kind",
                **self._standing(work, patient.live[group]))
        if busy := doctor.busy_with_other_than(patient_id):
            raise errors.SessionConflict(f"doctor has live session {busy!r} with another patient",
                                         **self._standing(work, busy))
        pool = choose_pool(work, patient_id, kind, at)
        if pool is None:
            raise errors.InsufficientUnits(f"no {kind} unit can be held for block 1")
        session = Session(session_id=sid, kind=kind, patient_id=patient_id,
                          doctor_id=p["doctor_id"], requested_at=at, pool_id=str(pool.id))
        pool.hold(session_id=sid, block=1, bucket=kind, patient_id=patient_id, at=at)
        patient.open_session(group=group, session_id=sid)
        doctor.open_session(session_id=sid, patient_id=patient_id)
        work.add(session, pool, patient, doctor)
        return session_view(session)

    @staticmethod
    def _standing(work: Work, session_id: str) -> dict:
        """The conflicting session's session_id, state, ended_at, paid_until (for a 409)."""
        session = work.get(Session.create_id(session_id))
        return session.standing() if session is not None else {"session_id": session_id}

    def _live_session(self, work: Work, p: dict, at: datetime) -> Session:
        session = work.get(Session.create_id(p["session_id"]))
        if session is None:
            raise errors.UnknownSession(f"no session {p['session_id']!r}")
        session.check_open()
        if session.ended and (session.ended_finally or at >= session.ended_at):
            # A report from before a backend-reported end still counts until settlement (§3);
            # a recorded timeout (or decline) stays final even if an earlier end report has
            # since replaced the end's time and reason (§8).
            raise errors.SessionEnded(f"session {session.session_id} ended: {session.end_reason}",
                                      **session.standing(), reason=session.end_reason)
        if at < session.requested_at:
            raise errors.InvalidTransition(
                f"occurred_at {at.isoformat()} precedes the session's request")
        session.check_live_at(at, self.policy)
        return session

    def _patient_message(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        session = self._live_session(work, p, at)
        if session.kind != "text":
            raise errors.InvalidTransition("patient messages are for text sessions")
        if session.first_message_at is None and session.started_at is None:
            session.patient_messaged(at=at)
        else:
            session.record_activity(at=at)
        work.add(session)
        return session_view(session)

    def _started(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        session = self._live_session(work, p, at)
        wants_call = p["_type"] == "call.connected"
        if session.is_call != wants_call:
            raise errors.InvalidTransition(f"{p['_type']} does not apply to a {session.kind} session")
        self._start(work, session, at)
        return session_view(session)

    def _start(self, work: Work, session: Session, at: datetime) -> None:
        """Record `at` as a reported billable start if it is the earliest reported (the
        providers' connect is kept apart: it may still move later), stamp the rate, hold ahead."""
        if session.reported_start is not None and at >= session.reported_start:
            return
        session.start(at=at, rate=self._rate(work, session, at))
        work.add(session)
        hold_ahead(work, session, 2, self.policy)

    def _presence(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        """A provider's participant or room report (issue 4; §8). The connect and the end are
        derived from all kept reports in provider-time order — the connect at once, the end by
        the tick at its decide_at + skew — so duplicates and reordering give the same outcome.
        A report naming neither participant, or dated after the session's final end or a
        passed timeout, is acknowledged and not kept (it could not change anything billed)."""
        session = work.get(Session.create_id(p["session_id"]))
        if session is None:
            raise errors.UnknownSession(f"no session {p['session_id']!r}")
        session.check_open()
        if not session.is_call:
            raise errors.InvalidTransition(f"{p['_type']} is for voice and video sessions")
        if at < session.requested_at:
            raise errors.InvalidTransition(f"occurred_at {at.isoformat()} precedes the session's request")
        action = p["_type"].removeprefix("call.").removeprefix("participant_")
        roles = [""] if action == "room_ended" else participant_roles(session, p.get("participant", ""))
        late = self._too_late(session, at)
        if not roles or late:
            reason = late or "participant is neither the patient nor the doctor"
            return {**session_view(session), "ignored": reason}
        if any([session.record_presence(role=role, action=action, at=at) for role in roles]):
            work.add(session)
            self._stamp_provider_start(work, session)
        return {**session_view(session), "presence": presence_view(session)}

    def _too_late(self, session: Session, at: datetime) -> str | None:
        """Why a report dated `at` comes too late to count, or None (§8): once a final end
        (timeout, exhaustion, decline) is recorded, or after the idle or maximum-duration
        deadline of a started call, as for the backend's own reports. Before the start, reports
        are kept whatever their order (a leave may arrive before the joins); a connect they
        show after the ring deadline counts if it is accepted before the tick records `missed`
        (docs/design.md, Provider presence)."""
        if session.ended_finally:  # decided once, never reopened (§3, §8)
            return f"the session's end is final ({session.end_reason})"
        pending = session.pending_end(self.policy) if session.started_at else None
        if pending and at > pending[0]:
            return f"after the session's {pending[1]} deadline"
        return None

    def _stamp_provider_start(self, work: Work, session: Session) -> None:
        """A start known only from provider reports gets its rate and its hold ahead (§3, §5)."""
        if session.started_at is None or session.rate is not None:
            return
        session.stamp_rate(rate=self._rate(work, session, session.started_at))
        hold_ahead(work, session, 2, self.policy)

    @staticmethod
    def _rate(work: Work, session: Session, at: datetime) -> dict:
        """The rate to stamp on `session` for a billable start at `at` (§5)."""
        doctor = work.get(Doctor.create_id(session.doctor_id))
        return stamped_rate(doctor, session.bucket, at)

    def _call_ringing(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        session = self._live_session(work, p, at)
        if not session.is_call:
            raise errors.InvalidTransition("call.ringing is for voice and video sessions")
        if session.ringing_at is None and session.started_at is None:
            session.ring(at=at)
            work.add(session)
        return session_view(session)

    def _call_declined(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        session = self._live_session(work, p, at)
        if not session.is_call or session.started_at is not None:
            raise errors.InvalidTransition("only a call that has not connected can be declined")
        end_session(work, session, at, "doctor", "declined", now)
        return session_view(session)

    def _activity(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        session = self._live_session(work, p, at)
        session.record_activity(at=at)  # before a reported end it can still defer a timeout
        work.add(session)
        return session_view(session)

    def _session_ended(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        session = work.get(Session.create_id(p["session_id"]))
        if session is None:
            raise errors.UnknownSession(f"no session {p['session_id']!r}")
        session.check_open()
        by, reason = p.get("ended_by", "patient"), p.get("reason") or "completed"
        if by not in END_BY:
            raise errors.InvalidEvent(f"ended_by must be one of {END_BY}")
        # A timeout deadline before `at` is not applied here but by the tick at deadline + skew
        # (the earliest end stands), so a start or activity reported late within the skew counts.
        recorded = end_session(work, session, at, by, reason, now)
        return {**session_view(session), "ended_at": session.ended_at.isoformat(),
                "reason": session.end_reason, "end_recorded": recorded,
                "standing_end": self._standing_end(session, recorded)}

    @staticmethod
    def _standing_end(session: Session, recorded: bool) -> dict:
        """The end that stands after an end report (§3: the earliest; a timeout is final):
        its ended_at, reason and who ended it, and why a report that changed nothing did not."""
        end = {"ended_at": session.ended_at.isoformat(), "reason": session.end_reason,
               "ended_by": session.end_by}
        if not recorded:
            final = " (a timeout, exhaustion or decline is final)" if session.ended_finally else ""
            end["note"] = (f"the session already ended at {end['ended_at']} "
                           f"({session.end_reason}){final}; this later end changes nothing")
        return end

    # ----------------------------------------------------------------------- appointments
    # A booking, never a charge (§9, I10): these handlers touch no pool and no wallet.

    def get_appointment(self, appointment_id: str) -> Appointment:
        """Raises UnknownAppointment."""
        appointment = self.load(Appointment.create_id(appointment_id))
        if appointment is None:
            raise errors.UnknownAppointment(f"no appointment {appointment_id!r}")
        return appointment

    @staticmethod
    def _appointment(work: Work, appointment_id: str) -> Appointment:
        appointment = work.get(Appointment.create_id(appointment_id))
        if appointment is None:
            raise errors.UnknownAppointment(f"no appointment {appointment_id!r}")
        work.add(appointment)
        return appointment

    def _appointment_booked(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        if p["kind"] not in APPOINTMENT_KINDS:
            raise errors.InvalidEvent(f"kind must be one of {APPOINTMENT_KINDS}")
        starts_at = self._payload_instant(p, "starts_at", at)
        fields = {"patient_id": p["patient_id"], "doctor_id": p["doctor_id"], "kind": p["kind"],
                  "starts_at": starts_at, "duration_minutes": int(p.get("duration_minutes", 30))}
        existing = work.get(Appointment.create_id(p["appointment_id"]))
        if existing is not None:
            if any(getattr(existing, k) != v for k, v in fields.items()):
                raise errors.AppointmentExists(f"appointment {p['appointment_id']!r} exists")
            return existing.view()
        appointment = Appointment(appointment_id=p["appointment_id"], at=at, **fields)
        work.add(appointment)
        return appointment.view()

    def _appointment_step(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        appointment = self._appointment(work, p["appointment_id"])
        if p["_type"] == "appointment.confirmed":
            appointment.confirm(at=at)
        else:
            appointment.open_join_window(at=at)
        return appointment.view()

    def _appointment_linked(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        appointment = self._appointment(work, p["appointment_id"])
        session = work.get(Session.create_id(p["session_id"]))
        if session is None:
            raise errors.UnknownSession(f"no session {p['session_id']!r}")
        if (session.patient_id, session.doctor_id) != (appointment.patient_id, appointment.doctor_id):
            raise errors.InvalidTransition("the session has another patient or doctor")
        if session.kind != appointment.kind:
            raise errors.InvalidTransition(f"a {appointment.kind} appointment cannot be served "
                                           f"by a {session.kind} session")
        if session.appointment_id not in (None, appointment.appointment_id):
            raise errors.InvalidTransition(f"session serves appointment {session.appointment_id!r}")
        if appointment.link(session.session_id, at):
            session.link_appointment(appointment_id=appointment.appointment_id)
            work.add(session)
        if session.settled:
            complete_appointment(work, session, now)
        return appointment.view()

    def _appointment_closed(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        appointment = self._appointment(work, p["appointment_id"])
        status = p["_type"].removeprefix("appointment.")
        detail = {k: p[k] for k in ("cancelled_by", "reason", "absent") if k in p}
        if appointment.status == status and appointment.close_detail == detail:
            return appointment.view()  # the same close reported again: nothing changes
        appointment.close(status=status, at=at, detail=detail,
                          session_unbilled=self._settled_unstarted(work, appointment.session_id))
        return appointment.view()

    @staticmethod
    def _settled_unstarted(work: Work, session_id: str | None) -> bool:
        """Whether the linked session settled without a billable start (nothing was billed)."""
        session = work.get(Session.create_id(session_id)) if session_id else None
        return bool(session and session.settled and session.started_at is None)

    # ---------------------------------------------------------------------------- wallets

    def _withdrawal_requested(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        currency, amount = p["currency"], int(p["amount_minor"])
        minimum = self.withdrawal_minimum_minor.get(currency, 0)
        if amount < minimum:
            raise errors.BelowMinimum(f"minimum withdrawal is {minimum} {currency} minor units",
                                      minimum_minor=minimum, currency=currency)
        wallet = work.get(Wallet.create_id(p["doctor_id"], currency))
        if wallet is None:
            raise errors.InsufficientFunds("no settled pay in this currency", available_minor=0)
        wallet.request_withdrawal(p["request_id"], amount, at)
        work.add(wallet)
        return self._wallet_result(wallet, p["request_id"])

    def _withdrawal_finished(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        wallet = work.get(Wallet.create_id(p["doctor_id"], p["currency"]))
        if wallet is None:
            raise errors.UnknownWithdrawal(f"unknown withdrawal {p['request_id']!r}")
        completed = p["_type"] == "withdrawal.completed"
        wallet.finish_withdrawal(p["request_id"], completed, p.get("reason", ""), at)
        work.add(wallet)
        return self._wallet_result(wallet, p["request_id"])

    @staticmethod
    def _wallet_result(wallet: Wallet, request_id: str) -> dict:
        return {"request_id": request_id, "doctor_id": wallet.doctor_id,
                "currency": wallet.currency, "status": wallet.withdrawals[request_id]["status"],
                "available_minor": wallet.available_minor}

    # ---------------------------------------------------------------------------- the tick

    def tick(self, as_of: datetime, session_ids: Iterable[str], pool_ids: Iterable[str] = (),
             max_steps: int = 20_000) -> TickReport:
        """Decide everything due by `as_of` for the given sessions and pools, in time order.

        Candidates come from the live view. Steps are decided in units of TICK_UNIT_STEPS
        against one shared set of aggregates and each unit is saved in one transaction
        (`Unit`). Every save is optimistic: a unit another writer has moved (a concurrent tick
        or ingest) fails to save as a whole, and the tick goes on step by step from there; so
        does a tick in which a step raised. Step by step, each step is decided on the session
        as loaded (or as this tick last saved it) and saved on its own, so a step another tick
        has already taken fails to save, is re-decided on a fresh load and changes nothing
        (I1, I9); a broken session is reported in `failures` and the others go on.
        """
        as_of = utc_seconds(as_of)
        session_ids, pool_ids = list(dict.fromkeys(session_ids)), list(dict.fromkeys(pool_ids))
        report = TickReport(as_of=as_of)
        try:
            self._tick_units(as_of, session_ids, pool_ids, max_steps, report)
            return report
        except IntegrityError:
            report.conflicts += 1  # the unsaved unit is dropped; its steps are redone below
        except _Fallback as fallback:
            report.conflicts += fallback.stale
        report.absorb(self._tick_each(as_of, session_ids, pool_ids, max_steps))
        return report

    def _tick_units(self, as_of: datetime, session_ids: list[str], pool_ids: list[str],
                    max_steps: int, report: TickReport) -> None:
        """The tick in units; each saved unit's steps are added to `report`. Raises
        IntegrityError (a lost race) or _Fallback (a step raised): the unit then being decided
        is not saved and not reported."""
        unit = Unit(self.load, self.load_many)
        planned = self._plan_page(unit, as_of, session_ids, pool_ids)
        queue = [(step.due, "session", sid) for sid, (_, step) in planned.items()]
        queue += self._due_pools(as_of, pool_ids, unit.peek)
        heapq.heapify(queue)
        pending, decided, steps = TickReport(as_of=as_of), 0, 0
        while queue and steps < max_steps:
            due, kind, key = heapq.heappop(queue)
            steps += 1
            if kind == "pool":
                decided += self._expire_in_unit(unit, key, pending)
            else:
                step_due = self._step_in_unit(unit, key, as_of, pending, planned)
                decided += 1
                if step_due is not None:
                    heapq.heappush(queue, (step_due, "session", key))
            if decided >= TICK_UNIT_STEPS:
                self._save_unit(unit, pending, report)
                pending, decided = TickReport(as_of=as_of), 0
        self._save_unit(unit, pending, report)
        report.more = bool(queue)

    def _save_unit(self, unit: Unit, pending: TickReport, report: TickReport) -> None:
        """Save the unit's queued events in one transaction, then report its steps."""
        if unit.events:
            self.save(*unit.events)
            self._remember(unit)
            unit.saved()
        report.absorb(pending)

    def _remember(self, unit: Unit) -> None:
        """Cache the aggregates a unit just saved, as saved (their versions are the stored
        ones), so the next load reads nothing but what others wrote since. Safe to share:
        a unit never changes its aggregates in place (it copies on use). Receipts are not
        cached. Snapshots the long-lived ones due for it (`_write_snapshots`)."""
        self._write_snapshots(unit.events, unit.current)
        if self._aggregates is None:
            return
        for aggregate_id in {event.originator_id for event in unit.events}:
            aggregate = unit.current.get(aggregate_id)
            if aggregate is not None and not aggregate.pending_events \
                    and _worth_caching(aggregate):
                self._aggregates.put(aggregate_id, aggregate)

    def _step_in_unit(self, unit: Unit, session_id: str, as_of: datetime, report: TickReport,
                      planned: dict[str, tuple[int, Step]]) -> datetime | None:
        """Decide one due step of a session inside `unit`; returns when its next step is due
        (≤ as_of) or None. `planned`: the step decided for the session at its version when
        it was queued (reused while the session is still at that version; replaced by the
        following step). Raises _Fallback if the step raised."""
        work = unit.work()
        session = work.get(Session.create_id(session_id))
        version, step = planned.pop(session_id, (None, None))
        if session is not None and session.version != version:
            step = next_step(session, self.policy)  # changed since planned: decide again
        if session is None or step is None or step.due > as_of:
            return None
        try:
            with recording_at(utc_seconds(self.clock())):
                line = apply_step(work, session, step, as_of, self.policy)
        except Exception as exc:  # noqa: BLE001 - stale or broken: the step-by-step path judges
            raise _Fallback(session_id, unit) from exc
        unit.adopt(work)
        report.record(session_id, step, session, line)
        following = next_step(session, self.policy)
        if following is None or following.due > as_of:
            return None
        planned[session_id] = session.version, following
        return following.due

    def _expire_in_unit(self, unit: Unit, pool_id: str, report: TickReport) -> int:
        """Expire a pool inside `unit`; returns 1 if it did, else 0."""
        work = unit.work()
        pool = work.get(UUID(pool_id))
        if pool is None or pool.expired:
            return 0
        try:
            with recording_at(utc_seconds(self.clock())):
                pool.expire()
        except Exception as exc:  # noqa: BLE001 - judged again on the step-by-step path
            raise _Fallback(pool_id, unit) from exc
        work.add(pool)
        unit.adopt(work)
        report.expire(pool)
        return 1

    def _tick_each(self, as_of: datetime, session_ids: list[str], pool_ids: list[str],
                   max_steps: int) -> TickReport:
        """The tick step by step, each step saved on its own (see `tick`)."""
        report = TickReport(as_of=as_of)
        known: dict[str, Session] = {}  # sessions as loaded or last saved by this tick
        queue = self._initial_queue(as_of, session_ids, pool_ids, known, self.load)
        heapq.heapify(queue)
        steps = 0
        while queue and steps < max_steps:
            due, kind, key = heapq.heappop(queue)
            steps += 1
            if kind == "pool":
                self._expire_pool(key, report)
                continue
            try:
                step_due = self._tick_session(key, as_of, report, known)
            except Exception as exc:  # one broken session must not stop everyone's billing
                log.exception("tick failed for session %s", key)
                report.fail(key, exc)
                continue
            if step_due is not None:
                heapq.heappush(queue, (step_due, "session", key))
        report.more = bool(queue)
        return report

    def _initial_queue(self, as_of: datetime, session_ids: Iterable[str], pool_ids: Iterable[str],
                       known: dict[str, Session], load: Callable[[UUID], Any],
                       ) -> list[tuple[datetime, str, str]]:
        """(due, "session" | "pool", id) of everything due by `as_of`, read with `load`;
        the due sessions as read go into `known`."""
        due = self._due_sessions(as_of, session_ids, load)
        known.update((sid, session) for sid, (session, _) in due.items())
        return ([(step.due, "session", sid) for sid, (_, step) in due.items()]
                + self._due_pools(as_of, pool_ids, load))

    def _due_pools(self, as_of: datetime, pool_ids: Iterable[str], load: Callable[[UUID], Any],
                   ) -> list[tuple[datetime, str, str]]:
        """(due, "pool", id) of each pool whose expiry is due by `as_of`, read with `load`."""
        queue = []
        skew = timedelta(seconds=self.policy.skew_seconds)
        for pool_id in dict.fromkeys(pool_ids):
            pool = load(UUID(pool_id))
            if pool is not None and not pool.expired and pool.effective_end + skew <= as_of:
                queue.append((pool.effective_end + skew, "pool", pool_id))
        return queue

    def _tick_session(self, session_id: str, as_of: datetime, report: TickReport,
                      known: dict[str, Session]) -> datetime | None:
        """Take one due step for a session; returns when its next step is due (≤ as_of) or None.

        The first attempt starts from `known[session_id]`; a retry after a lost race reloads.
        """
        for _ in range(MAX_ATTEMPTS):
            work = Work(self.load)
            session = (work.seed(known.pop(session_id)) if session_id in known
                       else work.get(Session.create_id(session_id)))
            step = next_step(session, self.policy)
            if step is None or step.due > as_of:
                return None
            try:
                with recording_at(utc_seconds(self.clock())):
                    line = apply_step(work, session, step, as_of, self.policy)
            except (AssertionError, KeyError):
                if not work.stale():
                    raise
                report.conflicts += 1  # decided on a snapshot another writer has moved
                continue
            try:
                self.save(*work.to_save())
            except IntegrityError:
                report.conflicts += 1
                continue
            report.record(session_id, step, session, line)
            known[session_id] = session  # saved: current for its next step in this tick
            following = next_step(session, self.policy)
            return following.due if following and following.due <= as_of else None
        report.conflicts += 1
        return None

    def _expire_pool(self, pool_id: str, report: TickReport) -> None:
        for _ in range(MAX_ATTEMPTS):
            pool = self.load(UUID(pool_id))
            if pool is None or pool.expired:
                return
            with recording_at(utc_seconds(self.clock())):
                pool.expire()
            try:
                self.save(pool)
            except IntegrityError:
                report.conflicts += 1
                continue
            report.expire(pool)
            return

