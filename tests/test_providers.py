"""Signed provider webhooks (issue 4): Twilio Voice, Twilio Video and LiveKit → ledger events.

Signatures are made by the providers' own libraries (twilio's RequestValidator, livekit-api's
AccessToken). Requests reach the app at http://testserver while Twilio signed the public URL, as
behind the production proxy. Billing is checked end to end: webhooks, then ticks on the manual
clock until the session settles, then the session, patient balance and doctor wallet.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from itertools import count

import pytest
from livekit.api import AccessToken
from twilio.request_validator import RequestValidator

from api.providers import PROVIDERS
from api.providers.base import content_id, provider_time, session_of_room
from conftest import T0
from test_api import AUDITOR, BACKEND, assert_problem, make_settings, running_api, usable_now

PUBLIC = "https://ledger.example.org"
TWILIO_TOKEN = "twilio-auth-token-for-tests"
LK_KEY, LK_SECRET = "lk-api-key", "lk-api-secret-at-least-thirty-two-bytes-long"
CONFIGURED = {"public_base_url": PUBLIC, "twilio_auth_token": TWILIO_TOKEN,
              "livekit_api_key": LK_KEY, "livekit_api_secret": LK_SECRET}
START = T0 + timedelta(minutes=2)  # both participants in the room: the billable start
MIN = timedelta(minutes=1)
_ids = count(1)
serving = contextmanager(running_api)  # `with serving(settings) as api:` for a second app


@pytest.fixture
def api(tmp_path):
    yield from running_api(make_settings(tmp_path, **CONFIGURED))


def open_call(api, kind: str = "video", session_id: str = "s1") -> None:
    """Doctor d1 (MW), patient p1 with 5 units of each call kind, a requested call at T0."""
    api.doctor()
    api.grant(voice=5, video=5)
    api.ok("session.requested", T0, session_id=session_id, kind=kind, patient_id="p1",
           doctor_id="d1")


def session(api, session_id: str = "s1") -> dict:
    response = api.client.get(f"/v1/sessions/{session_id}", headers=AUDITOR)
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------------ Twilio signing


def twilio_post(api, path: str, form: dict, *, query: str = "", signed_base: str = PUBLIC,
                tampered: dict | None = None, headers: dict | None = None, sign: bool = True):
    """POST `form` (or `tampered`, after signing `form`) to `path?query`, signed as Twilio signs
    the URL it called: `signed_base` + path + query."""
    suffix = f"?{query}" if query else ""
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(signed_base + path + suffix, form)
    sent = {**form, **(tampered or {})}
    all_headers = {"X-Twilio-Signature": signature} if sign else {}
    return api.client.post(path + suffix, data=sent, headers={**all_headers, **(headers or {})})


def rfc2822(moment: datetime) -> str:
    return format_datetime(moment.astimezone(timezone.utc), usegmt=False)


def voice_form(status: str, at: datetime, call_sid: str = "CA1") -> dict:
    form = {"AccountSid": "AC1", "CallSid": call_sid, "CallStatus": status,
            "Timestamp": rfc2822(at), "SequenceNumber": "0"}
    if status == "completed":
        form["CallDuration"] = "1500"
    return form


def voice(api, status: str, at: datetime, session_id: str = "s1", **kwargs):
    return twilio_post(api, "/webhooks/twilio/voice", voice_form(status, at),
                       query=f"session_id={session_id}", **kwargs)


def video_form(event: str, at: datetime, identity: str | None = None,
               room: str = "call_s1") -> dict:
    form = {"AccountSid": "AC1", "RoomName": room, "RoomSid": "RM1", "RoomType": "group",
            "RoomStatus": "completed" if event == "room-ended" else "in-progress",
            "StatusCallbackEvent": event, "SequenceNumber": "3",
            "Timestamp": at.strftime("%Y-%m-%dT%H:%M:%S.123Z")}
    if identity is not None:
        status = "disconnected" if event.endswith("disconnected") else "connected"
        form |= {"ParticipantIdentity": identity, "ParticipantSid": f"PA{identity}",
                 "ParticipantStatus": status}
    return form


# ----------------------------------------------------------------------- LiveKit signing


def livekit_body(event: str, at: datetime, identity: str | None = None,
                 room: str = "call_s1", event_id: str | None = None) -> str:
    message = {"event": event, "id": event_id or f"EV_{next(_ids)}",
               "createdAt": str(int(at.timestamp())),
               "room": {"sid": "RM_1", "name": room}}
    if identity is not None:
        message["participant"] = {"sid": f"PA_{identity}", "identity": identity}
    return json.dumps(message)


def livekit_post(api, body: str, *, sent: str | None = None, secret: str = LK_SECRET,
                 authorization: str | None = None, ttl: timedelta = timedelta(minutes=5)):
    """POST `sent` (default `body`) with a LiveKit token carrying the SHA-256 of `body`."""
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    token = AccessToken(LK_KEY, secret).with_sha256(digest).with_ttl(ttl).to_jwt()
    headers = {"Content-Type": "application/webhook+json",
               "Authorization": token if authorization is None else authorization}
    if authorization == "":
        del headers["Authorization"]
    return api.client.post("/webhooks/livekit", content=(sent or body).encode(), headers=headers)


# -------------------------------------------------------------------- presence scenarios


@dataclass(frozen=True)
class Report:
    """One presence callback in provider-neutral terms: `event` joined|left|room_ended."""

    event: str
    at: datetime
    identity: str | None = None


def send(api, provider: str, report: Report, token: str | None = None):
    """Deliver `report` as `provider` would (the same report always gives the same bytes);
    `token` is Twilio's I-Twilio-Idempotency-Token (the same on a retry, else a new one)."""
    if provider == "livekit":
        name = {"joined": "participant_joined", "left": "participant_left",
                "room_ended": "room_finished"}[report.event]
        event_id = f"EV_{name}_{report.identity}_{int(report.at.timestamp())}"  # as on a retry
        return livekit_post(api, livekit_body(name, report.at, report.identity, event_id=event_id))
    name = {"joined": "participant-connected", "left": "participant-disconnected",
            "room_ended": "room-ended"}[report.event]
    headers = {"I-Twilio-Idempotency-Token": token} if token else None
    return twilio_post(api, "/webhooks/twilio/video", video_form(name, report.at, report.identity),
                       headers=headers)


