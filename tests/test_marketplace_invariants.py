"""Invariants I11–I14 of billing-rules.md §6 (priced consultations, §10), checked over the EVENT
LOG with independent folds, in the Hypothesis state machine interleaved with unit-based sessions.

* `check_I11_…` … `check_I14_…` recompute money wallets, consultations and accounts from the
  decoded events and raise AssertionError; `test_I11_…` … `test_I14_…` run each on a
  handcrafted scenario and on a doctored copy of its log (the check has teeth).
* `MarketplaceMachine` extends test_invariants' `LedgerMachine` (pools, sessions of every kind,
  provider reports, withdrawals, ticks, duplicate and late posts) with top-ups, refunds to
  source, chargebacks, price lists, bookings, activations, joins (backend and provider), ends,
  cancellations, declines and refunds of the same doctors and patients, ticks at arbitrary
  times (racing ones too), duplicate and out-of-order posts. After every step it checks I1–I10
  and I11–I14; at the end every consultation is closed and the aggregates equal the folds.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from hypothesis import event as hevent
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from conftest import T0, FakeClock
from ledger import errors
from ledger.consultations import Consultation, MoneyWallet, TopUp
from ledger.domain import Wallet
from ledger.marketplace import tick_consultations
from test_billing import MIN, S, name
from test_invariants import KINDS, LedgerMachine, check_all
from test_marketplace import FEE, START, TAX, TOTAL, Clinic

NO_SHOW = timedelta(seconds=600)
MONEY_FIELDS = ("topped_up", "refunded_to_source", "reversed_payments", "debt", "available",
                "held", "captured", "refunded")


# ============================================================================ folds over the log


@dataclass
class MoneyFold:
    topped_up: int = 0
    refunded_to_source: int = 0
    reversed_payments: int = 0
    debt: int = 0
    available: int = 0
    held: int = 0
    captured: int = 0
    refunded: int = 0
    holds: dict = field(default_factory=dict)  # consultation id -> held amount

    def balance(self) -> tuple[int, int]:
        """(topped_up − refunded_to_source − reversed_payments + debt,
            available + held + captured − refunded): equal by I11."""
        return (self.topped_up - self.refunded_to_source - self.reversed_payments + self.debt,
                self.available + self.held + self.captured - self.refunded)


@dataclass
class ConsultationFold:
    cid: str
    patient_id: str
    practitioner_id: str
    start: datetime
    duration_minutes: int
    price: dict
    joins: dict = field(default_factory=dict)  # role -> earliest join
    closed: object = None
    refunds: list = field(default_factory=list)
    releases: list = field(default_factory=list)
    wallet_held: list = field(default_factory=list)
    wallet_captured: list = field(default_factory=list)
    wallet_released: list = field(default_factory=list)
    wallet_refunded: list = field(default_factory=list)


@dataclass
class Market:
    wallets: dict  # (patient, currency) -> MoneyFold
    consultations: dict  # consultation id -> ConsultationFold
    earned: Counter  # (practitioner, currency, consultation id) -> §5 credit


def fold_market(events, on_step=None) -> Market:
    """Replay the marketplace's events in order with independent code."""
    wallets: dict = defaultdict(MoneyFold)
    consultations: dict = {}
    by_uuid: dict = {}
    earned: Counter = Counter()
    out = Market(wallets, consultations, earned)
    for i, e in enumerate(events):
        n = name(e)
        if n.startswith("MoneyWallet.") and n != "MoneyWallet.Opened":
            fold_money(wallets[(e.patient_id, e.currency)], n, e, consultations)
        elif n == "Consultation.Booked":
            c = ConsultationFold(e.consultation_id, e.patient_id, e.practitioner_id, e.start,
                                 e.duration_minutes, e.price)
            consultations[e.consultation_id] = by_uuid[e.originator_id] = c
        elif n.startswith("Consultation."):
            c = by_uuid[e.originator_id]
            if n == "Consultation.Joined":
                c.joins[e.role] = min(c.joins.get(e.role, e.at), e.at)
            elif n == "Consultation.Closed":
                assert c.closed is None, f"I12: {c.cid} closed twice"
                c.closed = e
            elif n == "Consultation.Refunded":
                c.refunds.append(e)
            elif n == "Consultation.EarningReleased":
                c.releases.append(e)
        elif n == "Wallet.EarningCredited":
            earned[(e.originator_id, e.consultation_id)] += e.amount_minor
        if on_step is not None:
            on_step(i, e, out)
    return out


