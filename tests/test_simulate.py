"""`ledger simulate`: a small simulated day through the real HTTP service, checked by the oracle.

The end-to-end test starts the service as a subprocess (uvicorn, manual clock, SQLite file in a
temporary folder), drives a small but complete day against it and requires zero differences
from the oracle and a clean replay audit. It also asserts that the day exercised the paths
the oracle exists to check, so it cannot pass vacuously.
"""

from __future__ import annotations

import io
import sqlite3
from contextlib import closing
from datetime import datetime, timedelta, timezone

import pytest
from rich.console import Console

from simulation.oracle import Oracle, owed_units, pool_id_of
from simulation.scenario import build_scenario
from simulation.driver import run_simulation

DAY = datetime(2026, 11, 2, tzinfo=timezone.utc)
T0 = datetime(2026, 11, 2, 8, tzinfo=timezone.utc)


# --------------------------------------------------------------- the oracle on its own


@pytest.mark.parametrize(("kind", "seconds", "units"), [
    ("text", 0, 1), ("text", 480, 1), ("text", 720, 2), ("text", 1500, 3), ("text", 1200, 2),
    ("text", 1201, 3), ("voice", 59, 0), ("voice", 60, 1), ("video", 599, 1), ("video", 600, 1),
    ("voice", 601, 2), ("voice", 1500, 3), ("video", 3600, 6),
])
def test_oracle_units_owed_match_the_examples_of_section_2(kind, seconds, units):
    assert owed_units(kind, T0, T0 + timedelta(seconds=seconds)) == units
    assert owed_units(kind, None, T0 + timedelta(seconds=seconds)) == 0


def _post(oracle: Oracle, n: int, type_: str, at: datetime, now: datetime | None = None, **payload):
    event = {"event_id": f"e{n}", "type": type_, "occurred_at": at.isoformat(), "payload": payload}
    return oracle.post(event, now or at)


def test_oracle_reverses_a_block_charged_before_a_late_end_report():
    o = Oracle()
    _post(o, 1, "doctor.registered", T0, doctor_id="d1", country="MW")
    plan = {"name": "P", "price_minor": 1, "currency": "MWK", "units": {"voice": 5},
            "seats": 1, "duration_days": 30}
    _post(o, 2, "subscription.granted", T0, payment_reference="pay1", owner_id="p1", plan=plan,
          starts_at=T0.isoformat())
    assert _post(o, 3, "session.requested", T0, session_id="s1", kind="voice", patient_id="p1",
                 doctor_id="d1").accepted
    _post(o, 4, "call.connected", T0, session_id="s1")
    _post(o, 5, "session.activity", T0 + timedelta(seconds=590), session_id="s1")
    o.tick(T0 + timedelta(seconds=1260))  # blocks 1 and 2 charged: the end is not known yet
    assert sorted(o.sessions["s1"].charges) == [1, 2]
    late = _post(o, 6, "session.ended", T0 + timedelta(seconds=595), T0 + timedelta(seconds=1270),
                 session_id="s1", ended_by="patient", reason="completed")
    assert late.accepted and late.result["ended_at"] == (T0 + timedelta(seconds=595)).isoformat()
    o.tick(T0 + timedelta(seconds=1270 + 600))
    s = o.sessions["s1"]
    assert s.settled and sorted(s.charges) == [1] and sorted(s.reversals) == [2]
    assert o.pool_numbers("pay1")["voice"] == {"granted": 5, "available": 4, "held": 0,
                                               "charged": 1, "reversed": 1, "forfeited": 0,
                                               "revoked": 0}
    assert o.wallet_numbers("d1") == {"MWK": {"pending_minor": 0, "available_minor": 350_000,
                                              "held_minor": 0, "withdrawn_minor": 0}}
    assert _post(o, 7, "session.activity", T0, session_id="s1").code == "session_settled"


def test_oracle_draws_from_the_pool_that_expires_first():
    o = Oracle()
    _post(o, 1, "doctor.registered", T0, doctor_id="d1", country="KE")
    for n, (ref, days, start) in enumerate([("old", 30, T0 - timedelta(days=25)),
                                            ("new", 14, T0 - timedelta(days=2))]):
        plan = {"name": "P", "price_minor": 1, "currency": "USD", "units": {"text": 3},
                "seats": 1, "duration_days": days}
        _post(o, 10 + n, "subscription.granted", T0, payment_reference=ref, owner_id="p1",
              plan=plan, starts_at=start.isoformat())
    _post(o, 20, "session.requested", T0, session_id="s1", kind="text", patient_id="p1",
          doctor_id="d1")
    # "old" ends at T0 + 12 days (30 + 7 − 25), "new" at T0 + 12 days too: then starts_at wins.
    assert o.sessions["s1"].holds == {1: "old"}
    assert pool_id_of("old") == o.pools["old"].pid


