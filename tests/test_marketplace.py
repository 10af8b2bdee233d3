"""One named test per row of billing-rules.md §10's table and per rule around it, through
`Ledger.ingest` and the consultation tick on POPO, with the document's numbers: fee 1000.00 INR
→ tax 180.00, total 1180.00, practitioner 500.00, platform 500.00, tax payable 180.00 (legacy
would have paid the practitioner 590.00). Assertions read the event log and the money.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from conftest import T0, FakeClock, make_ledger
from ledger import errors
from ledger.consultations import Consultation, MoneyWallet, TopUp
from ledger.domain import Doctor, Wallet
from ledger.marketplace import TICK_ONLY_TYPES, tick_consultations
from ledger.money import breakdown, legacy_share_minor
from ledger.rules import Policy
from test_billing import MIN, S, Desk, log, name, named

FEE = 100_000  # 1000.00 INR
TAX = 18_000  # 180.00 INR: GST 18 %
TOTAL = 118_000  # 1180.00 INR
SHARE = 50_000  # 500.00 INR to the practitioner
PLATFORM = 50_000  # 500.00 INR to the platform
LEGACY_SHARE = 59_000  # 590.00 INR: legacy paid 50 % of the tax-inclusive total
START = T0 + timedelta(hours=3)  # the booked consultation's start
END = START + 50 * MIN  # a 50-minute individual consultation
SKEW = 60 * S
GRACE = 600 * S


class Clinic(Desk):
    """The marketplace backend's side: price lists, top-ups, bookings, and the tick."""

    def __init__(self, clock: FakeClock | None = None, policy: Policy = Policy()) -> None:
        super().__init__(clock, policy)
        self.consultations: list[str] = []

    def practitioner(self, pid: str = "t1", version: str = "v1", fee: int = FEE,
                     currency: str = "INR", **extra) -> dict:
        if self.ledger.load(Doctor.create_id(pid)) is None:
            self.doctor(pid, "IN")
        return self.post("price_list.published", practitioner_id=pid, version=version,
                         currency=currency, tax_bps=1800, share_bps=5000, fees=[
                             {"consultation_type": "individual", "duration_minutes": 50,
                              "fee_minor": fee},
                             {"consultation_type": "couple", "duration_minutes": 80,
                              "fee_minor": 2 * fee}], **extra)

    def top_up(self, patient: str = "p1", amount: int = 2 * TOTAL, ref: str = "pay-i1",
               currency: str = "INR", at: datetime | None = None) -> dict:
        return self.post("wallet.topped_up", at, patient_id=patient, currency=currency,
                         amount_minor=amount, payment_reference=ref, provider="razorpay")

    def book(self, cid: str = "c1", patient: str = "p1", practitioner: str = "t1",
             start: datetime = START, minutes: int = 50, kind: str = "individual",
             mode: str = "video", at: datetime | None = None) -> dict:
        result = self.post("consultation.booked", at, consultation_id=cid, patient_id=patient,
                           practitioner_id=practitioner, consultation_type=kind, mode=mode,
                           start=start.isoformat(), duration_minutes=minutes)
        self.consultations.append(cid)
        return result

    def activate(self, cid: str = "c1", at: datetime | None = None, admin: str = "admin-7") -> dict:
        return self.post("consultation.activated", at, consultation_id=cid, admin_id=admin)

    def join(self, cid: str = "c1", who: str = "patient", at: datetime | None = None) -> dict:
        return self.post("consultation.joined", at, consultation_id=cid, participant=who)

    def finish(self, cid: str = "c1", at: datetime | None = None, by: str = "patient") -> dict:
        return self.post("consultation.ended", at, consultation_id=cid, ended_by=by)

    def refund(self, cid: str = "c1", at: datetime | None = None) -> dict:
        return self.post("consultation.refunded", at, consultation_id=cid, admin_id="admin-7",
                         reason="complaint upheld")

    def tick_at(self, moment: datetime):
        self.at(moment)
        return tick_consultations(self.ledger, moment, self.consultations)

    def booked_and_activated(self, cid: str = "c1", **book) -> None:
        self.book(cid, **book)
        self.activate(cid)

    def in_progress(self, cid: str = "c1", patient_at: datetime = START,
                    practitioner_at: datetime = START + 30 * S) -> None:
        self.booked_and_activated(cid)
        self.join(cid, "patient", self.at(patient_at))
        self.join(cid, "practitioner", self.at(practitioner_at))

    # ---- reading
    def consultation(self, cid: str = "c1") -> Consultation:
        return self.ledger.repository.get(Consultation.create_id(cid))

    def money(self, patient: str = "p1", currency: str = "INR") -> MoneyWallet:
        return self.ledger.repository.get(MoneyWallet.create_id(patient, currency))

    def earnings(self, practitioner: str = "t1", currency: str = "INR") -> Wallet | None:
        return self.ledger.load(Wallet.create_id(practitioner, currency))

    def closed_event(self, cid: str = "c1"):
        found = [e for e in named(self.events(), "Consultation.Closed")
                 if e.originator_id == Consultation.create_id(cid)]
        assert len(found) == 1, f"{cid} closed {len(found)} times"
        return found[0]


