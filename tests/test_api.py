"""HTTP API: auth, ingestion (single and batch), idempotency, problem+json, reads, ticks, clock.

Runs the real lifespan (TestClient as a context manager) on a temp SQLite file with an injected
FakeClock and tick_enabled=False; ticks are driven through POST /v1/ticks.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from runtime.asgi import create_app
from api.schemas import EVENT_TYPES
from ledger.input_rules import ID_PATTERN
from ledger.marketplace import TICK_ONLY_TYPES
from runtime.clock import ManualClock, SystemClock
from runtime.settings import Settings
from conftest import T0, FakeClock

from projections import Projector

KEYS = "k-backend:backend,k-auditor:auditor,k-admin:admin"
BACKEND = {"Authorization": "Bearer k-backend"}
AUDITOR = {"X-API-Key": "k-auditor"}
ADMIN = {"Authorization": "Bearer k-admin"}
PROBLEM = "application/problem+json"
START = T0 + timedelta(minutes=2)  # billable start of the happy-path call


def usable_now(balance: dict, bucket: str) -> int:
    """Units of `bucket` the patient can use now, from the balance read model."""
    return balance["buckets"][bucket]["usable_now"]


def wallet_minor(wallet: dict, currency: str, field: str = "available_minor") -> int:
    """One amount of the doctor's wallet in `currency` (0 if it has none yet)."""
    rows = [w for w in wallet["wallets"] if w["currency"] == currency]
    return rows[0][field] if rows else 0


# ------------------------------------------------------------------------------- harness


class Api:
    """A running app with helpers to post events as the backend."""

    def __init__(self, client: TestClient, clock: FakeClock) -> None:
        self.client, self.clock = client, clock
        self.n = 0

    @property
    def ledger(self):
        return self.client.app.state.ledger

    def position(self) -> int:
        return self.ledger.recorder.max_notification_id() or 0

    def event(self, type_: str, at=None, event_id: str | None = None, **payload) -> dict:
        self.n += 1
        at = at or self.clock()
        return {"event_id": event_id or f"ev-{self.n}", "type": type_,
                "occurred_at": at.isoformat() if hasattr(at, "isoformat") else at,
                "payload": payload}

    def post(self, body: dict, headers=BACKEND):
        return self.client.post("/v1/events", json=body, headers=headers)

    def ok(self, type_: str, at=None, **payload) -> dict:
        response = self.post(self.event(type_, at, **payload))
        assert response.status_code == 201, response.text
        return response.json()

    def tick(self, as_of=None):
        body = {"as_of": as_of.isoformat()} if as_of is not None else None
        response = self.client.post("/v1/ticks", json=body, headers=ADMIN)
        assert response.status_code == 200, response.text
        return response.json()

    # -- common setup

    def doctor(self, doctor_id="d1", country="MW") -> dict:
        return self.ok("doctor.registered", doctor_id=doctor_id, country=country)

    def grant(self, owner="p1", reference="pay1", text=0, voice=0, video=0, seats=1) -> dict:
        return self.ok("subscription.granted", payment_reference=reference, owner_id=owner,
                       plan=plan(text, voice, video, seats), starts_at=(T0 - timedelta(days=1))
                       .isoformat())


def plan(text=0, voice=0, video=0, seats=1) -> dict:
    return {"name": "Life", "price_minor": 1_500_000, "currency": "MWK",
            "units": {"text": text, "voice": voice, "video": video}, "seats": seats,
            "duration_days": 30}


def make_settings(tmp_path, **overrides) -> Settings:
    values = {"database_url": f"sqlite:///{tmp_path}/l.db", "api_keys": KEYS,
              "tick_enabled": False, "clock": "manual", **overrides}
    return Settings(**values)


def running_api(settings: Settings):
    clock = FakeClock(T0)
    with TestClient(create_app(settings, clock=clock)) as client:
        yield Api(client, clock)


@pytest.fixture
def api(tmp_path):
    yield from running_api(make_settings(tmp_path))


@pytest.fixture
def store_api(tmp_path, store_url):
    """The API on SQLite and on PostgreSQL (conftest's store_url)."""
    yield from running_api(make_settings(tmp_path, database_url=store_url))


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["code"] == code
    assert body["type"] == f"/problems/{code}"
    assert body["title"] and body["detail"]
    return body


# ---------------------------------------------------------------------------------- auth


def test_healthz_needs_no_key(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"},
                                     {"X-API-Key": "nope"}, {"Authorization": "Basic k-backend"}])
