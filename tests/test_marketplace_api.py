"""The marketplace over HTTP (billing-rules.md §10): who may send what, problem details that
change nothing, the reads (consultation, patient wallet, platform accounts, price list), joins
from the signed provider webhooks, and the whole flow with the document's numbers on SQLite and
PostgreSQL, ending with `replay --verify` (I7, I11, I14).
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from conftest import T0
from ledger.marketplace import TICK_ONLY_TYPES
from ledger.rules import Policy
from projections import replay_verify
from test_api import ADMIN, AUDITOR, BACKEND, Api, assert_problem, make_settings, running_api
from test_providers import CONFIGURED, livekit_body, livekit_post

MIN = timedelta(minutes=1)
START = T0 + timedelta(hours=3)
FEE, TAX, TOTAL, SHARE, PLATFORM = 100_000, 18_000, 118_000, 50_000, 50_000


@pytest.fixture
def api(tmp_path):
    yield from running_api(make_settings(tmp_path, **CONFIGURED))


@pytest.fixture
def store_api(tmp_path, store_url):
    yield from running_api(make_settings(tmp_path, database_url=store_url))


def admin_ok(api: Api, type_: str, at=None, **payload) -> dict:
    response = api.post(api.event(type_, at, **payload), headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()


def get(api: Api, path: str, headers=AUDITOR) -> dict:
    response = api.client.get(path, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def open_shop(api: Api, top_up: int = 2 * TOTAL) -> None:
    """Practitioner t1 with a price list (individual 50 min: 1000.00 INR + 18 % GST); patient
    p1 tops up `top_up` minor units; c1 booked for START."""
    api.ok("doctor.registered", doctor_id="t1", country="IN")
    api.ok("price_list.published", practitioner_id="t1", version="2026-11", currency="INR",
           tax_bps=1800, fees=[{"consultation_type": "individual", "duration_minutes": 50,
                                "fee_minor": FEE}])
    api.ok("wallet.topped_up", patient_id="p1", currency="INR", amount_minor=top_up,
           payment_reference="rzp-1", provider="razorpay")


def book(api: Api, cid: str = "c1", start=START) -> dict:
    return api.ok("consultation.booked", consultation_id=cid, patient_id="p1",
                  practitioner_id="t1", consultation_type="individual", mode="video",
                  start=start.isoformat(), duration_minutes=50)


def money(api: Api, patient: str = "p1", currency: str = "INR") -> dict:
    wallets = get(api, f"/v1/patients/{patient}/wallet")["wallets"]
    return next(w for w in wallets if w["currency"] == currency)


def platform(api: Api, currency: str = "INR") -> dict:
    accounts = get(api, "/v1/platform/accounts")["accounts"]
    return next(a for a in accounts if a["currency"] == currency)


def earnings(api: Api, practitioner: str = "t1") -> dict:
    wallets = get(api, f"/v1/doctors/{practitioner}/wallet")["wallets"]
    return next((w for w in wallets if w["currency"] == "INR"), {})


# ================================================================================ who may send


@pytest.mark.parametrize("type_", TICK_ONLY_TYPES)
@pytest.mark.parametrize("headers", [BACKEND, ADMIN], ids=["backend", "admin"])
def test_tick_only_event_types_posted_by_anyone_are_403_and_record_nothing(api, type_, headers):
    open_shop(api)
    book(api)
    before = api.position()
    response = api.post(api.event(type_, consultation_id="c1"), headers=headers)
    assert_problem(response, 403, "forbidden")
    batch = api.post({"events": [api.event(type_, consultation_id="c1")]}, headers=headers)
    assert batch.status_code == 200 and batch.json()["results"][0]["status"] == 403
    assert batch.json()["results"][0]["problem"]["code"] == "forbidden"
    assert api.position() == before


@pytest.mark.parametrize("type_,payload", [
    ("consultation.activated", {"consultation_id": "c1", "admin_id": "a1"}),
    ("consultation.admin_cancelled", {"consultation_id": "c1", "admin_id": "a1", "reason": "x"}),
    ("consultation.refunded", {"consultation_id": "c1", "admin_id": "a1", "reason": "x"}),
    ("wallet.refunded_to_source", {"refund_id": "r1", "payment_reference": "rzp-1",
                                   "amount_minor": 1, "admin_id": "a1", "reason": "x"}),
])
def test_admin_only_event_types_need_an_admin_key(api, type_, payload):
    open_shop(api)
    book(api)
    before = api.position()
    assert_problem(api.post(api.event(type_, **payload), headers=BACKEND), 403, "forbidden")
    assert api.position() == before
    response = api.post(api.event(type_, **payload), headers=ADMIN)
    assert response.status_code in (201, 409), response.text  # allowed: the rules decide


def test_platform_accounts_are_read_by_admin_and_auditor_only(api):
    assert_problem(api.client.get("/v1/platform/accounts", headers=BACKEND), 403, "forbidden")
    assert get(api, "/v1/platform/accounts", AUDITOR) == {"accounts": []}
    assert get(api, "/v1/platform/accounts", ADMIN) == {"accounts": []}


def test_refusals_are_problem_json_with_stable_codes_and_change_nothing(api):
    open_shop(api, top_up=TOTAL - 1)
    before = api.position()
    body = assert_problem(api.post(api.event(
        "consultation.booked", consultation_id="c1", patient_id="p1", practitioner_id="t1",
        consultation_type="individual", mode="video", start=START.isoformat(),
        duration_minutes=50)), 409, "insufficient_funds")
    assert body["available_minor"] == TOTAL - 1
    assert_problem(api.post(api.event("consultation.joined", consultation_id="nope",
                                      participant="patient")), 404, "unknown_consultation")
    assert_problem(api.post(api.event(
        "consultation.booked", consultation_id="c1", patient_id="p1", practitioner_id="t1",
        consultation_type="individual", mode="video", start=(T0 + 5 * MIN).isoformat(),
        duration_minutes=50)), 422, "invalid_booking")
    assert_problem(api.post(api.event(
        "consultation.booked", consultation_id="c1", patient_id="p1", practitioner_id="t1",
        consultation_type="group", mode="video", start=START.isoformat(),
        duration_minutes=50)), 422, "validation_error")
    assert_problem(api.post(api.event("wallet.topped_up", patient_id="p1", currency="INR",
                                      amount_minor=5, payment_reference="rzp-1",
                                      provider="razorpay")), 409, "payment_conflict")
    assert api.position() == before
    assert money(api)["held_minor"] == 0
    assert_problem(api.client.get("/v1/consultations/nope", headers=AUDITOR), 404,
                   "unknown_consultation")


# ================================================================================ the whole flow


def test_marketplace_flow_with_the_documents_numbers(store_api):
    api = store_api
    open_shop(api)
    assert money(api) == {"currency": "INR", "topped_up_minor": 2 * TOTAL,
                          "refunded_to_source_minor": 0, "reversed_payments_minor": 0,
                          "debt_minor": 0, "available_minor": 2 * TOTAL, "held_minor": 0,
                          "captured_minor": 0, "refunded_minor": 0}
    book(api)
    assert (money(api)["available_minor"], money(api)["held_minor"]) == (TOTAL, TOTAL)
    assert admin_ok(api, "consultation.activated", consultation_id="c1",
                    admin_id="admin-7")["status"] == "activated"
    api.clock.set(START - 5 * MIN)
    assert api.tick()["consultations"] == [{
        "consultation_id": "c1", "action": "confirm", "status": "confirmed", "reason": None,
        "money": None, "amount_minor": 0, "currency": "INR"}]
    api.clock.set(START)
    api.ok("consultation.joined", consultation_id="c1", participant="patient")
    api.ok("consultation.joined", START + MIN, consultation_id="c1", participant="practitioner")
    api.clock.set(START + 50 * MIN)
    assert api.ok("consultation.ended", consultation_id="c1",
                  ended_by="practitioner")["status"] == "completed"
    c = get(api, "/v1/consultations/c1")
    assert {k: c["price"][k] for k in ("fee_minor", "tax_minor", "total_minor", "share_minor",
                                       "platform_minor")} == {
        "fee_minor": FEE, "tax_minor": TAX, "total_minor": TOTAL, "share_minor": SHARE,
        "platform_minor": PLATFORM}
    assert c["hold"]["status"] == "captured" and c["hold"]["event"] == "Booked"
    assert c["capture"]["event"] == "Closed" and c["capture"]["share_minor"] == SHARE
    assert c["earning"]["status"] == "pending" and c["activated_by"] == "admin-7"
    assert (money(api)["captured_minor"], money(api)["held_minor"]) == (TOTAL, 0)
    assert platform(api) == {"currency": "INR", "captured_minor": TOTAL, "refunded_minor": 0,
                             "shares_minor": SHARE, "shares_reversed_minor": 0,
                             "platform_minor": PLATFORM, "tax_payable_minor": TAX}
    assert (earnings(api)["pending_minor"], earnings(api)["available_minor"]) == (SHARE, 0)
    api.clock.set(START + 60 * MIN)
    report = api.tick()
    assert report["consultations"] == [{
        "consultation_id": "c1", "action": "release", "status": "completed", "reason": None,
        "money": "earning_available", "amount_minor": SHARE, "currency": "INR"}]
    assert report["counts"]["consultations"] == 1
    assert (earnings(api)["pending_minor"], earnings(api)["available_minor"]) == (0, SHARE)
    refund = admin_ok(api, "consultation.refunded", consultation_id="c1", admin_id="admin-7",
                      reason="complaint upheld")
    assert refund["refund"]["earning"] == "available"
    assert (money(api)["available_minor"], money(api)["refunded_minor"]) == (2 * TOTAL, TOTAL)
    assert platform(api)["platform_minor"] == PLATFORM - FEE  # may go negative
    assert platform(api)["tax_payable_minor"] == 0
    assert earnings(api)["available_minor"] == SHARE  # the practitioner keeps it
    assert get(api, "/v1/consultations/c1")["refund"]["event"] == "Refunded"
    versions = get(api, "/v1/practitioners/t1/price-list")["versions"]
    assert [v["version"] for v in versions] == ["2026-11"]
    app = api.client.app.state
    report = replay_verify(app.ledger, app.settings.database_url, Policy())
    assert report.ok, report.differences


def test_a_provider_join_of_room_call_consultation_id_is_a_join(api):
    open_shop(api)
    book(api)
    admin_ok(api, "consultation.activated", consultation_id="c1", admin_id="admin-7")
    api.clock.set(START)
    for identity in ("p1", "doctor:t1"):
        response = livekit_post(api, livekit_body("participant_joined", START, identity,
                                                  room="call_c1"))
        assert response.status_code == 200, response.text
    left = livekit_post(api, livekit_body("participant_left", START + MIN, "p1", room="call_c1"))
    assert "never ends" in left.json()["ignored"]
    c = get(api, "/v1/consultations/c1")
    assert c["status"] == "in_progress" and set(c["joins"]) == {"patient", "practitioner"}


def test_replay_verify_names_a_money_wallet_or_platform_account_that_breaks_i11_or_i14(api):
    open_shop(api)
    book(api)
    app = api.client.app.state
    store = app.projector._store
    app.projector.catch_up()  # the background projector is done: nothing overwrites the damage
    with store.locked(), store.transaction():
        store.execute("UPDATE money_wallets SET available = available + 1")
    report = replay_verify(app.ledger, app.settings.database_url, Policy())
    assert any(d.startswith("money wallet p1/INR: live available=118001 replay available=118000")
               for d in report.differences), report.differences
    assert any(d.startswith("I11 money wallet p1/INR") for d in report.differences)


def test_export_writes_the_marketplace_events(api, tmp_path):
    import io

    from projections import export_events

    open_shop(api)
    book(api)
    out = io.StringIO()
    export_events(api.client.app.state.ledger, out)
    topics = [json.loads(line)["topic"] for line in out.getvalue().splitlines()]
    for topic in ("ledger.consultations:MoneyWallet.Held", "ledger.consultations:Consultation",
                  "ledger.consultations:PriceList.Published", "ledger.consultations:TopUp"):
        assert any(t.startswith(topic) for t in topics), topic
