"""Appointments going forward (issue 3 §3; billing-rules.md §9, I10): a booking is never a charge.

Through `Ledger.ingest` and the tick on POPO; assertions read the event log and the money.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from conftest import T0
from ledger import errors
from test_billing import MW_RATE, Desk, log, name

MIN = timedelta(minutes=1)
START = T0 + 60 * MIN


def book(desk: Desk, appointment_id: str = "a1", kind: str = "voice") -> dict:
    return desk.post("appointment.booked", appointment_id=appointment_id, patient_id="p1",
                     doctor_id="d1", kind=kind, starts_at=START.isoformat(), duration_minutes=30)


def money_events(desk: Desk) -> list[str]:
    """Every event that moves a unit or money: pools and wallets."""
    return [name(e) for e in log(desk.ledger) if name(e).split(".")[0] in ("Pool", "Wallet")]


@pytest.fixture
def desk() -> Desk:
    desk = Desk()
    desk.doctor()
    desk.grant(voice=3, text=3)
    return desk


def test_lifecycle_booked_confirmed_join_window_linked_completed_on_settlement(desk) -> None:
    assert book(desk)["status"] == "booked"
    assert desk.post("appointment.confirmed", appointment_id="a1")["status"] == "confirmed"
    desk.at(START - 5 * MIN)
    assert desk.post("appointment.join_window_opened", appointment_id="a1")["join_open"] is True
    desk.at(START)
    desk.request("c1", "voice")
    assert desk.post("appointment.linked", appointment_id="a1", session_id="c1")["session_id"] == "c1"
    desk.connect("c1")
    desk.pings("c1", START, START + 25 * MIN)
    desk.end("c1", desk.at(START + 25 * MIN))
    desk.tick(START + 40 * MIN)
    appointment = desk.ledger.get_appointment("a1")
    assert appointment.status == "completed"
    session = desk.ledger.get_session("c1")
    assert session.settlement["units_owed"] == 3 and session.settlement["net_pay_minor"] == 3 * MW_RATE
    completed = [e for e in log(desk.ledger) if name(e) == "Appointment.Closed"]
    assert [e.status for e in completed] == ["completed"]


def test_the_join_window_opens_five_minutes_before_the_start(desk) -> None:
    book(desk)
    desk.post("appointment.confirmed", appointment_id="a1")
    desk.at(START - 5 * MIN - 1 * timedelta(seconds=1))
    with pytest.raises(errors.InvalidTransition):
        desk.post("appointment.join_window_opened", appointment_id="a1")


def test_I10_appointment_events_never_move_units_or_money(desk) -> None:
    before = money_events(desk)
    book(desk)
    desk.post("appointment.confirmed", appointment_id="a1")
    desk.at(START)
    desk.post("appointment.no_show", appointment_id="a1", absent="patient")
    book(desk, "a2")
    desk.post("appointment.cancelled", appointment_id="a2", cancelled_by="patient")
    book(desk, "a3")
    desk.post("appointment.expired", appointment_id="a3")
    desk.tick(START + 120 * MIN)
    assert money_events(desk) == before
    assert [desk.ledger.get_appointment(a).status for a in ("a1", "a2", "a3")] == [
        "no_show", "cancelled", "expired"]


def test_a_linked_appointment_is_billed_only_through_its_session(desk) -> None:
    book(desk, kind="text")
    desk.at(START)
    desk.request("t1", "text")
    desk.post("appointment.linked", appointment_id="a1", session_id="t1")
    desk.message("t1")
    desk.activate("t1")
    desk.pings("t1", START, START + 12 * MIN)
    desk.end("t1", desk.at(START + 12 * MIN))
    desk.tick(START + 30 * MIN)
    charged = [e for e in log(desk.ledger) if name(e) == "Pool.Charged"]
    assert len(charged) == 2  # 12 minutes of text: two blocks, nothing for the appointment
    assert desk.ledger.get_appointment("a1").status == "completed"


def test_a_linked_appointment_is_closed_by_its_session_not_by_the_backend(desk) -> None:
    book(desk)
    desk.at(START)
    desk.request("c1", "voice")
    desk.post("appointment.linked", appointment_id="a1", session_id="c1")
    with pytest.raises(errors.InvalidTransition):
        desk.post("appointment.no_show", appointment_id="a1", absent="doctor")


def test_a_linked_appointment_whose_session_never_started_can_be_closed_after_settlement(desk) -> None:
    book(desk)
    desk.post("appointment.confirmed", appointment_id="a1")
    desk.at(START)
    desk.request("c1", "voice")
    desk.post("appointment.linked", appointment_id="a1", session_id="c1")
    with pytest.raises(errors.InvalidTransition):  # not settled yet: its session decides
        desk.post("appointment.no_show", appointment_id="a1", absent="doctor")
    desk.tick(START + 30 * MIN)  # missed at 90 s (recorded now) …
    desk.tick(START + 45 * MIN)  # … and settled a grace after that
    assert desk.session("c1").settled and desk.session("c1").started_at is None
    assert desk.ledger.get_appointment("a1").status == "confirmed"
    assert desk.post("appointment.no_show", appointment_id="a1", absent="doctor")["status"] == "no_show"


def test_linking_checks_the_parties_kind_and_uniqueness(desk) -> None:
    book(desk)
    desk.at(START)
    desk.request("t1", "text")
    with pytest.raises(errors.InvalidTransition):
        desk.post("appointment.linked", appointment_id="a1", session_id="t1")
    desk.request("c1", "voice")
    desk.post("appointment.linked", appointment_id="a1", session_id="c1")
    desk.post("appointment.linked", appointment_id="a1", session_id="c1")  # same link: no-op
    with pytest.raises(errors.UnknownAppointment):
        desk.post("appointment.linked", appointment_id="nope", session_id="c1")


def test_closed_appointments_stay_closed_and_rebooking_is_idempotent(desk) -> None:
    book(desk)
    assert book(desk)["status"] == "booked"  # same content again: the same appointment
    with pytest.raises(errors.AppointmentExists):
        desk.post("appointment.booked", appointment_id="a1", patient_id="p2", doctor_id="d1",
                  kind="voice", starts_at=START.isoformat())
    desk.post("appointment.cancelled", appointment_id="a1", cancelled_by="doctor")
    desk.post("appointment.cancelled", appointment_id="a1", cancelled_by="doctor")  # a retry
    with pytest.raises(errors.AppointmentClosed):
        desk.post("appointment.confirmed", appointment_id="a1")