def deliver(api, provider: str, report: Report, token: str | None = None, attempts: int = 8):
    """Deliver like a provider: retry on 503 `retry_later` (too many concurrent writers)."""
    for _ in range(attempts):
        response = send(api, provider, report, token)
        if response.status_code != 503:
            assert response.status_code == 200, response.text
            return response
    raise AssertionError(f"still 503 after {attempts} attempts: {response.text}")


# A 25-minute video call: patient waits, doctor joins at START; the patient hangs up first, the
# doctor 30 s later; the empty room ends 5 minutes after that.
CALL = [Report("joined", START - MIN, "patient:p1"), Report("joined", START, "doctor:d1"),
        Report("left", START + 25 * MIN, "patient:p1"),
        Report("left", START + 25 * MIN + timedelta(seconds=30), "doctor:d1"),
        Report("room_ended", START + 30 * MIN + timedelta(seconds=30))]


@dataclass
class Outcome:
    """What a settled call cost: units owed, its end, and the money on both sides."""

    units: int
    ended_at: str
    end_reason: str
    video_usable_now: int
    doctor_available_minor: int


def settle(api, session_id: str = "s1") -> dict:
    """Move the clock past the settlement grace and tick until the session settles."""
    for _ in range(4):
        api.clock.advance(11 * 60)
        api.tick()
        resource = session(api, session_id)
        if resource["state"] == "settled":
            return resource
    raise AssertionError(f"not settled: {resource}")


