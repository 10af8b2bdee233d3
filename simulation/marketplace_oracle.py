"""An independent, sequential model of billing-rules.md §10 (priced consultations paid from a
patient money wallet): the simulation's ground truth for the marketplace.

`MarketOracle(oracle)` plugs into the unit-billing `Oracle` (simulation/oracle.py): it adds the
handlers of §10's event types, wraps the unit handlers §10 constrains (a consultation's id is not
a session's; a doctor's in-progress consultation and live session block each other; one payment
reference is one payment), and shares the oracle's receipts, doctors and doctor wallets, so
practitioners' shares are withdrawn like unit pay. `tick(as_of)` predicts the tick's consultation
lines. Like the unit oracle it imports nothing from `ledger/`: plain dicts, no events.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from simulation.oracle import Oracle, OWallet, Refused, utc

JOIN_EARLY = timedelta(seconds=300)
NO_SHOW = timedelta(seconds=600)
CANCEL_BEFORE = timedelta(seconds=7200)
BOOK_AHEAD = timedelta(seconds=300)
ROLES = ("patient", "practitioner")
CLOSED = ("completed", "no_show", "cancelled", "expired")
SESSION_EVENTS = ("session.patient_message", "text.activated", "call.ringing", "call.connected",
                  "call.declined", "session.activity", "session.ended")
PRESENCE_EVENTS = ("call.participant_joined", "call.participant_left", "call.room_ended")
MONEY = ("topped_up", "refunded_to_source", "reversed_payments", "debt", "available", "held",
         "captured", "refunded")


@dataclass
class OMoney:
    """A patient's money in one currency, minor units (§10)."""

    topped_up: int = 0
    refunded_to_source: int = 0
    reversed_payments: int = 0
    debt: int = 0
    available: int = 0
    held: int = 0
    captured: int = 0
    refunded: int = 0

    def credit(self, amount: int) -> None:
        """Money coming into `available` repays debt first."""
        repaid = min(self.debt, amount)
        self.debt -= repaid
        self.available += amount - repaid

    def numbers(self) -> dict:
        return {f"{k}_minor": getattr(self, k) for k in MONEY}


@dataclass
class OTopUp:
    ref: str
    patient: str
    currency: str
    amount: int
    provider: str
    refunds: dict = field(default_factory=dict)  # refund id -> (amount, admin, reason)
    reversal: tuple | None = None  # (amount, reason)

    def left(self) -> int:
        return self.amount - sum(r[0] for r in self.refunds.values()) - \
            (self.reversal[0] if self.reversal else 0)


@dataclass
class OConsultation:
    cid: str
    patient: str
    practitioner: str
    ctype: str
    mode: str
    start: datetime
    minutes: int
    price: dict
    status: str = "scheduled"
    activated_at: datetime | None = None
    activated_by: str | None = None
    joins: dict = field(default_factory=dict)
    completed_at: datetime | None = None
    captured: bool = False
    released: bool = False
    close_reason: str | None = None
    earning_at: datetime | None = None
    refund: dict | None = None

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.minutes)

    @property
    def closed(self) -> bool:
        return self.status in CLOSED

    def joined_by(self, role: str, t: datetime) -> bool:
        return role in self.joins and self.joins[role] <= t

    @property
    def earning(self) -> str | None:
        if not self.captured:
            return None
        if self.earning_at is not None:
            return "available"
        return "reversed" if self.refund is not None else "pending"


def split(fee: int, tax_bps: int, share_bps: int) -> dict:
    """§10: tax rounded half up, share rounded down, the odd minor unit to the platform."""
    tax = (fee * tax_bps + 5000) // 10000
    share = fee * share_bps // 10000
    return {"fee_minor": fee, "tax_minor": tax, "total_minor": fee + tax, "share_minor": share,
            "platform_minor": fee - share, "tax_payable_minor": tax}


