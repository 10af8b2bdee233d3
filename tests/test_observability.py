"""The operator's view: /metrics after a scripted workload, /readyz flipping, JSON logs with
request ids and no secrets, and metrics summed over several worker processes."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from eventsourcing.persistence import IntegrityError
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import T0, FakeClock
from runtime.asgi import create_app
from runtime.settings import Settings
from simulation.crash import ADMIN_KEY, Service
from storage import StoreUnavailable

BACKEND_KEY, METRICS_KEY, TWILIO_TOKEN = "k-secret-backend", "k-secret-metrics", "tw-secret-token"
BACKEND = {"Authorization": f"Bearer {BACKEND_KEY}"}
ADMIN = {"Authorization": "Bearer k-secret-admin"}
SCRAPER = {"Authorization": f"Bearer {METRICS_KEY}"}
MIN = timedelta(minutes=1)


def settings(tmp_path, **overrides) -> Settings:
    values = {"database_url": f"sqlite:///{tmp_path / 'ledger.db'}", "tick_enabled": False,
              "api_keys": f"{BACKEND_KEY}:backend,k-secret-admin:admin,{METRICS_KEY}:metrics",
              "twilio_auth_token": TWILIO_TOKEN, **overrides}
    return Settings(**values)


def event(event_id: str, type_: str, at, **payload) -> dict:
    return {"event_id": event_id, "type": type_, "occurred_at": at.isoformat(), "payload": payload}


def plan(voice: int = 3) -> dict:
    return {"name": "P", "price_minor": 100, "currency": "MWK",
            "units": {"text": 0, "voice": voice, "video": 0}, "seats": 1, "duration_days": 30}


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels...): value} of a Prometheus text exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return found


@pytest.fixture
def client(tmp_path):
    clock = FakeClock(T0)
    with TestClient(create_app(settings(tmp_path), clock=clock)) as client:
        client.clock = clock
        yield client


def test_metrics_after_a_scripted_workload(client):
    post = lambda body, headers=BACKEND: client.post("/v1/events", json=body, headers=headers)  # noqa: E731
    assert post(event("e1", "doctor.registered", T0, doctor_id="d1", country="MW")).status_code == 201
    assert post(event("e1", "doctor.registered", T0, doctor_id="d1", country="MW")).status_code == 200
    assert post(event("e1", "doctor.registered", T0, doctor_id="d1", country="KE")).status_code == 409
    batch = {"events": [
        event("e2", "subscription.granted", T0, payment_reference="pay1", owner_id="p1",
              plan=plan(), starts_at=T0.isoformat()),
        event("e3", "call.connected", T0, session_id="nope")]}
    assert post(batch).status_code == 200
    ledger = client.app.state.ledger
    save, lost = ledger.save, {"races": 1}

    def save_losing_once(*aggregates, **kwargs):  # a concurrent writer wins the first race
        if lost["races"]:
            lost["races"] -= 1
            raise IntegrityError("duplicate key value violates unique constraint")
        return save(*aggregates, **kwargs)

    ledger.save = save_losing_once
    assert post(event("e4", "session.requested", T0, session_id="s1", kind="voice",
                      patient_id="p1", doctor_id="d1")).status_code == 201
    ledger.save = save
    assert post(event("e5", "call.connected", T0, session_id="s1")).status_code == 201
    client.clock.advance(25 * 60)
    tick = client.post("/v1/ticks", json={}, headers=ADMIN).json()
    assert tick["counts"]["charged"] == 1 and tick["counts"]["ended"] == 1  # then idle timeout

    ingest = ledger.ingest
    ledger.ingest = lambda *a, **k: (_ for _ in ()).throw(StoreUnavailable("down"))
    down = post(event("e6", "session.activity", T0 + 20 * MIN, session_id="s1"))
    assert down.status_code == 503 and down.headers["retry-after"] == "2"
    ledger.ingest = ingest

    # the tick's writes reach the views through the background projector: a read waits for them
    assert client.get("/v1/patients/p1/balance", headers=BACKEND).status_code == 200
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=BACKEND).status_code == 403
    scrape = client.get("/metrics", headers=SCRAPER)
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    found = samples(scrape.text)
    events = lambda t, outcome, code="": found.get(  # noqa: E731
        ("ledger_events_total", ("code", code), ("outcome", outcome), ("type", t)), 0)
    assert events("doctor.registered", "accepted") == 1
    assert events("doctor.registered", "replayed") == 1
    assert events("doctor.registered", "refused", "idempotency_conflict") == 1
    assert events("subscription.granted", "accepted") == 1
    assert events("call.connected", "refused", "unknown_session") == 1
    assert events("session.requested", "accepted") == 1 and events("call.connected", "accepted") == 1
    assert found[("ledger_optimistic_conflicts_total", ("operation", "ingest"))] == 1
    assert found[("ledger_retry_later_total", ("reason", "store_unavailable"))] == 1
    assert found[("ledger_store_up",)] == 1  # read at the scrape: the store answers again
    requests = lambda route, status, method="POST": found.get(  # noqa: E731
        ("ledger_http_requests_total", ("method", method), ("route", route), ("status", status)), 0)
    assert requests("/v1/events", "201") == 3 and requests("/v1/events", "200") == 2
    assert requests("/v1/events", "409") == 1 and requests("/v1/events", "503") == 1
    assert requests("/metrics", "401", "GET") == 1 and requests("/metrics", "403", "GET") == 1
    assert found[("ledger_http_request_duration_seconds_count", ("method", "POST"),
                  ("route", "/v1/events"))] == 7
    assert found[("ledger_ticks_total", ("outcome", "ok"), ("source", "api"))] == 1
    assert found[("ledger_tick_duration_seconds_count", ("source", "api"))] == 1
    assert found[("ledger_tick_work_total", ("kind", "charged"))] == 1
    assert found[("ledger_tick_work_total", ("kind", "ended"))] == 1
    assert found[("ledger_projection_lag_events",)] == 0
    assert found[("ledger_event_store_head",)] == ledger.recorder.max_notification_id()


def test_readiness_flips_with_the_store_the_projections_and_the_scheduler(tmp_path, monkeypatch):
    with TestClient(create_app(settings(tmp_path, tick_enabled=True, tick_seconds=3600,
                                        ready_max_lag_events=2),
                               clock=FakeClock(T0))) as client:
        state = client.app.state
        assert client.get("/readyz").json()["status"] == "ready"

        for n in range(3):  # written behind the projector's back: it lags 3+ events
            state.ledger.ingest(f"lag{n}", "doctor.registered", T0,
                                {"doctor_id": f"d{n}", "country": "MW"})
        lagging = client.get("/readyz")
        assert lagging.status_code == 503 and lagging.json()["code"] == "not_ready"
        assert lagging.json()["checks"]["projections"]["reason"].startswith("lagging")
        assert lagging.headers["retry-after"] == "2"
        state.projector.catch_up()
        assert client.get("/readyz").status_code == 200

        health = state.projector.health
        stalled = {"position": 7, "event_id": "bad", "topic": "ledger.domain:Pool.Granted",
                   "error": "KeyError: 'units'"}
        monkeypatch.setattr(state.projector, "health", lambda: {**health(), "stalled": stalled})
        answer = client.get("/readyz").json()
        assert "stalled at position 7" in answer["detail"]
        monkeypatch.setattr(state.projector, "health", health)

        recorder = state.ledger.recorder
        monkeypatch.setattr(recorder, "max_notification_id",
                            lambda: (_ for _ in ()).throw(StoreUnavailable("refused")))
        down = client.get("/readyz").json()
        assert down["checks"]["store"] == {"ok": False, "reason": "event store unreachable"}
        monkeypatch.undo()
        assert client.get("/readyz").status_code == 200

        state.scheduler.shutdown()
        stopped = client.get("/readyz").json()
        assert stopped["checks"]["scheduler"]["reason"] == "the tick scheduler is not running"
        state.scheduler = None


def test_json_logs_one_line_per_request_with_ids_and_no_secrets(tmp_path, capsys):
    with TestClient(create_app(settings(tmp_path), clock=FakeClock(T0))) as client:
        capsys.readouterr()
        client.post("/v1/events", headers={**BACKEND, "X-Request-ID": "req-42"}, json={"events": [
            event("e1", "doctor.registered", T0, doctor_id="d1", country="MW"),
            event("e2", "session.ended", T0, session_id="s9", ended_by="patient")]})
        generated = client.get("/v1/patients/p1/balance", headers=BACKEND)
        client.get("/v1/clock", headers={"Authorization": "Bearer wrong-key-xyz"})
        logging.getLogger("anything").warning("a library logs the token %s", TWILIO_TOKEN)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    requests = [line for line in lines if line["event"] == "request"]
    assert len(requests) == 3
    batch, balance, refused = requests
    assert batch["request_id"] == "req-42" and batch["status"] == 200
    assert batch["event_ids"] == ["e1", "e2"] and batch["session_ids"] == ["s9"]
    assert batch["events"] == {"accepted": 1, "refused:unknown_session": 1}
    assert batch["route"] == "/v1/events" and batch["role"] == "backend"
    assert balance["request_id"] == generated.headers["x-request-id"] and len(balance["request_id"]) == 32
    assert refused["status"] == 401 and refused["code"] == "unauthenticated"
    assert all(line["level"] and line["timestamp"] and line["logger"] for line in lines)
    text = json.dumps(lines)
    for secret in (BACKEND_KEY, METRICS_KEY, TWILIO_TOKEN, "k-secret-admin"):
        assert secret not in text
    assert any(line["event"] == "a library logs the token ***" for line in lines)


def test_a_bad_request_id_is_replaced(client):
    answer = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert answer.headers["x-request-id"] != "bad id\twith spaces"
    assert len(answer.headers["x-request-id"]) == 32


@pytest.mark.postgres
def test_metrics_sum_over_worker_processes(pg_url, tmp_path):
    service = Service(pg_url, tmp_path / "service.log", workers=2,
                      env={"LEDGER_TICK_SECONDS": "1",
                           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")})
    service.start()
    try:
        service.wait_ready()
        posted = 20
        for n in range(posted):  # a new connection each: the kernel spreads them over workers
            answer = httpx.post(service.base_url + "/v1/events",
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                                json=event(f"w{n}", "doctor.registered",
                                           datetime.now(timezone.utc).replace(microsecond=0),
                                           doctor_id=f"d{n}", country="MW"))
            assert answer.status_code == 201, answer.text
        for _ in range(3):  # whichever worker answers the scrape reports every worker's counts
            scrape = httpx.get(service.base_url + "/metrics",
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            found = samples(scrape.text)
            assert found[("ledger_events_total", ("code", ""), ("outcome", "accepted"),
                          ("type", "doctor.registered"))] == posted
            assert found[("ledger_http_requests_total", ("method", "POST"),
                          ("route", "/v1/events"), ("status", "201"))] == posted
        for _ in range(40):  # the scheduled tick (every 1 s) may not have run yet: wait, bounded
            ticks = sum(v for k, v in found.items() if k[0] == "ledger_ticks_total")
            if ticks >= 1:
                break
            time.sleep(0.5)
            found = samples(httpx.get(service.base_url + "/metrics",
                                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text)
        assert ticks >= 1, "no scheduled tick was counted within 20 s"
        assert found[("ledger_db_pool_connections", ("state", "size"))] >= 1
    finally:
        service.stop()
