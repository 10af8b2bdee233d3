"""The therapy marketplace's billing: handlers of §10's event types and the consultation tick.

Source: billing-rules.md §10. Every handler has the Ledger's signature
`handler(work, at, payload, now) -> dict` (ledger/application.py registers them); it checks
its guards first and raises a LedgerError before changing anything, so a refusal records
nothing. Money moves in the same `save` as the decision that moves it: a booking saves the
consultation with its wallet hold, a close saves the capture or release, a refund the wallet
credit, an earning release the practitioner's §5 wallet.

Tick-only event types (confirmation, no-shows, expiry, completion by time, earning release)
have no handler here: only `tick_consultations` records them.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable

from eventsourcing.persistence import IntegrityError

from ledger import errors
from ledger.billing import Work
from ledger.consultations import (
    BOOK_AHEAD,
    CALL_MODES,
    CANCEL_BEFORE,
    CONSULTATION_TYPES,
    JOIN_EARLY,
    MAX_DURATION_MINUTES,
    MIN_DURATION_MINUTES,
    MODES,
    NO_SHOW_AFTER,
    ROLES,
    Consultation,
    MoneyWallet,
    PriceList,
    Step,
    TopUp,
    closing_step,
    fee_key,
    next_step,
)
from ledger.domain import Doctor, Pool, Session, Wallet
from ledger.input_rules import payload_instant_window, within
from ledger.money import BPS, DEFAULT_SHARE_BPS, breakdown
from ledger.rules import Policy, utc_seconds

log = logging.getLogger("ledger")
Handler = Callable[[Work, datetime, dict, datetime], dict]
MAX_ATTEMPTS = 8  # optimistic retries per consultation step before leaving it to the next tick

# Event types of unit-billed sessions that name a `session_id`: a consultation's id there is
# refused with consultation_not_unit_billed (§10 Scope), not reported as an unknown session.
SESSION_TYPES = ("session.patient_message", "text.activated", "call.ringing", "call.connected",
                 "call.declined", "session.activity", "session.ended", "appointment.linked")
PRESENCE_TYPES = ("call.participant_joined", "call.participant_left", "call.room_ended")
# Only the tick records these; posted by anyone they are refused (403, api/event_permissions.py).
TICK_ONLY_TYPES = ("consultation.confirmed", "consultation.completed", "consultation.no_show",
                   "consultation.expired", "consultation.earning_released")


def _instant(value: Any, name: str, at: datetime) -> datetime:
    """A payload instant in UTC whole seconds; raises InstantOutOfRange beyond 366 days of the
    event's `at` (ledger/input_rules.py, the door's one rule)."""
    moment = utc_seconds(value if isinstance(value, datetime)
                         else datetime.fromisoformat(str(value)))
    if not within(moment, payload_instant_window(at)):
        raise errors.InstantOutOfRange(f"{name} {moment.isoformat()} is more than 366 days from "
                                       f"occurred_at {at.isoformat()}", field=name)
    return moment


def _positive(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise errors.InvalidEvent(f"{what} must be a positive integer of minor units")
    return value


# ---------------------------------------------------------------------------------- views


def wallet_result(wallet: MoneyWallet) -> dict:
    """The answer about a patient money wallet carried by its events' results."""
    return {"patient_id": wallet.patient_id, "currency": wallet.currency, **wallet.numbers()}


def consultation_result(c: Consultation) -> dict:
    """The short answer about a consultation carried by its events' results."""
    return {"consultation_id": c.consultation_id, "status": c.status,
            "start": c.start.isoformat(), "currency": c.currency,
            "total_minor": c.total_minor,
            "joins": {role: at.isoformat() for role, at in sorted(c.joins.items())},
            "earning": c.earning, "refunded": c.refund is not None}


# ------------------------------------------------------------------------------ handlers


