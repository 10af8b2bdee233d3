"""Aggregates of the ledger: Session, Pool, Patient, Doctor, Wallet, Receipt.

Each command method checks its guards and then calls one `@event` method, which is both the
event and its mutator (replayed on load). Consistency boundaries are in docs/design.md: a hold,
charge or release is saved together with every pool it touches, so a unit is held, charged or
released exactly when the session records it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache
from hashlib import sha1
from uuid import NAMESPACE_URL, UUID, SafeUUID, uuid5

from eventsourcing.domain import event

from ledger.presence import Presence, Signal, derive
from ledger.recording import LedgerAggregate, fast_commands, fast_creation
from ledger.errors import (
    InvalidTransition,
    InsufficientFunds,
    SeatsExhausted,
    SessionEnded,
    SessionSettled,
    UnknownMember,
    UnknownWithdrawal,
    WithdrawalConflict,
)
from ledger.rules import (
    BLOCK_SECONDS,
    Policy,
    block_end,
    bucket_for,
    settlement_due,
    units_owed,
)

NS = uuid5(NAMESPACE_URL, "urn:telehealth-ledger")


_NS_BYTES = NS.bytes
_UUID5_CLEAR = ~((0xc000 << 48) | (0xf000 << 64))  # the variant and version bits, as uuid.UUID
_UUID5_SET = (0x8000 << 48) | (5 << 76)  # RFC 4122 variant, version 5


@lru_cache(maxsize=65_536)
def ledger_id(name: str) -> UUID:
    """The aggregate id of `name` ("session:<id>", "pool:<reference>", …): uuid5 in the
    ledger's namespace (`uuid.uuid5(NS, name)`, the same UUID). Memoised, bounded: a tick or a
    batch derives the same few ids many times, and uuid5 (a SHA-1) was 3 % of a tick's CPU;
    a miss (every new event id's receipt) builds the UUID without `UUID.__init__`'s checks."""
    digest = sha1(_NS_BYTES + name.encode()).digest()
    uid = object.__new__(UUID)
    object.__setattr__(uid, "int", (int.from_bytes(digest[:16], "big") & _UUID5_CLEAR) | _UUID5_SET)
    object.__setattr__(uid, "is_safe", SafeUUID.unknown)
    return uid
# Ends after which no billable start or activity is accepted any more (§8): the timeouts, the
# exhaustion decided by the ledger, and a declined call.
FINAL_REASONS = frozenset({"not_started", "doctor_no_response", "missed", "idle_timeout",
                           "max_duration", "balance_exhausted", "declined"})


def _key(session_id: str, block: int) -> str:
    return f"{session_id}#{block}"


# ----------------------------------------------------------------------------------------- pools


class Pool(LedgerAggregate):
    """One subscription purchase: units per bucket, validity window, owner and members (§4).

    `free[bucket]` never goes below zero (I3); conservation per bucket (I6):
    granted = free + held + net charged + forfeited + revoked, where `charged` holds the
    net charges (a reversal removes its entry) and `reversed` counts the reversals.
    """

    @staticmethod
    def create_id(payment_reference: str) -> UUID:
        return ledger_id("pool:" + payment_reference)

    @event("Granted")
    def __init__(self, payment_reference: str, owner_id: str, plan: dict, starts_at: datetime,
                 effective_end: datetime, extension_days: int, content_hash: str) -> None:
        self.payment_reference = payment_reference
        self.owner_id = owner_id
        self.plan = plan
        self.starts_at = starts_at
        self.effective_end = effective_end
        self.extension_days = extension_days
        self.content_hash = content_hash
        units = {b: int(plan["units"].get(b, 0)) for b in ("text", "voice", "video")}
        self.granted = dict(units)
        self.free = dict(units)
        self.held: dict[str, str] = {}  # "session#block" -> bucket
        self.charged: dict[str, str] = {}  # "session#block" -> bucket (net of reversals)
        self.reversed = {b: 0 for b in units}
        self.forfeited = {b: 0 for b in units}
        self.revoked = {b: 0 for b in units}
        self.members: dict[str, list] = {}  # patient_id -> [added_at, removed_at | None]
        self.expired = False
        self.refunded = False

    @property
    def seats(self) -> int:
        return int(self.plan.get("seats", 1))

    @property
    def closed(self) -> bool:
        """Expired or refunded: its free units are gone and released units are not returned."""
        return self.expired or self.refunded

    def is_member(self, patient_id: str, instant: datetime) -> bool:
        """Owner always; a member from `added_at` until `removed_at` (exclusive) (§4)."""
        if patient_id == self.owner_id:
            return True
        span = self.members.get(patient_id)
        return bool(span) and span[0] <= instant and (span[1] is None or instant < span[1])

    def usable_for(self, patient_id: str, bucket: str, instant: datetime) -> bool:
        """Whether a hold for `instant` may draw on this pool (§4)."""
        return (not self.closed and self.free.get(bucket, 0) > 0
                and self.starts_at <= instant < self.effective_end
                and self.is_member(patient_id, instant))

    def draw_order(self) -> tuple:
        """Earliest effective_end, then earliest starts_at, then pool id (§4, legacy B26)."""
        return (self.effective_end, self.starts_at, str(self.id))

    def active_member_count(self) -> int:
        """Seats taken, owner included."""
        return 1 + sum(1 for p, span in self.members.items()
                       if span[1] is None and p != self.owner_id)

    def add_member(self, patient_id: str, at: datetime) -> bool:
        """Add an active member; False if already active. Raises SeatsExhausted (§4)."""
        span = self.members.get(patient_id)
        if patient_id == self.owner_id or (span and span[1] is None):
            return False
        if self.active_member_count() >= self.seats:
            raise SeatsExhausted(f"plan has {self.seats} seats")
        self._member_added(patient_id=patient_id, at=at)
        return True

    @event("MemberAdded")
    def _member_added(self, patient_id: str, at: datetime) -> None:
        self.members[patient_id] = [at, None]

    def remove_member(self, patient_id: str, at: datetime) -> None:
        """Remove an active member from `at` on; raises UnknownMember."""
        span = self.members.get(patient_id)
        if not span or span[1] is not None:
            raise UnknownMember(f"{patient_id} is not an active member")
        self._member_removed(patient_id=patient_id, at=max(at, span[0]))

    @event("MemberRemoved")
    def _member_removed(self, patient_id: str, at: datetime) -> None:
        self.members[patient_id][1] = at

    @event("Held")
    def hold(self, session_id: str, block: int, bucket: str, patient_id: str, at: datetime) -> None:
        """Hold one free unit of `bucket` for (session, block); caller checked usable_for."""
        assert self.free[bucket] > 0, "overdraft"
        self.free[bucket] -= 1
        self.held[_key(session_id, block)] = bucket

    @event("Charged")
    def charge(self, session_id: str, block: int, bucket: str, patient_id: str) -> None:
        """Post the hold of (session, block): held → charged."""
        key = _key(session_id, block)
        assert self.held.pop(key) == bucket and key not in self.charged, "charge without hold"
        self.charged[key] = bucket

    def release(self, session_id: str, block: int, patient_id: str) -> None:
        """Void the hold of (session, block); forfeited if the pool has closed (§4)."""
        bucket = self.held[_key(session_id, block)]
        self._released(session_id=session_id, block=block, bucket=bucket, patient_id=patient_id,
                       forfeited=self.expired, revoked=self.refunded and not self.expired)

    @event("Released")
    def _released(self, session_id: str, block: int, bucket: str, patient_id: str,
                  forfeited: bool, revoked: bool) -> None:
        del self.held[_key(session_id, block)]
        self._return_unit(bucket, forfeited, revoked)

    def reverse(self, session_id: str, block: int, patient_id: str) -> None:
        """Reverse the charge of (session, block): the unit goes back, or is forfeited (§3)."""
        bucket = self.charged[_key(session_id, block)]
        self._reversed(session_id=session_id, block=block, bucket=bucket, patient_id=patient_id,
                       forfeited=self.expired, revoked=self.refunded and not self.expired)

    @event("Reversed")
    def _reversed(self, session_id: str, block: int, bucket: str, patient_id: str,
                  forfeited: bool, revoked: bool) -> None:
        del self.charged[_key(session_id, block)]
        self.reversed[bucket] += 1
        self._return_unit(bucket, forfeited, revoked)

    def _return_unit(self, bucket: str, forfeited: bool, revoked: bool) -> None:
        if forfeited:
            self.forfeited[bucket] += 1
        elif revoked:
            self.revoked[bucket] += 1
        else:
            self.free[bucket] += 1

    def expire(self) -> None:
        """Forfeit every free unit at effective_end by an explicit event (§4, legacy B25)."""
        if not self.expired:
            self._expired(forfeited={b: n for b, n in self.free.items()})

    @event("Expired")
    def _expired(self, forfeited: dict) -> None:
        for bucket, n in forfeited.items():
            self.forfeited[bucket] += n
            self.free[bucket] -= n
        self.expired = True

    def revoke(self) -> None:
        """Refund: revoke the free units; held and charged units stand (§4)."""
        if not self.refunded:
            self._revoked(revoked={b: n for b, n in self.free.items()})

    @event("Revoked")
    def _revoked(self, revoked: dict) -> None:
        for bucket, n in revoked.items():
            self.revoked[bucket] += n
            self.free[bucket] -= n
        self.refunded = True


# -------------------------------------------------------------------------------------- sessions


class Session(LedgerAggregate):
    """One consultation. Blocks are 1-based; `holds`/`charges` map block → pool id (§3).

    Events: Requested, Ringing, PatientMessaged, Activated (text), Connected (calls),
    ActivityRecorded, BlockHeld, AutoDeducted(n), Ended, Settled.
    """

    appointment_id: str | None = None  # the appointment this session serves, if linked (§9)

    @staticmethod
    def create_id(session_id: str) -> UUID:
        return ledger_id("session:" + session_id)

    @event("Requested")
    def __init__(self, session_id: str, kind: str, patient_id: str, doctor_id: str,
                 requested_at: datetime, pool_id: str) -> None:
        self.session_id = session_id
        self.kind = kind
        self.bucket = bucket_for(kind)
        self.patient_id = patient_id
        self.doctor_id = doctor_id
        self.requested_at = requested_at
        self.holds: dict[int, str] = {1: pool_id}
        self.charges: dict[int, str] = {}
        self.reversals: dict[int, str] = {}
        self.ringing_at: datetime | None = None
        self.first_message_at: datetime | None = None
        self.started_at: datetime | None = None  # min(reported_start, provider connect)
        self.reported_start: datetime | None = None  # earliest Activated/Connected
        self.last_activity_at: datetime | None = None
        self.rate: dict | None = None
        self.ended_at: datetime | None = None
        self.end_by: str | None = None
        self.end_reason: str | None = None
        self.end_reasons: list[str] = []  # every accepted end's reason, in order
        self.end_received_at: datetime | None = None
        self.settled = False
        self.settlement: dict | None = None
        self.presence: list[Signal] = []  # provider reports, in provider-time order

    # ---- derived state

    def presence_state(self) -> Presence:
        """Connected/ended as the provider reports say (ledger/presence.py)."""
        return derive(self.presence)

    @property
    def is_call(self) -> bool:
        return self.kind != "text"

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def state(self) -> str:
        """requested | ringing | active | ended | settled."""
        if self.settled:
            return "settled"
        if self.ended:
            return "ended"
        if self.started_at:
            return "active"
        return "ringing" if self.ringing_at else "requested"

    def held_through(self) -> int:
        """Highest block k such that blocks 1..k are all held or charged."""
        k = 0
        while (k + 1) in self.holds or (k + 1) in self.charges:
            k += 1
        return k

    @property
    def charged_through(self) -> int:
        return max(self.charges, default=0)

    def paid_until(self) -> datetime | None:
        """End of the last block held or charged; None before the billable start (§3)."""
        if self.started_at is None:
            return None
        return block_end(self.started_at, self.held_through())

    @property
    def ended_finally(self) -> bool:
        """A final end was ever recorded (a timeout, exhaustion or decline): nothing reopens it."""
        return bool(FINAL_REASONS.intersection(self.end_reasons))

    def pending_end(self, policy: Policy) -> tuple[datetime, str] | None:
        """The timeout the session reaches if nothing else is reported: (deadline, reason) (§8).

        Also for a session ended by a report, when the deadline comes before that end: the
        tick records it at deadline + skew, so reports arriving within the skew still count.
        """
        if self.settled or self.ended_finally:
            return None
        if self.started_at is None:
            deadline = self._not_started_end(policy)
        else:
            max_end = self.started_at + timedelta(seconds=policy.max_duration_seconds)
            deadline = (max_end, "max_duration")
            # While the provider reports both participants in the room the call is not idle.
            if not (self.presence and self.presence_state().both_present):
                idle_end = self.last_activity_at + timedelta(seconds=policy.idle_seconds(self.kind))
                deadline = min((idle_end, "idle_timeout"), deadline)
        if self.ended and deadline[0] >= self.ended_at:
            return None
        return deadline

    def _not_started_end(self, policy: Policy) -> tuple[datetime, str]:
        if self.is_call:
            since = self.ringing_at or self.requested_at
            return since + timedelta(seconds=policy.ring_timeout_seconds), "missed"
        if self.first_message_at is not None:
            return (self.first_message_at + timedelta(seconds=policy.doctor_reply_seconds),
                    "doctor_no_response")
        return self.requested_at + timedelta(seconds=policy.text_not_started_seconds), "not_started"

    def units_owed(self) -> int:
        """Units owed by §2 for the recorded times; the session must have ended."""
        assert self.ended_at is not None
        return units_owed(self.kind, self.started_at, self.ended_at)

    def settlement_due(self, policy: Policy) -> datetime | None:
        if not self.ended or self.settled:
            return None
        return settlement_due(self.ended_at, self.end_received_at, policy)

    def standing(self) -> dict:
        """What a refusal about this session carries so the backend can act without a second
        call (issue 9 §4): session_id, state, ended_at and paid_until (ISO 8601 or None)."""
        paid_until = self.paid_until()
        return {"session_id": self.session_id, "state": self.state,
                "ended_at": self.ended_at.isoformat() if self.ended_at else None,
                "paid_until": paid_until.isoformat() if paid_until else None}

    # ---- guards

    def check_open(self) -> None:
        """Raise SessionSettled after settlement; nothing about the session changes then."""
        if self.settled:
            raise SessionSettled(f"session {self.session_id} is settled", **self.standing())

    def check_live_at(self, at: datetime, policy: Policy) -> None:
        """Raise SessionEnded if a timeout of a live session has passed by `at` (§8)."""
        self.check_open()
        pending = self.pending_end(policy)
        if pending and at > pending[0]:
            raise SessionEnded(f"session {self.session_id} timed out ({pending[1]}) at "
                               f"{pending[0].isoformat()}", **self.standing(),
                               timeout=pending[1], timeout_at=pending[0].isoformat())

    # ---- commands and events

    @event("Ringing")
    def ring(self, at: datetime) -> None:
        self.ringing_at = at

    @event("PatientMessaged")
    def patient_messaged(self, at: datetime) -> None:
        self.first_message_at = at
        self.last_activity_at = max(self.last_activity_at or at, at)

    def start(self, at: datetime, rate: dict) -> None:
        """Record the billable start (Activated for text, Connected for calls) (§1, §3)."""
        if self.is_call:
            self._connected(at=at, rate=rate)
        else:
            self._activated(at=at, rate=rate)

    @event("Activated")
    def _activated(self, at: datetime, rate: dict) -> None:
        self._apply_start(at, rate)

    @event("Connected")
    def _connected(self, at: datetime, rate: dict) -> None:
        self._apply_start(at, rate)

    def _apply_start(self, at: datetime, rate: dict) -> None:
        # One billable start: the earliest reported before settlement (§1); rate stamped once.
        self.reported_start = at if self.reported_start is None else min(self.reported_start, at)
        self.rate = self.rate or rate
        self._refresh_start()

    def _refresh_start(self) -> None:
        """started_at = the earliest of the reported start and the providers' connect. The
        providers' connect is re-derived from all their reports, so a report delivered late
        can move it either way until settlement (issue 4: order by provider time)."""
        connected = derive(self.presence).connected_at if self.presence else None
        starts = [t for t in (self.reported_start, connected) if t is not None]
        self.started_at = min(starts, default=None)
        if self.started_at is not None:
            self.last_activity_at = max(self.last_activity_at or self.started_at, self.started_at)

    @event("RateStamped")
    def stamp_rate(self, rate: dict) -> None:
        """The rate of a start known only from provider reports (§5: stamped once)."""
        self.rate = self.rate or rate

    def record_presence(self, role: str, action: str, at: datetime) -> bool:
        """Keep one provider report (§8, issue 4); False if the same report is already kept."""
        signal = Signal(at=at, role=role, action=action)
        if signal in self.presence:
            return False
        self._presence_recorded(role=role, action=action, at=at)
        return True

    @event("PresenceRecorded")
    def _presence_recorded(self, role: str, action: str, at: datetime) -> None:
        self.presence = sorted([*self.presence, Signal(at=at, role=role, action=action)],
                               key=Signal.sort_key)
        self.last_activity_at = max(self.last_activity_at or at, at)  # a provider report (§8)
        self._refresh_start()

    @event("LinkedToAppointment")
    def link_appointment(self, appointment_id: str) -> None:
        self.appointment_id = appointment_id

    @event("ActivityRecorded")
    def record_activity(self, at: datetime) -> None:
        self.last_activity_at = max(self.last_activity_at or at, at)

    @event("BlockHeld")
    def held(self, block: int, pool_id: str, at: datetime) -> None:
        """A unit of `pool_id` is held for `block`; `at` is the instant the hold is for."""
        assert block not in self.holds and block not in self.charges
        self.holds[block] = pool_id

    @event("AutoDeducted")
    def auto_deducted(self, n: int, pool_id: str, patient_id: str, doctor_id: str, bucket: str,
                      pay_minor: int, currency: str) -> None:
        """Block n's hold is charged when its end has passed (§3). At most once per n (I1)."""
        assert n not in self.charges and self.holds.get(n) == pool_id, "double charge"
        del self.holds[n]
        self.charges[n] = pool_id

    def end(self, ended_at: datetime, by: str, reason: str, received_at: datetime) -> bool:
        """Record an end report; the earliest ended_at stands (§3). False if it changes nothing."""
        self.check_open()
        if self.ended and ended_at >= self.ended_at:
            return False
        # The reported instant is kept as is, even before the billable start: d = max(0, …)
        # (§1) already makes such a session zero-length, and clamping it to the start known now
        # would bill the gap if an earlier billable start is reported later.
        self._ended(ended_at=ended_at, by=by, reason=reason, received_at=received_at,
                    first=not self.ended, patient_id=self.patient_id, doctor_id=self.doctor_id)
        return True

    @event("Ended")
    def _ended(self, ended_at: datetime, by: str, reason: str, received_at: datetime, first: bool,
               patient_id: str, doctor_id: str) -> None:
        self.ended_at, self.end_by, self.end_reason = ended_at, by, reason
        self.end_reasons.append(reason)
        if first:
            self.end_received_at = received_at

    @event("Settled")
    def _settled(self, at: datetime, units_owed: int, charged: list, reversed: list,
                 released: list, patient_id: str, doctor_id: str, bucket: str,
                 pay_per_unit_minor: int, currency: str, pending_before_minor: int,
                 net_pay_minor: int) -> None:
        for item in charged:
            self.charges[item["block"]] = self.holds.pop(item["block"])
        for item in reversed:
            self.reversals[item["block"]] = self.charges.pop(item["block"])
        for item in released:
            del self.holds[item["block"]]
        self.settled = True
        self.settlement = {"at": at.isoformat(), "units_owed": units_owed,
                           "net_pay_minor": net_pay_minor, "currency": currency}

    def record_settlement(self, at: datetime, charged: list, reversed: list, released: list) -> None:
        """Close the session's billing; lists hold {"block", "pool_id"} dicts (§3)."""
        pay = self.rate["pay_minor"] if self.rate else 0
        currency = self.rate["currency"] if self.rate else ""
        pending_before = pay * len(self.charges)
        net_units = len(self.charges) + len(charged) - len(reversed)
        assert net_units == self.units_owed(), "settlement must charge exactly the units owed (I2)"
        self._settled(at=at, units_owed=self.units_owed(), charged=charged, reversed=reversed,
                      released=released, patient_id=self.patient_id, doctor_id=self.doctor_id,
                      bucket=self.bucket, pay_per_unit_minor=pay, currency=currency,
                      pending_before_minor=pending_before, net_pay_minor=pay * net_units)


# ------------------------------------------------------------------------ patients and doctors


class Patient(LedgerAggregate):
    """A patient's pool links and live sessions (one per presence group, §8)."""

    @staticmethod
    def create_id(patient_id: str) -> UUID:
        return ledger_id("patient:" + patient_id)

    @event("Registered")
    def __init__(self, patient_id: str) -> None:
        self.patient_id = patient_id
        self.pool_ids: list[str] = []
        self.live: dict[str, str] = {}  # presence group -> session id

    @event("PoolLinked")
    def link_pool(self, pool_id: str) -> None:
        if pool_id not in self.pool_ids:
            self.pool_ids.append(pool_id)

    @event("SessionOpened")
    def open_session(self, group: str, session_id: str) -> None:
        self.live[group] = session_id

    @event("SessionClosed")
    def close_session(self, group: str, session_id: str) -> None:
        if self.live.get(group) == session_id:
            del self.live[group]


class Doctor(LedgerAggregate):
    """A doctor: ISO 3166-1 alpha-2 country and live sessions (session id → patient id) (§5, §8)."""

    @staticmethod
    def create_id(doctor_id: str) -> UUID:
        return ledger_id("doctor:" + doctor_id)

    @event("Registered")
    def __init__(self, doctor_id: str, country: str, at: datetime) -> None:
        self.doctor_id = doctor_id
        self.country = country
        self.live: dict[str, str] = {}

    @event("CountryChanged")
    def change_country(self, country: str, at: datetime) -> None:
        self.country = country

    @event("SessionOpened")
    def open_session(self, session_id: str, patient_id: str) -> None:
        self.live[session_id] = patient_id

    @event("SessionClosed")
    def close_session(self, session_id: str) -> None:
        self.live.pop(session_id, None)

    def busy_with_other_than(self, patient_id: str) -> str | None:
        """A live session of this doctor with another patient, if any."""
        return next((s for s, p in self.live.items() if p != patient_id), None)

    # ---- priced consultations in progress (§10: they and live sessions block each other)

    @property
    def consultations(self) -> dict[str, dict]:
        """consultation id -> {"mode", "ends_at", "practitioner_joined"} while in progress."""
        return self.__dict__.setdefault("_consultations", {})  # absent in older snapshots

    @event("ConsultationInProgress")
    def consultation_in_progress(self, consultation_id: str, mode: str, ends_at: datetime,
                                 practitioner_joined: bool) -> None:
        self.consultations[consultation_id] = {"mode": mode, "ends_at": ends_at,
                                               "practitioner_joined": practitioner_joined}

    @event("ConsultationClosed")
    def close_consultation(self, consultation_id: str) -> None:
        self.consultations.pop(consultation_id, None)

    def consultation_busy(self, at: datetime, modes: tuple[str, ...],
                          other_than: str = "") -> str | None:
        """An in-progress consultation of one of `modes`, other than `other_than`, whose
        scheduled end is after `at`, if any (§10)."""
        return next((cid for cid, c in self.consultations.items()
                     if cid != other_than and c["mode"] in modes and c["ends_at"] > at), None)


# ---------------------------------------------------------------------------------------- wallets


class Wallet(LedgerAggregate):
    """Settled pay and withdrawals of one doctor in one ISO 4217 currency (§5, §7).

    available = credited − held − withdrawn, in minor units; never negative (I3).
    """

    @staticmethod
    def create_id(doctor_id: str, currency: str) -> UUID:
        return ledger_id(f"wallet:{doctor_id}:{currency}")

    @event("Opened")
    def __init__(self, doctor_id: str, currency: str) -> None:
        self.doctor_id = doctor_id
        self.currency = currency
        self.credited_minor = 0
        self.held_minor = 0
        self.withdrawn_minor = 0
        self.withdrawals: dict[str, dict] = {}

    @property
    def available_minor(self) -> int:
        return self.credited_minor - self.held_minor - self.withdrawn_minor

    @event("Credited")
    def credit(self, session_id: str, amount_minor: int) -> None:
        """Settled pay of one session becomes available."""
        self.credited_minor += amount_minor

    @event("EarningCredited")
    def credit_earning(self, consultation_id: str, amount_minor: int) -> None:
        """A priced consultation's share becomes available after its grace (§10 Earnings)."""
        self.credited_minor += amount_minor

    def request_withdrawal(self, request_id: str, amount_minor: int, at: datetime) -> None:
        """Hold `amount_minor`; raises WithdrawalConflict or InsufficientFunds (§7)."""
        if request_id in self.withdrawals:
            raise WithdrawalConflict(f"withdrawal {request_id} already exists")
        if amount_minor > self.available_minor:
            raise InsufficientFunds(f"available {self.available_minor} < {amount_minor}",
                                    available_minor=self.available_minor)
        self._withdrawal_held(request_id=request_id, amount_minor=amount_minor, at=at)

    @event("WithdrawalHeld")
    def _withdrawal_held(self, request_id: str, amount_minor: int, at: datetime) -> None:
        self.held_minor += amount_minor
        self.withdrawals[request_id] = {"amount_minor": amount_minor, "status": "held"}

    def finish_withdrawal(self, request_id: str, completed: bool, reason: str, at: datetime) -> None:
        """Post (completed) or release (rejected/failed) a held withdrawal (§7)."""
        item = self.withdrawals.get(request_id)
        if item is None:
            raise UnknownWithdrawal(f"unknown withdrawal {request_id}")
        if item["status"] != "held":
            raise WithdrawalConflict(f"withdrawal {request_id} is already {item['status']}")
        if completed:
            self._withdrawal_completed(request_id=request_id, amount_minor=item["amount_minor"], at=at)
        else:
            self._withdrawal_released(request_id=request_id, amount_minor=item["amount_minor"],
                                      reason=reason, at=at)

    @event("WithdrawalCompleted")
    def _withdrawal_completed(self, request_id: str, amount_minor: int, at: datetime) -> None:
        self.held_minor -= amount_minor
        self.withdrawn_minor += amount_minor
        self.withdrawals[request_id]["status"] = "completed"

    @event("WithdrawalReleased")
    def _withdrawal_released(self, request_id: str, amount_minor: int, reason: str,
                             at: datetime) -> None:
        self.held_minor -= amount_minor
        self.withdrawals[request_id]["status"] = "rejected"


# --------------------------------------------------------------------------------------- receipts


class Receipt(LedgerAggregate):
    """The idempotency record of one accepted event id, kept forever (I8)."""

    @staticmethod
    def create_id(event_id: str) -> UUID:
        return ledger_id("event:" + event_id)

    @event("Recorded")
    def __init__(self, event_id: str, body_hash: str, event_type: str, result: dict) -> None:
        self.event_id = event_id
        self.body_hash = body_hash
        self.event_type = event_type
        self.result = result


def check_transition(ok: bool, message: str) -> None:
    """Raise InvalidTransition unless `ok`."""
    if not ok:
        raise InvalidTransition(message)


# The tick's and the write path's aggregates trigger their events without the library's
# per-call layers (ledger/recording.py `fast_commands`: the same events, the same bytes).
fast_commands(Pool, Session, Patient, Doctor, Wallet)
fast_creation(Pool, Session, Patient, Doctor, Wallet, Receipt)

__all__ = ["NS", "Pool", "Session", "Patient", "Doctor", "Wallet", "Receipt", "BLOCK_SECONDS",
           "check_transition", "SessionEnded"]
