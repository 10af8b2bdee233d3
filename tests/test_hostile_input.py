"""Hostile input never stops billing and never becomes money (issue 9 §1, §2, §4), on SQLite and
PostgreSQL.

Every case posts what a hostile or careless client would — U+0000 and other control characters
in every id and text field of every event type, ids outside the alphabet, bad path parameters,
provider callbacks naming such rooms and people, instants at year 1 and 9999 ± 14 hours and
outside their windows — and asserts a 4xx `application/problem+json` with a stable, registered
code, and that nothing changed: the event count, a patient's balance, a doctor's wallet and a
live session read the same before and after. After the barrage the projections catch up and a
tick runs, and a valid event is still billed (the failure issue 9 found: one accepted NUL stalled
every projection and every tick on PostgreSQL).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest

from api.schemas import EVENT_TYPES
from conftest import T0
from ledger.errors import ERROR_CODES
from test_api import (ADMIN, AUDITOR, BACKEND, PROBLEM, assert_problem, make_settings, plan,
                      running_api)
from test_providers import (CONFIGURED, livekit_post, rfc2822, twilio_post, video_form,
                            voice_form)

START = T0 + timedelta(minutes=1)  # within the 90-second ring timeout
DAY = timedelta(days=1)

# Values no id may take: control characters (U+0000 first: PostgreSQL text cannot hold it), a lone
# surrogate, characters outside the alphabet, and one character too many.
CONTROL = ["bad\x00id", "\x00", "tab\there", "new\nline", "esc\x1b[0m", "del\x7f", "nel\x85",
           "lone\ud800"]
NOT_AN_ID = ["with space", "sl/ash", "per%cent", "hash#1", "q?x", "é", "x" * 201, ""]
TEXT_FIELDS = {("payload", "plan", "name"), ("payload", "reason")}


@pytest.fixture
def api(tmp_path, store_url):
    """The API on SQLite and on PostgreSQL, providers configured, with a doctor d1 (MW), patient
    p1's pool `pay1` (text 3, voice 5), a connected call s1 and an appointment a1."""
    for harness in running_api(make_settings(tmp_path, database_url=store_url, **CONFIGURED)):
        harness.doctor()
        harness.grant(text=3, voice=5)
        harness.ok("session.requested", T0, session_id="s1", kind="voice", patient_id="p1",
                   doctor_id="d1")
        harness.ok("call.connected", START, session_id="s1")
        harness.ok("appointment.booked", START, appointment_id="a1", patient_id="p1",
                   doctor_id="d1", kind="voice", starts_at=(T0 + DAY).isoformat())
        harness.clock.set(START + timedelta(minutes=1))
        yield harness


def state(api) -> dict:
    """What must not move: the event count and everything the reads say."""
    reads = {path: api.client.get(path, headers=AUDITOR).json() for path in (
        "/v1/patients/p1/balance", "/v1/doctors/d1/wallet", "/v1/sessions/s1",
        "/v1/appointments/a1")}
    return {"events": api.position(), **reads}


def post(api, body: Any, path: str = "/v1/events"):
    """POST `body` as JSON with every non-ASCII character escaped (\\ud800 included, which
    httpx cannot encode), as a client in another language might send it."""
    return api.client.post(path, content=json.dumps(body).encode(),
                           headers={**BACKEND, "Content-Type": "application/json"})


def refused(response, status: int | None = None, code: str | None = None) -> dict:
    """A 4xx problem+json with a registered code (and this status and code, if given)."""
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == PROBLEM, response.text
    body = response.json()
    assert body["code"] in ERROR_CODES and body["status"] == response.status_code
    if status is not None:
        assert_problem(response, status, code)
    return body


# ------------------------------------------------------------------------- every field