def outcome(api) -> Outcome:
    resource = settle(api)
    balance = api.client.get("/v1/patients/p1/balance", headers=BACKEND).json()
    wallet = api.client.get("/v1/doctors/d1/wallet", headers=BACKEND).json()
    available = sum(w["available_minor"] for w in wallet["wallets"] if w["currency"] == "MWK")
    return Outcome(resource["statement"]["settlement"]["units_owed"], resource["ended_at"],
                   resource["end_reason"], usable_now(balance, "video"), available)


def run_call(tmp_path, provider: str, mode: str, reports=CALL) -> Outcome:
    """The call delivered `clean` (in order, each when it happened), `messy` (each report three
    times: a delivery, its retry with the same idempotency token, and a second delivery with
    another token (Twilio) or none; all shuffled, after the fact) or `concurrent` (messy, from
    4 threads at once)."""
    with serving(make_settings(tmp_path, **CONFIGURED)) as api:
        open_call(api)
        if mode == "clean":
            for report in reports:
                api.clock.set(max(api.clock(), report.at))
                deliver(api, provider, report)
        else:
            api.clock.set(max(r.at for r in reports))
            messy = [(r, token) for i, r in enumerate(reports)
                     for token in (f"tok-{i}", f"tok-{i}", None)]
            random.Random(4).shuffle(messy)
            workers = 4 if mode == "concurrent" else 1
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(lambda item: deliver(api, provider, *item), messy))
        return outcome(api)


# ------------------------------------------------------------------------- Twilio Voice


def test_twilio_voice_call_is_charged_three_units(api):
    open_call(api, "voice")
    api.clock.set(T0 + 30 * timedelta(seconds=1))
    ringing = voice(api, "ringing", api.clock())
    assert ringing.status_code == 200, ringing.text
    assert ringing.json()["replayed"] is False
    api.clock.set(START)
    assert voice(api, "in-progress", START).json()["state"] == "active"
    # No activity pings: between in-progress and completed both legs are up, so the
    # 15-minute call idle timeout does not apply (the provider's report is the evidence).
    api.clock.set(START + 20 * MIN)
    api.tick()
    assert session(api)["state"] == "active"
    api.clock.set(START + 25 * MIN)
    ended = voice(api, "completed", START + 25 * MIN)
    assert ended.status_code == 200, ended.text
    assert ended.json()["presence"]["ended_at"] == (START + 25 * MIN).isoformat()
    resource = settle(api)
    assert resource["started_at"] == START.isoformat()
    assert (resource["end_by"], resource["end_reason"]) == ("system", "room_ended")
    assert resource["statement"]["settlement"]["units_owed"] == 3
    balance = api.client.get("/v1/patients/p1/balance", headers=BACKEND).json()
    assert usable_now(balance, "voice") == 2


@pytest.mark.parametrize("status, reason", [("busy", "declined"), ("no-answer", "missed"),
                                            ("canceled", "cancelled"), ("failed", "failed")])
def test_twilio_voice_unanswered_call_ends_with_its_reason(api, status, reason):
    open_call(api, "voice")
    api.clock.set(T0 + 20 * timedelta(seconds=1))
    assert voice(api, "ringing", api.clock()).status_code == 200
    response = voice(api, status, api.clock())
    assert response.status_code == 200, response.text
    resource = session(api)
    assert (resource["state"], resource["end_by"], resource["end_reason"]) == (
        "ended", "system", reason)
    assert resource["started_at"] is None


def test_twilio_voice_occurred_at_is_the_provider_timestamp(api):
    open_call(api, "voice")
    ringing, answered = T0 + 10 * timedelta(seconds=1), T0 + MIN
    api.clock.set(answered + 2 * MIN)  # both callbacks arrive two minutes late
    assert voice(api, "ringing", ringing).status_code == 200
    assert voice(api, "in-progress", answered).status_code == 200
    resource = session(api)
    assert (resource["ringing_at"], resource["started_at"]) == (ringing.isoformat(),
                                                                answered.isoformat())