def test_missing_or_unknown_key_is_401_and_records_nothing(api, headers):
    before = api.position()
    response = api.post(api.event("doctor.registered", doctor_id="d1", country="MW"), headers)
    body = assert_problem(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert body["instance"] == "/v1/events"
    assert api.position() == before
    assert_problem(api.client.get("/v1/sessions/s1", headers=headers), 401, "unauthenticated")
    # an unauthenticated caller learns nothing from validation either
    bad = api.client.post("/v1/events", content=b"{not json", headers={
        **headers, "content-type": "application/json"})
    assert_problem(bad, 401, "unauthenticated")


def test_auditor_reads_but_cannot_post_tick_or_set_clock(api):
    before = api.position()
    response = api.post(api.event("doctor.registered", doctor_id="d1", country="MW"), AUDITOR)
    assert_problem(response, 403, "forbidden")
    assert api.position() == before
    assert_problem(api.client.post("/v1/ticks", headers=AUDITOR), 403, "forbidden")
    assert_problem(api.client.put("/v1/clock", json={"now": T0.isoformat()}, headers=AUDITOR),
                   403, "forbidden")
    assert api.client.get("/v1/projections", headers=AUDITOR).status_code == 200
    assert_problem(api.client.get("/v1/doctors/d1/wallet", headers=AUDITOR), 404,
                   "unknown_doctor")  # readable by an auditor, but never registered


def test_backend_cannot_tick_and_admin_can_post(api):
    assert_problem(api.client.post("/v1/ticks", headers=BACKEND), 403, "forbidden")
    response = api.post(api.event("doctor.registered", doctor_id="d1", country="MW"), ADMIN)
    assert response.status_code == 201


# ----------------------------------------------------------------------------- happy path


def test_full_call_bills_three_units_and_pays_doctor_after_settlement(store_api):
    api = store_api
    c = api.clock
    assert api.doctor() == {"event_id": "ev-1", "type": "doctor.registered", "doctor_id": "d1",
                            "country": "MW"}
    granted = api.grant(voice=5)
    pool_id = granted["pool_id"]
    c.advance(60)
    requested = api.ok("session.requested", session_id="s1", kind="voice", patient_id="p1",
                       doctor_id="d1")
    assert requested["state"] == "requested" and requested["paid_until"] is None
    assert usable_now(api.client.get("/v1/patients/p1/balance", headers=BACKEND).json(),
                      "voice") == 4
    api.ok("call.ringing", session_id="s1")
    c.set(START)
    connected = api.ok("call.connected", session_id="s1")
    assert connected["paid_until"] == (START + timedelta(minutes=20)).isoformat()
    for minute in (5, 10, 15, 20):  # activity pings keep the call from idling out (§8)
        c.set(START + timedelta(minutes=minute))
        api.ok("session.activity", session_id="s1")
    c.set(START + timedelta(minutes=25))
    ended = api.ok("session.ended", session_id="s1", ended_by="doctor")
    assert ended["ended_at"] == (START + timedelta(minutes=25)).isoformat()
    assert ended["reason"] == "completed"

    before = api.client.get("/v1/sessions/s1", headers=AUDITOR).json()
    assert before["state"] == "ended"
    assert before["statement"]["doctor_pay"]["status"] == "pending"
    assert available_minor(api, "d1", "MWK") == 0

    c.set(START + timedelta(minutes=25 + 11))  # past the 10-minute settlement grace
    report = api.tick()  # blocks 1 and 2 were due at their ends; block 3 owed at settlement
    assert steps(report) == [("s1", "charge", 1, 1, pool_id, None),
                             ("s1", "charge", 2, 1, pool_id, None),
                             ("s1", "settle", None, 3, None, None)]
    assert report["counts"] == {"charged": 2, "ended": 0, "settled": 1, "expired": 0, "failed": 0,
                                "consultations": 0}
    assert report["more"] is False

    session = api.client.get("/v1/sessions/s1", headers=AUDITOR).json()
    assert session["state"] == "settled"
    assert session["kind"] == "voice" and session["patient_id"] == "p1"
    assert session["started_at"] == START.isoformat()
    assert session["end_by"] == "doctor" and session["end_reason"] == "completed"
    assert session["rate"] == {"tariff": "2026-01-12", "amount_minor": 350000,
                               "pay_minor": 350000, "currency": "MWK", "commission_pct": 0,
                               "country": "MW"}
    statement = session["statement"]
    assert [(b["block"], b["status"], b["pool_id"]) for b in statement["blocks"]] == [
        (1, "charged", pool_id), (2, "charged", pool_id), (3, "charged", pool_id)]
    assert statement["blocks"][2]["start"] == (START + timedelta(minutes=20)).isoformat()
    assert statement["blocks"][2]["end"] == (START + timedelta(minutes=30)).isoformat()
    assert statement["charges"] == [{"block": n, "pool_id": pool_id} for n in (1, 2, 3)]
    assert statement["reversals"] == []
    assert statement["doctor_pay"] == {"per_unit_minor": 350000, "units": 3,
                                       "net_total_minor": 1_050_000, "currency": "MWK",
                                       "status": "available"}
    assert statement["settlement"]["units_owed"] == 3
    assert statement["settlement"]["at"] == c().isoformat()

    assert usable_now(api.client.get("/v1/patients/p1/balance", headers=BACKEND).json(),
                      "voice") == 2
    assert available_minor(api, "d1", "MWK") == 3 * 350000
    wallet = api.client.get("/v1/doctors/d1/wallet", headers=AUDITOR).json()
    assert wallet_minor(wallet, "MWK", "pending_minor") == 0
    lag = api.client.get("/v1/projections", headers=AUDITOR).json()
    assert all(v == 0 for v in lag["lag"].values())


def steps(report: dict) -> list[tuple]:
    """The tick report's decisions as (session, action, block, units, pool, reason)."""
    return [(s["session_id"], s["action"], s["block"], s["units"], s["pool_id"], s["reason"])
            for s in report["steps"]]


def available_minor(api: Api, doctor_id: str, currency: str) -> int:
    wallet = api.client.get(f"/v1/doctors/{doctor_id}/wallet", headers=BACKEND)
    assert wallet.status_code == 200, wallet.text
    assert wallet.json()["doctor_id"] == doctor_id
    return wallet_minor(wallet.json(), currency)


def test_statement_before_billable_start_shows_block_one_held(api):
    api.doctor()
    pool_id = api.grant(text=2)["pool_id"]
    api.ok("session.requested", session_id="t1", kind="text", patient_id="p1", doctor_id="d1")
    session = api.client.get("/v1/sessions/t1", headers=BACKEND).json()
    assert session["state"] == "requested" and session["started_at"] is None
    assert session["statement"]["blocks"] == [
        {"block": 1, "start": None, "end": None, "status": "held", "pool_id": pool_id}]
    assert session["rate"] is None and session["statement"]["doctor_pay"] is None
    assert session["statement"]["settlement"] is None


def test_short_text_session_releases_unused_hold(api):
    c = api.clock
    api.doctor()
    pool_id = api.grant(text=3)["pool_id"]
    api.ok("session.requested", session_id="t1", kind="text", patient_id="p1", doctor_id="d1")
    api.ok("session.patient_message", session_id="t1")
    c.advance(60)
    api.ok("text.activated", session_id="t1")  # holds block 2 ahead
    c.advance(300)
    api.ok("session.ended", session_id="t1", ended_by="patient")
    c.advance(700)
    api.tick()
    statement = api.client.get("/v1/sessions/t1", headers=BACKEND).json()["statement"]
    assert [(b["block"], b["status"], b["pool_id"]) for b in statement["blocks"]] == [
        (1, "charged", pool_id), (2, "released", pool_id)]
    assert statement["settlement"]["units_owed"] == 1


def test_late_early_end_reverses_auto_deducted_block(store_api):
    api = store_api
    c = api.clock
    api.doctor()
    pool_id = api.grant(voice=6)["pool_id"]
    c.set(START - timedelta(seconds=30))
    api.ok("session.requested", session_id="s1", kind="voice", patient_id="p1", doctor_id="d1")
    c.set(START)
    api.ok("call.connected", session_id="s1")
    c.set(START + timedelta(minutes=10))
    api.ok("session.activity", session_id="s1")
    c.set(START + timedelta(minutes=21))
    assert steps(api.tick()) == [("s1", "charge", 1, 1, pool_id, None),
                                 ("s1", "charge", 2, 1, pool_id, None)]
    assert api.client.get("/v1/sessions/s1", headers=BACKEND).json()["statement"][
        "doctor_pay"] == {"per_unit_minor": 350000, "units": 2, "net_total_minor": 700000,
                          "currency": "MWK", "status": "pending"}
    wallet = api.client.get("/v1/doctors/d1/wallet", headers=AUDITOR).json()
    assert wallet_minor(wallet, "MWK", "pending_minor") == 700000
    assert wallet_minor(wallet, "MWK", "available_minor") == 0
    # the provider reports, late, that the call ended five minutes in: one unit owed (§3)
    api.ok("session.ended", START + timedelta(minutes=5), session_id="s1", ended_by="system",
           reason="provider_disconnect")
    c.set(START + timedelta(minutes=32))
    assert steps(api.tick()) == [("s1", "settle", None, 1, None, None)]
    statement = api.client.get("/v1/sessions/s1", headers=BACKEND).json()["statement"]
    assert [(b["block"], b["status"], b["pool_id"]) for b in statement["blocks"]] == [
        (1, "charged", pool_id), (2, "reversed", pool_id), (3, "released", pool_id),
        (4, "released", pool_id)]
    assert statement["charges"] == [{"block": 1, "pool_id": pool_id}]
    assert statement["reversals"] == [{"block": 2, "pool_id": pool_id}]
    assert statement["doctor_pay"]["net_total_minor"] == 350000
    assert statement["doctor_pay"]["status"] == "available"
    assert usable_now(api.client.get("/v1/patients/p1/balance", headers=BACKEND).json(),
                      "voice") == 5
    assert available_minor(api, "d1", "MWK") == 350000


# ---------------------------------------------------------------------------- idempotency


def test_repost_returns_original_body_with_replay_header_and_changes_nothing(api):
    api.doctor()
    api.grant(voice=2)
    event = api.event("session.requested", session_id="s1", kind="voice", patient_id="p1",
                      doctor_id="d1")
    first = api.post(event)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    before = api.position()
    api.clock.advance(36 * 86400)  # replay comes before every other check, age included (I8)
    again = api.post(event)
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert api.position() == before


def test_equal_instants_written_differently_are_the_same_event(api):
    event = api.event("doctor.registered", doctor_id="d1", country="MW")
    assert api.post(event).status_code == 201
    event["occurred_at"] = T0.astimezone(timezone(timedelta(hours=2))).isoformat()
    assert event["occurred_at"] == "2026-11-02T10:00:00+02:00"
    assert api.post(event).status_code == 200


def test_concurrent_posts_of_one_event_record_it_once(api):
    api.doctor()
    api.grant(voice=3)
    event = api.event("session.requested", session_id="s1", kind="voice", patient_id="p1",
                      doctor_id="d1")
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda _: api.post(event), range(4)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({r.text for r in responses}) == 1
    assert usable_now(api.client.get("/v1/patients/p1/balance", headers=BACKEND).json(),
                      "voice") == 2


def test_failed_catch_up_does_not_fail_the_accepted_write(api, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("view store down")

    api.client.app.state.projector.catch_up = broken
    response = api.post(api.event("doctor.registered", doctor_id="d1", country="MW"))
    assert response.status_code == 201
    # the projections are applied in the background (woken by the write): its failure is logged
    for _ in range(200):
        if "catch-up failed" in caplog.text:
            break
        time.sleep(0.05)
    assert "catch-up failed" in caplog.text
    assert api.position() > 0


def test_same_event_id_with_other_body_is_409_idempotency_conflict(api):
    event = api.event("doctor.registered", doctor_id="d1", country="MW")
    assert api.post(event).status_code == 201
    before = api.position()
    event["payload"]["country"] = "ZM"
    assert_problem(api.post(event), 409, "idempotency_conflict")
    assert api.position() == before


@pytest.mark.parametrize("offset", [timedelta(minutes=5, seconds=1), -timedelta(days=35, seconds=1)])
def test_occurred_at_out_of_range_is_422(api, offset):
    before = api.position()
    response = api.post(api.event("doctor.registered", T0 + offset, doctor_id="d1", country="MW"))
    assert_problem(response, 422, "occurred_at_out_of_range")
    assert api.position() == before


@pytest.mark.parametrize("offset", [timedelta(minutes=5), -timedelta(days=35)])
def test_occurred_at_at_the_window_edges_is_accepted(api, offset):
    response = api.post(api.event("doctor.registered", T0 + offset, doctor_id="d1", country="MW"))
    assert response.status_code == 201, response.text


# ----------------------------------------------------------------------------- validation


def _doctor_event(**changes) -> dict:
    event = {"event_id": "v1", "type": "doctor.registered", "occurred_at": T0.isoformat(),
             "payload": {"doctor_id": "d1", "country": "MW"}}
    for key, value in changes.items():
        if key.startswith("payload_"):
            event["payload"][key[len("payload_"):]] = value
        else:
            event[key] = value
    return event


@pytest.mark.parametrize("body", [
    _doctor_event(occurred_at="2026-11-02T08:00:00"),  # naive
    _doctor_event(occurred_at="2026-11-02"),
    _doctor_event(occurred_at=1793606400),
    _doctor_event(occurred_at="1793606400"),
    _doctor_event(occurred_at="2026-02-30T08:00:00Z"),
    _doctor_event(event_id=""),
    _doctor_event(event_id="x" * 201),
    _doctor_event(type="doctor.unknown"),
    _doctor_event(extra="member"),
    _doctor_event(payload_extra="member"),
    _doctor_event(payload_country="mw"),
    _doctor_event(payload_country="MWI"),
    {"event_id": "v1", "type": "session.requested", "occurred_at": T0.isoformat(),
     "payload": {"session_id": "s", "kind": "chat", "patient_id": "p", "doctor_id": "d"}},
    {"event_id": "v1", "type": "withdrawal.requested", "occurred_at": T0.isoformat(),
     "payload": {"request_id": "w", "doctor_id": "d", "currency": "MWK", "amount_minor": "5"}},
    {"event_id": "v1", "type": "withdrawal.requested", "occurred_at": T0.isoformat(),
     "payload": {"request_id": "w", "doctor_id": "d", "currency": "MWK", "amount_minor": 0}},
    {"event_id": "v1", "type": "session.ended", "occurred_at": T0.isoformat(),
     "payload": {"session_id": "s", "ended_by": "nurse"}},
    {"event_id": "v1", "type": "subscription.granted", "occurred_at": T0.isoformat(),
     "payload": {"payment_reference": "r", "owner_id": "p", "starts_at": T0.isoformat(),
                 "plan": {**plan(), "seats": 0}}},
    {"event_id": "v1", "type": "subscription.granted", "occurred_at": T0.isoformat(),
     "payload": {"payment_reference": "r", "owner_id": "p", "starts_at": "2026-11-02T08:00:00",
                 "plan": plan()}},
    {"events": []},
    {"events": [_doctor_event()], "extra": 1},
    [],
    "event",
])
def test_invalid_body_is_422_validation_error_and_records_nothing(api, body):
    before = api.position()
    response = api.post(body)
    problem = assert_problem(response, 422, "validation_error")
    assert isinstance(problem["errors"], list) and problem["errors"]
    assert all({"loc", "msg", "type"} <= set(e) for e in problem["errors"])
    assert api.position() == before


def test_every_ledger_event_type_has_a_model(api):
    # The tick-only types of §10 have a model (so posting one is a 403, not a 422) and no handler.
    assert set(EVENT_TYPES) == set(api.ledger.event_types) | set(TICK_ONLY_TYPES)


# ---------------------------------------------------------------------------------- batch


def test_batch_gives_per_event_results_in_array_order(api):
    api.doctor()
    api.grant(voice=1)
    replayed = api.event("doctor.registered", event_id="ev-1", doctor_id="d1", country="MW")
    events = [
        api.event("session.requested", session_id="s1", kind="voice", patient_id="p1",
                  doctor_id="d1"),
        api.event("call.connected", session_id="nope"),
        api.event("session.requested", session_id="s2", kind="video", patient_id="p1",
                  doctor_id="d1"),  # applied after s1: same presence group → conflict
        api.event("call.ringing", session_id="s1"),
        replayed,
    ]
    response = api.client.post("/v1/events", json={"events": events}, headers=BACKEND)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["event_id"] for r in results] == [e["event_id"] for e in events]
    assert [r["status"] for r in results] == [201, 404, 409, 201, 200]
    assert results[0]["result"]["session_id"] == "s1"
    assert results[1]["problem"]["code"] == "unknown_session"
    assert results[1]["problem"]["type"] == "/problems/unknown_session"
    assert results[2]["problem"]["code"] == "session_conflict"
    assert results[3]["result"]["state"] == "ringing"
    assert results[4]["result"]["doctor_id"] == "d1"
    # read-your-writes after the batch
    assert usable_now(api.client.get("/v1/patients/p1/balance", headers=BACKEND).json(),
                      "voice") == 0


def test_batch_of_101_is_422_and_records_nothing(api):
    before = api.position()
    events = [api.event("doctor.registered", doctor_id=f"d{i}", country="MW")
              for i in range(101)]
    response = api.client.post("/v1/events", json={"events": events}, headers=BACKEND)
    assert_problem(response, 422, "validation_error")
    assert api.position() == before
    events.pop()
    response = api.client.post("/v1/events", json={"events": events}, headers=BACKEND)
    assert response.status_code == 200
    assert {r["status"] for r in response.json()["results"]} == {201}


def test_batch_limit_setting_lowers_the_ceiling(tmp_path):
    app = create_app(make_settings(tmp_path, batch_limit=2), clock=FakeClock(T0))
    with TestClient(app) as client:
        api = Api(client, FakeClock(T0))
        events = [api.event("doctor.registered", doctor_id=f"d{i}", country="MW")
                  for i in range(3)]
        response = client.post("/v1/events", json={"events": events}, headers=BACKEND)
        assert_problem(response, 422, "validation_error")
        assert api.position() == 0


def test_invalid_item_in_batch_gets_its_own_422_and_the_others_apply(api):
    events = [api.event("doctor.registered", doctor_id="d1", country="MW"),
              api.event("doctor.registered", doctor_id="d2", country="Malawi"),
              {"event_id": "bad\u0000id", "type": "doctor.registered"},
              "not an event",
              api.event("doctor.registered", doctor_id="d3", country="ZM")]
    response = api.client.post("/v1/events", json={"events": events}, headers=BACKEND)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 422, 422, 422, 201]
    assert [r["event_id"] for r in results] == ["ev-1", "ev-2", None, None, "ev-3"]
    for index in (1, 2, 3):
        problem = results[index]["problem"]
        assert problem["code"] == "validation_error" and problem["errors"]
        assert all(e["loc"][:3] == ["body", "events", index] for e in problem["errors"])
    assert "country" in results[1]["problem"]["errors"][0]["loc"]
    assert available_doctors(api) == {"d1", "d3"}


