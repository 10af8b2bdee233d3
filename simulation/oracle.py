"""An independent, sequential model of billing-rules.md: the simulation's ground truth.

The oracle is fed exactly the operations the simulation driver performs, in the same order:
every posted event with the service clock at its acceptance (`post`) and every tick with its
`as_of` (`tick`). It predicts each post's outcome (accepted, or the refusal code) and, at the end,
every session's, patient's and doctor's numbers.

It deliberately imports nothing from `ledger/`: it is a second, simple implementation of the
written rules (one dict per aggregate, no events), so that a bug in the ledger shows up as a
difference instead of being copied. Where the rules leave a choice open, the comments say which
reading it takes (the same as the ledger's documented one, or the comparison would be noise).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from uuid import NAMESPACE_URL, uuid5

BLOCK = 600  # seconds of billable time one unit pays (§1)
CALL_GRACE = 60  # a call shorter than this is free (§2)
KINDS = ("text", "voice", "video")
NS = uuid5(NAMESPACE_URL, "urn:telehealth-ledger")
MAX_FUTURE = timedelta(minutes=5)
MAX_AGE = timedelta(days=35)
WITHDRAWAL_MINIMUM = {"MWK": 5_000_000, "USD": 7_000}  # legacy minimums (§7)
# Reasons after which neither a billable start nor activity is accepted any more (§8).
FINAL_REASONS = frozenset({"not_started", "doctor_no_response", "missed", "idle_timeout",
                           "max_duration", "balance_exhausted", "declined"})
TARIFF_2026 = datetime(2026, 1, 12, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Timings:
    """The configurable timings (§1, §3, §8), seconds."""

    skew: int = 60
    grace: int = 600
    not_started: int = 900
    doctor_reply: int = 300
    ring: int = 90
    idle_text: int = 600
    idle_call: int = 900
    max_duration: int = 3 * 3600

    def idle(self, kind: str) -> int:
        return self.idle_text if kind == "text" else self.idle_call


class Refused(Exception):
    """A refusal with its stable code; the post changes nothing."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Outcome:
    """What the oracle says one post returns."""

    accepted: bool
    replayed: bool = False
    code: str | None = None
    result: dict | None = None


def utc(moment: datetime | str) -> datetime:
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return moment.astimezone(timezone.utc).replace(microsecond=0)


def secs(a: datetime, b: datetime) -> int:
    """Whole seconds from a to b."""
    return int((b - a).total_seconds())


def pool_id_of(payment_reference: str) -> str:
    return str(uuid5(NS, "pool:" + payment_reference))


def owed_units(kind: str, start: datetime | None, end: datetime) -> int:
    """§2: one unit per started block; text at least one once activated; calls under 60 s free."""
    if start is None:
        return 0
    d = max(0, secs(start, end))
    started_blocks = (d + BLOCK - 1) // BLOCK
    if kind == "text":
        return max(1, started_blocks)
    return 0 if d < CALL_GRACE else started_blocks


def pay_rate(country: str, bucket: str, at: datetime) -> tuple[int, str]:
    """Per-unit doctor pay (minor units, currency) in force at the billable start (§5)."""
    home = country == "MW"
    if at >= TARIFF_2026:
        return (350_000, "MWK") if home else (300, "USD")
    legacy = {"text": 4, "voice": 5, "video": 6}[bucket]
    return (legacy * 100_000, "MWK") if home else (legacy * 100, "USD")


def group_of(kind: str) -> str:
    """Voice and video count as one kind for live-session exclusivity (§8)."""
    return "text" if kind == "text" else "call"


# ------------------------------------------------------------------------------- state