def templates() -> dict[str, dict]:
    """A payload of every event type with every field present (optional ones too)."""
    later = (T0 + DAY).isoformat()
    session, appointment = {"session_id": "s1"}, {"appointment_id": "a1"}
    withdrawal = {"request_id": "w1", "doctor_id": "d1", "currency": "MWK"}
    return {
        "doctor.registered": {"doctor_id": "d9", "country": "MW"},
        "doctor.country_changed": {"doctor_id": "d1", "country": "ZM"},
        "subscription.granted": {"payment_reference": "pay9", "owner_id": "p9",
                                 "plan": plan(text=1), "starts_at": T0.isoformat()},
        "payment.refunded": {"payment_reference": "pay1"},
        "member.added": {"payment_reference": "pay1", "patient_id": "p8"},
        "member.removed": {"payment_reference": "pay1", "patient_id": "p8"},
        "session.requested": {"session_id": "s9", "kind": "text", "patient_id": "p1",
                              "doctor_id": "d1"},
        **{t: session for t in ("session.patient_message", "text.activated", "call.ringing",
                                "call.connected", "call.declined", "session.activity")},
        "session.ended": {**session, "ended_by": "patient", "reason": "completed"},
        "call.participant_joined": {**session, "participant": "p1", "provider": "livekit"},
        "call.participant_left": {**session, "participant": "p1", "provider": "livekit"},
        "call.room_ended": {**session, "provider": "livekit"},
        "appointment.booked": {"appointment_id": "a9", "patient_id": "p1", "doctor_id": "d1",
                               "kind": "voice", "starts_at": later, "duration_minutes": 30},
        **{t: appointment for t in ("appointment.confirmed", "appointment.join_window_opened",
                                    "appointment.expired")},
        "appointment.linked": {**appointment, **session},
        "appointment.cancelled": {**appointment, "cancelled_by": "patient", "reason": "ill"},
        "appointment.no_show": {**appointment, "absent": "patient"},
        "withdrawal.requested": {**withdrawal, "amount_minor": 5_000_000},
        "withdrawal.completed": withdrawal,
        "withdrawal.rejected": {**withdrawal, "reason": "bank refused"},
        **marketplace_templates(later),
    }


def marketplace_templates(later: str) -> dict[str, dict]:
    """The priced consultations' event types (billing-rules §10), every field present."""
    consultation, admin = {"consultation_id": "c1"}, {"admin_id": "ops-1", "reason": "support"}
    return {
        "wallet.topped_up": {"patient_id": "p1", "currency": "INR", "amount_minor": 118_000,
                             "payment_reference": "rzp-1", "provider": "razorpay"},
        "wallet.refunded_to_source": {"refund_id": "r1", "payment_reference": "rzp-1",
                                      "amount_minor": 1, **admin},
        "wallet.payment_reversed": {"payment_reference": "rzp-1", "amount_minor": 1,
                                    "reason": "chargeback"},
        "price_list.published": {"practitioner_id": "d1", "version": "v1", "currency": "INR",
                                 "tax_bps": 1800, "share_bps": 5000, "effective_from": later,
                                 "fees": [{"consultation_type": "individual",
                                           "duration_minutes": 50, "fee_minor": 100_000}]},
        "consultation.booked": {**consultation, "patient_id": "p1", "practitioner_id": "d1",
                                "consultation_type": "individual", "mode": "video",
                                "start": later, "duration_minutes": 50},
        "consultation.activated": {**consultation, "admin_id": "ops-1"},
        "consultation.joined": {**consultation, "participant": "patient"},
        "consultation.ended": {**consultation, "ended_by": "patient"},
        "consultation.cancelled": {**consultation, "reason": "rescheduling"},
        "consultation.declined": {**consultation, "reason": "unwell"},
        "consultation.admin_cancelled": {**consultation, **admin},
        "consultation.refunded": {**consultation, **admin},
        **{t: consultation for t in ("consultation.confirmed", "consultation.completed",
                                     "consultation.no_show", "consultation.expired",
                                     "consultation.earning_released")},
    }