def available_doctors(api: Api) -> set[str]:
    return {d for d in ("d1", "d2", "d3")
            if api.client.get(f"/v1/doctors/{d}/wallet", headers=BACKEND).status_code == 200}


# ----------------------------------------------------------------------- business refusals


def test_insufficient_units_refuses_request_and_records_nothing(api):
    api.doctor()
    api.grant(text=1)
    before = api.position()
    response = api.post(api.event("session.requested", session_id="s1", kind="voice",
                                  patient_id="p1", doctor_id="d1"))
    assert_problem(response, 409, "insufficient_units")
    assert api.position() == before
    assert_problem(api.client.get("/v1/sessions/s1", headers=BACKEND), 404, "unknown_session")


def test_session_conflict_for_second_live_call(api):
    api.doctor()
    api.grant(voice=2, video=2)
    api.ok("session.requested", session_id="s1", kind="voice", patient_id="p1", doctor_id="d1")
    response = api.post(api.event("session.requested", session_id="s2", kind="video",
                                  patient_id="p1", doctor_id="d1"))
    assert_problem(response, 409, "session_conflict")


def test_unknown_session_and_unknown_doctor(api):
    assert_problem(api.post(api.event("session.activity", session_id="ghost")), 404,
                   "unknown_session")
    assert_problem(api.client.get("/v1/sessions/ghost", headers=AUDITOR), 404, "unknown_session")
    api.grant(voice=1)
    response = api.post(api.event("session.requested", session_id="s1", kind="voice",
                                  patient_id="p1", doctor_id="who"))
    assert_problem(response, 422, "unknown_doctor")