def test_twilio_redelivery_replays_the_first_result(api):
    open_call(api, "voice")
    api.clock.set(START)
    assert voice(api, "ringing", T0 + MIN).status_code == 200
    token = {"I-Twilio-Idempotency-Token": "idem-1"}
    first = voice(api, "in-progress", START, headers=token)
    assert first.status_code == 200 and first.json()["replayed"] is False
    before = api.position()
    again = voice(api, "in-progress", START, headers=token)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == {**first.json(), "replayed": True}
    assert api.position() == before
    # no token: the content (CallSid, status, Timestamp) is the dedupe key
    plain = voice(api, "completed", START + 5 * MIN)
    assert plain.status_code == 200 and plain.json()["replayed"] is False
    before = api.position()
    assert voice(api, "completed", START + 5 * MIN).json() == {**plain.json(), "replayed": True}
    assert api.position() == before


@pytest.mark.parametrize("case", ["status", "timestamp", "session_query", "host", "missing",
                                  "other_token"])
def test_twilio_bad_signature_is_403_and_records_nothing(api, case):
    open_call(api, "voice")
    api.clock.set(START + 25 * MIN)
    before, position = session(api), api.position()
    form = voice_form("in-progress", START)
    path = "/webhooks/twilio/voice"
    if case == "status":
        response = twilio_post(api, path, form, query="session_id=s1",
                               tampered={"CallStatus": "completed"})
    elif case == "timestamp":
        response = twilio_post(api, path, form, query="session_id=s1",
                               tampered={"Timestamp": rfc2822(START + 30 * MIN)})
    elif case == "session_query":  # signed for s2, replayed against s1
        signature = RequestValidator(TWILIO_TOKEN).compute_signature(
            f"{PUBLIC}{path}?session_id=s2", form)
        response = api.client.post(f"{path}?session_id=s1", data=form,
                                   headers={"X-Twilio-Signature": signature})
    elif case == "host":  # signed for another host than public_base_url
        response = twilio_post(api, path, form, query="session_id=s1",
                               signed_base="https://evil.example.org")
    elif case == "missing":
        response = twilio_post(api, path, form, query="session_id=s1", sign=False)
    else:
        signature = RequestValidator("another-account").compute_signature(
            f"{PUBLIC}{path}?session_id=s1", form)
        response = api.client.post(f"{path}?session_id=s1", data=form,
                                   headers={"X-Twilio-Signature": signature})
    assert_problem(response, 403, "invalid_signature")
    assert session(api) == before and api.position() == position


def test_twilio_signature_for_the_request_host_is_refused_behind_the_proxy(api):
    """The app sees http://testserver; only the public URL Twilio called counts."""
    open_call(api, "voice")
    response = voice(api, "ringing", T0, signed_base="http://testserver")
    assert_problem(response, 403, "invalid_signature")
    assert voice(api, "ringing", T0).status_code == 200  # signed for public_base_url


# ------------------------------------------------------------------------- Twilio Video


def test_twilio_video_presence_connects_the_call(api):
    open_call(api)
    for report in CALL[:2]:
        api.clock.set(report.at)
        response = deliver(api, "twilio-video", report)
    assert session(api)["started_at"] == START.isoformat()
    assert response.json()["presence"]["connected_at"] == START.isoformat()


def test_twilio_video_tampered_identity_is_403(api):
    open_call(api)
    api.clock.set(START)
    before, position = session(api), api.position()
    response = twilio_post(api, "/webhooks/twilio/video",
                           video_form("participant-connected", START, "doctor:d1"),
                           tampered={"ParticipantIdentity": "patient:p1"})
    assert_problem(response, 403, "invalid_signature")
    assert session(api) == before and api.position() == position


@pytest.mark.parametrize("event", ["room-created", "track-added", "recording-started"])
def test_twilio_video_other_events_are_ignored(api, event):
    open_call(api)
    position = api.position()
    response = twilio_post(api, "/webhooks/twilio/video", video_form(event, T0, "doctor:d1"))
    assert response.status_code == 200 and "ignored" in response.json()
    assert api.position() == position


