"""How units move for one session: hold ahead, charge due blocks, end at exhaustion, settle.

Rules: billing-rules.md §3 (two phases, one block ahead, exhaustion, settlement, reversal) and §4
(draw order). Every decision is a function of the session's event times, `as_of` and the
Policy; `Work` only loads and collects the aggregates that must be saved together.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Callable, Iterable
from uuid import UUID

from eventsourcing.domain import Aggregate

from ledger.appointments import Appointment
from ledger.domain import Doctor, Patient, Pool, Session, Wallet
from ledger.presence import Signal
from ledger.rules import Policy, block_end, presence_group

_IMMUTABLE = frozenset({str, int, float, bool, type(None), bytes, datetime, date, Decimal, UUID,
                        frozenset, Signal})  # Signal: a frozen dataclass of scalars


def _clone(value):
    """A deep copy of a value: dicts, lists and tuples rebuilt, immutable scalars shared,
    anything else (e.g. a frozen dataclass holding a list) through copy.deepcopy."""
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is dict:  # the common flat case (e.g. a pool's `charged`) copied at C speed
        if _IMMUTABLE.issuperset(map(type, value.values())):
            return value.copy()
        return {k: _clone(v) for k, v in value.items()}
    if kind is list:
        if _IMMUTABLE.issuperset(map(type, value)):
            return value.copy()
        return [_clone(v) for v in value]
    if kind is tuple:
        return tuple(_clone(v) for v in value)
    return deepcopy(value)


def copy_aggregate(aggregate: Aggregate) -> Aggregate:
    """A deep copy of an aggregate without its pending events (a few times cheaper than
    copy.deepcopy on the ledger's aggregates, which hold dicts and lists of scalars)."""
    clone = object.__new__(type(aggregate))
    # immutable values (most attributes: ids, versions, instants) shared without a call
    clone.__dict__ = {k: v if type(v) in _IMMUTABLE else _clone(v)
                      for k, v in aggregate.__dict__.items() if k != "_pending_events"}
    clone.__dict__["_pending_events"] = []
    return clone


@dataclass
class Work:
    """Aggregates loaded for one decision; `touched` are saved together in one transaction.

    `peek` (a Unit's): reads the unit's current aggregate without copying it, for `look`."""

    load: Callable[[UUID], Aggregate | None]
    cache: dict[UUID, Aggregate | None] = field(default_factory=dict)
    touched: dict[UUID, Aggregate] = field(default_factory=dict)
    read_versions: dict[UUID, int | None] = field(default_factory=dict)
    peek: Callable[[UUID], Aggregate | None] | None = None

    def look(self, aggregate_id: UUID) -> Aggregate | None:
        """The aggregate to READ only (never change it): this decision's copy if it has one,
        else the unit's own without a copy (copy-on-write: only what a decision changes is
        copied, e.g. the one pool chosen out of a patient's many); `get` without a unit."""
        if self.peek is None or aggregate_id in self.cache:
            return self.get(aggregate_id)
        return self.peek(aggregate_id)

    def get(self, aggregate_id: UUID) -> Aggregate | None:
        if aggregate_id not in self.cache:
            aggregate = self.load(aggregate_id)
            self.cache[aggregate_id] = aggregate
            self.read_versions[aggregate_id] = aggregate.version if aggregate else None
        return self.cache[aggregate_id]

    def seed(self, aggregate: Aggregate) -> Aggregate:
        """Use an aggregate loaded earlier as if `get` had read it now (stale() still checks it)."""
        self.cache[aggregate.id] = aggregate
        self.read_versions[aggregate.id] = aggregate.version
        return aggregate

    def stale(self) -> bool:
        """Whether an aggregate read for this decision has moved on in the store since it was
        read. Aggregates are loaded one by one, so a concurrent writer can leave this Work with
        an inconsistent snapshot (a session from before a charge, its pool from after it); a
        domain guard tripping on such a snapshot is a lost race, to be retried like an
        IntegrityError, not a bug."""
        for aggregate_id, version in self.read_versions.items():
            current = self.load(aggregate_id)
            if (current.version if current else None) != version:
                return True
        return False

    def add(self, *aggregates: Aggregate) -> None:
        for aggregate in aggregates:
            self.cache[aggregate.id] = aggregate
            self.touched[aggregate.id] = aggregate

    def pool(self, pool_id: str) -> Pool:
        pool = self.get(UUID(pool_id))
        assert isinstance(pool, Pool), f"missing pool {pool_id}"
        self.touched[pool.id] = pool
        return pool

    def to_save(self) -> list[Aggregate]:
        return [a for a in self.touched.values() if a.pending_events]


class Unit:
    """One unit of work (a batch of events, or a page of a tick): every decision in it is made
    against one shared set of loaded aggregates, and all of them are saved in ONE transaction.

    Each decision gets its own `Work` (`work()`), whose `get` hands out a private deep copy of
    the unit's current aggregate, so a decision that raises after mutating leaves nothing
    behind: only `adopt(work)` makes a decision's aggregates the unit's current state and
    queues its new events (`events`, in decision order). The unit's own aggregates never hold
    pending events. `load(id)` reads the store (None when absent); `read_versions` are the
    versions read from the store, for the optimistic check the save does on every written
    aggregate (a concurrent writer makes the save raise IntegrityError; nothing is written).
    """

    def __init__(self, load: Callable[[UUID], Aggregate | None],
                 load_many: Callable[..., dict[UUID, Aggregate | None]] | None = None,
                 ) -> None:
        self.load = load
        self.load_many = load_many
        self.current: dict[UUID, Aggregate | None] = {}
        self.read_versions: dict[UUID, int | None] = {}  # as read from the store
        self.events: list = []

    def prefetch(self, aggregate_ids: Iterable[UUID]) -> None:
        """Read the aggregates this unit does not hold yet together (one query with
        `load_many`); only an optimisation: `peek` loads whatever was not prefetched."""
        missing = [i for i in dict.fromkeys(aggregate_ids) if i not in self.current]
        if missing and self.load_many is not None:
            self._read(self.load_many(missing, shared=True))

    def peek(self, aggregate_id: UUID) -> Aggregate | None:
        """The unit's current aggregate (not a copy: read it, never mutate it)."""
        if aggregate_id not in self.current:
            self.prefetch([aggregate_id])
        if aggregate_id not in self.current:  # no load_many: load one by one
            self._read({aggregate_id: self.load(aggregate_id)})
        return self.current[aggregate_id]

    def _read(self, loaded: dict[UUID, Aggregate | None]) -> None:
        self.current.update(loaded)
        self.read_versions.update((i, a.version if a is not None else None)
                                  for i, a in loaded.items())

    def stale(self) -> bool:
        """Whether an aggregate this unit read has moved on in the store since (see
        Work.stale: a guard tripping on such a snapshot is a lost race, not a bug)."""
        ids = list(self.read_versions)
        now = self.load_many(ids) if self.load_many else {i: self.load(i) for i in ids}
        return any((now[i].version if now[i] is not None else None) != self.read_versions[i]
                   for i in ids)

    def copy(self, aggregate_id: UUID) -> Aggregate | None:
        """A private copy of the unit's current aggregate, or None."""
        aggregate = self.peek(aggregate_id)
        return copy_aggregate(aggregate) if aggregate is not None else None

    def work(self) -> "Work":
        """A Work for one decision, reading private copies of the unit's aggregates."""
        return Work(self.copy, peek=self.peek)

    def saved(self) -> None:
        """The queued events were saved: the store now holds the unit's current versions."""
        for event in self.events:
            self.read_versions[event.originator_id] = event.originator_version
        self.events.clear()

    def adopt(self, work: "Work") -> list:
        """Make one successful decision part of the unit; returns the events it adds.

        As a decision saved alone: the touched aggregates' pending events are queued and they
        become current; aggregates read and not changed become current as they are; one
        changed but never added to the Work (its events would not have been saved) is dropped
        and reloaded from the unit's previous state on next use.
        """
        added = []
        for aggregate in work.to_save():
            added.extend(aggregate.collect_events())
        for aggregate_id, aggregate in work.cache.items():
            if aggregate is None or not aggregate.pending_events:
                self.current[aggregate_id] = aggregate
        self.events.extend(added)
        return added


# ---------------------------------------------------------------------------------------- holds


def choose_pool(work: Work, patient_id: str, bucket: str, instant: datetime) -> Pool | None:
    """The usable pool that expires first for a hold at `instant`, or None (§4)."""
    patient = work.look(Patient.create_id(patient_id))
    if patient is None:
        return None
    pools = [work.look(UUID(pool_id)) for pool_id in patient.pool_ids]
    usable = [p for p in pools if p is not None and p.usable_for(patient_id, bucket, instant)]
    chosen = min(usable, key=Pool.draw_order, default=None)
    return work.get(chosen.id) if chosen is not None else None  # the one to change: a copy


def try_hold(work: Work, session: Session, block: int) -> bool:
    """Hold one unit for `block`, judged at the block's start; False if none is usable."""
    instant = block_end(session.started_at, block - 1)
    pool = choose_pool(work, session.patient_id, session.bucket, instant)
    if pool is None:
        return False
    pool.hold(session_id=session.session_id, block=block, bucket=session.bucket,
              patient_id=session.patient_id, at=instant)
    session.held(block=block, pool_id=str(pool.id), at=instant)
    work.add(pool, session)
    return True


def block_needed(session: Session, block: int, policy: Policy) -> bool:
    """Whether `block` can still be used: it starts before the end (reported or maximal)."""
    limit = session.ended_at or (
        session.started_at + timedelta(seconds=policy.max_duration_seconds))
    return block_end(session.started_at, block - 1) < limit


def hold_ahead(work: Work, session: Session, upto: int, policy: Policy) -> None:
    """Try to hold every missing block up to `upto`, in order, stopping at the first failure."""
    for block in range(session.held_through() + 1, upto + 1):
        if not block_needed(session, block, policy) or not try_hold(work, session, block):
            return


# ------------------------------------------------------------------------------------ lifecycle


def close_presence(work: Work, session: Session) -> None:
    """A session is live until its first accepted Ended (§8)."""
    patient = work.get(Patient.create_id(session.patient_id))
    doctor = work.get(Doctor.create_id(session.doctor_id))
    if patient is not None and patient.live.get(presence_group(session.kind)) == session.session_id:
        patient.close_session(group=presence_group(session.kind), session_id=session.session_id)
        work.add(patient)
    if doctor is not None and session.session_id in doctor.live:
        doctor.close_session(session_id=session.session_id)
        work.add(doctor)


def end_session(work: Work, session: Session, ended_at: datetime, by: str, reason: str,
                received_at: datetime) -> bool:
    """Record an end (earliest stands) and free the presence on the first one (§3, §8)."""
    first = not session.ended
    changed = session.end(ended_at=ended_at, by=by, reason=reason, received_at=received_at)
    work.add(session)
    if changed and first:
        close_presence(work, session)
    return changed


def charge_block(work: Work, session: Session, n: int, as_of: datetime, policy: Policy) -> None:
    """Charge block n from its hold, hold ahead, or end at the boundary when n+1 has no hold."""
    if n not in session.holds and not try_hold(work, session, n):
        end_session(work, session, block_end(session.started_at, n - 1), "system",
                    "balance_exhausted", as_of)
        return
    pool = work.pool(session.holds[n])
    pool.charge(session_id=session.session_id, block=n, bucket=session.bucket,
                patient_id=session.patient_id)
    session.auto_deducted(n=n, pool_id=session.holds[n], patient_id=session.patient_id,
                          doctor_id=session.doctor_id, bucket=session.bucket,
                          pay_minor=session.rate["pay_minor"], currency=session.rate["currency"])
    work.add(session)
    hold_ahead(work, session, n + 2, policy)
    if block_needed(session, n + 1, policy) and session.held_through() <= n:
        end_session(work, session, block_end(session.started_at, n), "system",
                    "balance_exhausted", as_of)


def settle(work: Work, session: Session, as_of: datetime, policy: Policy) -> None:
    """Charge exactly owed − charged, reverse any excess, release every other hold (§3)."""
    for _ in range(policy.max_blocks + 2):  # each pass either settles or moves the end earlier
        owed = session.units_owed()
        missing = [b for b in range(1, owed + 1) if b not in session.charges]
        unheld = next((b for b in missing if b not in session.holds), None)
        if unheld is None:
            break
        if not try_hold(work, session, unheld):
            end_session(work, session, block_end(session.started_at, unheld - 1), "system",
                        "balance_exhausted", as_of)
    else:
        raise AssertionError("settlement did not converge")
    reverse = sorted((b for b in session.charges if b > owed), reverse=True)
    release = sorted(b for b in session.holds if b not in missing)
    for b in reverse:
        work.pool(session.charges[b]).reverse(session_id=session.session_id, block=b,
                                               patient_id=session.patient_id)
    for b in missing:
        work.pool(session.holds[b]).charge(session_id=session.session_id, block=b,
                                           bucket=session.bucket, patient_id=session.patient_id)
    for b in release:
        work.pool(session.holds[b]).release(session_id=session.session_id, block=b,
                                            patient_id=session.patient_id)
    session.record_settlement(
        at=as_of,
        charged=[{"block": b, "pool_id": session.holds[b]} for b in missing],
        reversed=[{"block": b, "pool_id": session.charges[b]} for b in reverse],
        released=[{"block": b, "pool_id": session.holds[b]} for b in release])
    work.add(session)
    credit_wallet(work, session)
    complete_appointment(work, session, as_of)


def complete_appointment(work: Work, session: Session, as_of: datetime) -> None:
    """The appointment a started session served is completed when it settles (§9)."""
    if session.appointment_id is None or session.started_at is None:
        return
    appointment = work.get(Appointment.create_id(session.appointment_id))
    if appointment is not None and not appointment.closed:
        appointment.complete(session_id=session.session_id, at=as_of)
        work.add(appointment)


def credit_wallet(work: Work, session: Session) -> None:
    """Settled pay becomes available in the doctor's wallet for the stamped currency (§5)."""
    amount = session.settlement["net_pay_minor"]
    if amount <= 0:
        return
    currency = session.rate["currency"]
    wallet = work.get(Wallet.create_id(session.doctor_id, currency))
    if wallet is None:
        wallet = Wallet(doctor_id=session.doctor_id, currency=currency)
    wallet.credit(session_id=session.session_id, amount_minor=amount)
    work.add(wallet)


# ------------------------------------------------------------------------------------- the tick


@dataclass(frozen=True)
class Step:
    """One decision the tick can take for a session: `action` at instant `due`."""

    action: str  # "charge" | "timeout" | "settle"
    due: datetime
    block: int = 0
    reason: str = ""
    ended_at: datetime | None = None


def next_step(session: Session, policy: Policy) -> Step | None:
    """The session's earliest pending decision and when it becomes actionable, or None.

    A block n is charged at its end + skew if it is owed in full; a timeout is recorded at its
    deadline + skew; settlement at max(ended_at, first Ended received) + grace (§3, §8).
    """
    if session.settled:
        return None
    skew = timedelta(seconds=policy.skew_seconds)
    pending = session.pending_end(policy)
    provider_end = pending_provider_end(session)
    limit = min((t for t in (session.ended_at, pending and pending[0],
                             provider_end and provider_end[0]) if t), default=None)
    steps = []
    if session.started_at is not None:
        n = session.charged_through + 1
        boundary = block_end(session.started_at, n)
        if limit is None or boundary <= limit:
            steps.append(Step("charge", boundary + skew, block=n))
    if pending is not None:
        steps.append(Step("timeout", pending[0] + skew, reason=pending[1], ended_at=pending[0]))
    if provider_end is not None:
        ended_at, reason, decide_at = provider_end
        steps.append(Step("timeout", decide_at + skew, reason=reason, ended_at=ended_at))
    if session.ended:
        steps.append(Step("settle", session.settlement_due(policy)))
    # A timeout that falls exactly on a block boundary is decided before that block's charge:
    # the session ends there for the timeout, and block n+1 is then not needed, so it is not
    # "balance_exhausted". This is also what an end report arriving before the tick records
    # (the timeout it is replaced with), so the outcome does not depend on the tick (I9).
    return min(steps, key=lambda s: (s.due, s.action != "timeout"), default=None)


def pending_provider_end(session: Session) -> tuple[datetime, str, datetime] | None:
    """(ended_at, reason, decide_at) of the end the provider reports point to, until the tick
    records it at decide_at + skew (a departure + 60 s, a room's end); None when there is none
    or it would not move the recorded end earlier (§3: the earliest end stands)."""
    if not session.presence or session.settled:
        return None
    presence = session.presence_state()
    if presence.ended_at is None or (session.ended and presence.ended_at >= session.ended_at):
        return None
    return presence.ended_at, presence.end_reason, presence.decide_at


def next_due_at(session: Session, policy: Policy) -> datetime | None:
    """When the tick next has something to decide for this session (for the live view)."""
    step = next_step(session, policy)
    return step.due if step else None


def apply_step(work: Work, session: Session, step: Step, as_of: datetime, policy: Policy) -> str:
    """Carry out one decided step; returns a short description for the tick report."""
    if step.action == "charge":
        charge_block(work, session, step.block, as_of, policy)
        return f"charged block {step.block}"
    if step.action == "timeout":
        end_session(work, session, step.ended_at, "system", step.reason, as_of)
        return f"ended {step.reason} at {step.ended_at.isoformat()}"
    settle(work, session, as_of, policy)
    return f"settled {session.settlement['units_owed']} units"
