"""Webhook throughput: signed LiveKit deliveries verified, translated and ingested (SQLite).

Each call is 5 deliveries (two joins, two departures, room end) plus one duplicate of each, so
half the deliveries exercise the replay path. Timing lives here, never in pass/fail tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import timedelta

from livekit.api import AccessToken

from api.providers.base import WebhookRequest
from api.providers.livekit import PROVIDER as LIVEKIT
from runtime.wiring import build_ledger
from runtime.settings import Settings

KEY, SECRET = "bench-key", "bench-secret-with-at-least-thirty-two-bytes"


def _signed(message: dict) -> WebhookRequest:
    body = json.dumps(message)
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    token = AccessToken(KEY, SECRET).with_sha256(digest).to_jwt()
    return WebhookRequest(path=LIVEKIT.path, query="", headers={"authorization": token},
                          body=body.encode())


def _deliveries(i: int, t0) -> list[WebhookRequest]:
    room = {"sid": f"RM{i}", "name": f"call_s{i}"}
    plan = [("participant_joined", 0, f"p{i}"), ("participant_joined", 20, f"d{i}"),
            ("participant_left", 1520, f"p{i}"), ("participant_left", 1530, f"d{i}"),
            ("room_finished", 1830, None)]
    out = []
    for event, offset, who in plan:
        message = {"event": event, "id": f"EV{i}-{event}-{who}", "room": room,
                   "createdAt": str(int((t0 + timedelta(seconds=offset)).timestamp()))}
        if who:
            message["participant"] = {"sid": f"PA{who}", "identity": who}
        out.append(_signed(message))
    return out + out  # every delivery twice: providers retry


def bench_webhooks(url: str, calls: int, clock, t0) -> list[tuple[str, str, int, float]]:
    """Rows (store, stage, count, seconds): verify-only and verify+translate+ingest."""
    settings = Settings(database_url=url, livekit_api_key=KEY, livekit_api_secret=SECRET)
    ledger = build_ledger(settings, clock)
    clock.now = t0
    ledger.ingest("d", "doctor.registered", t0, {"doctor_id": "d0", "country": "MW"})
    for i in range(calls):
        ledger.ingest(f"dr{i}", "doctor.registered", t0, {"doctor_id": f"d{i}", "country": "MW"})
        ledger.ingest(f"g{i}", "subscription.granted", t0, {
            "payment_reference": f"pay{i}", "owner_id": f"p{i}", "starts_at": t0.isoformat(),
            "plan": {"name": "Life Max", "price_minor": 1, "currency": "MWK",
                     "units": {"text": 0, "voice": 5, "video": 0}, "seats": 1, "duration_days": 30}})
        ledger.ingest(f"r{i}", "session.requested", t0, {"session_id": f"s{i}", "kind": "voice",
                                                         "patient_id": f"p{i}", "doctor_id": f"d{i}"})
    deliveries = [d for i in range(calls) for d in _deliveries(i, t0)]
    clock.now = t0 + timedelta(minutes=31)
    started = time.perf_counter()
    for hook in deliveries:
        LIVEKIT.verify(hook, settings)
    rows = [("sqlite", "livekit verify only", len(deliveries), time.perf_counter() - started)]
    started = time.perf_counter()
    for hook in deliveries:
        event = LIVEKIT.translate(LIVEKIT.verify(hook, settings), hook)
        ledger.ingest(event.event_id, event.type, event.occurred_at, event.payload)
    rows.append(("sqlite", "livekit webhook → ledger", len(deliveries), time.perf_counter() - started))
    ledger.close()
    return rows