# ------------------------------------------------------------------------------ LiveKit


def test_livekit_presence_connects_the_call(api):
    open_call(api)
    api.clock.set(START)
    for report in CALL[:2]:
        response = deliver(api, "livekit", report)
    assert response.json()["replayed"] is False
    assert session(api)["started_at"] == START.isoformat()


@pytest.mark.parametrize("case", ["identity", "event", "created_at", "wrong_secret", "expired",
                                  "missing", "garbage"])
def test_livekit_bad_token_is_403_and_records_nothing(api, case):
    open_call(api)
    api.clock.set(START + 25 * MIN)
    before, position = session(api), api.position()
    body = livekit_body("participant_joined", START, "doctor:d1")
    if case in ("identity", "event", "created_at"):
        sent = {"identity": body.replace("doctor:d1", "patient:p1"),
                "event": body.replace("participant_joined", "participant_left"),
                "created_at": body.replace(str(int(START.timestamp())),
                                           str(int(START.timestamp()) + 60))}[case]
        response = livekit_post(api, body, sent=sent)
    elif case == "wrong_secret":
        response = livekit_post(api, body, secret="x" * 40)
    elif case == "expired":  # past LiveKit's 1-minute leeway (on the wall clock: JWT exp)
        response = livekit_post(api, body, ttl=timedelta(minutes=-2))
    elif case == "missing":
        response = livekit_post(api, body, authorization="")
    else:
        response = livekit_post(api, body, authorization="not-a-jwt")
    assert_problem(response, 403, "invalid_signature")
    assert session(api) == before and api.position() == position


def test_livekit_accepts_a_bearer_scheme_too(api):
    open_call(api)
    api.clock.set(START)
    body = livekit_body("participant_joined", START - MIN, "p1")
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    token = AccessToken(LK_KEY, LK_SECRET).with_sha256(digest).to_jwt()
    response = livekit_post(api, body, authorization=f"Bearer {token}")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("event, room", [("track_published", "call_s1"),
                                         ("room_started", "call_s1"),
                                         ("participant_joined", "lobby"),
                                         ("participant_joined", "call_")])
def test_livekit_other_events_and_rooms_are_ignored(api, event, room):
    open_call(api)
    position = api.position()
    response = livekit_post(api, livekit_body(event, T0, "doctor:d1", room=room))
    assert response.status_code == 200 and "ignored" in response.json()
    assert api.position() == position


# ------------------------------------------------------------- billing through presence


@pytest.mark.parametrize("provider", ["twilio-video", "livekit"])
def test_clean_delivery_bills_to_the_first_departure_not_the_room_end(tmp_path, provider):
    """The room ends 5 min after the last participant left (empty-room timeout): billed up to
    the patient's departure at 25 min (3 video units), not the room's end at 30.5 min (4)."""
    clean = run_call(tmp_path, provider, "clean")
    assert clean.units == 3
    assert (clean.ended_at, clean.end_reason) == ((START + 25 * MIN).isoformat(),
                                                   "participant_left")
    assert clean.video_usable_now == 2 and clean.doctor_available_minor > 0


@pytest.mark.parametrize("provider", ["twilio-video", "livekit"])
@pytest.mark.parametrize("mode", ["messy", "concurrent"])
def test_duplicated_reordered_concurrent_delivery_bills_like_one_clean_delivery(
        tmp_path, provider, mode):
    clean = run_call(tmp_path / "clean", provider, "clean")
    other = run_call(tmp_path / mode, provider, mode)
    assert other == clean


@pytest.mark.parametrize("provider", ["twilio-video", "livekit"])
def test_join_reported_after_the_room_finished_still_counts(tmp_path, provider):
    """The doctor's join arrives after room_finished (within the settlement grace)."""
    late = [CALL[0], *CALL[2:], CALL[1]]
    with serving(make_settings(tmp_path / "late", **CONFIGURED)) as api:
        open_call(api)
        for report in late:
            api.clock.set(max(api.clock(), report.at))
            deliver(api, provider, report)
        got = outcome(api)
    assert got == run_call(tmp_path / "clean", provider, "clean")
    assert got.units == 3