def string_fields(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Paths of every string leaf of an event body (but `type`, the discriminator)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if path or key != "type":
                yield from string_fields(item, (*path, key))
    elif isinstance(value, str):
        yield path


def replaced(event: dict, path: tuple, value: str) -> dict:
    body = json.loads(json.dumps(event))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


def test_the_templates_cover_every_event_type_and_field():
    from api.schemas import PAYLOADS

    assert set(templates()) == set(EVENT_TYPES)
    for event_type, payload in templates().items():
        assert set(payload) == set(PAYLOADS[event_type].model_fields), event_type


def test_every_id_and_text_field_of_every_event_type_refuses_hostile_values(api):
    before = state(api)
    tried = 0
    for event_type, payload in templates().items():
        event = {"event_id": f"hostile-{event_type}", "type": event_type,
                 "occurred_at": api.clock().isoformat(), "payload": payload}
        for path in string_fields(event):
            values = CONTROL if path in TEXT_FIELDS else CONTROL + NOT_AN_ID
            for value in values:
                response = post(api, replaced(event, path, value))
                problem = refused(response, 422, "validation_error")
                locs = [tuple(e["loc"][-len(path):]) for e in problem["errors"]]
                assert path in locs, (event_type, path, value, problem["errors"])
                tried += 1
    assert tried > 1000
    assert state(api) == before
    still_billing(api)


def test_a_batch_answers_each_hostile_item_and_applies_the_others_in_order(api):
    before = state(api)
    good = api.event("doctor.registered", doctor_id="d7", country="KE")
    events = [api.event("doctor.registered", doctor_id="bad\x00doctor", country="MW"), good,
              replaced(good, ("event_id",), "evt\x00dup"),
              api.event("session.ended", session_id="s1", ended_by="patient", reason="a\x00b")]
    events.append(replaced(good, ("payload", "doctor_id"), "lone\ud800"))
    response = post(api, {"events": events})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [422, 201, 422, 422, 422]
    assert [r["event_id"] for r in results] == [events[0]["event_id"], good["event_id"], None,
                                                events[3]["event_id"], good["event_id"]]
    assert all(r["problem"]["code"] == "validation_error" for r in results if r["status"] == 422)
    assert api.position() > before["events"]  # the valid item, and only it, was recorded
    assert {k: v for k, v in state(api).items() if k != "events"} == \
        {k: v for k, v in before.items() if k != "events"}
    still_billing(api)


@pytest.mark.parametrize("template", [
    "/v1/sessions/{}", "/v1/appointments/{}", "/v1/patients/{}/balance", "/v1/doctors/{}/wallet"])
def test_path_parameters_follow_the_same_rule(api, template):
    before = state(api)
    for raw in ("%00", "bad%00id", "%0A", "%7F", "%C2%85", "a%20b", "x" * 201, "%C3%A9"):
        refused(api.client.get(template.format(raw), headers=AUDITOR), 422, "validation_error")
    refused(api.client.get(template.format("a%2Fb"), headers=AUDITOR))  # another route: 404
    assert state(api) == before
    still_billing(api)


def test_unknown_patients_and_doctors_read_as_404_not_as_empty_accounts(api):
    refused(api.client.get("/v1/patients/p404/balance", headers=AUDITOR), 404, "unknown_patient")
    refused(api.client.get("/v1/doctors/d404/wallet", headers=AUDITOR), 404, "unknown_doctor")
    assert api.client.get("/v1/doctors/d1/wallet", headers=AUDITOR).status_code == 200
    assert api.client.get("/v1/patients/p1/balance", headers=AUDITOR).status_code == 200


# ------------------------------------------------------------------------------ webhooks


def test_provider_callbacks_naming_what_no_event_may_carry_are_refused(api):
    before = state(api)
    at = START + timedelta(seconds=30)
    for room, identity in (("call_s1\x00x", "p1"), ("call_s1", "p1\x00"), ("call_s 1", "p1"),
                           ("call_s1", "p1\x1b")):
        body = json.dumps({"event": "participant_joined", "id": "EV_x",
                           "createdAt": str(int(at.timestamp())),
                           "room": {"sid": "RM_1", "name": room},
                           "participant": {"sid": "PA_1", "identity": identity}})
        refused(livekit_post(api, body), 422, "validation_error")
        form = video_form("participant-connected", at, identity, room=room)
        refused(twilio_post(api, "/webhooks/twilio/video", form), 422, "validation_error")
    for session_id in ("s1%00", "s1%0A", "s%201"):
        refused(twilio_post(api, "/webhooks/twilio/voice", voice_form("ringing", at),
                            query=f"session_id={session_id}"), 422, "validation_error")
    assert state(api) == before
    still_billing(api)


@pytest.mark.parametrize("timestamp", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00",
                                       "1999-12-31T23:59:59Z", "2100-01-01T00:00:00Z"])
def test_provider_timestamps_outside_the_instant_window_are_422(api, timestamp):
    before = state(api)
    form = video_form("participant-connected", START, "p1")
    form["Timestamp"] = timestamp
    refused(twilio_post(api, "/webhooks/twilio/video", form), 422, "validation_error")
    voice = voice_form("in-progress", START)
    moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    voice["Timestamp"] = f"{moment:%a, %d %b %Y %H:%M:%S} {moment:%z}"
    response = twilio_post(api, "/webhooks/twilio/voice", voice, query="session_id=s1")
    # RFC 2822 reads year 0001 as 2001 (two-digit years): then the event's own window refuses it
    assert refused(response)["code"] in ("validation_error", "occurred_at_out_of_range")
    assert response.status_code == 422
    assert state(api) == before


