"""Priced consultations paid from a patient money wallet: aggregates and pure rules.

Source: billing-rules.md §10 (and I11–I14 in §6). Aggregates:
- `MoneyWallet` per patient and ISO 4217 currency: top-ups, refunds to source, payment
  reversals with debt, and the hold / capture / release / refund of consultations (I11).
- `TopUp` per payment reference: the payment that credited a wallet, what of it was refunded
  to its source or reversed (a chargeback); the reference is unique across the ledger.
- `PriceList` per practitioner: versions of fees per (consultation type, duration), currency,
  tax rate and share, each in force from its `effective_from`.
- `Consultation`: one booked consultation with the price stamped at booking, its lifecycle
  (§10's table) and the money each step moved (one hold, captured or released whole; at most
  one capture and one refund, I12).

The handlers that use them are in ledger/marketplace.py; tick decisions are `next_step` below,
a pure function of the consultation and `as_of`. Nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from eventsourcing.domain import event

from ledger import errors
from ledger.recording import LedgerAggregate
from ledger.rules import Policy

BOOK_AHEAD = timedelta(seconds=300)  # a booking starts more than 5 minutes after it is made
JOIN_EARLY = timedelta(seconds=300)  # the join window opens 5 minutes before the start
NO_SHOW_AFTER = timedelta(seconds=600)  # a participant not joined 10 minutes in is absent
CANCEL_BEFORE = timedelta(seconds=7200)  # a patient cancels at least 2 hours before the start
CONSULTATION_TYPES = ("individual", "couple", "family")
MODES = ("video", "audio", "chat")
CALL_MODES = ("video", "audio")  # the one-in-progress rule's modes (§10)
ROLES = ("patient", "practitioner")
OPEN = ("scheduled", "activated", "confirmed", "in_progress")
CLOSED = ("completed", "no_show", "cancelled", "expired")
MIN_DURATION_MINUTES = 10  # a consultation lasts at least the no-show window
MAX_DURATION_MINUTES = 480


def _id(name: str) -> UUID:
    """The ledger's memoised uuid5 of `name` (ledger/domain.py `ledger_id`): one namespace for
    every aggregate id of the ledger."""
    from ledger.domain import ledger_id  # deferred: ledger.domain imports this module's users

    return ledger_id(name)


# -------------------------------------------------------------------------------- wallets


class MoneyWallet(LedgerAggregate):
    """A patient's prepaid money in one currency, in minor units (§10).

    I11: topped_up − refunded_to_source − reversed_payments + debt
         = available + held + captured − refunded,
    where `captured` and `refunded` (consultation refunds back into the wallet) are gross and
    never decrease, and `available` is never negative. Money coming into `available` (a
    top-up, a released hold, a refund) first repays debt; a wallet with debt takes no booking.
    """

    @staticmethod
    def create_id(patient_id: str, currency: str) -> UUID:
        return _id(f"money-wallet:{patient_id}:{currency}")

    @event("Opened")
    def __init__(self, patient_id: str, currency: str) -> None:
        self.patient_id = patient_id
        self.currency = currency
        self.topped_up_minor = 0
        self.refunded_to_source_minor = 0
        self.reversed_payments_minor = 0
        self.debt_minor = 0
        self.available_minor = 0
        self.held_minor = 0
        self.captured_minor = 0
        self.refunded_minor = 0
        self.holds: dict[str, int] = {}  # consultation id -> held minor units

    def _repayment(self, amount_minor: int) -> int:
        return min(self.debt_minor, amount_minor)

    def top_up(self, payment_reference: str, provider: str, amount_minor: int,
               at: datetime) -> None:
        """Credit a completed top-up; debt is repaid first."""
        self._topped_up(payment_reference=payment_reference, provider=provider,
                        amount_minor=amount_minor, debt_repaid_minor=self._repayment(amount_minor),
                        patient_id=self.patient_id, currency=self.currency, at=at)

    @event("ToppedUp")
    def _topped_up(self, payment_reference: str, provider: str, amount_minor: int,
                   debt_repaid_minor: int, patient_id: str, currency: str, at: datetime) -> None:
        self.topped_up_minor += amount_minor
        self.debt_minor -= debt_repaid_minor
        self.available_minor += amount_minor - debt_repaid_minor

    def refund_to_source(self, refund_id: str, payment_reference: str, amount_minor: int,
                         admin_id: str, reason: str, at: datetime) -> None:
        """Send money back to the top-up's source; raises InsufficientFunds above available."""
        if amount_minor > self.available_minor:
            raise errors.InsufficientFunds(
                f"available {self.available_minor} < {amount_minor} {self.currency} minor units",
                available_minor=self.available_minor)
        self._refunded_to_source(refund_id=refund_id, payment_reference=payment_reference,
                                 amount_minor=amount_minor, admin_id=admin_id, reason=reason,
                                 patient_id=self.patient_id, currency=self.currency, at=at)

    @event("RefundedToSource")
    def _refunded_to_source(self, refund_id: str, payment_reference: str, amount_minor: int,
                            admin_id: str, reason: str, patient_id: str, currency: str,
                            at: datetime) -> None:
        assert amount_minor <= self.available_minor, "refund to source above available"
        self.refunded_to_source_minor += amount_minor
        self.available_minor -= amount_minor

    def reverse_payment(self, payment_reference: str, amount_minor: int, at: datetime) -> None:
        """A chargeback: debit `available` up to the amount, record the rest as debt (§10)."""
        debited = min(self.available_minor, amount_minor)
        self._payment_reversed(payment_reference=payment_reference, amount_minor=amount_minor,
                               debited_minor=debited, debt_minor=amount_minor - debited,
                               patient_id=self.patient_id, currency=self.currency, at=at)

    @event("PaymentReversed")
    def _payment_reversed(self, payment_reference: str, amount_minor: int, debited_minor: int,
                          debt_minor: int, patient_id: str, currency: str, at: datetime) -> None:
        self.reversed_payments_minor += amount_minor
        self.available_minor -= debited_minor
        self.debt_minor += debt_minor

    def hold(self, consultation_id: str, amount_minor: int, at: datetime) -> None:
        """Hold a booking's total; raises WalletInDebt or InsufficientFunds (§10 booked)."""
        if self.debt_minor > 0:
            raise errors.WalletInDebt(f"the {self.currency} wallet owes {self.debt_minor} minor "
                                      "units from a reversed payment", debt_minor=self.debt_minor)
        if amount_minor > self.available_minor:
            raise errors.InsufficientFunds(
                f"available {self.available_minor} < total {amount_minor} {self.currency} "
                "minor units", available_minor=self.available_minor)
        self._held(consultation_id=consultation_id, amount_minor=amount_minor,
                   patient_id=self.patient_id, currency=self.currency, at=at)

    @event("Held")
    def _held(self, consultation_id: str, amount_minor: int, patient_id: str, currency: str,
              at: datetime) -> None:
        assert 0 < amount_minor <= self.available_minor and consultation_id not in self.holds, \
            "overdraft or second hold"
        self.available_minor -= amount_minor
        self.held_minor += amount_minor
        self.holds[consultation_id] = amount_minor

    def capture(self, consultation_id: str, at: datetime) -> None:
        """Post the consultation's whole hold: held → captured."""
        self._captured(consultation_id=consultation_id, amount_minor=self.holds[consultation_id],
                       patient_id=self.patient_id, currency=self.currency, at=at)

    @event("Captured")
    def _captured(self, consultation_id: str, amount_minor: int, patient_id: str, currency: str,
                  at: datetime) -> None:
        assert self.holds.pop(consultation_id) == amount_minor, "capture of another amount"
        self.held_minor -= amount_minor
        self.captured_minor += amount_minor

    def release(self, consultation_id: str, at: datetime) -> None:
        """Void the consultation's whole hold: held → available (debt is repaid first)."""
        amount = self.holds[consultation_id]
        self._released(consultation_id=consultation_id, amount_minor=amount,
                       debt_repaid_minor=self._repayment(amount), patient_id=self.patient_id,
                       currency=self.currency, at=at)

    @event("Released")
    def _released(self, consultation_id: str, amount_minor: int, debt_repaid_minor: int,
                  patient_id: str, currency: str, at: datetime) -> None:
        assert self.holds.pop(consultation_id) == amount_minor, "release of another amount"
        self.held_minor -= amount_minor
        self.debt_minor -= debt_repaid_minor
        self.available_minor += amount_minor - debt_repaid_minor

    def refund(self, consultation_id: str, amount_minor: int, at: datetime) -> None:
        """Credit a refunded consultation's total back; debt is repaid first."""
        self._consultation_refunded(consultation_id=consultation_id, amount_minor=amount_minor,
                                    debt_repaid_minor=self._repayment(amount_minor),
                                    patient_id=self.patient_id, currency=self.currency, at=at)

    @event("ConsultationRefunded")
    def _consultation_refunded(self, consultation_id: str, amount_minor: int,
                               debt_repaid_minor: int, patient_id: str, currency: str,
                               at: datetime) -> None:
        self.refunded_minor += amount_minor
        self.debt_minor -= debt_repaid_minor
        self.available_minor += amount_minor - debt_repaid_minor

    def numbers(self) -> dict[str, int]:
        """The wallet's balances in minor units (the keys of the wallet read model)."""
        return {"topped_up_minor": self.topped_up_minor,
                "refunded_to_source_minor": self.refunded_to_source_minor,
                "reversed_payments_minor": self.reversed_payments_minor,
                "debt_minor": self.debt_minor, "available_minor": self.available_minor,
                "held_minor": self.held_minor, "captured_minor": self.captured_minor,
                "refunded_minor": self.refunded_minor}