# --------------------------------------------------------------------- edges and errors


@pytest.mark.parametrize("provider", ["twilio-video", "livekit"])
def test_identity_neither_patient_nor_doctor_is_acknowledged_and_ignored(api, provider):
    open_call(api)
    api.clock.set(START)
    deliver(api, provider, Report("joined", START - MIN, "patient:p1"))
    response = deliver(api, provider, Report("joined", START, "interpreter-7"))
    assert "ignored" in response.json()
    assert session(api)["started_at"] is None


def test_unknown_session_is_the_ledgers_404(api):
    position = api.position()
    response = twilio_post(api, "/webhooks/twilio/video",
                           video_form("participant-connected", T0, "p1", room="call_nope"))
    assert_problem(response, 404, "unknown_session")
    assert api.position() == position


def test_voice_callback_without_session_id_is_ignored(api):
    open_call(api, "voice")
    position = api.position()
    response = twilio_post(api, "/webhooks/twilio/voice", voice_form("ringing", T0))
    assert response.status_code == 200 and "ignored" in response.json()
    assert api.position() == position


def test_signed_callback_without_timestamp_is_422(api):
    open_call(api)
    form = video_form("participant-connected", T0, "p1")
    del form["Timestamp"]
    assert_problem(twilio_post(api, "/webhooks/twilio/video", form), 422, "validation_error")


@pytest.mark.parametrize("path", ["/webhooks/twilio/voice", "/webhooks/twilio/video",
                                  "/webhooks/livekit"])
def test_unconfigured_provider_is_503_and_records_nothing(tmp_path, path):
    with serving(make_settings(tmp_path)) as api:
        open_call(api)
        position = api.position()
        form = video_form("participant-connected", T0, "p1")
        response = twilio_post(api, path, form, query="session_id=s1")
        assert_problem(response, 503, "provider_not_configured")
        assert api.position() == position


def test_oversized_body_is_413_before_anything_else(api):
    response = api.client.post("/webhooks/livekit", content=b"x" * (64 * 1024 + 1),
                               headers={"Content-Type": "application/webhook+json"})
    assert_problem(response, 413, "payload_too_large")


def test_webhooks_need_no_api_key_but_v1_still_does(api):
    open_call(api, "voice")
    assert voice(api, "ringing", T0).status_code == 200  # no Authorization header at all
    assert_problem(api.client.get("/v1/sessions/s1"), 401, "unauthenticated")


def test_webhooks_are_not_in_the_openapi(api):
    paths = api.client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/webhooks")]


# --------------------------------------------------------------------------- adapters


def test_registry_names_each_provider_once_under_webhooks():
    assert [p.name for p in PROVIDERS] == ["twilio-voice", "twilio-video", "livekit"]
    assert len({p.path for p in PROVIDERS}) == 3
    assert all(p.path.startswith("/webhooks/") for p in PROVIDERS)


def test_provider_time_reads_both_twilio_formats():
    moment = datetime(2026, 11, 21, 10, 0, tzinfo=timezone.utc)
    assert provider_time("Sat, 21 Nov 2026 10:00:00 +0000") == moment
    assert provider_time("Sat, 21 Nov 2026 12:00:00 +0200") == moment
    assert provider_time("2026-11-21T10:00:00.379Z") == moment + timedelta(microseconds=379000)
    assert provider_time("2026-11-21T10:00:00") == moment  # providers send UTC


def test_room_names_and_content_ids():
    assert session_of_room("call_s-42") == "s-42"
    assert session_of_room("call_") is None and session_of_room("lobby") is None
    a = content_id("livekit", room="call_s1", participant="p1", event="left", at="1")
    assert a == content_id("livekit", at="1", event="left", participant="p1", room="call_s1")
    assert a.startswith("livekit:") and a != content_id("livekit", room="call_s1",
                                                        participant="p1", event="left", at="2")