@dataclass
class OPool:
    ref: str
    pid: str  # pool id, as the ledger names it
    owner: str
    plan: dict
    starts_at: datetime
    end: datetime  # effective_end
    content: tuple
    granted: dict
    free: dict
    held: dict = field(default_factory=dict)  # (session, block) -> bucket
    charged: dict = field(default_factory=dict)  # (session, block) -> bucket, net of reversals
    reversed: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    forfeited: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    revoked: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    members: dict = field(default_factory=dict)  # patient -> [added_at, removed_at | None]
    expired: bool = False
    refunded: bool = False

    def member_at(self, patient: str, t: datetime) -> bool:
        if patient == self.owner:
            return True
        span = self.members.get(patient)
        return bool(span) and span[0] <= t and (span[1] is None or t < span[1])

    def usable(self, patient: str, bucket: str, t: datetime) -> bool:
        return (not self.expired and not self.refunded and self.free[bucket] > 0
                and self.starts_at <= t < self.end and self.member_at(patient, t))

    def seats_taken(self) -> int:
        return 1 + sum(1 for p, span in self.members.items() if span[1] is None and p != self.owner)

    def give_back(self, bucket: str) -> None:
        """A released or reversed unit: forfeited once expired, revoked once refunded (§3, §4)."""
        if self.expired:
            self.forfeited[bucket] += 1
        elif self.refunded:
            self.revoked[bucket] += 1
        else:
            self.free[bucket] += 1

    def count(self, table: dict, bucket: str) -> int:
        return sum(1 for b in table.values() if b == bucket)


@dataclass
class OSession:
    sid: str
    kind: str
    patient: str
    doctor: str
    requested_at: datetime
    holds: dict  # block -> pool ref
    charges: dict = field(default_factory=dict)  # block -> pool ref
    reversals: dict = field(default_factory=dict)
    ringing_at: datetime | None = None
    first_message_at: datetime | None = None
    started_at: datetime | None = None
    last_activity_at: datetime | None = None
    rate: tuple[int, str] | None = None  # (pay per unit, currency)
    ended_at: datetime | None = None
    end_by: str | None = None
    end_reason: str | None = None
    end_received_at: datetime | None = None
    settled_at: datetime | None = None
    units_owed: int | None = None
    auto_charged: int = 0  # blocks charged by the tick (AutoDeducted)
    settle_charged: int = 0  # blocks charged at settlement
    exhausted: bool = False  # ever ended with balance_exhausted
    final: bool = False  # a final end (timeout, exhaustion, decline) was ever recorded

    @property
    def settled(self) -> bool:
        return self.settled_at is not None

    @property
    def state(self) -> str:
        if self.settled:
            return "settled"
        if self.ended_at is not None:
            return "ended"
        if self.started_at is not None:
            return "active"
        return "ringing" if self.ringing_at is not None else "requested"

    def block_start(self, block: int) -> datetime:
        return self.started_at + timedelta(seconds=(block - 1) * BLOCK)

    def covered_through(self) -> int:
        """Highest k with every block 1..k held or charged."""
        k = 0
        while (k + 1) in self.holds or (k + 1) in self.charges:
            k += 1
        return k

    def paid_until(self) -> datetime | None:
        if self.started_at is None:
            return None
        return self.block_start(self.covered_through() + 1)


@dataclass
class OWallet:
    credited: int = 0  # settled pay
    held: int = 0
    withdrawn: int = 0
    withdrawals: dict = field(default_factory=dict)  # request -> [amount, status]

    @property
    def available(self) -> int:
        return self.credited - self.held - self.withdrawn


@dataclass
class TickOutcome:
    charged: int = 0  # charge steps taken
    ended: int = 0  # timeouts, and charge steps that ended the session at exhaustion
    settled: int = 0
    expired: int = 0


# ------------------------------------------------------------------------------ oracle