def test_session_settled_refuses_later_events(api):
    c = api.clock
    api.doctor()
    api.grant(voice=2)
    api.ok("session.requested", session_id="s1", kind="voice", patient_id="p1", doctor_id="d1")
    c.advance(30)
    api.ok("call.connected", session_id="s1")
    c.advance(120)
    api.ok("session.ended", session_id="s1", ended_by="patient")
    c.advance(11 * 60)
    assert steps(api.tick()) == [("s1", "settle", None, 1, None, None)]
    before = api.position()
    response = api.post(api.event("session.ended", c() - timedelta(minutes=12), session_id="s1",
                                  ended_by="system", reason="idle_timeout"))
    assert_problem(response, 409, "session_settled")
    assert api.position() == before


def test_payment_conflict_for_regrant_with_other_content(api):
    first = api.grant(voice=2)
    again = api.grant(voice=2)  # same reference, same content: a no-op with the same pool
    assert again["pool_id"] == first["pool_id"]
    response = api.post(api.event("subscription.granted", payment_reference="pay1",
                                  owner_id="p1", plan=plan(voice=3),
                                  starts_at=(T0 - timedelta(days=1)).isoformat()))
    assert_problem(response, 409, "payment_conflict")


def test_insufficient_funds_carries_its_extension_member(api):
    response = api.post(api.event("withdrawal.requested", request_id="w1", doctor_id="d1",
                                  currency="MWK", amount_minor=10_000_000))
    problem = assert_problem(response, 409, "insufficient_funds")
    assert problem["available_minor"] == 0