def test_scenario_is_deterministic_and_sized():
    a = build_scenario(seed=3, patients=60, doctors=10, sessions=200, day_start=DAY)
    b = build_scenario(seed=3, patients=60, doctors=10, sessions=200, day_start=DAY)
    assert [(d.at, d.event.body()) for d in a.deliveries] == \
        [(d.at, d.event.body()) for d in b.deliveries]
    facts = a.describe()
    assert facts["patients"] == 60 and facts["doctors"] == 10 and facts["sessions"] >= 195
    assert facts["duplicates"] > 0 and facts["late"] > 0 and facts["family_pools"] >= 2
    assert all(d.at >= d.event.occurred_at for d in a.deliveries if d.event.session_id)


# ------------------------------------------------------------- end to end, over HTTP


@pytest.mark.timeout(240)
def test_simulated_day_matches_the_oracle_over_http(tmp_path):
    out = io.StringIO()
    report = run_simulation(seed=7, patients=60, doctors=10, sessions=200, practitioners=4,
                            consultations=40, workdir=tmp_path,
                            console=Console(file=out, width=140))
    assert report.differences == [], out.getvalue()[-6000:]
    assert report.replay_ok is True, report.summary.get("replay")
    assert report.ok
    s = report.summary
    timeouts = s["timeouts"]
    # The day really went through every path the oracle is there to check.
    assert s["exhaustions"] > 0, "no session ran out of units"
    assert s["reversals_after_late_end"] > 0, "no late end report led to a reversal"
    assert s["contentions"] > 0, "no family-pool contention for the last unit"
    assert s["duplicates"] > 0 and s["late"] > 0 and s["swaps"] > 0
    assert s["timeout_retries"] > 0 and s["single_posts"] > 0
    for reason in ("not_started", "doctor_no_response", "missed", "idle_timeout", "max_duration",
                   "declined"):
        assert timeouts[reason] > 0, f"no {reason}"
    refusals = s["refusals"]
    for code in ("insufficient_units", "session_conflict", "session_ended", "session_settled"):
        assert refusals.get(code, 0) > 0, f"no {code} refusal"
    assert s["tick_work"].get("expired", 0) > 0, "no pool expired during the day"
    assert sum(s["units_charged"].values()) > 100
    assert any(m.get("withdrawn_minor", 0) > 0 for m in s["money"].values()), "no withdrawal"
    assert all(m.get("pending_minor", 0) == 0 for m in s["money"].values())
    # The marketplace (§10) went through every row of its table and the rules around it.
    market = s["marketplace"]
    outcomes = market["consultations_by_outcome"]
    for outcome in ("completed (ended)", "completed (completed_by_time)", "expired (never_activated)",
                    "no_show (patient_absent)", "no_show (practitioner_absent)"):
        assert outcomes.get(outcome, 0) > 0, f"no consultation {outcome}"
    assert sum(n for o, n in outcomes.items() if o.startswith("cancelled")) >= 2
    assert market["consultations_refused"] > 0 and set(market["refunds"]) == {"pending",
                                                                              "available"}
    for code in ("insufficient_funds", "wallet_in_debt", "invalid_booking", "payment_conflict",
                 "activation_too_late", "cancellation_window_closed", "join_window_not_open",
                 "consultation_not_started", "consultation_not_unit_billed",
                 "price_list_conflict"):
        assert refusals.get(code, 0) > 0, f"no {code} refusal"
    by_type = s["refusals_by_event_type"]
    assert by_type.get("session.requested: session_conflict", 0) > 0
    assert by_type.get("consultation.joined: session_conflict", 0) + by_type.get(
        "call.participant_joined: session_conflict", 0) > 0, "no double-booked practitioner"
    assert market["accounts"]["INR"]["tax_payable_minor"] > 0
    assert s["tick_work"].get("consultation steps", 0) > 0

    # Every notification the catalogue promises arrived, verified, once per id, in order.
    webhooks = s["webhooks"]
    assert webhooks["missing"] == 0 and webhooks["unexpected"] == 0
    assert webhooks["out_of_order"] == 0 and webhooks["rejected"] == 0
    for kind in ("session.block_charged", "session.ended", "session.settled",
                 "session.paid_until_changed", "balance.low", "pool.expired", "withdrawal.held",
                 "withdrawal.completed"):
        assert webhooks["by_type"][kind]["delivered"] > 0, f"no {kind} notification"