class Oracle:
    """Sequential model of the billing rules; see the module docstring."""

    def __init__(self, timings: Timings = Timings()) -> None:
        self.t = timings
        self.receipts: dict[str, tuple[str, Outcome]] = {}
        self.doctors: dict[str, dict] = {}  # id -> {"country", "live": {session: patient}}
        self.patients: dict[str, dict] = {}  # id -> {"pools": [ref], "live": {group: session}}
        self.pools: dict[str, OPool] = {}
        self.pools_by_id: dict[str, OPool] = {}
        self.sessions: dict[str, OSession] = {}
        self.unsettled: set[str] = set()
        self.expiries: list[tuple[datetime, str]] = []  # heap of (effective_end, pool id)
        self.wallets: dict[tuple[str, str], OWallet] = {}
        self.pending_pay: dict[tuple[str, str], int] = {}  # charged pay of unsettled sessions
        # Evidence that the interesting paths were exercised.
        self.contentions = 0  # holds refused while another patient held a unit of the pool
        self.handlers = {
            "doctor.registered": self._doctor, "doctor.country_changed": self._doctor_change,
            "subscription.granted": self._grant, "payment.refunded": self._refund,
            "member.added": self._member_added, "member.removed": self._member_removed,
            "session.requested": self._requested, "session.patient_message": self._message,
            "text.activated": self._start, "call.connected": self._start,
            "call.ringing": self._ringing, "call.declined": self._declined,
            "session.activity": self._activity, "session.ended": self._ended,
            "withdrawal.requested": self._withdraw, "withdrawal.completed": self._withdraw_done,
            "withdrawal.rejected": self._withdraw_done,
        }

    # -------------------------------------------------------------------------- posting

    def post(self, event: dict, now: datetime) -> Outcome:
        """One event accepted at service time `now` (I8: a re-post returns the original)."""
        at = utc(event["occurred_at"])
        digest = _digest(event["type"], at, event["payload"])
        if event["event_id"] in self.receipts:
            stored_digest, outcome = self.receipts[event["event_id"]]
            if stored_digest != digest:
                return Outcome(False, code="idempotency_conflict")
            return Outcome(True, replayed=True, result=outcome.result)
        now = utc(now)
        if at > now + MAX_FUTURE or at < now - MAX_AGE:
            return Outcome(False, code="occurred_at_out_of_range")
        handler = self.handlers.get(event["type"])
        if handler is None:
            return Outcome(False, code="invalid_event")
        try:
            result = handler(at, event["payload"], now, event["type"])
        except Refused as refusal:
            return Outcome(False, code=refusal.code)
        outcome = Outcome(True, result=result)
        self.receipts[event["event_id"]] = (digest, outcome)
        return outcome

    # ---- doctors and pools

    def _doctor(self, at, p, now, _type) -> dict:
        doctor = self.doctors.setdefault(p["doctor_id"], {"country": p["country"], "live": {}})
        doctor["country"] = p["country"]
        return {"doctor_id": p["doctor_id"], "country": p["country"]}

    def _doctor_change(self, at, p, now, _type) -> dict:
        if p["doctor_id"] not in self.doctors:
            raise Refused("unknown_doctor")
        return self._doctor(at, p, now, _type)

    def _patient(self, patient: str) -> dict:
        return self.patients.setdefault(patient, {"pools": [], "live": {}})

    def _grant(self, at, p, now, _type) -> dict:
        plan = _plan(p["plan"])
        starts = utc(p["starts_at"])
        content = (p["owner_id"], json.dumps(plan, sort_keys=True), starts)
        pool = self.pools.get(p["payment_reference"])
        if pool is not None:
            if pool.content != content:
                raise Refused("payment_conflict")
            return self._pool_result(pool)
        days = plan["duration_days"] + (7 if plan["duration_days"] == 30 else 0)  # §4 extension
        units = {b: plan["units"][b] for b in KINDS}
        pool = OPool(ref=p["payment_reference"], pid=pool_id_of(p["payment_reference"]),
                     owner=p["owner_id"], plan=plan, starts_at=starts,
                     end=starts + timedelta(days=days), content=content, granted=dict(units),
                     free=dict(units))
        self.pools[pool.ref] = pool
        self.pools_by_id[pool.pid] = pool
        heapq.heappush(self.expiries, (pool.end, pool.pid))
        self._link(p["owner_id"], pool)
        return self._pool_result(pool)

    def _link(self, patient: str, pool: OPool) -> None:
        pools = self._patient(patient)["pools"]
        if pool.ref not in pools:
            pools.append(pool.ref)

    @staticmethod
    def _pool_result(pool: OPool) -> dict:
        return {"pool_id": pool.pid, "payment_reference": pool.ref,
                "effective_end": pool.end.isoformat()}

    def _known_pool(self, ref: str) -> OPool:
        if ref not in self.pools:
            raise Refused("unknown_subscription")
        return self.pools[ref]

    def _refund(self, at, p, now, _type) -> dict:
        pool = self._known_pool(p["payment_reference"])
        if not pool.refunded:
            for b in KINDS:
                gone = pool.free[b]
                pool.revoked[b] += gone
                pool.free[b] = 0
                self.noted_units(pool, b, -gone)
            pool.refunded = True
        return {**self._pool_result(pool), "revoked": dict(pool.revoked)}

    def _member_added(self, at, p, now, _type) -> dict:
        pool = self._known_pool(p["payment_reference"])
        patient = p["patient_id"]
        span = pool.members.get(patient)
        if patient != pool.owner and not (span and span[1] is None):
            if pool.seats_taken() >= int(pool.plan.get("seats", 1)):
                raise Refused("seats_exhausted")
            pool.members[patient] = [at, None]
            self._link(patient, pool)
        return {**self._pool_result(pool), "patient_id": patient, "seats_taken": pool.seats_taken()}

    def _member_removed(self, at, p, now, _type) -> dict:
        pool = self._known_pool(p["payment_reference"])
        span = pool.members.get(p["patient_id"])
        if not span or span[1] is not None:
            raise Refused("unknown_member")
        span[1] = max(at, span[0])
        self.noted_unlink(pool, p["patient_id"])
        return {**self._pool_result(pool), "patient_id": p["patient_id"]}

    # ---- sessions

    def _pick_pool(self, patient: str, bucket: str, t: datetime) -> OPool | None:
        """The usable pool that expires first (§4): effective_end, starts_at, pool id."""
        refs = self.patients.get(patient, {}).get("pools", [])
        usable = [self.pools[r] for r in refs if self.pools[r].usable(patient, bucket, t)]
        if not usable:
            self._note_contention(patient, bucket, t, refs)
            return None
        return min(usable, key=lambda q: (q.end, q.starts_at, q.pid))

    def _note_contention(self, patient: str, bucket: str, t: datetime, refs: list) -> None:
        for ref in refs:
            pool = self.pools[ref]
            if pool.expired or pool.refunded or not pool.member_at(patient, t):
                continue
            if any(b == bucket and self.sessions[s].patient != patient
                   for (s, _), b in pool.held.items()):
                self.contentions += 1
                return

    def _requested(self, at, p, now, _type) -> dict:
        sid, kind, patient, doctor_id = p["session_id"], p["kind"], p["patient_id"], p["doctor_id"]
        if kind not in KINDS:
            raise Refused("invalid_event")
        if sid in self.sessions:
            raise Refused("session_exists")
        doctor = self.doctors.get(doctor_id)
        if doctor is None or not doctor["country"]:
            raise Refused("unknown_doctor")
        group = group_of(kind)
        if group in self.patients.get(patient, {}).get("live", {}):
            raise Refused("session_conflict")
        if any(other != patient for other in doctor["live"].values()):
            raise Refused("session_conflict")
        pool = self._pick_pool(patient, kind, at)
        if pool is None:
            raise Refused("insufficient_units")
        session = OSession(sid=sid, kind=kind, patient=patient, doctor=doctor_id,
                           requested_at=at, holds={1: pool.ref})
        pool.free[kind] -= 1
        pool.held[(sid, 1)] = kind
        self.noted_units(pool, kind, -1)
        self.sessions[sid] = session
        self.unsettled.add(sid)
        self._patient(patient)["live"][group] = sid
        doctor["live"][sid] = patient
        return self.view(session)

    def _live(self, p: dict, at: datetime) -> OSession:
        """The session an activity-like event is for, refusing it when it can't count (§8)."""
        session = self.sessions.get(p["session_id"])
        if session is None:
            raise Refused("unknown_session")
        if session.settled:
            raise Refused("session_settled")
        if session.ended_at is not None and (session.final or at >= session.ended_at):
            raise Refused("session_ended")  # ended by then, or a final end was recorded
        if at < session.requested_at:
            raise Refused("invalid_transition")  # would bill time before the request
        pending = self.pending_end(session)
        if pending is not None and at > pending[0]:
            raise Refused("session_ended")  # a timeout has passed by the event's own time
        return session

    def _message(self, at, p, now, _type) -> dict:
        session = self._live(p, at)
        if session.kind != "text":
            raise Refused("invalid_transition")
        if session.first_message_at is None and session.started_at is None:
            session.first_message_at = at
        self._touch(session, at)
        return self.view(session)

    @staticmethod
    def _touch(session: OSession, at: datetime) -> None:
        if session.last_activity_at is None or at > session.last_activity_at:
            session.last_activity_at = at

    def _start(self, at, p, now, event_type) -> dict:
        session = self._live(p, at)
        if (session.kind != "text") != (event_type == "call.connected"):
            raise Refused("invalid_transition")
        if session.started_at is None or at < session.started_at:
            # One billable start: the earliest reported before settlement (§1).
            if session.rate is None:
                session.rate = pay_rate(self.doctors[session.doctor]["country"], session.kind, at)
            before = session.paid_until()
            session.started_at = at
            self.noted_session(session, before)
            self._touch(session, at)
            if session.last_activity_at < session.started_at:
                session.last_activity_at = session.started_at
            self._hold_ahead(session, 2)
        return self.view(session)

    def _ringing(self, at, p, now, _type) -> dict:
        session = self._live(p, at)
        if session.kind == "text":
            raise Refused("invalid_transition")
        if session.ringing_at is None and session.started_at is None:
            session.ringing_at = at
        return self.view(session)

    def _declined(self, at, p, now, _type) -> dict:
        session = self._live(p, at)
        if session.kind == "text" or session.started_at is not None:
            raise Refused("invalid_transition")
        self._end(session, at, "doctor", "declined", now)
        return self.view(session)

    def _activity(self, at, p, now, _type) -> dict:
        session = self._live(p, at)
        self._touch(session, at)  # before a reported end it can still defer a timeout
        return self.view(session)

    def _ended(self, at, p, now, _type) -> dict:
        session = self.sessions.get(p["session_id"])
        if session is None:
            raise Refused("unknown_session")
        if session.settled:
            raise Refused("session_settled")
        by, reason = p.get("ended_by", "patient"), p.get("reason") or "completed"
        if by not in ("patient", "doctor", "system"):
            raise Refused("invalid_event")
        # A timeout before `at` is left to the tick (deadline + skew); the earliest end stands.
        self._end(session, at, by, reason, now)
        return {**self.view(session), "ended_at": session.ended_at.isoformat(),
                "reason": session.end_reason}

    def _end(self, session: OSession, at: datetime, by: str, reason: str,
             received: datetime) -> None:
        """Record an end report: the earliest ended_at stands (§3); live until the first."""
        if session.ended_at is not None and at >= session.ended_at:
            return
        # An end before the billable start is kept as reported: d = max(0, …) (§1) makes the
        # session zero-length, and an earlier start reported later still counts from there.
        first = session.ended_at is None
        session.ended_at, session.end_by, session.end_reason = at, by, reason
        self.noted_end(session, first)
        session.final = session.final or reason in FINAL_REASONS
        if reason == "balance_exhausted":
            session.exhausted = True
        if first:
            session.end_received_at = received
            live = self.patients[session.patient]["live"]
            if live.get(group_of(session.kind)) == session.sid:
                del live[group_of(session.kind)]
            self.doctors[session.doctor]["live"].pop(session.sid, None)

    # ---- withdrawals (§7)

    def _withdraw(self, at, p, now, _type) -> dict:
        currency, amount = p["currency"], int(p["amount_minor"])
        if amount < WITHDRAWAL_MINIMUM.get(currency, 0):
            raise Refused("withdrawal_below_minimum")
        wallet = self.wallets.get((p["doctor_id"], currency))
        if wallet is None:
            raise Refused("insufficient_funds")
        if p["request_id"] in wallet.withdrawals:
            raise Refused("withdrawal_conflict")
        if amount > wallet.available:
            raise Refused("insufficient_funds")
        wallet.held += amount
        wallet.withdrawals[p["request_id"]] = [amount, "held"]
        self.noted_withdrawal("held", p["doctor_id"], currency, p["request_id"], amount)
        return self._wallet_result(p["doctor_id"], currency, p["request_id"])

    def _withdraw_done(self, at, p, now, event_type) -> dict:
        wallet = self.wallets.get((p["doctor_id"], p["currency"]))
        item = wallet.withdrawals.get(p["request_id"]) if wallet else None
        if item is None:
            raise Refused("unknown_withdrawal")
        if item[1] != "held":
            raise Refused("withdrawal_conflict")
        wallet.held -= item[0]
        if event_type == "withdrawal.completed":
            wallet.withdrawn += item[0]
            item[1] = "completed"
        else:
            item[1] = "rejected"
        self.noted_withdrawal(item[1], p["doctor_id"], p["currency"], p["request_id"], item[0])
        return self._wallet_result(p["doctor_id"], p["currency"], p["request_id"])

    def _wallet_result(self, doctor: str, currency: str, request: str) -> dict:
        wallet = self.wallets[(doctor, currency)]
        return {"request_id": request, "doctor_id": doctor, "currency": currency,
                "status": wallet.withdrawals[request][1], "available_minor": wallet.available}

    # ------------------------------------------------------------------------- deadlines

    def pending_end(self, s: OSession) -> tuple[datetime, str] | None:
        """(instant, reason) of the timeout a session reaches if nothing else is reported (§8);
        for a session ended by a report, only a deadline before that end; none after a final end."""
        if s.settled or s.final:
            return None
        deadline = self._deadline(s)
        if s.ended_at is not None and deadline[0] >= s.ended_at:
            return None
        return deadline

    def _deadline(self, s: OSession) -> tuple[datetime, str]:
        t = self.t
        if s.started_at is None:
            if s.kind != "text":
                return (s.ringing_at or s.requested_at) + timedelta(seconds=t.ring), "missed"
            if s.first_message_at is not None:
                return s.first_message_at + timedelta(seconds=t.doctor_reply), "doctor_no_response"
            return s.requested_at + timedelta(seconds=t.not_started), "not_started"
        idle = s.last_activity_at + timedelta(seconds=t.idle(s.kind))
        longest = s.started_at + timedelta(seconds=t.max_duration)
        return (idle, "idle_timeout") if idle <= longest else (longest, "max_duration")

    def next_step(self, s: OSession) -> tuple | None:
        """(due, action, detail) of the session's next decision, or None.

        Actions, earliest due first; a timeout on the same instant as a charge goes first, as
        an end report arriving before the tick would have been replaced by that timeout (I9):
        charge block n at its end + skew, if that end is not past the session's (known or
        pending) end; a timeout at its deadline + skew; settlement at
        max(ended_at, first end received) + grace.
        """
        if s.settled:
            return None
        skew = timedelta(seconds=self.t.skew)
        pending = self.pending_end(s)
        limit = min((t for t in (s.ended_at, pending and pending[0]) if t is not None), default=None)
        options = []
        if s.started_at is not None:
            n = max(s.charges, default=0) + 1
            boundary = s.block_start(n + 1)
            if boundary <= limit:
                options.append((boundary + skew, 1, "charge", n))
        if pending is not None:
            options.append((pending[0] + skew, 0, "timeout", pending))
        if s.ended_at is not None:
            due = max(s.ended_at, s.end_received_at) + timedelta(seconds=self.t.grace)
            options.append((due, 2, "settle", None))
        if not options:
            return None
        due, _, action, detail = min(options, key=lambda o: (o[0], o[1]))
        return due, action, detail

    # ------------------------------------------------------------------------------ holds

    def _needed(self, s: OSession, block: int) -> bool:
        """A block can still be used if it starts before the end (reported, else maximal)."""
        limit = s.ended_at or s.started_at + timedelta(seconds=self.t.max_duration)
        return s.block_start(block) < limit

    def _hold(self, s: OSession, block: int) -> bool:
        """Hold a unit for `block`, judged at the block's start instant (§4)."""
        pool = self._pick_pool(s.patient, s.kind, s.block_start(block))
        if pool is None:
            return False
        pool.free[s.kind] -= 1
        pool.held[(s.sid, block)] = s.kind
        self.noted_units(pool, s.kind, -1)
        before = s.paid_until()
        s.holds[block] = pool.ref
        self.noted_session(s, before)
        return True

    def _hold_ahead(self, s: OSession, upto: int) -> None:
        for block in range(s.covered_through() + 1, upto + 1):
            if not self._needed(s, block) or not self._hold(s, block):
                return

    # ------------------------------------------------------------------------------- tick

    def tick(self, as_of: datetime) -> TickOutcome:
        """Every decision due by `as_of`, in order of due time; pools before sessions on a tie,
        then by id (pool id, session id)."""
        as_of = utc(as_of)
        out = TickOutcome()
        queue: list[tuple[datetime, str, str]] = []
        for sid in self.unsettled:
            step = self.next_step(self.sessions[sid])
            if step is not None and step[0] <= as_of:
                queue.append((step[0], "session", sid))
        skew = timedelta(seconds=self.t.skew)
        while self.expiries and self.expiries[0][0] + skew <= as_of:
            end, pid = heapq.heappop(self.expiries)
            queue.append((end + skew, "pool", pid))
        heapq.heapify(queue)
        while queue:
            _, what, key = heapq.heappop(queue)
            if what == "pool":
                self._expire(self.pools_by_id[key])
                out.expired += 1
                continue
            session = self.sessions[key]
            step = self.next_step(session)
            if step is None or step[0] > as_of:
                continue
            self._apply(session, step, as_of, out)
            following = self.next_step(session)
            if following is not None and following[0] <= as_of:
                heapq.heappush(queue, (following[0], "session", key))
        return out

    def _apply(self, s: OSession, step: tuple, as_of: datetime, out: TickOutcome) -> None:
        _, action, detail = step
        if action == "charge":
            self._charge(s, detail, as_of)
            out.charged += detail in s.charges  # a block whose unit ran out is an end, not a charge
            if s.end_reason == "balance_exhausted" and s.ended_at <= as_of:
                out.ended += 1
        elif action == "timeout":
            self._end(s, detail[0], "system", detail[1], as_of)
            out.ended += 1
        else:
            self._settle(s, as_of)
            out.settled += 1

    def _expire(self, pool: OPool) -> None:
        """At effective_end the pool's free units are forfeited (§4)."""
        forfeited = dict(pool.free)
        for b in KINDS:
            pool.forfeited[b] += pool.free[b]
            pool.free[b] = 0
            self.noted_units(pool, b, -forfeited[b])
        pool.expired = True
        self.noted_expiry(pool, forfeited)

    def _charge(self, s: OSession, n: int, as_of: datetime) -> None:
        """AutoDeducted(n): post block n's hold, hold ahead, end if block n+1 is unpaid (§3)."""
        if n not in s.holds and not self._hold(s, n):
            self._end(s, s.block_start(n), "system", "balance_exhausted", as_of)
            return
        ref = s.holds.pop(n)
        pool = self.pools[ref]
        pool.charged[(s.sid, n)] = pool.held.pop((s.sid, n))
        s.charges[n] = ref
        s.auto_charged += 1
        self.noted_charge(s, n)
        key = (s.doctor, s.rate[1])
        self.pending_pay[key] = self.pending_pay.get(key, 0) + s.rate[0]
        self._hold_ahead(s, n + 2)
        if self._needed(s, n + 1) and s.covered_through() <= n:
            self._end(s, s.block_start(n + 1), "system", "balance_exhausted", as_of)

    def _settle(self, s: OSession, as_of: datetime) -> None:
        """Charge exactly owed − charged, reverse the excess, release every other hold (§3)."""
        for _ in range(self.t.max_duration // BLOCK + 3):  # each pass settles or ends earlier
            owed = owed_units(s.kind, s.started_at, s.ended_at)
            missing = [b for b in range(1, owed + 1) if b not in s.charges]
            unheld = [b for b in missing if b not in s.holds]
            if not unheld:
                break
            if not self._hold(s, unheld[0]):  # no unit for an owed block: it was never paid
                self._end(s, s.block_start(unheld[0]), "system", "balance_exhausted", as_of)
        else:
            raise AssertionError(f"oracle: settlement of {s.sid} did not converge")
        pending_before = len(s.charges) * (s.rate[0] if s.rate else 0)
        reversed_now = sorted((b for b in s.charges if b > owed), reverse=True)
        for b in reversed_now:
            pool = self.pools[s.charges.pop(b)]
            pool.give_back(pool.charged.pop((s.sid, b)))
            pool.reversed[s.kind] += 1
            s.reversals[b] = pool.ref
        for b in missing:
            pool = self.pools[s.holds.pop(b)]
            pool.charged[(s.sid, b)] = pool.held.pop((s.sid, b))
            s.charges[b] = pool.ref
            s.settle_charged += 1
        for b in sorted(s.holds):
            pool = self.pools[s.holds.pop(b)]
            pool.give_back(pool.held.pop((s.sid, b)))
        assert len(s.charges) == owed
        s.units_owed = owed
        s.settled_at = as_of
        self.noted_settlement(s, len(missing), reversed_now)
        self.unsettled.discard(s.sid)
        if s.rate is not None:
            key = (s.doctor, s.rate[1])
            self.pending_pay[key] = self.pending_pay.get(key, 0) - pending_before
            if owed > 0:
                self.wallets.setdefault(key, OWallet()).credited += owed * s.rate[0]

    # ------------------------------------------------------------------ observation points
    # Called where the ledger records an event a webhook is derived from; they do nothing
    # here. simulation/expectation.py overrides them to predict the notifications.

    def noted_units(self, pool: OPool, bucket: str, delta: int) -> None:
        """The free units of `pool` in `bucket` changed by `delta` < 0 (a hold, a refund's
        revocation, an expiry)."""

    def noted_unlink(self, pool: OPool, patient: str) -> None:
        """`patient` stopped being an active member of `pool`."""

    def noted_session(self, s: OSession, paid_until_before: datetime | None) -> None:
        """A billable start or a hold was recorded for `s` (paid_until may have moved)."""

    def noted_charge(self, s: OSession, block: int) -> None:
        """The tick charged `block` of `s` (AutoDeducted)."""

    def noted_end(self, s: OSession, first: bool) -> None:
        """An end was recorded for `s` (the first, or an earlier one replacing it)."""

    def noted_settlement(self, s: OSession, charged_now: int, reversed_blocks: list) -> None:
        """`s` settled, charging `charged_now` more blocks and reversing `reversed_blocks`."""

    def noted_expiry(self, pool: OPool, forfeited: dict) -> None:
        """`pool` expired, forfeiting `forfeited` units per bucket."""

    def noted_withdrawal(self, status: str, doctor: str, currency: str, request: str,
                         amount: int) -> None:
        """A withdrawal was held, completed or rejected."""

    # ------------------------------------------------------------------------------ views

    def view(self, s: OSession) -> dict:
        """The short session answer every event result carries (§3: paid_until)."""
        paid = s.paid_until()
        return {"session_id": s.sid, "state": s.state,
                "paid_until": paid.isoformat() if paid else None}

    def session_facts(self, sid: str) -> dict:
        s = self.sessions[sid]
        iso = lambda m: m.isoformat() if m else None  # noqa: E731
        return {"state": s.state, "started_at": iso(s.started_at), "ended_at": iso(s.ended_at),
                "end_reason": s.end_reason, "paid_until": iso(s.paid_until()),
                "charges": sorted(s.charges), "reversals": sorted(s.reversals),
                "holds": sorted(s.holds), "units_owed": s.units_owed,
                "charge_pools": {b: self.pools[r].pid for b, r in s.charges.items()},
                "pay_per_unit_minor": s.rate[0] if s.rate else None,
                "currency": s.rate[1] if s.rate else None}

    def patient_units(self) -> dict[str, dict]:
        """Per patient and bucket: units held for and charged to their sessions (net)."""
        out: dict[str, dict] = {}
        for pool in self.pools.values():
            for field_name, table in (("held", pool.held), ("charged", pool.charged)):
                for (sid, _), b in table.items():
                    patient = self.sessions[sid].patient
                    row = out.setdefault(patient, {k: {"held": 0, "charged": 0} for k in KINDS})
                    row[b][field_name] += 1
        return out

    def pool_numbers(self, ref: str) -> dict:
        pool = self.pools[ref]
        return {b: {"granted": pool.granted[b], "available": pool.free[b],
                    "held": pool.count(pool.held, b), "charged": pool.count(pool.charged, b),
                    "reversed": pool.reversed[b], "forfeited": pool.forfeited[b],
                    "revoked": pool.revoked[b]} for b in KINDS}

    def usable_now(self, patient: str, bucket: str, now: datetime) -> int:
        refs = self.patients.get(patient, {}).get("pools", [])
        return sum(self.pools[r].free[bucket] for r in refs
                   if self.pools[r].usable(patient, bucket, now))

    def wallet_numbers(self, doctor: str) -> dict:
        """Per currency: pending (charged, not yet settled), available, held, withdrawn."""
        out = {}
        for (d, currency), pending in self.pending_pay.items():
            if d == doctor:
                out.setdefault(currency, {"pending_minor": 0, "available_minor": 0,
                                          "held_minor": 0, "withdrawn_minor": 0})
                out[currency]["pending_minor"] = pending
        for (d, currency), w in self.wallets.items():
            if d == doctor:
                row = out.setdefault(currency, {"pending_minor": 0})
                row.update(available_minor=w.available, held_minor=w.held,
                           withdrawn_minor=w.withdrawn)
        return out

    def available_minor(self, doctor: str, currency: str) -> int:
        wallet = self.wallets.get((doctor, currency))
        return wallet.available if wallet else 0


def _plan(plan: dict) -> dict:
    """A plan with the API's defaults filled in (seats 1, missing buckets 0)."""
    units = {b: int(plan.get("units", {}).get(b, 0)) for b in KINDS}
    return {**plan, "units": units, "seats": int(plan.get("seats", 1)),
            "duration_days": int(plan["duration_days"])}


def _digest(event_type: str, at: datetime, payload: dict) -> str:
    body = json.dumps({"type": event_type, "at": at.isoformat(), "payload": payload},
                      sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()