def fold_money(w: MoneyFold, n: str, e, consultations: dict) -> None:
    c = consultations.get(getattr(e, "consultation_id", None))
    if n == "MoneyWallet.ToppedUp":
        w.topped_up += e.amount_minor
        w.debt -= e.debt_repaid_minor
        w.available += e.amount_minor - e.debt_repaid_minor
    elif n == "MoneyWallet.RefundedToSource":
        w.refunded_to_source += e.amount_minor
        w.available -= e.amount_minor
    elif n == "MoneyWallet.PaymentReversed":
        assert e.debited_minor + e.debt_minor == e.amount_minor, f"I11: {e} loses money"
        w.reversed_payments += e.amount_minor
        w.available -= e.debited_minor
        w.debt += e.debt_minor
    elif n == "MoneyWallet.Held":
        w.holds[e.consultation_id] = e.amount_minor
        w.available -= e.amount_minor
        w.held += e.amount_minor
        (c.wallet_held if c else []).append(e)
    elif n in ("MoneyWallet.Captured", "MoneyWallet.Released"):
        held = w.holds.pop(e.consultation_id, None)
        assert held is not None, f"I12: {n} of {e.consultation_id} without a hold (a second one)"
        assert held == e.amount_minor, f"I11/I13: {n} of another amount than held"
        w.held -= e.amount_minor
        if n == "MoneyWallet.Captured":
            w.captured += e.amount_minor
            c.wallet_captured.append(e)
        else:
            w.debt -= e.debt_repaid_minor
            w.available += e.amount_minor - e.debt_repaid_minor
            c.wallet_released.append(e)
    elif n == "MoneyWallet.ConsultationRefunded":
        w.refunded += e.amount_minor
        w.debt -= e.debt_repaid_minor
        w.available += e.amount_minor - e.debt_repaid_minor
        c.wallet_refunded.append(e)


# =================================================================================== the checks


def check_I11_money_wallet_conservation(events) -> None:
    """Per patient and currency, at every prefix of the log: topped up − refunded to source −
    reversed payments + debt = available + held + captured − refunded; available, held and
    debt never negative; every amount moved is positive (captured, refunded only grow)."""

    def every_prefix(i, e, market: Market) -> None:
        n = name(e)
        if n.startswith("MoneyWallet.") and n != "MoneyWallet.Opened":
            assert e.amount_minor > 0, f"I11: {n} of {e.amount_minor} at {i}"
            w = market.wallets[(e.patient_id, e.currency)]
            lhs, rhs = w.balance()
            assert lhs == rhs, f"I11: wallet {e.patient_id} {e.currency} at {i}: {lhs} != {rhs}"
            assert min(w.available, w.held, w.debt) >= 0, f"I11: negative at {i}: {w}"

    fold_market(events, on_step=every_prefix)


def check_I12_captured_and_refunded_at_most_once(events) -> None:
    """A consultation holds once, is closed once, captured at most once and refunded at most
    once — in the consultation and in the wallet — and only a captured one is refunded."""
    for c in fold_market(events).consultations.values():
        assert len(c.wallet_held) == 1, f"I12: {c.cid} held {len(c.wallet_held)} times"
        assert len(c.wallet_captured) <= 1, f"I12: {c.cid} captured {len(c.wallet_captured)} times"
        assert len(c.refunds) <= 1 and len(c.wallet_refunded) == len(c.refunds), \
            f"I12: {c.cid} refunded {len(c.refunds)}/{len(c.wallet_refunded)} times"
        assert len(c.releases) <= 1, f"I12: {c.cid} earning released twice"
        if c.refunds:
            assert c.wallet_captured, f"I12: {c.cid} refunded without a capture"
            assert c.wallet_refunded[0].amount_minor == c.price["total_minor"]