class TopUp(LedgerAggregate):
    """One completed top-up payment, keyed by its unique payment reference (§10).

    `remaining_minor` = amount − refunded to source − reversed: what a refund to source or a
    chargeback may still take back.
    """

    @staticmethod
    def create_id(payment_reference: str) -> UUID:
        return _id("top-up:" + payment_reference)

    @event("Recorded")
    def __init__(self, payment_reference: str, patient_id: str, currency: str, amount_minor: int,
                 provider: str, at: datetime) -> None:
        self.payment_reference = payment_reference
        self.patient_id = patient_id
        self.currency = currency
        self.amount_minor = amount_minor
        self.provider = provider
        self.refunds: dict[str, dict] = {}  # refund id -> {"amount_minor", "admin_id", "reason"}
        self.reversed_minor = 0
        self.reversal: dict | None = None

    def same_content(self, patient_id: str, currency: str, amount_minor: int, provider: str) -> bool:
        return (self.patient_id, self.currency, self.amount_minor, self.provider) == (
            patient_id, currency, amount_minor, provider)

    @property
    def remaining_minor(self) -> int:
        refunded = sum(r["amount_minor"] for r in self.refunds.values())
        return self.amount_minor - refunded - self.reversed_minor

    def refund_to_source(self, refund_id: str, amount_minor: int, admin_id: str, reason: str,
                         at: datetime) -> bool:
        """Record a refund to the payment's source; False for the same refund again.

        Raises PaymentConflict for the id with other content, InsufficientFunds above what is
        left of the payment."""
        if refund_id in self.refunds:
            if self.refunds[refund_id] != {"amount_minor": amount_minor, "admin_id": admin_id,
                                           "reason": reason}:
                raise errors.PaymentConflict(f"refund {refund_id!r} was recorded with other content")
            return False
        if amount_minor > self.remaining_minor:
            raise errors.InsufficientFunds(
                f"only {self.remaining_minor} minor units of payment "
                f"{self.payment_reference!r} are left to refund", remaining_minor=self.remaining_minor)
        self._refunded(refund_id=refund_id, amount_minor=amount_minor, admin_id=admin_id,
                       reason=reason, at=at)
        return True

    @event("RefundedToSource")
    def _refunded(self, refund_id: str, amount_minor: int, admin_id: str, reason: str,
                  at: datetime) -> None:
        self.refunds[refund_id] = {"amount_minor": amount_minor, "admin_id": admin_id,
                                   "reason": reason}

    def reverse(self, amount_minor: int, reason: str, at: datetime) -> bool:
        """Record the payment's chargeback, once; False for the same chargeback again.

        Raises PaymentConflict for a second, different chargeback or one above what is left."""
        if self.reversal is not None:
            if self.reversal != {"amount_minor": amount_minor, "reason": reason}:
                raise errors.PaymentConflict(f"payment {self.payment_reference!r} was already "
                                             "reversed with other content")
            return False
        if amount_minor > self.remaining_minor:
            raise errors.PaymentConflict(f"only {self.remaining_minor} minor units of payment "
                                         f"{self.payment_reference!r} are left to reverse")
        self._reversed(amount_minor=amount_minor, reason=reason, at=at)
        return True

    @event("Reversed")
    def _reversed(self, amount_minor: int, reason: str, at: datetime) -> None:
        self.reversed_minor += amount_minor
        self.reversal = {"amount_minor": amount_minor, "reason": reason}