def refused(code: str, fn, *args, desk: Clinic | None = None, **kwargs) -> errors.LedgerError:
    """Run fn, expect a refusal with `code`, and check that nothing at all was recorded.
    `desk` is fn's Clinic when fn is not one of its methods."""
    desk = desk or fn.__self__
    before = len(desk.events())
    with pytest.raises(errors.LedgerError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, f"{info.value.code}: {info.value}"
    assert len(desk.events()) == before, "a refused event recorded something"
    return info.value


@pytest.fixture
def clinic(clock) -> Clinic:
    c = Clinic(clock)
    c.practitioner()
    c.top_up()
    return c


# ======================================================================================= money


def test_price_of_1000_inr_is_1180_with_500_to_practitioner_500_to_platform_180_tax() -> None:
    b = breakdown(FEE, 1800, 5000)
    assert (b.fee_minor, b.tax_minor, b.total_minor) == (FEE, TAX, TOTAL)
    assert (b.share_minor, b.platform_minor, b.tax_payable_minor) == (SHARE, PLATFORM, TAX)
    assert legacy_share_minor(TOTAL) == LEGACY_SHARE != b.share_minor


def test_tax_rounds_half_up_and_the_odd_share_unit_goes_to_the_platform() -> None:
    assert breakdown(25, 1800, 5000).tax_minor == 5  # 4.5 → 5 (half up)
    assert breakdown(24, 1800, 5000).tax_minor == 4  # 4.32 → 4
    odd = breakdown(100_001, 1800, 5000)
    assert (odd.share_minor, odd.platform_minor) == (50_000, 50_001)
    assert odd.total_minor == odd.share_minor + odd.platform_minor + odd.tax_payable_minor


# ============================================================================ wallet and top-up


def test_top_up_credits_available_and_is_idempotent_on_payment_reference(clock) -> None:
    clinic = Clinic(clock)
    result = clinic.top_up(amount=TOTAL)
    assert result["available_minor"] == TOTAL
    before = len(clinic.events())
    again = clinic.top_up(amount=TOTAL)  # a new event id, the same payment: a no-op
    assert again["available_minor"] == TOTAL and len(clinic.events()) == before + 1  # receipt
    assert clinic.money().topped_up_minor == TOTAL


def test_top_up_with_the_same_reference_and_other_content_is_payment_conflict(clinic) -> None:
    refused("payment_conflict", clinic.top_up, amount=1)
    refused("payment_conflict", clinic.top_up, patient="p2")
    clinic.grant("pay-units", owner="p1")
    refused("payment_conflict", clinic.top_up, ref="pay-units")  # one reference, one use
    err = refused("payment_conflict", clinic.grant, "pay-i1", owner="p1")
    assert "money wallet" in err.detail


def test_refund_to_source_at_most_available_and_what_is_left_of_the_top_up(clinic) -> None:
    clinic.top_up(amount=10_000, ref="pay-i2")
    refund = lambda rid, ref, amount: clinic.post(  # noqa: E731
        "wallet.refunded_to_source", refund_id=rid, payment_reference=ref,
        amount_minor=amount, admin_id="admin-7", reason="asked")
    refused("insufficient_funds", refund, "r1", "pay-i2", 10_001, desk=clinic)  # > the top-up
    refund("r1", "pay-i2", 6_000)
    refused("insufficient_funds", refund, "r2", "pay-i2", 4_001, desk=clinic)  # 4,000 left
    assert refund("r1", "pay-i2", 6_000)["refunded_to_source_minor"] == 6_000  # same id: no-op
    clinic.book()  # holds 118,000 of the 240,000 left
    refused("insufficient_funds", refund, "r3", "pay-i1", 2 * TOTAL, desk=clinic)  # > available
    refused("unknown_payment", refund, "r4", "nope", 1, desk=clinic)
    money = clinic.money()
    assert (money.available_minor, money.refunded_to_source_minor) == (
        2 * TOTAL + 4_000 - TOTAL, 6_000)


def test_payment_reversal_debits_available_and_records_the_rest_as_debt(clinic) -> None:
    clinic.book()  # 118,000 held, 118,000 available
    result = clinic.post("wallet.payment_reversed", payment_reference="pay-i1",
                         amount_minor=2 * TOTAL, reason="chargeback")
    assert (result["available_minor"], result["debt_minor"]) == (0, TOTAL)
    refused("wallet_in_debt", clinic.book, "c2", start=START + timedelta(hours=2))
    clinic.top_up(amount=TOTAL + 5, ref="pay-i3")  # repays the debt first
    money = clinic.money()
    assert (money.debt_minor, money.available_minor, money.held_minor) == (0, 5, TOTAL)
    refused("payment_conflict", clinic.post, "wallet.payment_reversed",
            payment_reference="pay-i1", amount_minor=1, reason="again")


def test_booking_draws_only_on_the_wallet_in_the_price_currency(clinic) -> None:
    clinic.top_up(amount=10 * TOTAL, ref="pay-usd", currency="USD")
    clinic.top_up(patient="p2", amount=10, ref="pay-p2")
    refused("insufficient_funds", clinic.book, "c9", patient="p2")
    clinic.book()
    assert clinic.money().held_minor == TOTAL
    assert clinic.money(currency="USD").held_minor == 0


# ================================================================================== price lists


def test_price_list_versions_are_never_edited_and_take_effect_from_their_instant(clinic) -> None:
    refused("price_list_conflict", clinic.practitioner, fee=FEE + 1)  # v1 again, other fee
    clinic.practitioner()  # v1 again, same content: a no-op
    refused("invalid_price_list", clinic.practitioner, version="v0",
            effective_from=(T0 - MIN).isoformat())
    refused("unknown_doctor", clinic.post, "price_list.published", practitioner_id="nobody",
            version="v1", currency="INR", tax_bps=1800, fees=[
                {"consultation_type": "individual", "duration_minutes": 50, "fee_minor": 1}])
    clinic.practitioner(version="v2", fee=2 * FEE, effective_from=(T0 + 10 * MIN).isoformat())
    clinic.book("c1")  # at T0: v1 is in force
    clinic.at(T0 + 10 * MIN)
    clinic.top_up(amount=10 * TOTAL, ref="pay-more")
    clinic.book("c2", start=START + timedelta(hours=1))  # v2
    assert (clinic.consultation("c1").price["version"], clinic.consultation("c1").total_minor) == (
        "v1", TOTAL)
    assert (clinic.consultation("c2").price["version"], clinic.consultation("c2").total_minor) == (
        "v2", 2 * TOTAL)


def test_a_later_price_change_never_touches_a_booked_consultation(clinic) -> None:
    clinic.book()
    clinic.practitioner(version="v2", fee=3 * FEE)
    c = clinic.consultation()
    assert c.price == {"version": "v1", "currency": "INR", "tax_bps": 1800, "share_bps": 5000,
                       "fee_minor": FEE, "tax_minor": TAX, "total_minor": TOTAL,
                       "share_minor": SHARE, "platform_minor": PLATFORM,
                       "tax_payable_minor": TAX}


# ============================================================================ §10's table: rows


def test_booked_holds_the_total_and_stamps_the_price_with_its_version(clinic) -> None:
    result = clinic.book()
    assert (result["status"], result["total_minor"]) == ("scheduled", TOTAL)
    money = clinic.money()
    assert (money.available_minor, money.held_minor) == (2 * TOTAL - TOTAL, TOTAL)
    held = named(clinic.events(), "MoneyWallet.Held")
    assert [(e.consultation_id, e.amount_minor) for e in held] == [("c1", TOTAL)]


def test_booked_too_soon_or_off_the_price_list_is_422_invalid_booking(clinic) -> None:
    refused("invalid_booking", clinic.book, start=T0 + 300 * S)  # start must be > at + 300 s
    refused("invalid_booking", clinic.book, minutes=45)
    refused("invalid_booking", clinic.book, kind="family")
    refused("invalid_booking", clinic.book, practitioner="t2")
    clinic.book(start=T0 + 301 * S)


def test_booked_without_enough_money_is_409_insufficient_funds(clinic) -> None:
    clinic.book("c1")
    clinic.book("c2", start=START + timedelta(hours=1))  # 2 × 1180.00 exactly
    err = refused("insufficient_funds", clinic.book, "c3", start=START + timedelta(hours=2))
    assert err.extra == {"available_minor": 0}
    refused("insufficient_funds", clinic.book, "c4", patient="p-new")


def test_booked_again_with_the_same_content_is_a_no_op_and_other_content_a_conflict(clinic) -> None:
    clinic.book()
    clinic.book()
    assert clinic.money().held_minor == TOTAL
    refused("consultation_exists", clinic.book, minutes=80, kind="couple")


def test_activated_by_an_admin_records_the_actor(clinic) -> None:
    clinic.book()
    result = clinic.activate(admin="admin-7")
    assert (result["status"], result["activated_by"]) == ("activated", "admin-7")
    (activated,) = named(clinic.events(), "Consultation.Activated")
    assert activated.admin_id == "admin-7" and activated.at == T0


def test_second_activation_is_409_consultation_not_scheduled(clinic) -> None:
    clinic.booked_and_activated()
    refused("consultation_not_scheduled", clinic.activate)


def test_activation_at_or_after_the_start_is_409_activation_too_late(clinic) -> None:
    clinic.book(start=T0 + 10 * MIN)
    clinic.at(T0 + 10 * MIN)
    refused("activation_too_late", clinic.activate)
    clinic.activate(at=T0 + 10 * MIN - S)


def test_confirmed_by_the_tick_from_start_minus_5_minutes(clinic) -> None:
    clinic.booked_and_activated()
    assert not clinic.tick_at(START - 301 * S).lines
    report = clinic.tick_at(START - 300 * S)
    assert report.lines == ["consultation c1: confirmed"]
    assert clinic.consultation().status == "confirmed"
    assert not clinic.tick_at(START - 200 * S).lines  # confirmed once


def test_confirmed_at_activation_when_activated_inside_the_last_5_minutes(clinic) -> None:
    clinic.book()
    clinic.at(START - 60 * S)
    clinic.activate()
    assert clinic.tick_at(START - 60 * S).lines == ["consultation c1: confirmed"]


def test_join_in_the_window_puts_it_in_progress_even_before_the_tick_confirms(clinic) -> None:
    clinic.booked_and_activated()
    result = clinic.join("c1", "patient", clinic.at(START - 300 * S))
    assert result["status"] == "in_progress"
    assert result["joins"] == {"patient": (START - 300 * S).isoformat()}
    assert not [l for l in clinic.tick_at(START).lines if "confirmed" in l]


def test_join_before_the_window_is_409_join_window_not_open(clinic) -> None:
    clinic.booked_and_activated()
    refused("join_window_not_open", clinic.join, "c1", "patient", clinic.at(START - 301 * S))


def test_join_of_a_consultation_never_activated_is_409_consultation_not_activated(clinic) -> None:
    clinic.book()
    refused("consultation_not_activated", clinic.join, "c1", "patient", clinic.at(START))


def test_join_at_or_after_the_scheduled_end_is_409_join_window_closed(clinic) -> None:
    clinic.in_progress()
    refused("join_window_closed", clinic.join, "c1", "patient", clinic.at(END))


def test_ended_by_the_backend_completes_at_its_occurred_at_and_captures(clinic) -> None:
    clinic.in_progress()
    result = clinic.finish(at=clinic.at(START + 45 * MIN), by="practitioner")
    assert result["status"] == "completed" and result["earning"] == "pending"
    c = clinic.consultation()
    assert c.completed_at == START + 45 * MIN
    closed = clinic.closed_event()
    assert closed.capture == {"total_minor": TOTAL, "share_minor": SHARE,
                              "platform_minor": PLATFORM, "tax_payable_minor": TAX,
                              "fee_minor": FEE, "tax_minor": TAX}
    money = clinic.money()
    assert (money.held_minor, money.captured_minor, money.available_minor) == (0, TOTAL, TOTAL)


def test_ended_before_both_joined_is_409_consultation_not_started(clinic) -> None:
    clinic.booked_and_activated()
    clinic.join("c1", "patient", clinic.at(START))
    refused("consultation_not_started", clinic.finish, at=clinic.at(START + MIN))
    clinic.join("c1", "practitioner", clinic.at(START + 2 * MIN))
    clinic.finish(at=clinic.at(START + 40 * MIN))


def test_completed_by_the_tick_at_start_plus_duration_plus_skew(clinic) -> None:
    clinic.in_progress()
    assert not clinic.tick_at(END + SKEW - S).lines
    assert clinic.tick_at(END + SKEW).lines == ["consultation c1: completed by time: captured"]
    c = clinic.consultation()
    assert (c.status, c.completed_at, c.captured) == ("completed", END, True)


def test_no_show_of_the_practitioner_releases_the_hold(clinic) -> None:
    clinic.booked_and_activated()
    clinic.join("c1", "patient", clinic.at(START))
    assert not clinic.tick_at(START + 600 * S + SKEW - S).lines
    clinic.tick_at(START + 600 * S + SKEW)
    c, closed = clinic.consultation(), clinic.closed_event()
    assert (c.status, closed.reason, closed.capture, closed.released_minor) == (
        "no_show", "practitioner_absent", None, TOTAL)
    assert clinic.money().available_minor == 2 * TOTAL


def test_no_show_of_the_patient_captures_with_completed_at_start_plus_600(clinic) -> None:
    clinic.booked_and_activated()
    clinic.join("c1", "practitioner", clinic.at(START + 600 * S))  # in time, just
    clinic.tick_at(START + 600 * S + SKEW)
    c, closed = clinic.consultation(), clinic.closed_event()
    assert (c.status, closed.reason, c.completed_at) == ("no_show", "patient_absent",
                                                         START + 600 * S)
    assert closed.capture["total_minor"] == TOTAL and clinic.money().captured_minor == TOTAL


def test_a_join_after_600_seconds_does_not_save_a_no_show(clinic) -> None:
    clinic.booked_and_activated()
    clinic.join("c1", "patient", clinic.at(START))
    clinic.join("c1", "practitioner", clinic.at(START + 601 * S))  # accepted, too late to count
    refused("consultation_not_started", clinic.finish, at=clinic.at(START + 620 * S))
    clinic.tick_at(START + 660 * S)
    assert clinic.closed_event().reason == "practitioner_absent"


def test_a_join_before_600_seconds_delivered_late_still_counts(clinic) -> None:
    clinic.booked_and_activated()
    clinic.join("c1", "patient", clinic.at(START))
    clinic.at(START + 640 * S)
    clinic.join("c1", "practitioner", START + 590 * S)  # accepted before the tick records it
    clinic.tick_at(START + 700 * S)
    assert clinic.consultation().status == "in_progress"


def test_cancelled_by_the_patient_at_least_2_hours_ahead_releases_the_hold(clinic) -> None:
    clinic.booked_and_activated()
    clinic.at(START - 7200 * S)
    result = clinic.post("consultation.cancelled", consultation_id="c1", reason="rescheduling")
    assert result["status"] == "cancelled"
    assert (clinic.money().available_minor, clinic.money().held_minor) == (2 * TOTAL, 0)


def test_cancelled_by_the_patient_later_is_409_cancellation_window_closed(clinic) -> None:
    clinic.book()
    clinic.at(START - 7199 * S)
    refused("cancellation_window_closed", clinic.post, "consultation.cancelled",
            consultation_id="c1")


def test_declined_by_the_practitioner_before_in_progress_releases_the_hold(clinic) -> None:
    clinic.booked_and_activated()
    clinic.at(START - MIN)
    result = clinic.post("consultation.declined", consultation_id="c1")
    assert result["status"] == "cancelled"
    assert clinic.closed_event().by == "practitioner"
    assert clinic.money().held_minor == 0


def test_cancelled_by_an_admin_records_the_admin_and_releases_the_hold(clinic) -> None:
    clinic.book()
    clinic.post("consultation.admin_cancelled", consultation_id="c1", admin_id="admin-9",
                reason="practitioner suspended")
    closed = clinic.closed_event()
    assert (closed.by, closed.actor, closed.reason, closed.released_minor) == (
        "admin", "admin-9", "practitioner suspended", TOTAL)


def test_declined_or_admin_cancelled_once_in_progress_is_409_consultation_in_progress(clinic) -> None:
    clinic.booked_and_activated()
    clinic.join("c1", "patient", clinic.at(START))
    refused("consultation_in_progress", clinic.post, "consultation.declined", consultation_id="c1")
    refused("consultation_in_progress", clinic.post, "consultation.admin_cancelled",
            consultation_id="c1", admin_id="a", reason="x")


def test_expired_by_the_tick_when_never_activated(clinic) -> None:
    clinic.book()
    assert not clinic.tick_at(START + SKEW - S).lines
    assert clinic.tick_at(START + SKEW).lines == ["consultation c1: expired: hold released"]
    assert clinic.consultation().status == "expired" and clinic.money().held_minor == 0


def test_every_later_event_of_a_closed_consultation_is_409_consultation_closed(clinic) -> None:
    clinic.in_progress()
    clinic.finish(at=clinic.at(START + 40 * MIN))
    refused("consultation_closed", clinic.finish, at=clinic.at(START + 41 * MIN))
    refused("consultation_closed", clinic.join, "c1", "patient")
    refused("consultation_closed", clinic.post, "consultation.declined", consultation_id="c1")
    refused("consultation_closed", clinic.activate)
    clinic.refund()  # the one exception


def test_an_unknown_consultation_is_404_unknown_consultation(clinic) -> None:
    refused("unknown_consultation", clinic.activate, "nope")
    refused("unknown_consultation", clinic.join, "nope")
    refused("unknown_consultation", clinic.refund, "nope")


def test_an_event_past_the_closing_decision_is_refused_as_if_the_tick_had_run(clinic) -> None:
    clinic.in_progress()
    refused("consultation_closed", clinic.finish, at=clinic.at(END + SKEW))  # completed by time
    clinic.finish(at=END + SKEW - S)


# =================================================================== one in progress per practitioner


def test_practitioner_join_refused_while_another_call_consultation_is_in_progress(clinic) -> None:
    clinic.top_up(amount=10 * TOTAL, ref="pay-p2", patient="p2")
    clinic.in_progress("c1")
    clinic.at(T0)
    clinic.book("c2", patient="p2", start=START + 45 * MIN)
    clinic.activate("c2")
    clinic.join("c2", "patient", clinic.at(START + 45 * MIN))  # a patient is never refused
    err = refused("session_conflict", clinic.join, "c2", "practitioner")
    assert "c1" in err.detail
    clinic.join("c2", "practitioner", clinic.at(END))  # c1's scheduled end has passed


def test_a_chat_in_progress_does_not_block_a_practitioner_join(clinic) -> None:
    clinic.top_up(amount=10 * TOTAL, ref="pay-p2", patient="p2")
    clinic.book("c1", mode="chat")
    clinic.activate("c1")
    clinic.book("c2", patient="p2", start=START + 10 * MIN)
    clinic.activate("c2")
    clinic.join("c1", "practitioner", clinic.at(START))
    clinic.join("c2", "practitioner", clinic.at(START + 10 * MIN))
    assert clinic.consultation("c2").status == "in_progress"


def test_a_live_unit_session_and_an_in_progress_consultation_block_each_other(clinic) -> None:
    clinic.grant("pay-units", owner="p9")
    clinic.booked_and_activated()
    clinic.at(START - MIN)
    clinic.request("s1", "voice", patient="p9", doctor="t1")
    refused("session_conflict", clinic.join, "c1", "practitioner", clinic.at(START))
    clinic.join("c1", "patient", START)
    clinic.end("s1", clinic.at(START + MIN))
    clinic.join("c1", "practitioner", START + MIN)
    err = refused("session_conflict", clinic.request, "s2", "text", patient="p9", doctor="t1")
    assert "c1" in err.detail


# ======================================================================================== earnings


def test_earning_pending_until_completed_plus_grace_then_available(clinic) -> None:
    clinic.in_progress()
    clinic.finish(at=clinic.at(START + 40 * MIN))
    assert clinic.earnings() is None
    assert not clinic.tick_at(START + 40 * MIN + GRACE - S).lines
    report = clinic.tick_at(START + 40 * MIN + GRACE)
    assert report.lines == [f"consultation c1: earning of {SHARE} INR minor units available"]
    assert clinic.earnings().available_minor == SHARE
    assert clinic.consultation().earning == "available"


def test_available_earning_is_withdrawn_through_the_two_phase_withdrawals(clinic) -> None:
    clinic.ledger.withdrawal_minimum_minor["INR"] = 10_000
    clinic.in_progress()
    clinic.finish(at=clinic.at(START + 40 * MIN))
    withdraw = lambda rid, amount: clinic.post(  # noqa: E731
        "withdrawal.requested", request_id=rid, doctor_id="t1", currency="INR",
        amount_minor=amount)
    refused("insufficient_funds", withdraw, "w1", SHARE, desk=clinic)  # still pending
    clinic.tick_at(START + 40 * MIN + GRACE)
    refused("insufficient_funds", withdraw, "w1", SHARE + 1, desk=clinic)
    assert withdraw("w1", SHARE)["status"] == "held"
    clinic.post("withdrawal.completed", request_id="w1", doctor_id="t1", currency="INR")
    wallet = clinic.earnings()
    assert (wallet.available_minor, wallet.withdrawn_minor) == (0, SHARE)


# ========================================================================================= refunds


def test_refund_while_the_earning_is_pending_reverses_share_platform_and_tax(clinic) -> None:
    clinic.in_progress()
    clinic.finish(at=clinic.at(START + 40 * MIN))
    result = clinic.refund()
    assert result["refund"] == {"admin_id": "admin-7", "reason": "complaint upheld",
                                "earning": "pending", "total_minor": TOTAL,
                                "share_reversed_minor": SHARE,
                                "platform_reversed_minor": PLATFORM, "tax_reversed_minor": TAX}
    assert clinic.money().available_minor == 2 * TOTAL and clinic.money().refunded_minor == TOTAL
    assert not clinic.tick_at(START + 40 * MIN + GRACE).lines  # nothing left to release
    assert clinic.earnings() is None


def test_refund_after_release_keeps_the_share_and_takes_fee_from_platform_and_tax(clinic) -> None:
    clinic.in_progress()
    clinic.finish(at=clinic.at(START + 40 * MIN))
    clinic.tick_at(START + 40 * MIN + GRACE)
    result = clinic.refund()
    assert (result["refund"]["earning"], result["refund"]["share_reversed_minor"],
            result["refund"]["platform_reversed_minor"], result["refund"]["tax_reversed_minor"]) \
        == ("available", 0, FEE, TAX)
    assert clinic.earnings().available_minor == SHARE  # the practitioner keeps it


def test_refund_only_once_and_only_for_completed_or_patient_no_show(clinic) -> None:
    clinic.top_up(amount=10 * TOTAL, ref="pay-more")
    clinic.book("c0")
    refused("not_refundable", clinic.refund, "c0")  # scheduled
    clinic.tick_at(START + SKEW)
    refused("not_refundable", clinic.refund, "c0")  # expired
    clinic.at(T0 + 4 * timedelta(hours=1))
    clinic.book("c1", start=T0 + timedelta(hours=6))
    clinic.activate("c1")
    clinic.join("c1", "practitioner", clinic.at(T0 + timedelta(hours=6)))
    clinic.tick_at(T0 + timedelta(hours=6) + 600 * S + SKEW)  # patient no-show: captured
    clinic.refund("c1")
    refused("not_refundable", clinic.refund, "c1")


def test_refund_of_a_practitioner_no_show_is_409_not_refundable(clinic) -> None:
    clinic.booked_and_activated()
    clinic.tick_at(START + 600 * S + SKEW)
    refused("not_refundable", clinic.refund)


# ================================================================ scope: not a unit-billed session


def test_session_events_naming_a_consultation_are_409_consultation_not_unit_billed(clinic) -> None:
    clinic.book()
    refused("consultation_not_unit_billed", clinic.end, "c1")
    refused("consultation_not_unit_billed", clinic.activity, "c1")
    refused("consultation_not_unit_billed", clinic.request, "c1", "video", doctor="t1")
    clinic.post("appointment.booked", appointment_id="a1", patient_id="p1", doctor_id="t1",
                kind="video", starts_at=START.isoformat())
    refused("consultation_not_unit_billed", clinic.post, "appointment.linked",
            appointment_id="a1", session_id="c1")


def test_a_booking_with_a_unit_session_id_is_409_session_exists(clinic) -> None:
    clinic.grant("pay-units", owner="p1")
    clinic.request("s1", "voice", doctor="t1")
    refused("session_exists", clinic.book, "s1")


def test_tick_only_event_types_have_no_handler_outside_the_tick(clinic) -> None:
    clinic.book()
    for type_ in TICK_ONLY_TYPES:
        refused("invalid_event", clinic.post, type_, consultation_id="c1")


# ================================================================ provider webhooks (presence)


def test_provider_joins_of_room_call_consultation_id_are_joins(clinic) -> None:
    clinic.booked_and_activated()
    clinic.at(START)
    clinic.post("call.participant_joined", session_id="c1", participant="p1", provider="livekit")
    clinic.post("call.participant_joined", session_id="c1", participant="doctor:t1",
                provider="livekit")
    c = clinic.consultation()
    assert c.joins == {"patient": START, "practitioner": START}
    left = clinic.post("call.participant_left", session_id="c1", participant="p1",
                       provider="livekit")
    assert "never ends" in left["ignored"]
    other = clinic.post("call.participant_joined", session_id="c1", participant="recorder",
                        provider="livekit")
    assert "neither" in other["ignored"]
    assert clinic.post("call.room_ended", session_id="c1", provider="livekit")["ignored"]
    assert clinic.consultation().status == "in_progress"
    both = Clinic(FakeClock())
    both.practitioner()
    both.top_up()
    both.booked_and_activated()
    both.at(START)
    both.post("call.participant_joined", session_id="c1", participant="*", provider="twilio-voice")
    assert set(both.consultation().joins) == {"patient", "practitioner"}


# ============================================================================== the whole story


def test_platform_and_tax_payable_accounts_hold_i14_over_the_log(clinic) -> None:
    clinic.in_progress()
    clinic.finish(at=clinic.at(START + 40 * MIN))
    events = clinic.events()
    (closed,) = named(events, "Consultation.Closed")
    c = closed.capture
    assert c["total_minor"] == c["share_minor"] + c["platform_minor"] + c["tax_payable_minor"]
    assert (c["share_minor"], c["platform_minor"], c["tax_payable_minor"]) == (SHARE, PLATFORM, TAX)
    names = [name(e) for e in events[events.index(closed) - 1:]]
    assert "MoneyWallet.Captured" in names  # captured in the same save as the close


def test_every_refusal_of_the_lifecycle_records_nothing_and_names_a_stable_code() -> None:
    codes = {e.code for e in vars(errors).values()
             if isinstance(e, type) and issubclass(e, errors.LedgerError)}
    for code in ("wallet_in_debt", "invalid_booking", "insufficient_funds",
                 "consultation_not_scheduled", "activation_too_late", "join_window_not_open",
                 "consultation_not_started", "cancellation_window_closed", "consultation_closed",
                 "unknown_consultation", "not_refundable", "consultation_not_unit_billed",
                 "session_conflict", "payment_conflict"):
        assert code in codes


def test_a_version_published_again_without_effective_from_later_is_a_no_op(clinic) -> None:
    clinic.at(T0 + 30 * MIN)
    before = len(clinic.events())
    clinic.practitioner()  # v1 again, half an hour later, without effective_from
    assert len(clinic.events()) == before + 1  # its receipt only
    refused("price_list_conflict", clinic.practitioner,
            effective_from=(T0 + 30 * MIN).isoformat())  # v1 at another instant
