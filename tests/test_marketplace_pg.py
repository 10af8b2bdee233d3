"""Concurrency of the marketplace on PostgreSQL (billing-rules.md §10, I11–I14): several
workers, each its own Ledger application on one schema (like separate processes), act at once.

- Bookings racing for the last money in one wallet: exactly one holds, the others are refused
  with insufficient_funds (never a double hold, never an overdraft).
- A capture (the backend's end) racing a refund: one outcome — the refund is refused while the
  consultation is in progress, or it follows the capture; never a refund without a capture.
- An earning release (the tick) racing a refund: either the refund reverses the pending share
  and nothing is released, or the share is released and the practitioner keeps it.
- Ticks racing on the same consultations: each step recorded once.
Asserted over the event log with the I11–I14 checks.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from conftest import T0, make_ledger
from ledger import errors
from ledger.consultations import Consultation
from ledger.marketplace import tick_consultations
from runtime.clock import ManualClock
from test_billing import MIN, S, named
from test_concurrency_pg import at_once, no_crash
from test_invariants import check_all, events_of
from test_marketplace import END, SHARE, START, TOTAL, Clinic
from test_marketplace_invariants import check_market

pytestmark = pytest.mark.postgres

WORKERS = 4
ROUNDS = 5


@pytest.fixture
def workers(pg_url):
    clock = ManualClock(T0)  # shared; only the main thread moves it
    main = make_ledger(pg_url, clock)
    ledgers = [make_ledger(pg_url, clock) for _ in range(WORKERS)]
    clinic = Clinic(clock)
    clinic.ledger = main
    clinic.practitioner()
    yield clock, clinic, ledgers
    for ledger in [main, *ledgers]:
        ledger.close()


def booking(ledger, cid: str, patient: str, start):
    return lambda: ledger.ingest(f"book-{cid}", "consultation.booked", T0, {
        "consultation_id": cid, "patient_id": patient, "practitioner_id": "t1",
        "consultation_type": "individual", "mode": "video", "start": start.isoformat(),
        "duration_minutes": 50})


def test_bookings_racing_for_the_last_money_exactly_one_holds(workers) -> None:
    clock, clinic, ledgers = workers
    for r in range(ROUNDS):
        patient = f"p{r}"
        clinic.top_up(patient=patient, amount=TOTAL, ref=f"pay-{r}")  # exactly one booking's worth
        results = no_crash(at_once([booking(ledger, f"c{r}-{k}", patient, START + k * MIN)
                                    for k, ledger in enumerate(ledgers)]),
                           allowed=("insufficient_funds",))
        accepted = [x for x in results if not isinstance(x, Exception)]
        assert len(accepted) == 1, results
        money = clinic.money(patient)
        assert (money.available_minor, money.held_minor) == (0, TOTAL)
    events = events_of(clinic.ledger)
    assert len(named(events, "MoneyWallet.Held")) == ROUNDS
    check_market(events)


def in_progress(clinic: Clinic, cid: str, start) -> None:
    clinic.book(cid, start=start)
    clinic.activate(cid)
    clinic.join(cid, "patient", clinic.at(start))
    clinic.join(cid, "practitioner", clinic.at(start + S))


def test_a_capture_racing_a_refund_has_one_outcome(workers) -> None:
    clock, clinic, ledgers = workers
    clinic.top_up(amount=ROUNDS * TOTAL)
    outcomes = []
    for r in range(ROUNDS):
        cid, start = f"c{r}", START + r * timedelta(hours=1)
        clock.set(T0)
        in_progress(clinic, cid, start)
        end_at = clinic.at(start + 40 * MIN)
        end = lambda led=ledgers[0], cid=cid: led.ingest(  # noqa: E731
            f"end-{cid}", "consultation.ended", end_at,
            {"consultation_id": cid, "ended_by": "patient"})
        refund = lambda led=ledgers[1], cid=cid: led.ingest(  # noqa: E731
            f"refund-{cid}", "consultation.refunded", end_at,
            {"consultation_id": cid, "admin_id": "admin-7", "reason": "race"})
        ended, refunded = no_crash(at_once([end, refund]), allowed=("not_refundable",))
        assert not isinstance(ended, Exception)
        c = clinic.consultation(cid)
        assert c.captured and (c.refund is not None) == (not isinstance(refunded, Exception))
        outcomes.append("refunded" if c.refund else "refused")
    events = events_of(clinic.ledger)
    for r in range(ROUNDS):  # a refund, when there is one, follows its capture in the log
        cid = Consultation.create_id(f"c{r}")
        kinds = [type(e).__name__ for e in events if e.originator_id == cid]
        assert kinds.count("Closed") == 1 and kinds.count("Refunded") <= 1
        if "Refunded" in kinds:
            assert kinds.index("Closed") < kinds.index("Refunded")
    check_market(events)
    assert set(outcomes) <= {"refunded", "refused"}


def test_an_earning_release_racing_a_refund_has_one_outcome(workers) -> None:
    clock, clinic, ledgers = workers
    clinic.top_up(amount=ROUNDS * TOTAL)
    for r in range(ROUNDS):
        cid, start = f"c{r}", START + r * timedelta(hours=1)
        clock.set(T0)
        in_progress(clinic, cid, start)
        clinic.finish(cid, at=clinic.at(start + 40 * MIN))
        due = clinic.at(start + 40 * MIN + timedelta(seconds=600))
        release = lambda led=ledgers[2], cid=cid: tick_consultations(led, due, [cid])  # noqa: E731
        refund = lambda led=ledgers[3], cid=cid: led.ingest(  # noqa: E731
            f"refund-{cid}", "consultation.refunded", due,
            {"consultation_id": cid, "admin_id": "admin-7", "reason": "race"})
        released, refunded = no_crash(at_once([release, refund]))
        assert not released.failed
        c = clinic.consultation(cid)
        assert c.refund is not None
        if c.refund["earning"] == "pending":
            assert c.earning_released_at is None and c.refund["share_reversed_minor"] == SHARE
        else:
            assert c.earning_released_at is not None and c.refund["share_reversed_minor"] == 0
    events = events_of(clinic.ledger)
    check_market(events)
    kept = sum(e.amount_minor for e in named(events, "Wallet.EarningCredited"))
    wallet = clinic.earnings()
    assert (wallet.available_minor if wallet else 0) == kept
    check_all(events, clinic.ledger)


def test_racing_ticks_record_each_consultation_step_once(workers) -> None:
    clock, clinic, ledgers = workers
    clinic.top_up(amount=8 * TOTAL)
    cids = []
    for k in range(6):
        cid = f"c{k}"
        clinic.book(cid, start=START + k * 10 * MIN)
        if k % 3:
            clinic.activate(cid)
        cids.append(cid)
    clinic.join("c1", "practitioner", clinic.at(START + 10 * MIN))
    clinic.join("c1", "patient", START + 10 * MIN)
    for moment in (START, START + 20 * MIN, END + 2 * timedelta(hours=1)):
        clock.set(moment)
        reports = no_crash(at_once([lambda led=led, m=moment: tick_consultations(led, m, cids)
                                    for led in ledgers]))
        assert not any(r.failed for r in reports)
    events = events_of(clinic.ledger)
    closed = [e.originator_id for e in named(events, "Consultation.Closed")]
    assert len(closed) == len(set(closed)) == len(cids)
    confirmed = [e.originator_id for e in named(events, "Consultation.Confirmed")]
    assert len(confirmed) == len(set(confirmed))
    check_market(events)
    with pytest.raises(errors.ConsultationClosed):
        clinic.activate("c0")