def test_the_expectation_predicts_a_charge_an_exhaustion_and_a_low_balance():
    from simulation.expectation import ExpectingOracle

    o = ExpectingOracle(threshold=1)
    _post(o, 1, "doctor.registered", T0, doctor_id="d1", country="MW")
    plan = {"name": "P", "price_minor": 1, "currency": "MWK", "units": {"voice": 2},
            "seats": 1, "duration_days": 30}
    _post(o, 2, "subscription.granted", T0, payment_reference="pay1", owner_id="p1", plan=plan,
          starts_at=T0.isoformat())
    _post(o, 3, "session.requested", T0, session_id="s1", kind="voice", patient_id="p1",
          doctor_id="d1")
    _post(o, 4, "call.connected", T0, session_id="s1")
    _post(o, 5, "session.activity", T0 + timedelta(seconds=590), session_id="s1")
    o.tick(T0 + timedelta(seconds=1260))
    e = o.expected
    assert e["balance.low"] == {("p1", "voice", 1): 1, ("p1", "voice", 0): 1}
    assert e["session.paid_until_changed"] == {
        ("s1", (T0 + timedelta(seconds=600)).isoformat()): 1,
        ("s1", (T0 + timedelta(seconds=1200)).isoformat()): 1}
    assert e["session.block_charged"] == {("s1", 1): 1, ("s1", 2): 1}
    assert e["session.ended"] == {("s1", (T0 + timedelta(seconds=1200)).isoformat(),
                                   "balance_exhausted"): 1}


# --------------------------------------------------------- the marketplace oracle on its own


def test_market_oracle_follows_the_documents_numbers_and_refund_rules():
    from simulation.marketplace_oracle import MarketOracle, split

    assert split(100_000, 1800, 5000) == {"fee_minor": 100_000, "tax_minor": 18_000,
                                          "total_minor": 118_000, "share_minor": 50_000,
                                          "platform_minor": 50_000, "tax_payable_minor": 18_000}
    o = Oracle()
    m = MarketOracle(o)
    start = T0 + timedelta(hours=3)
    _post(o, 1, "doctor.registered", T0, doctor_id="t1", country="IN")
    _post(o, 2, "price_list.published", T0, practitioner_id="t1", version="v1", currency="INR",
          tax_bps=1800, fees=[{"consultation_type": "individual", "duration_minutes": 50,
                               "fee_minor": 100_000}])
    _post(o, 3, "wallet.topped_up", T0, patient_id="p1", currency="INR", amount_minor=118_000,
          payment_reference="r1", provider="razorpay")
    assert _post(o, 4, "consultation.booked", T0, consultation_id="c1", patient_id="p1",
                 practitioner_id="t1", consultation_type="individual", mode="video",
                 start=start.isoformat(), duration_minutes=50).accepted
    assert _post(o, 5, "consultation.booked", T0, consultation_id="c2", patient_id="p1",
                 practitioner_id="t1", consultation_type="individual", mode="video",
                 start=start.isoformat(), duration_minutes=50).code == "insufficient_funds"
    _post(o, 6, "consultation.activated", T0, consultation_id="c1", admin_id="a")
    _post(o, 7, "consultation.joined", start, consultation_id="c1", participant="patient")
    _post(o, 8, "consultation.joined", start, consultation_id="c1", participant="practitioner")
    assert m.tick(start) == []  # confirmation is skipped once it is in progress
    end = start + timedelta(minutes=50)
    assert m.tick(end + timedelta(seconds=60)) == [{
        "consultation_id": "c1", "action": "complete", "status": "completed",
        "reason": "completed_by_time", "money": "captured", "amount_minor": 118_000,
        "currency": "INR"}]
    assert o.wallet_numbers("t1") == {"INR": {"pending_minor": 50_000, "available_minor": 0,
                                              "held_minor": 0, "withdrawn_minor": 0}}
    assert [(s["action"], s["money"], s["amount_minor"])
            for s in m.tick(end + timedelta(seconds=600))] == [
        ("release", "earning_available", 50_000)]
    _post(o, 9, "consultation.refunded", end + timedelta(hours=1), consultation_id="c1",
          admin_id="a", reason="r")
    assert m.accounts["INR"] == {"captured_minor": 118_000, "refunded_minor": 118_000,
                                 "shares_minor": 50_000, "shares_reversed_minor": 0,
                                 "platform_minor": -50_000, "tax_payable_minor": 0}
    assert m.money[("p1", "INR")].available == 118_000 and o.available_minor("t1", "INR") == 50_000


@pytest.mark.timeout(180)
def test_a_day_without_webhooks_registers_no_receiver_and_still_matches(tmp_path):
    """`ledger simulate --no-webhooks`: the day and the comparison as usual; the service has
    no endpoint, so it sends nothing, and the report says the webhooks were not checked."""
    out = io.StringIO()
    report = run_simulation(seed=3, patients=20, doctors=4, sessions=40, practitioners=0,
                            consultations=0, workdir=tmp_path, webhooks_checked=False,
                            console=Console(file=out, width=140))
    assert report.ok, out.getvalue()[-4000:]
    assert report.summary["webhooks"] == {"skipped": "no receiver registered (--no-webhooks)"}
    assert "Webhooks not checked: no receiver registered" in out.getvalue()
    assert sum(report.summary["units_charged"].values()) > 0
    with closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
        rows = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("webhook_messages", "webhook_endpoints", "webhook_deliveries")}
    assert rows["webhook_messages"] > 0, rows  # the outbox is derived all the same
    assert rows["webhook_endpoints"] == 0 and rows["webhook_deliveries"] == 0, rows