# ----------------------------------------------------------------------------- price lists


class PriceList(LedgerAggregate):
    """A practitioner's versioned prices (§10). A version is never edited: the same version
    published again with the same content is a no-op, with other content a conflict.

    Each version: {"version", "currency", "tax_bps", "share_bps", "effective_from",
    "fees": {"<type>:<minutes>": fee_minor}}; the version in force at `t` is the one with the
    latest `effective_from` <= t (the later published on a tie).
    """

    @staticmethod
    def create_id(practitioner_id: str) -> UUID:
        return _id("price-list:" + practitioner_id)

    @event("Opened")
    def __init__(self, practitioner_id: str) -> None:
        self.practitioner_id = practitioner_id
        self.versions: list[dict] = []

    def find(self, version_name: str) -> dict | None:
        """The version with this name, or None."""
        return next((v for v in self.versions if v["version"] == version_name), None)

    def publish(self, version: dict) -> bool:
        """Record a version; False if the identical version exists. Raises
        PriceListConflict for the same version name with other content."""
        existing = self.find(version["version"])
        if existing is not None:
            if existing != version:
                raise errors.PriceListConflict(
                    f"price list version {version['version']!r} exists with other content")
            return False
        self._published(version_name=version["version"],
                        **{k: v for k, v in version.items() if k != "version"})
        return True

    @event("Published")
    def _published(self, version_name: str, currency: str, tax_bps: int, share_bps: int,
                   effective_from: datetime, fees: dict) -> None:
        self.versions.append({"version": version_name, "currency": currency,
                              "tax_bps": tax_bps, "share_bps": share_bps,
                              "effective_from": effective_from, "fees": dict(fees)})

    def in_force(self, at: datetime) -> dict | None:
        """The version in force at instant `at`, or None."""
        candidates = [(v["effective_from"], k) for k, v in enumerate(self.versions)
                      if v["effective_from"] <= at]
        return self.versions[max(candidates)[1]] if candidates else None