@pytest.mark.parametrize("created_at", ["253402300800", "99999999999999999", "946684799"])
def test_livekit_times_outside_the_instant_window_are_422(api, created_at):
    before = state(api)
    body = json.dumps({"event": "participant_joined", "id": "EV_t", "createdAt": created_at,
                       "room": {"sid": "RM_1", "name": "call_s1"},
                       "participant": {"sid": "PA_1", "identity": "p1"}})
    refused(livekit_post(api, body), 422, "validation_error")
    assert state(api) == before


# ------------------------------------------------------------------------------ instants


def _grant(starts_at: str, occurred_at: str | None = None, **_) -> tuple[str, dict, str | None]:
    return "subscription.granted", {"payment_reference": "pay-i", "owner_id": "p1",
                                    "plan": plan(text=1), "starts_at": starts_at}, occurred_at


def _booking(starts_at: str, occurred_at: str | None = None) -> tuple[str, dict, str | None]:
    return "appointment.booked", {"appointment_id": "a-i", "patient_id": "p1", "doctor_id": "d1",
                                  "kind": "text", "starts_at": starts_at}, occurred_at


def _doctor(occurred_at: str) -> tuple[str, dict, str | None]:
    return "doctor.registered", {"doctor_id": "d-i", "country": "MW"}, occurred_at


INSTANT_CASES = [
    # the examples: each answered 500 before
    (_doctor("0001-01-01T00:00:00+14:00"), "validation_error"),
    (_doctor("9999-12-31T23:59:59-14:00"), "validation_error"),
    (_grant("9999-12-31T23:59:59Z"), "validation_error"),
    (_booking("0001-01-01T00:00:00Z"), "validation_error"),
    # the absolute window, and each field's own
    (_doctor("0001-01-01T00:00:00Z"), "validation_error"),
    (_doctor("1999-12-31T23:59:59Z"), "validation_error"),
    (_doctor("2100-01-01T00:00:00Z"), "validation_error"),
    (_doctor((T0 - 40 * DAY).isoformat()), "occurred_at_out_of_range"),
    (_doctor((START + timedelta(minutes=7)).isoformat()), "occurred_at_out_of_range"),
    (_grant("2000-01-01T00:00:00Z"), "instant_out_of_range"),
    (_grant((T0 + 367 * DAY).isoformat()), "instant_out_of_range"),
    (_booking((T0 - 367 * DAY).isoformat()), "instant_out_of_range"),
    (_booking("2099-12-31T23:59:59Z"), "instant_out_of_range"),
]


@pytest.mark.parametrize("case, code", INSTANT_CASES,
                         ids=[f"{c[0]}-{c[2] or c[1].get('starts_at')}" for c, _ in INSTANT_CASES])
def test_instants_outside_their_window_are_422_with_a_stable_code(api, case, code):
    event_type, payload, occurred_at = case
    before = state(api)
    event = api.event(event_type, occurred_at or api.clock(), **payload)
    refused(api.post(event), 422, code)
    response = api.client.post("/v1/events", json={"events": [event]}, headers=BACKEND)
    assert response.json()["results"][0]["problem"]["code"] == code  # the same in a batch
    assert state(api) == before


def test_payload_instants_at_the_edges_of_their_window_are_accepted(api):
    at = api.clock()
    api.ok("subscription.granted", payment_reference="edge-1", owner_id="p5",
           plan=plan(text=1), starts_at=(at - 366 * DAY).isoformat())
    api.ok("appointment.booked", appointment_id="edge-a", patient_id="p1", doctor_id="d1",
           kind="text", starts_at=(at + 366 * DAY).isoformat())


@pytest.mark.parametrize("as_of, code", [
    ("0001-01-01T00:00:00Z", "validation_error"), ("9999-12-31T23:59:59-14:00", "validation_error"),
    ((T0 - 36 * DAY).isoformat(), "as_of_out_of_range"),
    ((START + timedelta(minutes=7)).isoformat(), "as_of_out_of_range")])
def test_tick_as_of_outside_its_window_is_422(api, as_of, code):
    before = state(api)
    refused(api.client.post("/v1/ticks", json={"as_of": as_of}, headers=ADMIN), 422, code)
    assert state(api) == before


def test_the_manual_clock_cannot_be_set_outside_the_instant_window(api):
    refused(api.client.put("/v1/clock", json={"now": "9999-12-31T23:59:59Z"}, headers=ADMIN),
            422, "validation_error")
    assert api.client.get("/v1/clock", headers=AUDITOR).json()["now"] < "2100"


