"""Read models of priced consultations (billing-rules.md §10): patient money wallets, the
platform and tax-payable accounts per currency, and the consultations the tick must visit.

One projection, `marketplace`, fed by the MoneyWallet and Consultation events; all amounts are
integer minor units. The practitioners' shares go to the §5 doctor wallets, kept by the
`wallets` projection (projections/views.py).

I11 per money wallet: topped_up − refunded_to_source − reversed_payments + debt
                      = available + held + captured − refunds.
I14 per currency:     captured − refunds = (shares − shares_reversed) + platform + tax_payable.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ledger.consultations import Consultation, MoneyWallet, next_due_at
from ledger.recording import AggregateFollower
from ledger.rules import Policy
from projections.store import Store
from projections.views import Deltas, Projection, event_classes, pages, topics_of

# Columns; `refunds` is read as `refunded_minor` (a column named `refunded` is a pool flag
# elsewhere, and replay verification compares columns by name).
MONEY_WALLET_FIELDS = ("topped_up", "refunded_to_source", "reversed_payments", "debt",
                       "available", "held", "captured", "refunds")
PLATFORM_FIELDS = ("captured", "refunds", "shares", "shares_reversed", "platform", "tax_payable")
CONSULTATION_CACHE_SIZE = 20_000


class MarketplaceView(Projection):
    """money_wallets (patient, currency), platform_accounts (currency), live_consultations."""

    name = "marketplace"
    topics = topics_of(event_classes(MoneyWallet) + event_classes(Consultation))

    def __init__(self, ledger: Any, policy: Policy) -> None:
        super().__init__(ledger, policy)
        self.consultations = AggregateFollower.reading(ledger, CONSULTATION_CACHE_SIZE)
        self.handlers = {
            MoneyWallet.Opened: self._opened, MoneyWallet.ToppedUp: self._topped_up,
            MoneyWallet.RefundedToSource: self._refunded_to_source,
            MoneyWallet.PaymentReversed: self._payment_reversed, MoneyWallet.Held: self._held,
            MoneyWallet.Captured: self._captured, MoneyWallet.Released: self._released,
            MoneyWallet.ConsultationRefunded: self._consultation_refunded,
            Consultation.Closed: self._closed, Consultation.Refunded: self._refunded,
        }
        self.reset()

    def reset(self) -> None:
        self.consultations.clear()
        self.wallets = Deltas("money_wallets", ("patient_id", "currency"), MONEY_WALLET_FIELDS)
        self.platform = Deltas("platform_accounts", ("currency",), PLATFORM_FIELDS)
        self.states: dict[str, Consultation] = {}  # consultation_id -> its last state

    def fold(self, store: Store, events: list) -> None:
        for page in pages(events):
            self._fold(page)

    def _fold(self, events: list) -> None:
        self.consultations.prefetch(e for e in events if isinstance(e, Consultation.Event))
        for e in events:
            handler = self.handlers.get(type(e))
            if handler is not None:
                handler(e)
            if isinstance(e, Consultation.Event):
                _, c = self.consultations.advance(e)
                self.states[c.consultation_id] = c

    def flush(self, store: Store) -> None:
        self.wallets.flush(store)
        self.platform.flush(store)
        self._flush(store, {cid: self._row(store, c) for cid, c in self.states.items()})
        self.states = {}

    def pending(self) -> int:
        return len(self.wallets.rows) + len(self.platform.rows) + len(self.states)

    # ---- money wallets (I11)

    def _key(self, e: Any) -> tuple[str, str]:
        return (e.patient_id, e.currency)

    def _opened(self, e: Any) -> None:
        self.wallets.add(self._key(e))

    def _topped_up(self, e: Any) -> None:
        self.wallets.add(self._key(e), topped_up=e.amount_minor, debt=-e.debt_repaid_minor,
                         available=e.amount_minor - e.debt_repaid_minor)

    def _refunded_to_source(self, e: Any) -> None:
        self.wallets.add(self._key(e), refunded_to_source=e.amount_minor,
                         available=-e.amount_minor)

    def _payment_reversed(self, e: Any) -> None:
        self.wallets.add(self._key(e), reversed_payments=e.amount_minor,
                         available=-e.debited_minor, debt=e.debt_minor)

    def _held(self, e: Any) -> None:
        self.wallets.add(self._key(e), available=-e.amount_minor, held=e.amount_minor)

    def _captured(self, e: Any) -> None:
        self.wallets.add(self._key(e), held=-e.amount_minor, captured=e.amount_minor)

    def _released(self, e: Any) -> None:
        self.wallets.add(self._key(e), held=-e.amount_minor, debt=-e.debt_repaid_minor,
                         available=e.amount_minor - e.debt_repaid_minor)

    def _consultation_refunded(self, e: Any) -> None:
        self.wallets.add(self._key(e), refunds=e.amount_minor, debt=-e.debt_repaid_minor,
                         available=e.amount_minor - e.debt_repaid_minor)

    # ---- platform and tax payable (I14)

    def _closed(self, e: Any) -> None:
        if e.capture is None:
            return
        c = e.capture
        self.platform.add((e.currency,), captured=c["total_minor"], shares=c["share_minor"],
                          platform=c["platform_minor"], tax_payable=c["tax_payable_minor"])

    def _refunded(self, e: Any) -> None:
        self.platform.add((e.currency,), refunds=e.total_minor,
                          shares_reversed=e.share_reversed_minor,
                          platform=-e.platform_reversed_minor,
                          tax_payable=-e.tax_reversed_minor)

    # ---- what the tick must visit

    def _row(self, store: Store, c: Consultation) -> tuple | None:
        due = next_due_at(c, self.policy)
        if due is None:
            return None
        return (c.consultation_id, c.patient_id, c.practitioner_id, c.status, store.ts(due))

    @staticmethod
    def _flush(store: Store, rows: dict[str, tuple | None]) -> None:
        store.delete_keys("live_consultations", "consultation_id",
                          [cid for cid, row in rows.items() if row is None])
        store.upsert("live_consultations", ("consultation_id",),
                     ("consultation_id", "patient_id", "practitioner_id", "status",
                      "next_due_at"),
                     "status = excluded.status, next_due_at = excluded.next_due_at",
                     [row for row in rows.values() if row is not None])


# ------------------------------------------------------------------------------------ reads


def _minor(fields: tuple[str, ...], values: tuple) -> dict[str, int]:
    names = ("refunded" if f == "refunds" else f for f in fields)
    return {f"{name}_minor": int(v) for name, v in zip(names, values)}


def patient_money_wallet(store: Store, patient_id: str) -> dict:
    """{"patient_id", "wallets": [{"currency", "topped_up_minor", "refunded_to_source_minor",
    "reversed_payments_minor", "debt_minor", "available_minor", "held_minor", "captured_minor",
    "refunded_minor"}]} ordered by currency (minor units)."""
    with store.locked():
        rows = store.query(f"SELECT currency, {', '.join(MONEY_WALLET_FIELDS)} FROM money_wallets "
                           "WHERE patient_id = ? ORDER BY currency", (patient_id,))
    return {"patient_id": patient_id,
            "wallets": [{"currency": r[0], **_minor(MONEY_WALLET_FIELDS, r[1:])} for r in rows]}


def platform_accounts(store: Store) -> dict:
    """{"accounts": [{"currency", "captured_minor", "refunded_minor", "shares_minor",
    "shares_reversed_minor", "platform_minor", "tax_payable_minor"}]} ordered by currency."""
    with store.locked():
        rows = store.query(f"SELECT currency, {', '.join(PLATFORM_FIELDS)} FROM platform_accounts "
                           "ORDER BY currency LIMIT 1000")
    return {"accounts": [{"currency": r[0], **_minor(PLATFORM_FIELDS, r[1:])} for r in rows]}


def due_consultations(store: Store, as_of: datetime, limit: int = 1000) -> list[str]:
    """consultation_id of consultations with a tick step due by `as_of`, earliest first."""
    with store.locked():
        rows = store.query("SELECT consultation_id FROM live_consultations WHERE next_due_at <= ? "
                           "ORDER BY next_due_at, consultation_id LIMIT ?", (store.ts(as_of), limit))
    return [r[0] for r in rows]