def check_I13_capture_only_when_both_joined(events) -> None:
    """No capture unless both participants joined by the end (joins within start + 600 s
    count), or the patient no-show rule applies (the practitioner joined by start + 600 s);
    a closed consultation captured or released its whole hold, exactly one of the two, in the
    event that closed it."""
    for c in fold_market(events).consultations.values():
        total = c.price["total_minor"]
        assert c.wallet_held[0].amount_minor == total, f"I13: {c.cid} held {c.wallet_held}"
        if c.closed is None:
            assert not (c.wallet_captured or c.wallet_released), f"I13: {c.cid} moved while open"
            continue
        captured = c.closed.capture is not None
        assert [e.amount_minor for e in c.wallet_captured] == ([total] if captured else []), \
            f"I13: {c.cid} capture {c.wallet_captured} vs close {c.closed.capture}"
        assert [e.amount_minor for e in c.wallet_released] == ([] if captured else [total]), \
            f"I13: {c.cid} release {c.wallet_released} vs close"
        assert c.closed.released_minor == (0 if captured else total), \
            f"I13: {c.cid} closed releasing {c.closed.released_minor} of {total}"
        if not captured:
            continue
        deadline = c.start + NO_SHOW
        practitioner_in = c.joins.get("practitioner") and c.joins["practitioner"] <= deadline
        patient_in = c.joins.get("patient") and c.joins["patient"] <= deadline
        assert practitioner_in, f"I13: {c.cid} captured without the practitioner ({c.joins})"
        if c.closed.reason == "patient_absent":
            assert c.closed.completed_at == deadline and not patient_in
        else:
            assert patient_in, f"I13: {c.cid} captured without the patient ({c.joins})"
            assert max(c.joins.values()) <= c.closed.completed_at


def check_I14_split_and_accounts(events) -> None:
    """Per capture, total = share + platform + tax payable with the stamped price recomputed
    (tax half up, share down); per currency Σ captured − Σ refunded = Σ shares not reversed +
    platform account + tax payable, tax payable never negative; a refund reverses the share
    only while it is pending, and the §5 wallet gets each released share once."""
    market = fold_market(events)
    sums: dict = defaultdict(Counter)
    for c in market.consultations.values():
        p = c.price
        assert p["tax_minor"] == (p["fee_minor"] * p["tax_bps"] + 5000) // 10000, f"I14 {c.cid}"
        assert p["share_minor"] == p["fee_minor"] * p["share_bps"] // 10000, f"I14 {c.cid}"
        assert p["total_minor"] == p["fee_minor"] + p["tax_minor"]
        if c.closed is None or c.closed.capture is None:
            assert not c.releases and not c.refunds
            continue
        cap, s = c.closed.capture, sums[p["currency"]]
        assert cap["total_minor"] == cap["share_minor"] + cap["platform_minor"] + \
            cap["tax_payable_minor"], f"I14: {c.cid} split {cap}"
        assert (cap["share_minor"], cap["platform_minor"], cap["tax_payable_minor"]) == (
            p["share_minor"], p["fee_minor"] - p["share_minor"], p["tax_minor"]), f"I14 {c.cid}"
        s["captured"] += cap["total_minor"]
        s["shares"] += cap["share_minor"]
        s["platform"] += cap["platform_minor"]
        s["tax"] += cap["tax_payable_minor"]
        released = bool(c.releases)
        if released:
            assert c.releases[0].amount_minor == cap["share_minor"]
        for r in c.refunds:
            before_release = not released or events.index(r) < events.index(c.releases[0])
            expect = (cap["share_minor"], cap["platform_minor"]) if before_release else \
                (0, p["fee_minor"])
            assert (r.share_reversed_minor, r.platform_reversed_minor) == expect, \
                f"I14: {c.cid} refund reversed {r.share_reversed_minor}/" \
                f"{r.platform_reversed_minor}, expected {expect}"
            assert r.tax_reversed_minor == cap["tax_payable_minor"]
            s["refunded"] += r.total_minor
            s["shares"] -= r.share_reversed_minor
            s["platform"] -= r.platform_reversed_minor
            s["tax"] -= r.tax_reversed_minor
    for currency, s in sums.items():
        assert s["captured"] - s["refunded"] == s["shares"] + s["platform"] + s["tax"], \
            f"I14 {currency}: {dict(s)}"
        assert s["tax"] >= 0, f"I14 {currency}: tax payable {s['tax']}"
    released = {c.cid: c.releases[0].amount_minor for c in market.consultations.values()
                if c.releases and c.releases[0].amount_minor}
    credited = Counter()
    for (_, cid), amount in market.earned.items():
        credited[cid] += amount
    assert dict(credited) == released, f"I14: §5 credits {dict(credited)} != releases {released}"