# --------------------------------------------------------------------------- refusals say


def standing(api, session_id: str = "s1") -> tuple:
    """What GET /v1/sessions/{id} says: (session_id, state, ended_at, paid_until)."""
    s = api.client.get(f"/v1/sessions/{session_id}", headers=AUDITOR).json()
    return s["session_id"], s["state"], s["ended_at"], s["paid_until"]


def members(problem: dict) -> tuple:
    return tuple(problem[k] for k in ("session_id", "state", "ended_at", "paid_until"))


def test_session_refusals_carry_the_session_standing(api):
    # session_conflict names the live call s1
    response = api.post(api.event("session.requested", session_id="s2", kind="video",
                                  patient_id="p1", doctor_id="d1"))
    body = refused(response, 409, "session_conflict")
    assert members(body) == standing(api) == ("s1", "active", None,
                                              (START + timedelta(minutes=20)).isoformat())
    # the same session id requested again (another event id): session_exists, naming it
    body = refused(api.post(api.event("session.requested", session_id="s1", kind="voice",
                                      patient_id="p1", doctor_id="d1")), 409, "session_exists")
    assert members(body) == standing(api)
    # the call idles out at START + 15 min; a later start or activity is session_ended
    api.clock.set(START + timedelta(minutes=17))
    api.tick()
    body = refused(api.post(api.event("session.activity", session_id="s1")), 409,
                   "session_ended")
    assert members(body) == standing(api)
    assert body["state"] == "ended"
    assert body["ended_at"] == (START + timedelta(minutes=15)).isoformat()
    # settled: session_settled, with the same members
    api.clock.set(START + timedelta(minutes=30))
    api.tick()
    body = refused(api.post(api.event("session.ended", session_id="s1", ended_by="patient")),
                   409, "session_settled")
    assert members(body) == standing(api)
    assert body["state"] == "settled"


def test_an_end_report_after_a_recorded_timeout_says_the_timeout_stands(api):
    api.clock.set(START + timedelta(minutes=17))
    steps = api.tick()["steps"]
    assert [(s["action"], s["block"], s["reason"]) for s in steps] == [
        ("charge", 1, None), ("end", None, "idle_timeout")]
    assert steps[1]["ended_at"] == (START + timedelta(minutes=15)).isoformat()
    result = api.ok("session.ended", session_id="s1", ended_by="doctor", reason="completed")
    assert result["end_recorded"] is False
    assert result["standing_end"]["ended_at"] == (START + timedelta(minutes=15)).isoformat()
    assert result["standing_end"]["reason"] == "idle_timeout"
    assert result["standing_end"]["ended_by"] == "system"
    assert "final" in result["standing_end"]["note"]
    assert (result["ended_at"], result["reason"]) == (result["standing_end"]["ended_at"],
                                                      "idle_timeout")


def test_withdrawal_minimums_are_settings(tmp_path, store_url):
    settings = make_settings(tmp_path, database_url=store_url,
                             withdrawal_minimums={"MWK": 100_000})
    for harness in running_api(settings):
        harness.doctor()
        before = harness.position()
        body = refused(harness.post(harness.event(
            "withdrawal.requested", request_id="w1", doctor_id="d1", currency="MWK",
            amount_minor=99_999)), 422, "withdrawal_below_minimum")
        assert (body["minimum_minor"], body["currency"]) == (100_000, "MWK")
        refused(harness.post(harness.event(
            "withdrawal.requested", request_id="w2", doctor_id="d1", currency="MWK",
            amount_minor=100_000)), 409, "insufficient_funds")  # at the minimum: funds decide
        assert harness.position() == before


# --------------------------------------------------------------------------- still billing


def still_billing(api) -> None:
    """After the barrage: the projections catch up, a tick runs and a new grant is usable."""
    api.tick()
    lag = api.client.get("/v1/projections", headers=AUDITOR).json()["lag"]
    assert all(v == 0 for v in lag.values()), lag
    api.ok("subscription.granted", payment_reference=f"after-{api.n}", owner_id="p-after",
           plan=plan(text=2), starts_at=(api.clock() - DAY).isoformat())
    balance = api.client.get("/v1/patients/p-after/balance", headers=AUDITOR).json()
    assert balance["pools"] and balance["buckets"]["text"]["usable_now"] == 2 * len(balance["pools"])