def fee_key(consultation_type: str, duration_minutes: int) -> str:
    """The key of a fee in a price list version: `individual:50`."""
    return f"{consultation_type}:{duration_minutes}"


# ---------------------------------------------------------------------------- consultations


class Consultation(LedgerAggregate):
    """One priced consultation (§10). `status`: scheduled → activated → confirmed →
    in_progress → completed | no_show, or cancelled | expired before it starts.

    `price` is stamped at booking: {"version", "currency", "tax_bps", "share_bps",
    "fee_minor", "tax_minor", "total_minor", "share_minor", "platform_minor",
    "tax_payable_minor"}. `joins` keeps each role's earliest accepted join. The hold (the
    total) is captured or released whole by the `Closed` event; `refund` and
    `earning_released_at` record what happened to the money afterwards.
    """

    @staticmethod
    def create_id(consultation_id: str) -> UUID:
        return _id("consultation:" + consultation_id)

    @event("Booked")
    def __init__(self, consultation_id: str, patient_id: str, practitioner_id: str,
                 consultation_type: str, mode: str, start: datetime, duration_minutes: int,
                 price: dict, at: datetime) -> None:
        self.consultation_id = consultation_id
        self.patient_id = patient_id
        self.practitioner_id = practitioner_id
        self.consultation_type = consultation_type
        self.mode = mode
        self.start = start
        self.duration_minutes = duration_minutes
        self.price = dict(price)
        self.booked_at = at
        self.status = "scheduled"
        self.activated_at: datetime | None = None
        self.activated_by: str | None = None
        self.confirmed_at: datetime | None = None
        self.joins: dict[str, datetime] = {}
        self.closed_at: datetime | None = None
        self.completed_at: datetime | None = None
        self.close: dict | None = None  # {"status", "reason", "by", "actor"}
        self.captured = False
        self.released = False
        self.earning_released_at: datetime | None = None
        self.refund: dict | None = None

    # ---- derived

    @property
    def end(self) -> datetime:
        """The scheduled end: start + duration."""
        return self.start + timedelta(minutes=self.duration_minutes)

    @property
    def closed(self) -> bool:
        return self.status in CLOSED

    @property
    def activated(self) -> bool:
        return self.activated_at is not None

    @property
    def total_minor(self) -> int:
        return self.price["total_minor"]

    @property
    def currency(self) -> str:
        return self.price["currency"]

    @property
    def earning(self) -> str | None:
        """The practitioner's share: None (not captured), pending, available or reversed."""
        if not self.captured:
            return None
        if self.earning_released_at is not None:
            return "available"
        return "reversed" if self.refund is not None else "pending"

    def joined_by(self, role: str, instant: datetime) -> bool:
        """Whether `role` has an accepted join at or before `instant`."""
        return role in self.joins and self.joins[role] <= instant

    # ---- guards

    def check_open(self, what: str) -> None:
        """Raise ConsultationClosed once completed, a no-show, cancelled or expired (§10)."""
        if self.closed:
            raise errors.ConsultationClosed(
                f"consultation {self.consultation_id} is {self.status}; {what} does not apply",
                consultation_status=self.status)

    # ---- events

    @event("Activated")
    def activate(self, admin_id: str, at: datetime) -> None:
        self.status = "activated"
        self.activated_at = at
        self.activated_by = admin_id

    @event("Confirmed")
    def confirm(self, at: datetime, due_at: datetime) -> None:
        """Recorded by the tick from max(start − 300 s, activated at) (§10)."""
        self.status = "confirmed"
        self.confirmed_at = at

    @event("Joined")
    def joined(self, role: str, at: datetime, source: str) -> None:
        """`role`'s earliest accepted join; the first join of either puts it in progress."""
        self.joins[role] = min(self.joins.get(role, at), at)
        self.status = "in_progress"

    @event("Closed")
    def _closed(self, status: str, reason: str, by: str, actor: str | None, at: datetime,
                completed_at: datetime | None, capture: dict | None, released_minor: int,
                patient_id: str, practitioner_id: str, currency: str) -> None:
        self.status = status
        self.closed_at = at
        self.completed_at = completed_at
        self.close = {"status": status, "reason": reason, "by": by, "actor": actor}
        self.captured = capture is not None
        self.released = released_minor > 0

    def close_with(self, status: str, reason: str, by: str, at: datetime, *,
                   capture: bool, completed_at: datetime | None = None,
                   actor: str | None = None) -> None:
        """Close the consultation, capturing its whole hold (with the price's split into
        share, platform and tax payable: one event, I14) or releasing it (§10)."""
        assert not self.closed, "closed twice"
        split = {k: self.price[k] for k in ("total_minor", "share_minor", "platform_minor",
                                            "tax_payable_minor", "fee_minor", "tax_minor")}
        self._closed(status=status, reason=reason, by=by, actor=actor, at=at,
                     completed_at=completed_at, capture=split if capture else None,
                     released_minor=0 if capture else self.total_minor,
                     patient_id=self.patient_id, practitioner_id=self.practitioner_id,
                     currency=self.currency)

    @event("EarningReleased")
    def _earning_released(self, at: datetime, amount_minor: int, practitioner_id: str,
                          currency: str) -> None:
        self.earning_released_at = at

    def release_earning(self, at: datetime) -> None:
        """The share becomes available in the practitioner's wallet (§10 Earnings)."""
        assert self.earning == "pending", "only a pending earning is released"
        self._earning_released(at=at, amount_minor=self.price["share_minor"],
                               practitioner_id=self.practitioner_id, currency=self.currency)

    def refund_whole(self, admin_id: str, reason: str, at: datetime) -> None:
        """Refund the total once (completed or patient no-show): while the earning is pending
        share, platform and tax are reversed; once available the practitioner keeps it, tax
        payable goes down by the tax and the platform account by the fee (§10 Refunds).
        Raises NotRefundable."""
        if self.refund is not None:
            raise errors.NotRefundable(f"consultation {self.consultation_id} was already refunded")
        if not self.captured:
            raise errors.NotRefundable(f"consultation {self.consultation_id} is {self.status}: "
                                       "only a completed consultation or a patient no-show "
                                       "is refundable", consultation_status=self.status)
        pending = self.earning == "pending"
        p = self.price
        self._refunded(admin_id=admin_id, reason=reason, at=at, total_minor=p["total_minor"],
                       earning="pending" if pending else "available",
                       share_reversed_minor=p["share_minor"] if pending else 0,
                       platform_reversed_minor=p["platform_minor"] if pending else p["fee_minor"],
                       tax_reversed_minor=p["tax_payable_minor"], patient_id=self.patient_id,
                       practitioner_id=self.practitioner_id, currency=self.currency)

    @event("Refunded")
    def _refunded(self, admin_id: str, reason: str, at: datetime, total_minor: int, earning: str,
                  share_reversed_minor: int, platform_reversed_minor: int,
                  tax_reversed_minor: int, patient_id: str, practitioner_id: str,
                  currency: str) -> None:
        assert share_reversed_minor + platform_reversed_minor + tax_reversed_minor == total_minor
        self.refund = {"admin_id": admin_id, "reason": reason, "at": at, "earning": earning,
                       "total_minor": total_minor, "share_reversed_minor": share_reversed_minor,
                       "platform_reversed_minor": platform_reversed_minor,
                       "tax_reversed_minor": tax_reversed_minor}