class Marketplace:
    """§10's handlers, bound to the ledger's Policy (skew allowance, settlement grace)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def handlers(self, unit_billed: dict[str, Handler]) -> dict[str, Handler]:
        """The handlers to register: §10's own, and the unit-billed ones that a consultation
        touches wrapped with §10's guards (ids, presence routing, doctor busy, references)."""
        own = {
            "wallet.topped_up": self.topped_up,
            "wallet.refunded_to_source": self.refunded_to_source,
            "wallet.payment_reversed": self.payment_reversed,
            "price_list.published": self.price_list_published,
            "consultation.booked": self.booked,
            "consultation.activated": self.activated,
            "consultation.joined": self.joined,
            "consultation.ended": self.ended,
            "consultation.cancelled": self.cancelled,
            "consultation.declined": self.cancelled,
            "consultation.admin_cancelled": self.cancelled,
            "consultation.refunded": self.refunded,
        }
        wrapped = {t: self.unit_billed_only(unit_billed[t]) for t in SESSION_TYPES
                   if t in unit_billed}
        wrapped.update({t: self.presence_router(unit_billed[t]) for t in PRESENCE_TYPES
                        if t in unit_billed})
        if "session.requested" in unit_billed:
            wrapped["session.requested"] = self.request_guard(unit_billed["session.requested"])
        if "subscription.granted" in unit_billed:
            wrapped["subscription.granted"] = self.grant_guard(unit_billed["subscription.granted"])
        return {**wrapped, **own}

    # ---- guards around the unit-billed handlers (§10 Scope)

    @staticmethod
    def unit_billed_only(handler: Handler) -> Handler:
        """Refuse a session event (or an appointment link) naming a consultation (409)."""
        def guarded(work: Work, at: datetime, p: dict, now: datetime) -> dict:
            sid = p.get("session_id")
            if sid and work.get(Session.create_id(sid)) is None \
                    and work.get(Consultation.create_id(sid)) is not None:
                raise errors.ConsultationNotUnitBilled(
                    f"{sid!r} is a priced consultation, not a unit-billed session")
            return handler(work, at, p, now)
        return guarded

    @staticmethod
    def request_guard(handler: Handler) -> Handler:
        """A session request: its id must not be a consultation's, and its doctor must have no
        consultation in progress (they block each other, §10 Scope)."""
        def guarded(work: Work, at: datetime, p: dict, now: datetime) -> dict:
            sid = p["session_id"]
            if work.get(Session.create_id(sid)) is None \
                    and work.get(Consultation.create_id(sid)) is not None:
                raise errors.ConsultationNotUnitBilled(f"{sid!r} is a priced consultation")
            doctor = work.get(Doctor.create_id(p["doctor_id"]))
            busy = doctor.consultation_busy(at, MODES) if doctor is not None else None
            if busy:
                raise errors.SessionConflict(f"doctor has consultation {busy!r} in progress")
            return handler(work, at, p, now)
        return guarded

    @staticmethod
    def grant_guard(handler: Handler) -> Handler:
        """A payment reference is unique: one that credited a wallet grants no pool (§4, §10)."""
        def guarded(work: Work, at: datetime, p: dict, now: datetime) -> dict:
            if work.get(TopUp.create_id(p["payment_reference"])) is not None:
                raise errors.PaymentConflict(
                    f"payment {p['payment_reference']!r} already topped up a money wallet")
            return handler(work, at, p, now)
        return guarded

    def presence_router(self, handler: Handler) -> Handler:
        """Provider reports about room `call_<id>`: a session's go to its handler; for a
        consultation a join is a join and a departure or room end is acknowledged and not
        kept (a provider departure never ends a consultation, §10 Who sends what)."""
        def routed(work: Work, at: datetime, p: dict, now: datetime) -> dict:
            sid = p["session_id"]
            if work.get(Session.create_id(sid)) is not None:
                return handler(work, at, p, now)
            c = work.get(Consultation.create_id(sid))
            if c is None:
                return handler(work, at, p, now)  # the session handler's unknown_session
            if p["_type"] != "call.participant_joined":
                return {**consultation_result(c),
                        "ignored": "a provider departure never ends a consultation"}
            roles = provider_roles(c, p.get("participant", ""))
            if not roles:
                return {**consultation_result(c),
                        "ignored": "participant is neither the patient nor the practitioner"}
            for role in roles:
                self._join(work, c, role, at, p.get("provider", "provider"))
            return consultation_result(c)
        return routed

    # ---- money wallets

    @staticmethod
    def _money_wallet(work: Work, patient_id: str, currency: str) -> MoneyWallet:
        wallet = work.get(MoneyWallet.create_id(patient_id, currency))
        return wallet if wallet is not None else MoneyWallet(patient_id=patient_id,
                                                             currency=currency)

    def topped_up(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        """`wallet.topped_up`: credit a completed payment once per payment reference (§10)."""
        ref, amount = p["payment_reference"], _positive(p["amount_minor"], "amount_minor")
        content = (p["patient_id"], p["currency"], amount, p["provider"])
        top = work.get(TopUp.create_id(ref))
        if top is not None:
            if not top.same_content(*content):
                raise errors.PaymentConflict(f"payment {ref!r} was recorded with other content")
            return {"payment_reference": ref,
                    **wallet_result(work.get(MoneyWallet.create_id(top.patient_id, top.currency)))}
        if work.get(Pool.create_id(ref)) is not None:
            raise errors.PaymentConflict(f"payment {ref!r} already granted a subscription")
        wallet = self._money_wallet(work, p["patient_id"], p["currency"])
        top = TopUp(payment_reference=ref, patient_id=p["patient_id"], currency=p["currency"],
                    amount_minor=amount, provider=p["provider"], at=at)
        wallet.top_up(payment_reference=ref, provider=p["provider"], amount_minor=amount, at=at)
        work.add(top, wallet)
        return {"payment_reference": ref, **wallet_result(wallet)}

    @staticmethod
    def _top_up(work: Work, ref: str) -> tuple[TopUp, MoneyWallet]:
        top = work.get(TopUp.create_id(ref))
        if top is None:
            raise errors.UnknownPayment(f"no top-up with payment reference {ref!r}")
        return top, work.get(MoneyWallet.create_id(top.patient_id, top.currency))

    def refunded_to_source(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        """`wallet.refunded_to_source` (admin): at most `available` and at most what is left
        of the top-up, else 409 insufficient_funds; the same refund id again is a no-op."""
        top, wallet = self._top_up(work, p["payment_reference"])
        amount = _positive(p["amount_minor"], "amount_minor")
        if amount > wallet.available_minor and p["refund_id"] not in top.refunds:
            raise errors.InsufficientFunds(
                f"available {wallet.available_minor} < {amount} {wallet.currency} minor units",
                available_minor=wallet.available_minor)
        if top.refund_to_source(p["refund_id"], amount, p["admin_id"], p.get("reason", ""), at):
            wallet.refund_to_source(refund_id=p["refund_id"], payment_reference=top.payment_reference,
                                    amount_minor=amount, admin_id=p["admin_id"],
                                    reason=p.get("reason", ""), at=at)
            work.add(top, wallet)
        return {"refund_id": p["refund_id"], "payment_reference": top.payment_reference,
                **wallet_result(wallet)}

    def payment_reversed(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        """`wallet.payment_reversed`: a top-up's chargeback debits `available` up to its
        amount and records the rest as debt (§10); once per payment."""
        top, wallet = self._top_up(work, p["payment_reference"])
        amount = _positive(p["amount_minor"], "amount_minor")
        if top.reverse(amount, p.get("reason", ""), at):
            wallet.reverse_payment(payment_reference=top.payment_reference, amount_minor=amount,
                                   at=at)
            work.add(top, wallet)
        return {"payment_reference": top.payment_reference, **wallet_result(wallet)}

    # ---- price lists

    def price_list_published(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        """`price_list.published`: a new version of a practitioner's prices, in force from
        `effective_from` (default: occurred_at; never earlier)."""
        if work.get(Doctor.create_id(p["practitioner_id"])) is None:
            raise errors.UnknownDoctor(f"practitioner {p['practitioner_id']!r} is not registered")
        price_list = work.get(PriceList.create_id(p["practitioner_id"])) \
            or PriceList(practitioner_id=p["practitioner_id"])
        existing = price_list.find(p["version"])
        # Published again without `effective_from`: the same version if the rest is the same.
        version = price_version(p, at, existing["effective_from"] if existing else None)
        if price_list.publish(version):
            work.add(price_list)
        return {"practitioner_id": p["practitioner_id"], "version": version["version"],
                "effective_from": version["effective_from"].isoformat(),
                "currency": version["currency"], "fees": len(version["fees"])}

    # ---- consultations

    @staticmethod
    def _consultation(work: Work, consultation_id: str) -> Consultation:
        c = work.get(Consultation.create_id(consultation_id))
        if c is None:
            raise errors.UnknownConsultation(f"no consultation {consultation_id!r}")
        return c

    def _open(self, work: Work, consultation_id: str, at: datetime, what: str) -> Consultation:
        """The consultation, if `what` at `at` may still change it: refused once it is closed,
        or once its own times have reached the tick's closing decision (expiry, no-show,
        completion by time) — exactly as if the tick had run on time (I9)."""
        c = self._consultation(work, consultation_id)
        c.check_open(what)
        step = closing_step(c, self.policy)
        if step is not None and at >= step.due:
            raise errors.ConsultationClosed(
                f"consultation {c.consultation_id} is due to be closed ({step.action}) at "
                f"{step.due.isoformat()}; {what} at {at.isoformat()} comes after",
                consultation_status=c.status)
        return c

    def booked(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        """`consultation.booked`: stamp the price in force and hold the total (§10 booked)."""
        cid = p["consultation_id"]
        start = _instant(p["start"], "start", at)
        fields = {"patient_id": p["patient_id"], "practitioner_id": p["practitioner_id"],
                  "consultation_type": p["consultation_type"], "mode": p["mode"],
                  "start": start, "duration_minutes": int(p["duration_minutes"])}
        existing = work.get(Consultation.create_id(cid))
        if existing is not None:
            if any(getattr(existing, k) != v for k, v in fields.items()):
                raise errors.ConsultationExists(f"consultation {cid!r} exists with other content")
            return consultation_result(existing)
        if work.get(Session.create_id(cid)) is not None:
            raise errors.SessionExists(f"{cid!r} is a unit-billed session's id")
        price = self._price(work, fields, at)
        wallet = work.get(MoneyWallet.create_id(fields["patient_id"], price["currency"]))
        if wallet is None:
            raise errors.InsufficientFunds(f"no {price['currency']} wallet", available_minor=0)
        wallet.hold(consultation_id=cid, amount_minor=price["total_minor"], at=at)
        c = Consultation(consultation_id=cid, price=price, at=at, **fields)
        work.add(c, wallet)
        return consultation_result(c)

    @staticmethod
    def _price(work: Work, fields: dict, at: datetime) -> dict:
        """The price in force at `at` for the booking's (type, duration), stamped with its
        version; raises InvalidBooking (422)."""
        if fields["consultation_type"] not in CONSULTATION_TYPES or fields["mode"] not in MODES:
            raise errors.InvalidBooking(f"type must be one of {CONSULTATION_TYPES}, "
                                        f"mode one of {MODES}")
        if fields["start"] <= at + BOOK_AHEAD:
            raise errors.InvalidBooking("start must be more than 5 minutes after occurred_at")
        price_list = work.get(PriceList.create_id(fields["practitioner_id"]))
        version = price_list.in_force(at) if price_list is not None else None
        key = fee_key(fields["consultation_type"], fields["duration_minutes"])
        if version is None or key not in version["fees"]:
            raise errors.InvalidBooking(f"no {key} fee in the price list in force at "
                                        f"{at.isoformat()}")
        split = breakdown(version["fees"][key], version["tax_bps"], version["share_bps"])
        return {"version": version["version"], "currency": version["currency"],
                "tax_bps": version["tax_bps"], "share_bps": version["share_bps"],
                **split.as_dict()}

    def activated(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        """`consultation.activated` (admin): a scheduled consultation, before its start."""
        c = self._open(work, p["consultation_id"], at, "activation")
        if c.status != "scheduled":
            raise errors.ConsultationNotScheduled(
                f"consultation {c.consultation_id} is {c.status}", consultation_status=c.status)
        if at >= c.start:
            raise errors.ActivationTooLate(f"activation at {at.isoformat()} is not before the "
                                           f"start {c.start.isoformat()}")
        c.activate(admin_id=p["admin_id"], at=at)
        work.add(c)
        return {**consultation_result(c), "activated_by": c.activated_by}

    def joined(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        """`consultation.joined` (backend): `participant` is `patient` or `practitioner`."""
        if p["participant"] not in ROLES:
            raise errors.InvalidEvent(f"participant must be one of {ROLES}")
        c = self._consultation(work, p["consultation_id"])
        self._join(work, c, p["participant"], at, "backend")
        return consultation_result(c)

    def _join(self, work: Work, c: Consultation, role: str, at: datetime, source: str) -> None:
        """Record `role`'s join at `at` if it is their earliest (§10 join row)."""
        self._open(work, c.consultation_id, at, f"a {role} join")
        if not c.activated:
            raise errors.ConsultationNotActivated(f"consultation {c.consultation_id} is "
                                                  f"{c.status}", consultation_status=c.status)
        if at < c.start - JOIN_EARLY:
            raise errors.JoinWindowNotOpen(
                f"the join window opens at {(c.start - JOIN_EARLY).isoformat()}")
        if at >= c.end:
            raise errors.JoinWindowClosed(f"the join window closed at {c.end.isoformat()}")
        if c.joined_by(role, at):
            return  # an earlier join of this participant is already recorded
        doctor = work.get(Doctor.create_id(c.practitioner_id))
        if role == "practitioner":
            self._check_practitioner_free(doctor, c, at)
        c.joined(role=role, at=at, source=source)
        entry = doctor.consultations.get(c.consultation_id)
        joined = role == "practitioner" or bool(entry and entry["practitioner_joined"])
        if entry is None or entry["practitioner_joined"] != joined:
            # Recorded on the doctor too, so that a session request or another practitioner
            # join racing this one conflicts on the doctor's version (design notes).
            doctor.consultation_in_progress(consultation_id=c.consultation_id, mode=c.mode,
                                            ends_at=c.end, practitioner_joined=joined)
            work.add(doctor)
        work.add(c)

    @staticmethod
    def _check_practitioner_free(doctor: Doctor, c: Consultation, at: datetime) -> None:
        """A practitioner's join: refused while they have a live unit-billed session, or another
        video or audio consultation in progress whose scheduled end is after `at` (§10)."""
        if doctor.live:
            raise errors.SessionConflict(
                f"practitioner has live session {next(iter(doctor.live))!r}")
        busy = doctor.consultation_busy(at, CALL_MODES, other_than=c.consultation_id)
        if busy:
            raise errors.SessionConflict(f"practitioner has consultation {busy!r} in progress")

    def ended(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        """`consultation.ended` (backend): both joined (in time for the no-show rule) →
        completed at `at`, the total captured (§10 ended)."""
        c = self._open(work, p["consultation_id"], at, "an end")
        counted = min(at, c.start + NO_SHOW_AFTER)  # later joins do not undo a no-show
        if c.status != "in_progress" or not all(c.joined_by(r, counted) for r in ROLES):
            raise errors.ConsultationNotStarted(
                f"consultation {c.consultation_id} needs both participants joined by "
                f"{counted.isoformat()}", joins={r: t.isoformat() for r, t in c.joins.items()})
        close(work, c, "completed", "ended", p.get("ended_by", "patient"), at, capture=True,
              completed_at=at)
        return consultation_result(c)

    def cancelled(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        """Patient cancellation (at least 2 h ahead), practitioner decline, or admin
        cancellation: before in_progress, the hold released (§10)."""
        kind = p["_type"].removeprefix("consultation.")
        c = self._open(work, p["consultation_id"], at, kind.replace("_", " "))
        if c.status == "in_progress":
            raise errors.ConsultationInProgress(f"consultation {c.consultation_id} is in progress")
        if kind == "cancelled" and at > c.start - CANCEL_BEFORE:
            raise errors.CancellationWindowClosed(
                f"a patient cancels by {(c.start - CANCEL_BEFORE).isoformat()}")
        by, reason = {"cancelled": ("patient", "patient_cancelled"),
                      "declined": ("practitioner", "declined"),
                      "admin_cancelled": ("admin", "admin_cancelled")}[kind]
        close(work, c, "cancelled", p.get("reason") or reason, by, at, capture=False,
              actor=p.get("admin_id"))
        return consultation_result(c)

    def refunded(self, work: Work, at: datetime, p: dict, now: datetime) -> dict:
        """`consultation.refunded` (admin): the whole total back to the wallet, once (§10)."""
        c = self._consultation(work, p["consultation_id"])
        c.refund_whole(admin_id=p["admin_id"], reason=p["reason"], at=at)
        wallet = work.get(MoneyWallet.create_id(c.patient_id, c.currency))
        wallet.refund(consultation_id=c.consultation_id, amount_minor=c.total_minor, at=at)
        work.add(c, wallet)
        return {**consultation_result(c), "refund": {
            k: v for k, v in c.refund.items() if k != "at"}}


def provider_roles(c: Consultation, identity: str) -> list[str]:
    """The roles a provider identity stands for in a consultation: the patient's or the
    practitioner's id, `patient:<id>`, `doctor:<id>` or `practitioner:<id>`; `*` → both (a
    provider reporting a two-party call's legs together); anything else → none."""
    if identity == "*":
        return list(ROLES)
    kind, _, bare = identity.partition(":")
    if bare:
        role = {"patient": "patient", "doctor": "practitioner",
                "practitioner": "practitioner"}.get(kind)
        wanted = c.patient_id if role == "patient" else c.practitioner_id
        return [role] if role and bare == wanted else []
    return [role for role, who in (("patient", c.patient_id), ("practitioner", c.practitioner_id))
            if identity == who][:1]


def price_version(p: dict, at: datetime, published_from: datetime | None = None) -> dict:
    """A price list version from a `price_list.published` payload; raises InvalidPriceList.

    fees: [{"consultation_type", "duration_minutes", "fee_minor"}] → {"<type>:<minutes>": fee}.
    `effective_from` defaults to `at`, or to `published_from` when that version name exists.
    """
    if p.get("effective_from"):
        effective_from = _instant(p["effective_from"], "effective_from", at)
        if effective_from < at and effective_from != published_from:
            raise errors.InvalidPriceList("a version takes effect no earlier than it is recorded")
    else:
        effective_from = published_from or at
    tax_bps, share_bps = int(p["tax_bps"]), int(p.get("share_bps", DEFAULT_SHARE_BPS))
    if not (0 <= tax_bps <= BPS and 0 <= share_bps <= BPS):
        raise errors.InvalidPriceList("tax_bps and share_bps are within 0..10000")
    fees: dict[str, int] = {}
    for item in p["fees"]:
        minutes = int(item["duration_minutes"])
        if item["consultation_type"] not in CONSULTATION_TYPES or not (
                MIN_DURATION_MINUTES <= minutes <= MAX_DURATION_MINUTES):
            raise errors.InvalidPriceList(f"fee {item} has an unknown type or a duration outside "
                                          f"{MIN_DURATION_MINUTES}..{MAX_DURATION_MINUTES} min")
        key = fee_key(item["consultation_type"], minutes)
        if key in fees:
            raise errors.InvalidPriceList(f"two fees for {key}")
        fees[key] = _positive(item["fee_minor"], "fee_minor")
    if not fees:
        raise errors.InvalidPriceList("a price list has at least one fee")
    return {"version": p["version"], "currency": p["currency"], "tax_bps": tax_bps,
            "share_bps": share_bps, "effective_from": effective_from, "fees": fees}


# ---------------------------------------------------------------------- closing and money


def close(work: Work, c: Consultation, status: str, reason: str, by: str, at: datetime, *,
          capture: bool, completed_at: datetime | None = None, actor: str | None = None) -> None:
    """Close `c` and capture or release its whole hold in the same save; free the doctor."""
    c.close_with(status, reason, by, at, capture=capture, completed_at=completed_at, actor=actor)
    wallet = work.get(MoneyWallet.create_id(c.patient_id, c.currency))
    (wallet.capture if capture else wallet.release)(consultation_id=c.consultation_id, at=at)
    work.add(c, wallet)
    doctor = work.get(Doctor.create_id(c.practitioner_id))
    if doctor is not None and c.consultation_id in doctor.consultations:
        doctor.close_consultation(consultation_id=c.consultation_id)
        work.add(doctor)


def apply_step(work: Work, c: Consultation, step: Step, as_of: datetime, policy: Policy) -> str:
    """Carry out one tick decision for `c` (§10's tick rows); returns a line for the report."""
    if step.action == "confirm":
        c.confirm(at=as_of, due_at=step.due)
        work.add(c)
        return "confirmed"
    if step.action == "expire":
        close(work, c, "expired", "never_activated", "system", as_of, capture=False)
        return "expired: hold released"
    if step.action == "no_show":
        deadline = c.start + NO_SHOW_AFTER
        if not c.joined_by("practitioner", deadline):
            close(work, c, "no_show", "practitioner_absent", "system", as_of, capture=False)
            return "no-show (practitioner): hold released"
        close(work, c, "no_show", "patient_absent", "system", as_of, capture=True,
              completed_at=deadline)
        return "no-show (patient): captured"
    if step.action == "complete":
        close(work, c, "completed", "completed_by_time", "system", as_of, capture=True,
              completed_at=c.end)
        return "completed by time: captured"
    release_earning(work, c, as_of)
    return f"earning of {c.price['share_minor']} {c.currency} minor units available"


def release_earning(work: Work, c: Consultation, as_of: datetime) -> None:
    """The share becomes available in the practitioner's §5 wallet (§10 Earnings)."""
    c.release_earning(at=as_of)
    work.add(c)
    share = c.price["share_minor"]
    if share <= 0:
        return
    wallet = work.get(Wallet.create_id(c.practitioner_id, c.currency)) \
        or Wallet(doctor_id=c.practitioner_id, currency=c.currency)
    wallet.credit_earning(consultation_id=c.consultation_id, amount_minor=share)
    work.add(wallet)


# -------------------------------------------------------------------------------- the tick


@dataclass
class ConsultationTick:
    """What one tick decided for consultations, as data and as lines.

    `steps`: one dict per step, in the order taken: {"consultation_id", "action" (confirm |
    expire | no_show | complete | release), "status" (after the step), "reason" (the close's
    reason, else None), "money" ("captured" | "released" | "earning_available" | None),
    "amount_minor", "currency"}; `failures`: {"consultation_id", "error"}; `lines` and `failed`
    are the same for the CLI and the logs; `conflicts` counts lost races.
    """

    steps: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    conflicts: int = 0
    more: bool = False


def step_record(c: Consultation, step: Step) -> dict:
    """The report's data for one step `c` has just taken."""
    if step.action == "confirm":
        money, amount = None, 0
    elif step.action == "release":
        money, amount = "earning_available", c.price["share_minor"]
    else:
        money, amount = ("captured" if c.captured else "released"), c.total_minor
    closing = step.action in ("expire", "no_show", "complete")
    return {"consultation_id": c.consultation_id, "action": step.action, "status": c.status,
            "reason": c.close["reason"] if closing else None, "money": money,
            "amount_minor": amount, "currency": c.currency}


def tick_consultations(app: Any, as_of: datetime, consultation_ids: Iterable[str],
                       max_steps: int = 20_000) -> ConsultationTick:
    """Decide every step due by `as_of` for these consultations, in due order (§10's tick rows).

    `app` provides `load(uuid)`, `save(*aggregates)` and `policy` (the Ledger). Each step is
    decided on a freshly loaded consultation and saved optimistically, so a step another tick
    already took fails to save, is re-decided and changes nothing. A consultation whose step
    raises is listed in `failed` and the others go on.
    """
    as_of = utc_seconds(as_of)
    report = ConsultationTick()
    queue: list[tuple[datetime, str]] = []
    for cid in dict.fromkeys(consultation_ids):
        c = app.load(Consultation.create_id(cid))
        step = next_step(c, app.policy) if c is not None else None
        if step is not None and step.due <= as_of:
            queue.append((step.due, cid))
    heapq.heapify(queue)
    for _ in range(max_steps):
        if not queue:
            break
        _, cid = heapq.heappop(queue)
        try:
            due = _tick_one(app, cid, as_of, report)
        except Exception as exc:  # one broken consultation must not stop everyone's billing
            log.exception("tick failed for consultation %s", cid)
            report.failed.append(f"consultation {cid}: {type(exc).__name__}: {exc}")
            report.failures.append({"consultation_id": cid, "error": type(exc).__name__})
            continue
        if due is not None:
            heapq.heappush(queue, (due, cid))
    report.more = bool(queue)
    return report


def _tick_one(app: Any, cid: str, as_of: datetime, report: ConsultationTick) -> datetime | None:
    """Take one due step; returns when the next one is due (<= as_of) or None."""
    for _ in range(MAX_ATTEMPTS):
        work = Work(app.load)
        c = work.get(Consultation.create_id(cid))
        step = next_step(c, app.policy)
        if step is None or step.due > as_of:
            return None
        try:
            line = apply_step(work, c, step, as_of, app.policy)
        except (AssertionError, KeyError):
            if not work.stale():
                raise
            report.conflicts += 1  # decided on a snapshot another writer has moved
            continue
        try:
            app.save(*work.to_save())
        except IntegrityError:
            report.conflicts += 1
            continue
        report.lines.append(f"consultation {cid}: {line}")
        report.steps.append(step_record(c, step))
        following = next_step(c, app.policy)
        return following.due if following and following.due <= as_of else None
    report.conflicts += 1
    return None


def get_consultation(app: Any, consultation_id: str) -> Consultation:
    """The consultation aggregate; raises UnknownConsultation (404)."""
    c = app.load(Consultation.create_id(consultation_id))
    if c is None:
        raise errors.UnknownConsultation(f"no consultation {consultation_id!r}")
    return c