def check_market(events) -> None:
    check_I11_money_wallet_conservation(events)
    check_I12_captured_and_refunded_at_most_once(events)
    check_I13_capture_only_when_both_joined(events)
    check_I14_split_and_accounts(events)


def check_market_replay(events, ledger) -> None:
    """The aggregates rebuilt from the store equal the folds (I7 for §10)."""
    market = fold_market(events)
    for (patient, currency), w in market.wallets.items():
        agg = ledger.repository.get(MoneyWallet.create_id(patient, currency))
        assert agg.numbers() == {f"{k}_minor": getattr(w, k) for k in MONEY_FIELDS}, \
            f"I7: money wallet {patient} {currency}"
        assert agg.holds == w.holds
    for c in market.consultations.values():
        agg = ledger.repository.get(Consultation.create_id(c.cid))
        assert agg.joins == c.joins and agg.closed == (c.closed is not None)
        assert (agg.refund is not None) == bool(c.refunds)


# ========================================================================= handcrafted scenario


def scenario() -> Clinic:
    """Three consultations of one practitioner: completed and refunded after the release, a
    patient no-show refunded while pending, a practitioner no-show; a chargeback of the whole
    top-up while most of it is held leaves a debt that the refunds and the release repay."""
    clinic = Clinic(FakeClock())
    clinic.practitioner()
    clinic.top_up(amount=4 * TOTAL)
    clinic.book("c1")
    clinic.activate("c1")
    clinic.book("c2", start=START + 2 * 60 * MIN)
    clinic.activate("c2")
    clinic.book("c3", start=START + 4 * 60 * MIN)
    clinic.activate("c3")
    clinic.post("wallet.payment_reversed", payment_reference="pay-i1", amount_minor=4 * TOTAL)
    clinic.join("c1", "patient", clinic.at(START))
    clinic.join("c1", "practitioner", clinic.at(START + 30 * S))
    clinic.finish("c1", at=clinic.at(START + 45 * MIN))
    clinic.tick_at(START + 45 * MIN + 600 * S)
    clinic.refund("c1")
    clinic.join("c2", "practitioner", clinic.at(START + 2 * 60 * MIN))
    clinic.tick_at(START + 2 * 60 * MIN + 11 * MIN)
    clinic.refund("c2")
    clinic.tick_at(START + 4 * 60 * MIN + 11 * MIN)
    return clinic


@pytest.fixture(scope="module")
def market_events():
    clinic = scenario()
    events = clinic.events()
    m = fold_market(events)
    assert {c.cid: c.closed.reason for c in m.consultations.values()} == {
        "c1": "ended", "c2": "patient_absent", "c3": "practitioner_absent"}
    (reversal,) = [e for e in events if name(e) == "MoneyWallet.PaymentReversed"]
    assert (reversal.debited_minor, reversal.debt_minor) == (TOTAL, 3 * TOTAL)
    w = m.wallets[("p1", "INR")]
    assert (w.debt, w.available, w.captured, w.refunded) == (0, 0, 2 * TOTAL, 2 * TOTAL)
    return clinic, events


def doctored(events, pick, **changes) -> list:
    out = list(events)
    i = next(i for i, e in enumerate(out) if pick(e))
    out[i] = dataclasses.replace(out[i], **changes)
    return out