def test_unexpected_error_is_500_problem_without_trace(tmp_path):
    app = create_app(make_settings(tmp_path), clock=FakeClock(T0))
    with TestClient(app, raise_server_exceptions=False) as client:
        def boom(*args, **kwargs):
            raise RuntimeError("secret internals")
        client.app.state.ledger.session_with_events = boom
        response = client.get("/v1/sessions/s1", headers=BACKEND)
        problem = assert_problem(response, 500, "internal_error")
        assert "secret" not in response.text and "Traceback" not in response.text
        assert problem["instance"] == "/v1/sessions/s1"


def test_unknown_route_and_method_are_problems(api):
    assert_problem(api.client.get("/v1/nothing", headers=BACKEND), 404, "not_found")
    assert_problem(api.client.delete("/v1/events", headers=BACKEND), 405, "method_not_allowed")


# ---------------------------------------------------------------------------- ticks, clock


def test_admin_tick_defaults_to_now_and_refuses_far_future(api):
    report = api.tick()
    assert report["as_of"] == T0.isoformat()
    assert set(report) == {"as_of", "steps", "expired", "failed", "consultations", "counts",
                           "conflicts", "more"}
    assert api.tick(T0 + timedelta(minutes=5))["as_of"] == (T0 + timedelta(minutes=5)).isoformat()
    response = api.client.post("/v1/ticks", json={"as_of": (T0 + timedelta(minutes=6))
                                                  .isoformat()}, headers=ADMIN)
    assert_problem(response, 422, "as_of_out_of_range")
    response = api.client.post("/v1/ticks", json={"as_of": "2026-11-02T08:00:00"}, headers=ADMIN)
    assert_problem(response, 422, "validation_error")