class MarketOracle:
    """§10 beside the unit oracle; see the module docstring."""

    def __init__(self, oracle: Oracle) -> None:
        self.o = oracle
        self.skew = timedelta(seconds=oracle.t.skew)
        self.grace = timedelta(seconds=oracle.t.grace)
        self.money: dict[tuple[str, str], OMoney] = {}
        self.top_ups: dict[str, OTopUp] = {}
        self.price_lists: dict[str, list[dict]] = {}
        self.consultations: dict[str, OConsultation] = {}
        self.in_progress: dict[str, dict] = {}  # practitioner -> {cid: [mode, end, joined]}
        self.accounts: dict[str, dict] = {}  # currency -> platform account numbers
        handlers = oracle.handlers
        for event_type in SESSION_EVENTS:
            handlers[event_type] = self._not_a_consultation(handlers[event_type])
        for event_type in PRESENCE_EVENTS:
            handlers[event_type] = self._presence(handlers.get(event_type))
        handlers["session.requested"] = self._request_guard(handlers["session.requested"])
        handlers["subscription.granted"] = self._grant_guard(handlers["subscription.granted"])
        handlers.update({
            "wallet.topped_up": self._topped_up, "wallet.refunded_to_source": self._to_source,
            "wallet.payment_reversed": self._chargeback, "price_list.published": self._publish,
            "consultation.booked": self._book, "consultation.activated": self._activate,
            "consultation.joined": self._joined, "consultation.ended": self._ended,
            "consultation.cancelled": self._cancel, "consultation.declined": self._cancel,
            "consultation.admin_cancelled": self._cancel, "consultation.refunded": self._refund,
        })

    # -------------------------------------------------------------------------- guards

    def _is_consultation(self, sid: str) -> bool:
        return sid not in self.o.sessions and sid in self.consultations

    def _not_a_consultation(self, handler):
        def guarded(at, p, now, event_type):
            if self._is_consultation(p.get("session_id", "")):
                raise Refused("consultation_not_unit_billed")
            return handler(at, p, now, event_type)
        return guarded

    def _request_guard(self, handler):
        def guarded(at, p, now, event_type):
            if self._is_consultation(p["session_id"]):
                raise Refused("consultation_not_unit_billed")
            if p["doctor_id"] in self.o.doctors and any(
                    end > at for _mode, end, _j in self.in_progress.get(p["doctor_id"], {}).values()):
                raise Refused("session_conflict")
            return handler(at, p, now, event_type)
        return guarded

    def _grant_guard(self, handler):
        def guarded(at, p, now, event_type):
            if p["payment_reference"] in self.top_ups:
                raise Refused("payment_conflict")
            return handler(at, p, now, event_type)
        return guarded

    def _presence(self, handler):
        def routed(at, p, now, event_type):
            sid = p["session_id"]
            if not self._is_consultation(sid):
                if handler is None:
                    raise Refused("unknown_session")
                return handler(at, p, now, event_type)
            c = self.consultations[sid]
            if event_type != "call.participant_joined":
                return {**self.result(c), "ignored": "a provider departure never ends it"}
            roles = self._roles(c, p.get("participant", ""))
            if not roles:
                return {**self.result(c), "ignored": "not a participant"}
            saved = (copy.deepcopy(c), copy.deepcopy(self.in_progress))
            try:
                for role in roles:
                    self._join(c, role, at)
            except Refused:
                self.consultations[sid], self.in_progress = saved
                raise
            return self.result(c)
        return routed

    @staticmethod
    def _roles(c: OConsultation, identity: str) -> list[str]:
        if identity == "*":
            return list(ROLES)
        kind, _, bare = identity.partition(":")
        if bare:
            role = {"patient": "patient", "doctor": "practitioner",
                    "practitioner": "practitioner"}.get(kind)
            who = c.patient if role == "patient" else c.practitioner
            return [role] if role and bare == who else []
        if identity == c.patient:
            return ["patient"]
        return ["practitioner"] if identity == c.practitioner else []

    # -------------------------------------------------------------------------- money

    def wallet(self, patient: str, currency: str) -> OMoney | None:
        return self.money.get((patient, currency))

    def _money_result(self, w: OMoney, patient: str, currency: str) -> dict:
        return {"patient_id": patient, "currency": currency, **w.numbers()}

    def _topped_up(self, at, p, now, _type) -> dict:
        ref = p["payment_reference"]
        content = (p["patient_id"], p["currency"], p["amount_minor"], p["provider"])
        top = self.top_ups.get(ref)
        if top is not None:
            if (top.patient, top.currency, top.amount, top.provider) != content:
                raise Refused("payment_conflict")
            return self._money_result(self.money[(top.patient, top.currency)], top.patient,
                                      top.currency)
        if ref in self.o.pools:
            raise Refused("payment_conflict")
        self.top_ups[ref] = OTopUp(ref, *content)
        w = self.money.setdefault((p["patient_id"], p["currency"]), OMoney())
        w.topped_up += p["amount_minor"]
        w.credit(p["amount_minor"])
        return self._money_result(w, p["patient_id"], p["currency"])

    def _known_top_up(self, ref: str) -> tuple[OTopUp, OMoney]:
        top = self.top_ups.get(ref)
        if top is None:
            raise Refused("unknown_payment")
        return top, self.money[(top.patient, top.currency)]

    def _to_source(self, at, p, now, _type) -> dict:
        top, w = self._known_top_up(p["payment_reference"])
        amount, rid = p["amount_minor"], p["refund_id"]
        if rid in top.refunds:
            if top.refunds[rid] != (amount, p["admin_id"], p["reason"]):
                raise Refused("payment_conflict")
        else:
            if amount > w.available or amount > top.left():
                raise Refused("insufficient_funds")
            top.refunds[rid] = (amount, p["admin_id"], p["reason"])
            w.refunded_to_source += amount
            w.available -= amount
        return self._money_result(w, top.patient, top.currency)

    def _chargeback(self, at, p, now, _type) -> dict:
        top, w = self._known_top_up(p["payment_reference"])
        amount, reason = p["amount_minor"], p.get("reason", "chargeback")
        if top.reversal is not None:
            if top.reversal != (amount, reason):
                raise Refused("payment_conflict")
        else:
            if amount > top.left():
                raise Refused("payment_conflict")
            top.reversal = (amount, reason)
            debited = min(w.available, amount)
            w.reversed_payments += amount
            w.available -= debited
            w.debt += amount - debited
        return self._money_result(w, top.patient, top.currency)

    # ------------------------------------------------------------------------- prices

    def _publish(self, at, p, now, _type) -> dict:
        if p["practitioner_id"] not in self.o.doctors:
            raise Refused("unknown_doctor")
        versions = self.price_lists.setdefault(p["practitioner_id"], [])
        same = [v for v in versions if v["version"] == p["version"]]
        published = same[0]["effective_from"] if same else None
        effective = utc(p["effective_from"]) if p.get("effective_from") else (published or at)
        if effective < at and effective != published:
            raise Refused("invalid_price_list")
        fees = {}
        for item in p["fees"]:
            key = f"{item['consultation_type']}:{item['duration_minutes']}"
            if key in fees:
                raise Refused("invalid_price_list")
            fees[key] = item["fee_minor"]
        version = {"version": p["version"], "currency": p["currency"], "tax_bps": p["tax_bps"],
                   "share_bps": p.get("share_bps", 5000), "effective_from": effective,
                   "fees": fees}
        if same and same[0] != version:
            raise Refused("price_list_conflict")
        if not same:
            versions.append(version)
        return {"practitioner_id": p["practitioner_id"], "version": p["version"]}

    def _in_force(self, practitioner: str, at: datetime) -> dict | None:
        best = None
        for version in self.price_lists.get(practitioner, []):
            if version["effective_from"] <= at and (
                    best is None or version["effective_from"] >= best["effective_from"]):
                best = version
        return best

    # ------------------------------------------------------------------ consultations

    def result(self, c: OConsultation) -> dict:
        return {"consultation_id": c.cid, "status": c.status}

    def _book(self, at, p, now, _type) -> dict:
        cid, start = p["consultation_id"], utc(p["start"])
        facts = (p["patient_id"], p["practitioner_id"], p["consultation_type"], p["mode"], start,
                 p["duration_minutes"])
        c = self.consultations.get(cid)
        if c is not None:
            if (c.patient, c.practitioner, c.ctype, c.mode, c.start, c.minutes) != facts:
                raise Refused("consultation_exists")
            return self.result(c)
        if cid in self.o.sessions:
            raise Refused("session_exists")
        if start <= at + BOOK_AHEAD:
            raise Refused("invalid_booking")
        version = self._in_force(p["practitioner_id"], at)
        key = f"{p['consultation_type']}:{p['duration_minutes']}"
        if version is None or key not in version["fees"]:
            raise Refused("invalid_booking")
        price = {"version": version["version"], "currency": version["currency"],
                 "tax_bps": version["tax_bps"], "share_bps": version["share_bps"],
                 **split(version["fees"][key], version["tax_bps"], version["share_bps"])}
        w = self.money.get((p["patient_id"], price["currency"]))
        if w is None:
            raise Refused("insufficient_funds")
        if w.debt > 0:
            raise Refused("wallet_in_debt")
        if price["total_minor"] > w.available:
            raise Refused("insufficient_funds")
        w.available -= price["total_minor"]
        w.held += price["total_minor"]
        c = OConsultation(cid, *facts, price=price)
        self.consultations[cid] = c
        return self.result(c)

    def closing(self, c: OConsultation) -> tuple[datetime, str] | None:
        """(due, action) of the decision that closes an open consultation (§10's tick rows)."""
        if c.closed:
            return None
        if c.activated_at is None:
            return c.start + self.skew, "expire"
        deadline = c.start + NO_SHOW
        if not (c.joined_by("practitioner", deadline) and c.joined_by("patient", deadline)):
            return deadline + self.skew, "no_show"
        return c.end + self.skew, "complete"

    def _open(self, p: dict, at: datetime) -> OConsultation:
        c = self.consultations.get(p["consultation_id"])
        if c is None:
            raise Refused("unknown_consultation")
        due = self.closing(c)
        if c.closed or (due is not None and at >= due[0]):
            raise Refused("consultation_closed")
        return c

    def _activate(self, at, p, now, _type) -> dict:
        c = self._open(p, at)
        if c.status != "scheduled":
            raise Refused("consultation_not_scheduled")
        if at >= c.start:
            raise Refused("activation_too_late")
        c.status, c.activated_at, c.activated_by = "activated", at, p["admin_id"]
        return self.result(c)

    def _joined(self, at, p, now, _type) -> dict:
        c = self.consultations.get(p["consultation_id"])
        if c is None:
            raise Refused("unknown_consultation")
        self._join(c, p["participant"], at)
        return self.result(c)

    def _join(self, c: OConsultation, role: str, at: datetime) -> None:
        self._open({"consultation_id": c.cid}, at)
        if c.activated_at is None:
            raise Refused("consultation_not_activated")
        if at < c.start - JOIN_EARLY:
            raise Refused("join_window_not_open")
        if at >= c.end:
            raise Refused("join_window_closed")
        if c.joined_by(role, at):
            return
        busy = self.in_progress.setdefault(c.practitioner, {})
        if role == "practitioner":
            if self.o.doctors[c.practitioner]["live"]:
                raise Refused("session_conflict")
            if any(cid != c.cid and mode in ("video", "audio") and end > at
                   for cid, (mode, end, _j) in busy.items()):
                raise Refused("session_conflict")
        c.joins[role] = min(c.joins.get(role, at), at)
        c.status = "in_progress"
        entry = busy.setdefault(c.cid, [c.mode, c.end, False])
        entry[2] = entry[2] or role == "practitioner"

    def _ended(self, at, p, now, _type) -> dict:
        c = self._open(p, at)
        counted = min(at, c.start + NO_SHOW)
        if c.status != "in_progress" or not all(c.joined_by(r, counted) for r in ROLES):
            raise Refused("consultation_not_started")
        self._close(c, "completed", "ended", at, capture=True, completed_at=at)
        return self.result(c)

    def _cancel(self, at, p, now, event_type) -> dict:
        c = self._open(p, at)
        if c.status == "in_progress":
            raise Refused("consultation_in_progress")
        kind = event_type.removeprefix("consultation.")
        if kind == "cancelled" and at > c.start - CANCEL_BEFORE:
            raise Refused("cancellation_window_closed")
        reason = p.get("reason") or {"cancelled": "patient_cancelled", "declined": "declined",
                                     "admin_cancelled": "admin_cancelled"}[kind]
        self._close(c, "cancelled", reason, at, capture=False)
        return self.result(c)

    def _close(self, c: OConsultation, status: str, reason: str, at: datetime, *, capture: bool,
               completed_at: datetime | None = None) -> None:
        w = self.money[(c.patient, c.price["currency"])]
        total = c.price["total_minor"]
        w.held -= total
        c.status, c.close_reason, c.completed_at = status, reason, completed_at
        if capture:
            w.captured += total
            c.captured = True
            account = self._account(c.price["currency"])
            account["captured_minor"] += total
            account["shares_minor"] += c.price["share_minor"]
            account["platform_minor"] += c.price["platform_minor"]
            account["tax_payable_minor"] += c.price["tax_payable_minor"]
            self._pending(c, c.price["share_minor"])
        else:
            w.credit(total)
            c.released = True
        self.in_progress.get(c.practitioner, {}).pop(c.cid, None)

    def _account(self, currency: str) -> dict:
        return self.accounts.setdefault(currency, {
            "captured_minor": 0, "refunded_minor": 0, "shares_minor": 0,
            "shares_reversed_minor": 0, "platform_minor": 0, "tax_payable_minor": 0})

    def _pending(self, c: OConsultation, amount: int) -> None:
        """The practitioner's §5 wallet: a share is pending from capture to release."""
        key = (c.practitioner, c.price["currency"])
        self.o.pending_pay[key] = self.o.pending_pay.get(key, 0) + amount

    def _refund(self, at, p, now, _type) -> dict:
        c = self.consultations.get(p["consultation_id"])
        if c is None:
            raise Refused("unknown_consultation")
        if c.refund is not None or not c.captured:
            raise Refused("not_refundable")
        pending = c.earning == "pending"
        price, account = c.price, self._account(c.price["currency"])
        c.refund = {"earning": "pending" if pending else "available",
                    "share_reversed_minor": price["share_minor"] if pending else 0,
                    "platform_reversed_minor": price["platform_minor"] if pending
                    else price["fee_minor"]}
        account["refunded_minor"] += price["total_minor"]
        account["shares_reversed_minor"] += c.refund["share_reversed_minor"]
        account["platform_minor"] -= c.refund["platform_reversed_minor"]
        account["tax_payable_minor"] -= price["tax_payable_minor"]
        if pending:
            self._pending(c, -price["share_minor"])
        w = self.money[(c.patient, price["currency"])]
        w.refunded += price["total_minor"]
        w.credit(price["total_minor"])
        return self.result(c)

    # ---------------------------------------------------------------------------- tick

    def next_step(self, c: OConsultation) -> tuple[datetime, str] | None:
        if c.closed:
            if c.earning == "pending":
                return c.completed_at + self.grace, "release"
            return None
        if c.status == "activated":
            return max(c.start - JOIN_EARLY, c.activated_at), "confirm"
        return self.closing(c)

    def tick(self, as_of: datetime) -> list[dict]:
        """Every consultation step due by `as_of`, as the tick report's `consultations` lists
        them (in any order): {"consultation_id", "action", "status", "reason", "money",
        "amount_minor", "currency"}."""
        as_of, steps = utc(as_of), []
        for c in self.consultations.values():
            for _ in range(6):  # confirm, close, release: at most a few steps each
                step = self.next_step(c)
                if step is None or step[0] > as_of:
                    break
                steps.append(self._apply(c, step[1], as_of))
        return steps

    def _apply(self, c: OConsultation, action: str, as_of: datetime) -> dict:
        total, share = c.price["total_minor"], c.price["share_minor"]
        money, amount = None, 0
        if action == "confirm":
            c.status = "confirmed"
        elif action == "expire":
            self._close(c, "expired", "never_activated", as_of, capture=False)
        elif action == "no_show" and not c.joined_by("practitioner", c.start + NO_SHOW):
            self._close(c, "no_show", "practitioner_absent", as_of, capture=False)
        elif action == "no_show":
            self._close(c, "no_show", "patient_absent", as_of, capture=True,
                        completed_at=c.start + NO_SHOW)
        elif action == "complete":
            self._close(c, "completed", "completed_by_time", as_of, capture=True,
                        completed_at=c.end)
        else:
            c.earning_at = as_of
            self._pending(c, -share)
            if share > 0:
                self.o.wallets.setdefault((c.practitioner, c.price["currency"]),
                                          OWallet()).credited += share
            money, amount = "earning_available", share
        if action in ("expire", "no_show", "complete"):
            money, amount = ("captured" if c.captured else "released"), total
        return {"consultation_id": c.cid, "action": action, "status": c.status,
                "reason": c.close_reason if action in ("expire", "no_show", "complete") else None,
                "money": money, "amount_minor": amount, "currency": c.price["currency"]}

    @property
    def unsettled(self) -> bool:
        """Whether any consultation still has a tick step ahead."""
        return any(self.next_step(c) is not None for c in self.consultations.values())

    # ---------------------------------------------------------------------------- reads

    def consultation_facts(self, cid: str) -> dict:
        """What GET /v1/consultations/{id} must say, in its terms."""
        c = self.consultations[cid]
        iso = lambda m: m.isoformat() if m else None  # noqa: E731
        return {"status": c.status, "price": c.price,
                "joins": {r: iso(t) for r, t in sorted(c.joins.items())},
                "completed_at": iso(c.completed_at), "activated_by": c.activated_by,
                "hold": "captured" if c.captured else "released" if c.released else "held",
                "close_reason": c.close_reason, "earning": c.earning,
                "refund": c.refund}