def test_I11_money_wallet_conservation(market_events) -> None:
    clinic, events = market_events
    check_I11_money_wallet_conservation(events)
    with pytest.raises(AssertionError, match="I11"):
        check_I11_money_wallet_conservation(doctored(
            events, lambda e: name(e) == "MoneyWallet.Captured", amount_minor=TOTAL - 1))
    with pytest.raises(AssertionError, match="I11"):
        check_I11_money_wallet_conservation(doctored(
            events, lambda e: name(e) == "MoneyWallet.PaymentReversed", debt_minor=0))
    check_market_replay(events, clinic.ledger)


def test_I12_captured_and_refunded_at_most_once(market_events) -> None:
    clinic, events = market_events
    check_I12_captured_and_refunded_at_most_once(events)
    refund = next(e for e in events if name(e) == "Consultation.Refunded")
    with pytest.raises(AssertionError, match="I12"):
        check_I12_captured_and_refunded_at_most_once(events + [refund])
    capture = next(e for e in events if name(e) == "MoneyWallet.Captured")
    with pytest.raises(AssertionError, match="I12|I13"):
        check_I12_captured_and_refunded_at_most_once(events + [capture])


def test_I13_capture_only_when_both_joined(market_events) -> None:
    clinic, events = market_events
    check_I13_capture_only_when_both_joined(events)
    c1 = Consultation.create_id("c1")
    no_patient = [e for e in events if not (name(e) == "Consultation.Joined"
                                            and e.originator_id == c1 and e.role == "patient")]
    with pytest.raises(AssertionError, match="I13"):
        check_I13_capture_only_when_both_joined(no_patient)
    with pytest.raises(AssertionError, match="I13"):
        check_I13_capture_only_when_both_joined(doctored(
            events, lambda e: name(e) == "Consultation.Closed" and e.reason ==
            "practitioner_absent", released_minor=TOTAL - 1))