def test_tick_ends_unconnected_call_as_missed(api):
    api.doctor()
    api.grant(voice=1)
    api.ok("session.requested", session_id="s1", kind="voice", patient_id="p1", doctor_id="d1")
    api.clock.advance(90 + 60)
    report = api.tick()
    assert steps(report) == [("s1", "end", None, 0, None, "missed")]
    assert report["steps"][0]["ended_at"] == (T0 + timedelta(seconds=90)).isoformat()
    session = api.client.get("/v1/sessions/s1", headers=BACKEND).json()
    assert session["state"] == "ended" and session["end_reason"] == "missed"
    assert usable_now(api.client.get("/v1/patients/p1/balance", headers=BACKEND).json(),
                      "voice") == 0  # still held until settlement releases it


def test_manual_clock_moves_forward_only(tmp_path):
    app = create_app(make_settings(tmp_path))
    with TestClient(app) as client:
        assert isinstance(client.app.state.clock, ManualClock)
        now = client.get("/v1/clock", headers=AUDITOR).json()
        assert now["manual"] is True
        later = "2099-01-01T00:00:00Z"
        response = client.put("/v1/clock", json={"now": later}, headers=ADMIN)
        assert response.status_code == 200
        assert response.json() == {"now": "2099-01-01T00:00:00+00:00"}
        response = client.put("/v1/clock", json={"now": "2030-01-01T00:00:00Z"}, headers=ADMIN)
        assert response.json() == {"now": "2099-01-01T00:00:00+00:00"}
        assert_problem(client.put("/v1/clock", json={"now": "2099-01-02"}, headers=ADMIN),
                       422, "validation_error")
        assert_problem(client.put("/v1/clock", json={"now": later}, headers=BACKEND),
                       403, "forbidden")


