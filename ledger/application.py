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
from typing import Any, Callable, Iterable
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError

from ledger import errors
from ledger.appointments import APPOINTMENT_KINDS, Appointment
from ledger.billing import (Step, Work, apply_step, choose_pool, complete_appointment,
                            end_session, hold_ahead, next_step)
from ledger.domain import Doctor, Patient, Pool, Receipt, Session, Wallet
from ledger.marketplace import Marketplace
from ledger.input_rules import occurred_at_window, payload_instant_window, within
from ledger.rules import BLOCK_SECONDS, KINDS, Policy, presence_group, utc_seconds
from ledger.tariff import rate_at

log = logging.getLogger("ledger")
Clock = Callable[[], datetime]
MAX_ATTEMPTS = 8  # optimistic retries per command before answering retry_later
END_BY = ("patient", "doctor", "system")
# Legacy minimums (§7); the service takes LEDGER_WITHDRAWAL_MINIMUMS (runtime/settings.py).
WITHDRAWAL_MINIMUM_MINOR = {"MWK": 5_000_000, "USD": 7_000}


@dataclass(frozen=True)
class Accepted:
    """Result of one ingested event: `result` is the stored body; `replayed` on a re-post."""

    result: dict
    replayed: bool = False


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

    def fail(self, session_id: str, exc: Exception) -> None:
        self.failed.append(f"{session_id}: {type(exc).__name__}: {exc}")
        self.failures.append({"session_id": session_id, "error": type(exc).__name__})

    def expire(self, pool: Pool) -> None:
        self.expired.append(f"{pool.payment_reference}: forfeited {pool.forfeited}")
        self.pools.append({"pool_id": str(pool.id), "payment_reference": pool.payment_reference,
                           "forfeited": dict(pool.forfeited)})


def body_hash(event_type: str, occurred_at: datetime, payload: dict) -> str:
    """SHA-256 of the canonical JSON of the event body; identifies 'the same event'."""
    canonical = json.dumps({"type": event_type, "occurred_at": occurred_at.isoformat(),
                            "payload": payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


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
    """Event-sourced billing ledger. `clock` returns aware UTC datetimes (acceptance time)."""

    name = "Ledger"

    def __init__(self, env: dict | None = None, *, clock: Clock, policy: Policy = Policy(),
                 withdrawal_minimum_minor: dict[str, int] | None = None,
                 on_conflict: Callable[[str], None] | None = None) -> None:
        """`on_conflict(operation)` ("ingest" or "tick") is called at each optimistic-concurrency
        retry: a plain observer, so the domain stays free of metrics libraries."""
        super().__init__(env=env)
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

    # ------------------------------------------------------------------------------ loading

    def load(self, aggregate_id: UUID) -> Any:
        """The aggregate with this id, or None."""
        try:
            return self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None

    def get_session(self, session_id: str) -> Session:
        """Raises UnknownSession."""
        session = self.load(Session.create_id(session_id))
        if session is None:
            raise errors.UnknownSession(f"no session {session_id!r}")
        return session

    def get_receipt(self, event_id: str) -> Receipt | None:
        return self.load(Receipt.create_id(event_id))

    # ---------------------------------------------------------------------------- ingestion

    def ingest(self, event_id: str, event_type: str, occurred_at: datetime,
               payload: dict) -> Accepted:
        """Record one backend event exactly once; returns its result (I8).

        Raises IdempotencyConflict (same id, other body), OccurredAtOutOfRange, RetryLater and
        the business refusals of each handler. A refused event records nothing.
        """
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
                outcome = handler(work, occurred_at, {**payload, "_type": event_type}, now)
            except errors.LedgerError:
                if self.get_receipt(event_id) is not None:
                    continue  # a concurrent duplicate committed first: answer with its result
                raise
            except (AssertionError, KeyError):
                if work.stale():
                    self.on_conflict("ingest")
                    continue  # decided on a snapshot another writer has moved: a lost race
                raise
            result = {"event_id": event_id, "type": event_type, **outcome}
            receipt = Receipt(event_id=event_id, body_hash=digest, event_type=event_type, result=result)
            try:
                self.save(*work.to_save(), receipt)
            except IntegrityError:
                self.on_conflict("ingest")
                continue  # a concurrent writer won; reload everything and decide again
            return Accepted(result)
        raise errors.RetryLater("too many concurrent writers; retry the same event")

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

        Candidates come from the live view. Each step is decided on the session as loaded
        (or as this tick last saved it) and saved optimistically, so a step another tick has
        already taken fails to save, is re-decided on a fresh load and changes nothing (I1, I9).
        """
        as_of = utc_seconds(as_of)
        report = TickReport(as_of=as_of)
        known: dict[str, Session] = {}  # sessions as loaded or last saved by this tick
        queue = self._initial_queue(as_of, session_ids, pool_ids, known)
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
                       known: dict[str, Session]) -> list[tuple[datetime, str, str]]:
        queue = []
        for sid in dict.fromkeys(session_ids):
            session = self.load(Session.create_id(sid))
            step = next_step(session, self.policy) if session else None
            if step is not None and step.due <= as_of:
                queue.append((step.due, "session", sid))
                known[sid] = session
        skew = timedelta(seconds=self.policy.skew_seconds)
        for pool_id in dict.fromkeys(pool_ids):
            pool = self.load(UUID(pool_id))
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
            pool.expire()
            try:
                self.save(pool)
            except IntegrityError:
                report.conflicts += 1
                continue
            report.expire(pool)
            return