def test_I14_split_and_accounts(market_events) -> None:
    clinic, events = market_events
    check_I14_split_and_accounts(events)
    closed = next(e for e in events if name(e) == "Consultation.Closed" and e.capture)
    with pytest.raises(AssertionError, match="I14"):
        check_I14_split_and_accounts(doctored(events, lambda e: e is closed, capture={
            **closed.capture, "platform_minor": closed.capture["platform_minor"] + 1}))
    with pytest.raises(AssertionError, match="I14"):
        check_I14_split_and_accounts(doctored(
            # c1 was refunded after its share was released: the practitioner keeps it
            events, lambda e: name(e) == "Consultation.Refunded", share_reversed_minor=FEE // 2,
            platform_reversed_minor=FEE // 2))
    assert (FEE, TAX) == (100_000, 18_000)


# ======================================================================= the state machine

CONSULTATION_STARTS = st.sampled_from([6 * 60, 10 * 60, 30 * 60, 2 * 3600, 2 * 3600 + 60])
JOIN_OFFSETS = st.sampled_from([-301, -300, -60, 0, 30, 590, 600, 601, 700, 2999, 3000])


class MarketplaceMachine(LedgerMachine):
    """LedgerMachine's unit-billed world plus the marketplace, on the same doctors and patients."""

    @initialize(opening=st.lists(st.tuples(st.sampled_from(KINDS), st.booleans()),
                                 min_size=1, max_size=3))
    def setup(self, opening) -> None:  # the parent's initialiser, extended
        super().setup(opening)
        self.consultations: list[str] = []
        self.top_ups: list[str] = []
        for doctor, (currency, share) in {"d1": ("INR", 5000), "d2": ("INR", 7001),
                                          "d3": ("USD", 5000)}.items():
            self.publish(doctor, currency, share)
        for k, patient in enumerate(("p1", "p2", "p3")):
            self.post_top_up(patient, "INR", (k + 2) * TOTAL)
        self.post_top_up("p1", "USD", 50_000)
        self.book("p2", "d1", 2 * 3600, ("individual", 50), "video", 0)
        self.book("p3", "d2", 30 * 60, ("couple", 10), "audio", 0)

    def publish(self, doctor: str, currency: str, share: int, version: str = "v1",
                fee: int = FEE) -> None:
        self.post("price_list.published", practitioner_id=doctor, version=version,
                  currency=currency, tax_bps=1800, share_bps=share, fees=[
                      {"consultation_type": "individual", "duration_minutes": 50, "fee_minor": fee},
                      {"consultation_type": "couple", "duration_minutes": 10,
                       "fee_minor": fee // 3 + 1}])

    def post_top_up(self, patient: str, currency: str, amount: int, ref: str | None = None):
        ref = ref or f"top-{len(self.top_ups) + 1}"
        result = self.post("wallet.topped_up", patient_id=patient, currency=currency,
                           amount_minor=amount, payment_reference=ref, provider="razorpay")
        if result is not None and ref not in self.top_ups:
            self.top_ups.append(ref)
        return result

    def tick(self, as_of: datetime | None = None):
        report = super().tick(as_of)
        lo = self.sync()
        ct = tick_consultations(self.ledger, as_of or self.clock(), self.consultations)
        assert not ct.failed and ct.conflicts == 0, ct
        self.causes[(lo, self.sync())] = "tick"
        for line in ct.lines:
            hevent(f"tick: {line.split(': ', 1)[1].split(' of ')[0]}")
        return report

    def consultation(self, i: int) -> Consultation:
        return self.ledger.repository.get(Consultation.create_id(self.pick(self.consultations, i)))

    # ---- money
    @rule(patient=st.sampled_from(("p1", "p2", "p3", "p4")), currency=st.sampled_from(
        ["INR", "INR", "USD"]), amount=st.sampled_from([1, 1000, TOTAL, 2 * TOTAL]),
          reuse=st.sampled_from([None, None, "same", "other"]), i=st.integers(0, 20))
    def top_up(self, patient, currency, amount, reuse, i) -> None:
        """Top-ups; a re-used payment reference is a no-op (same content) or payment_conflict."""
        if reuse and self.top_ups:
            ref = self.pick(self.top_ups, i)
            top = self.ledger.repository.get(TopUp.create_id(ref))
            same = reuse == "same"
            result = self.post_top_up(top.patient_id, top.currency,
                                      top.amount_minor + (0 if same else 1), ref)
            assert (result is not None) == same
            return
        self.post_top_up(patient, currency, amount)

    @precondition(lambda self: self.top_ups)
    @rule(i=st.integers(0, 20), share=st.integers(1, 110), what=st.sampled_from(
        ["refund", "refund", "chargeback"]))
    def take_back(self, i, share, what) -> None:
        """A refund to source (admin) or a chargeback of part or more than all of a top-up."""
        top = self.ledger.repository.get(TopUp.create_id(self.pick(self.top_ups, i)))
        amount = max(1, top.amount_minor * share // 100)
        if what == "refund":
            self.post("wallet.refunded_to_source", refund_id=f"r{self.n}",
                      payment_reference=top.payment_reference, amount_minor=amount,
                      admin_id="admin-1", reason="asked")
        else:
            self.post("wallet.payment_reversed", payment_reference=top.payment_reference,
                      amount_minor=amount, reason="chargeback")

    @rule(doctor=st.sampled_from(["d1", "d2", "d4"]), fee=st.sampled_from([FEE, 99_999, 3]),
          share=st.sampled_from([0, 5000, 10_000]), delay=st.sampled_from([0, 0, 600]))
    def reprice(self, doctor, fee, share, delay) -> None:
        """A new price list version; booked consultations keep theirs."""
        self.post("price_list.published", practitioner_id=doctor, version=f"v{self.n}",
                  currency="INR", tax_bps=1800, share_bps=share,
                  effective_from=(self.clock() + timedelta(seconds=delay)).isoformat(),
                  fees=[{"consultation_type": "individual", "duration_minutes": 50,
                         "fee_minor": fee}])

    # ---- consultations
    @rule(patient=st.sampled_from(("p1", "p1", "p2", "p3", "p4")),
          doctor=st.sampled_from(["d1", "d1", "d2", "d3", "d4"]), start=CONSULTATION_STARTS,
          kind=st.sampled_from([("individual", 50), ("individual", 50), ("couple", 10),
                                ("family", 50)]),
          mode=st.sampled_from(["video", "video", "audio", "chat"]), lag=st.sampled_from([0, 20]))
    def book(self, patient, doctor, start, kind, mode, lag) -> None:
        cid = f"c{len(self.consultations) + 1}"
        starts = self.clock() + timedelta(seconds=start)
        if self.post("consultation.booked", lag, consultation_id=cid, patient_id=patient,
                     practitioner_id=doctor, consultation_type=kind[0], mode=mode,
                     start=starts.isoformat(), duration_minutes=kind[1]) is not None:
            self.consultations.append(cid)

    @precondition(lambda self: self.consultations)
    @rule(i=st.integers(0, 20), lag=st.sampled_from([0, 0, 30]))
    def activate(self, i, lag) -> None:
        c = self.consultation(i)
        self.post("consultation.activated", lag, consultation_id=c.consultation_id,
                  admin_id="admin-1")

    @precondition(lambda self: self.consultations)
    @rule(i=st.integers(0, 20), offset=st.sampled_from([-400, -300, -60, 0, 30, 600, 661,
                                                        3000, 3061]))
    def go_to(self, i, offset) -> None:
        """Move the clock to a consultation's start + offset (never backwards)."""
        moment = self.consultation(i).start + timedelta(seconds=offset)
        self.clock.set(max(self.clock(), moment))

    @precondition(lambda self: self.consultations)
    @rule(i=st.integers(0, 20), role=st.sampled_from(["patient", "practitioner", "both"]),
          lag=st.sampled_from([0, 0, 15, 59, 120]), via=st.sampled_from(["backend", "provider"]))
    def join(self, i, role, lag, via) -> None:
        """A join now (possibly delivered late), from the backend or a provider webhook."""
        c = self.consultation(i)
        if via == "backend" and role != "both":
            self.post("consultation.joined", lag, consultation_id=c.consultation_id,
                      participant=role)
        else:
            identity = {"patient": c.patient_id, "practitioner": f"doctor:{c.practitioner_id}",
                        "both": "*"}[role]
            self.post("call.participant_joined", lag, session_id=c.consultation_id,
                      participant=identity, provider="livekit")

    @precondition(lambda self: self.consultations)
    @rule(i=st.integers(0, 20), lag=st.sampled_from([0, 0, 30]),
          what=st.sampled_from(["end", "end", "cancel", "decline", "admin_cancel", "left"]))
    def close_it(self, i, lag, what) -> None:
        c = self.consultation(i)
        cid = c.consultation_id
        if what == "end":
            self.post("consultation.ended", lag, consultation_id=cid, ended_by="patient")
        elif what == "cancel":
            self.post("consultation.cancelled", lag, consultation_id=cid)
        elif what == "decline":
            self.post("consultation.declined", lag, consultation_id=cid)
        elif what == "admin_cancel":
            self.post("consultation.admin_cancelled", lag, consultation_id=cid,
                      admin_id="admin-1", reason="support")
        else:
            result = self.post("call.participant_left", lag, session_id=cid,
                               participant=c.patient_id, provider="livekit")
            assert result is None or "ignored" in result  # never ends a consultation

    @rule(patient=st.sampled_from(("p1", "p2", "p3")), doctor=st.sampled_from(["d1", "d2"]),
          story=st.sampled_from(["ended", "by_time", "practitioner_absent", "patient_absent",
                                 "late_delivery", "cancelled", "declined", "never_activated"]),
          tick_late=st.booleans(), refund=st.sampled_from([None, "pending", "available"]))
    def story(self, patient, doctor, story, tick_late, refund) -> None:
        """A whole consultation along one path of §10's table (other rules interleave with
        the stories' consultations too): ticks on time or late, refunds before or after the
        earning's release."""
        cid = f"c{len(self.consultations) + 1}"
        self.book(patient, doctor, 2 * 3600 + 120, ("individual", 50), "video", 0)
        if cid not in self.consultations:
            return
        c = self.ledger.repository.get(Consultation.create_id(cid))
        start = c.start
        late = timedelta(minutes=7 if tick_late else 0)

        def at(seconds: int, tick: bool = False) -> None:
            self.clock.set(max(self.clock(), start + timedelta(seconds=seconds)))
            if tick:
                self.tick()

        if story == "cancelled":
            at(-7300)
            self.post("consultation.cancelled", consultation_id=cid)
        if story != "never_activated":
            at(-3600)
            self.post("consultation.activated", consultation_id=cid, admin_id="admin-1")
        if story == "declined":
            at(-100)
            self.post("consultation.declined", consultation_id=cid)
        at(-300, tick=True)
        if story in ("ended", "by_time", "patient_absent", "late_delivery"):
            at(20)
            self.post("consultation.joined", consultation_id=cid, participant="practitioner")
        if story in ("ended", "by_time", "practitioner_absent"):
            at(45)
            self.post("call.participant_joined", session_id=cid, participant=patient,
                      provider="livekit")
        if story == "late_delivery":  # a join from before 600 s, delivered after it
            at(630)
            self.post("consultation.joined", 40, consultation_id=cid, participant="patient")
        at(660 + late.seconds, tick=True)
        if story == "ended":
            at(2400)
            self.post("consultation.ended", consultation_id=cid, ended_by="practitioner")
        at(3060 + late.seconds, tick=True)
        if refund == "pending":
            self.post("consultation.refunded", consultation_id=cid, admin_id="admin-1",
                      reason="complaint")
        at(3060 + 600 + late.seconds, tick=True)
        if refund == "available":
            self.post("consultation.refunded", consultation_id=cid, admin_id="admin-1",
                      reason="complaint")
        closed = self.ledger.repository.get(Consultation.create_id(cid))
        hevent(f"story {story}: {closed.status}")

    @precondition(lambda self: self.consultations)
    @rule(i=st.integers(0, 20))
    def refund(self, i) -> None:
        c = self.consultation(i)
        self.post("consultation.refunded", consultation_id=c.consultation_id,
                  admin_id="admin-1", reason="complaint")

    @rule(doctor=st.sampled_from(["d1", "d2"]), share=st.integers(1, 100))
    def withdraw_earnings(self, doctor, share) -> None:
        wallet = self.ledger.load(Wallet.create_id(doctor, "INR"))
        available = wallet.available_minor if wallet else 0
        rid = f"wi{self.n}"
        if self.post("withdrawal.requested", doctor_id=doctor, request_id=rid, currency="INR",
                     amount_minor=max(1, available * share // 100)) is not None:
            self.post("withdrawal.completed", doctor_id=doctor, request_id=rid, currency="INR")

    @precondition(lambda self: self.consultations)
    @rule(i=st.integers(0, 20))
    def racing_consultation_ticks(self, i) -> None:
        """Two ticks deciding the same consultation step at once: one commits, one changes
        nothing (its save loses, it re-decides)."""
        cid = self.pick(self.consultations, i)
        lo = self.sync()
        a = tick_consultations(self.ledger, self.clock(), [cid])
        b = tick_consultations(self.ledger, self.clock(), [cid])
        assert not b.lines and not a.failed and not b.failed
        self.causes[(lo, self.sync())] = "tick"

    # ---- invariants after every step
    @invariant()
    def marketplace_invariants(self) -> None:
        if not hasattr(self, "consultations"):
            return
        self.sync()
        check_market(self.events)

    def teardown(self) -> None:
        if not hasattr(self, "consultations"):
            return
        super().teardown()  # ticks 4 h later, settles everything, checks I1–I10 and replay
        self.tick(self.clock() + timedelta(hours=4))
        self.sync()
        market = fold_market(self.events)
        for c in market.consultations.values():
            assert c.closed is not None, f"{c.cid} never closed"
            if c.closed.capture is not None and not c.refunds:
                assert c.releases, f"{c.cid}: earning never released"
            hevent(f"consultation {c.closed.status} ({c.closed.reason})")
            if c.refunds:
                hevent(f"refunded with the earning {c.refunds[0].earning}")
        if any(w.debt for w in market.wallets.values()):
            hevent("a wallet in debt")
        check_market(self.events)
        check_market_replay(self.events, self.ledger)
        check_all(self.events, self.ledger)


MarketplaceMachine.TestCase.settings = settings(
    stateful_step_count=60, max_examples=max(10, settings.default.max_examples // 2))
TestMarketplaceMachine = MarketplaceMachine.TestCase