def test_system_clock_cannot_be_set(tmp_path):
    app = create_app(make_settings(tmp_path, clock="system"))
    with TestClient(app) as client:
        assert isinstance(client.app.state.clock, SystemClock)
        response = client.put("/v1/clock", json={"now": "2099-01-01T00:00:00Z"}, headers=ADMIN)
        assert_problem(response, 409, "clock_not_manual")


def test_lifespan_starts_and_stops_the_scheduler_when_enabled(tmp_path):
    pytest.importorskip("scheduler.jobs")
    app = create_app(make_settings(tmp_path, tick_enabled=True, tick_seconds=3600),
                     clock=FakeClock(T0))
    with TestClient(app) as client:
        assert app.state.scheduler is not None
        assert client.get("/healthz").status_code == 200
    assert app.state.scheduler is None


def test_lifespan_closes_everything(tmp_path):
    app = create_app(make_settings(tmp_path), clock=FakeClock(T0))
    with TestClient(app):
        assert app.state.ledger is not None
        assert isinstance(app.state.projector, Projector)
    assert app.state.ledger is None and app.state.projector is None


# ------------------------------------------------------------------------------- OpenAPI


def test_openapi_documents_problem_json_and_event_union(api):
    schema = api.client.get("/openapi.json").json()
    assert "Problem" in schema["components"]["schemas"]
    post = schema["paths"]["/v1/events"]["post"]
    for status in ("401", "403", "409", "422"):
        assert "application/problem+json" in post["responses"][status]["content"]
        assert "application/json" not in post["responses"][status]["content"]
    for model in ("SessionRequestedEvent", "SubscriptionGrantedEvent", "EventBatch"):
        assert model in schema["components"]["schemas"]
    timestamp = schema["components"]["schemas"]["DoctorRegisteredEvent"]["properties"][
        "occurred_at"]
    assert timestamp["type"] == "string" and timestamp["format"] == "date-time"
    # the window, so that a schema-valid request is not refused by surprise (issue 9 §4)
    assert "2000-01-01T00:00:00Z" in timestamp["description"]
    assert "now − 35 days, now + 5 minutes" in timestamp["description"]
    assert "occurred_at_out_of_range" in timestamp["description"]
    doctor_id = schema["components"]["schemas"]["DoctorPayload"]["properties"]["doctor_id"]
    assert doctor_id["pattern"] == ID_PATTERN and doctor_id["maxLength"] == 200
    tick = schema["components"]["schemas"]["TickRequest"]["properties"]["as_of"]
    assert "as_of_out_of_range" in json.dumps(tick)
    assert api.client.get("/docs").status_code == 200


# ------------------------------------------------------------ the direct route of POST /v1/events