# ------------------------------------------------------------------------ tick decisions


@dataclass(frozen=True)
class Step:
    """One decision the tick can take for a consultation: `action` from instant `due`.

    action: confirm | expire | no_show | complete | release.
    """

    action: str
    due: datetime


def closing_step(c: Consultation, policy: Policy) -> Step | None:
    """The tick decision that will close an open consultation, by its own event times:
    expire a never-activated booking at start + skew; a no-show at start + 600 s + skew unless
    both joined by start + 600 s; else completion by time at start + duration + skew (§10)."""
    if c.closed:
        return None
    skew = timedelta(seconds=policy.skew_seconds)
    if c.status == "scheduled":
        return Step("expire", c.start + skew)
    deadline = c.start + NO_SHOW_AFTER
    if not (c.joined_by("practitioner", deadline) and c.joined_by("patient", deadline)):
        return Step("no_show", deadline + skew)
    return Step("complete", c.end + skew)


def next_step(c: Consultation, policy: Policy) -> Step | None:
    """The consultation's next tick decision and when it is due, or None (§10's table):
    confirm an activated consultation from max(start − 300 s, activated at), then its
    closing step; after a capture, release the share at completed_at + settlement grace."""
    if c.closed:
        if c.earning != "pending":
            return None
        return Step("release", c.completed_at + timedelta(seconds=policy.settlement_grace_seconds))
    if c.status == "activated":
        return Step("confirm", max(c.start - JOIN_EARLY, c.activated_at))
    return closing_step(c, policy)


def next_due_at(c: Consultation, policy: Policy) -> datetime | None:
    """When the tick next has something to decide for this consultation (for the live view)."""
    step = next_step(c, policy)
    return step.due if step else None