def _raw(event: dict) -> bytes:
    return json.dumps(event).encode()


_DOCTOR = _raw(_doctor_event(event_id="d-1"))
_DIRECT_CASES = [  # (headers, body), posted in this order to each app
    (BACKEND, _DOCTOR),
    (BACKEND, _DOCTOR),  # a replay: 200, Idempotent-Replayed
    (BACKEND, _raw(_doctor_event(event_id="d-1", payload_country="ZM"))),  # 409
    (AUDITOR, _raw(_doctor_event(event_id="d-2"))),  # 403 from the route's dependency
    ({"Authorization": "Bearer k-auditor", "X-API-Key": "k-backend"}, _raw(_doctor_event(
        event_id="d-3"))),
    (ADMIN, _raw({"event_id": "g-1", "type": "subscription.granted",
                  "occurred_at": "2026-11-02T10:00:00.5+02:00",
                  "payload": {"payment_reference": "pay1", "owner_id": "p1",
                              "starts_at": (T0 - timedelta(days=1)).isoformat(),
                              "plan": plan(voice=2)}})),
    (BACKEND, _raw({"event_id": "s-1", "type": "session.requested",
                    "occurred_at": T0.isoformat(), "payload": {
                        "session_id": "s1", "kind": "voice", "patient_id": "p1",
                        "doctor_id": "v1"}})),  # unknown doctor
    (BACKEND, _raw({"events": [_doctor_event(event_id="b-1", payload_doctor_id="d9"),
                               _doctor_event(event_id="b-2", payload_country="Malawi"),
                               "not an event", _doctor_event(event_id="d-1")]})),
    (BACKEND, _raw({"events": []})),
    (BACKEND, b'{"event_id": "x-1", "event_id": "x-2", "type": "doctor.registered", '
              b'"occurred_at": "2026-11-02T08:00:00Z", '
              b'"payload": {"doctor_id": "d5", "country": "MW"}}'),  # duplicate member
    (BACKEND, b'\xef\xbb\xbf' + _raw(_doctor_event(event_id="bom"))),  # only json.loads reads it
    (BACKEND, _raw(_doctor_event(event_id="e\ud800"))),  # a lone surrogate
    (BACKEND, b'{"event_id": "nan", "type": "withdrawal.requested", "occurred_at": '
              b'"2026-11-02T08:00:00Z", "payload": {"request_id": "w", "doctor_id": "d", '
              b'"currency": "MWK", "amount_minor": NaN}}'),
    (BACKEND, _DOCTOR + b" x"),  # trailing bytes
    (BACKEND, b"{not json"),
    (BACKEND, b"\xff\xfe"),
    (BACKEND, b'{"event_id": "\xff"}'),  # not UTF-8: json.loads fails to decode it (400)
    (BACKEND, b""),
    (BACKEND, _raw(_doctor_event(event_id="late", occurred_at="2026-09-01T00:00:00Z"))),
    (BACKEND, _raw(_doctor_event(event_id="sec", occurred_at="2026-11-02T08:00:00.999Z"))),
]


def _answers(tmp_path, name: str, content_type: str) -> tuple[list, int]:
    app = create_app(make_settings(tmp_path / name), clock=FakeClock(T0))
    front = next(m for m in app.user_middleware if m.cls.__name__ == "Front")
    direct, taken = front.kwargs["direct"], []

    async def counted(scope, body, send):
        answered = await direct(scope, body, send)
        taken.append(answered)
        return answered

    front.kwargs["direct"] = counted
    answers = []
    with TestClient(app) as client:
        for headers, body in _DIRECT_CASES:
            response = client.post("/v1/events", content=body,
                                   headers={**headers, "content-type": content_type})
            answers.append((response.status_code, response.content, sorted(
                (k, v) for k, v in response.headers.items() if k != "x-request-id")))
    return answers, sum(taken)


def test_the_direct_route_answers_exactly_as_the_route(tmp_path):
    """`Content-Type: application/json` takes the direct route (api/routes.py
    `post_events_direct`) when it can; with a charset parameter the same body goes through
    FastAPI's route. Every answer (status, body bytes, headers) is the same."""
    (tmp_path / "direct").mkdir()
    (tmp_path / "route").mkdir()
    direct, taken = _answers(tmp_path, "direct", "application/json")
    routed, not_taken = _answers(tmp_path, "route", "application/json; charset=utf-8")
    assert not_taken == 0 and taken == 9  # the valid bodies of a role that may post
    for case, (one, other) in enumerate(zip(direct, routed)):
        assert one == other, (case, one, other)
    assert [status for status, _, _ in direct] == [
        201, 200, 409, 403, 403, 201, 422, 200, 422, 201, 201, 422, 422, 422, 422, 422, 400,
        422, 422, 201]
