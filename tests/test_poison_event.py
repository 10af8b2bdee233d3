"""A poison event: one stored event a projection cannot apply stops that projection loudly, at
that event, and nothing else (projections/projector.py).

The event is planted directly in the event store through the recorder (a `Pool.Held` topic whose
state is not an event), between valid events, on SQLite and PostgreSQL. The projection applies
every event before it, stops there without skipping it, names its notification id, stored
identity and topic in `health()`, the log, /readyz and /metrics; the other projections go on.
"""

from __future__ import annotations

import logging
import time
from uuid import uuid4

import pytest
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic
from fastapi.testclient import TestClient

from ledger.domain import Pool
from projections import ProjectionStalled
from projections.projector import describe_stall
from runtime.asgi import create_app
from test_api import ADMIN, BACKEND, Api, make_settings, plan
from test_projections import PLAN_30, World
from conftest import T0, FakeClock

HELD_TOPIC = get_topic(Pool.Held)


def plant_poison(ledger) -> tuple[int, str]:
    """Insert a `Pool.Held` stored event whose state is not an event; (its notification id,
    its stored identity `<originator_id>@1`)."""
    originator = uuid4()
    poison = StoredEvent(originator_id=originator, originator_version=1, topic=HELD_TOPIC,
                         state=b'{"not": "a held unit"}')
    ledger.recorder.insert_events([poison])
    return int(ledger.recorder.max_notification_id()), f"{originator}@1"


@pytest.fixture
def world(store_url, clock):
    w = World(store_url, clock)
    yield w
    w.close()


def test_a_poison_event_stalls_its_projection_at_that_event_and_only_it(world, caplog):
    before = world.grant("pay-before", "p1", world.at(minutes=1))
    world.post("doctor.registered", world.at(minutes=2), doctor_id="d1", country="MW")
    position, event_id = plant_poison(world.ledger)
    after = world.grant("pay-after", "p2", world.at(minutes=3))
    head = int(world.ledger.recorder.max_notification_id())
    projector = world.projector()

    with caplog.at_level(logging.ERROR, logger="ledger.projections"):
        with pytest.raises(ProjectionStalled) as raised:
            projector.catch_up()
    stall = raised.value.stall
    assert stall["projection"] == "balances" and stall["position"] == position
    assert stall["event_id"] == event_id and stall["topic"] == HELD_TOPIC
    assert stall["error"]
    assert describe_stall(stall) in caplog.text and "PROJECTION STALLED" in caplog.text

    positions = projector._positions()
    assert positions["balances"] < position  # stopped at the poison, never past it
    assert all(positions[name] == head for name in ("wallets", "live", "marketplace"))
    assert projector.patient_balance("p1", world.at(minutes=4))["pools"][0]["pool_id"] == before
    assert projector.patient_balance("p2", world.at(minutes=4))["pools"] == []  # not skipped
    health = projector.health()
    assert health["stalled"] == stall and health["lag_events"] == head - positions["balances"]

    with pytest.raises(ProjectionStalled):  # still stalled; nothing applied past the poison
        projector.catch_up()
    assert projector._positions()["balances"] == positions["balances"]
    assert after  # the later grant is in the log, waiting behind the poison


def test_a_stalled_projection_resumes_when_its_event_applies_on_retry(world):
    world.grant("pay-1", "p1", world.at(minutes=1))
    second = world.grant("pay-2", "p2", world.at(minutes=2))
    projector = world.projector()
    balances = next(p for p in projector._projections if p.name == "balances")
    granted = balances.handlers[Pool.Granted]
    seen: list[str] = []

    def refuses_pay_2(store, e, pool_id):  # a bug in the view code, for pay-2 only
        if e.payment_reference == "pay-2":
            raise KeyError("pay-2")
        seen.append(e.payment_reference)
        granted(store, e, pool_id)

    balances.handlers[Pool.Granted] = refuses_pay_2
    with pytest.raises(ProjectionStalled) as raised:
        projector.catch_up()
    assert raised.value.stall["event_id"] == f"{second}@1"
    assert projector.patient_balance("p1", world.at(minutes=3))["pools"]
    balances.handlers[Pool.Granted] = granted  # the fix is deployed; the retry comes round
    projector._retry_at["balances"] = 0.0
    projector.catch_up()
    assert projector.health()["stalled"] is None
    assert set(seen) == {"pay-1"}  # tried in each rolled-back attempt, then on its own
    voice = PLAN_30["units"]["voice"]
    for patient in ("p1", "p2"):  # each grant counted exactly once
        buckets = projector.patient_balance(patient, world.at(minutes=3))["buckets"]
        assert buckets["voice"]["available"] == voice
    assert projector.patient_balance("p2", world.at(minutes=3))["pools"][0]["pool_id"] == second


def test_a_failure_that_does_not_repeat_stalls_nothing(world):
    world.grant("pay-1", "p1", world.at(minutes=1))
    world.grant("pay-2", "p2", world.at(minutes=2))
    projector = world.projector()
    balances = next(p for p in projector._projections if p.name == "balances")
    granted, calls = balances.handlers[Pool.Granted], []

    def fails_once(store, e, pool_id):
        calls.append(e.payment_reference)
        if len(calls) == 2:
            raise RuntimeError("a passing fault")
        granted(store, e, pool_id)

    balances.handlers[Pool.Granted] = fails_once
    projector.catch_up()  # the batch fails once, then applies event by event
    assert projector.health()["stalled"] is None and set(projector.lag().values()) == {0}
    for patient in ("p1", "p2"):
        balance = projector.patient_balance(patient, world.at(minutes=3))
        assert len(balance["pools"]) == 1
        assert balance["buckets"]["voice"]["available"] == PLAN_30["units"]["voice"]


def test_the_service_shows_the_stall_on_readyz_metrics_and_reads(tmp_path, store_url, caplog):
    settings = make_settings(tmp_path, database_url=store_url, read_wait_seconds=5,
                             projection_poll_seconds=0.05, api_keys=(
                                 "k-backend:backend,k-auditor:auditor,k-admin:admin"))
    clock = FakeClock(T0)
    with TestClient(create_app(settings, clock=clock)) as client:
        api = Api(client, clock)
        api.doctor()
        api.grant(voice=2)
        position, event_id = plant_poison(api.ledger)
        body = None
        for _ in range(200):  # the background projector finds it (bounded: 10 s)
            response = client.get("/readyz")
            body = response.json()
            if response.status_code == 503 and "stalled" in body["detail"]:
                break
            time.sleep(0.05)
        assert response.status_code == 503 and body["code"] == "not_ready", body
        assert f"stalled at position {position}" in body["detail"]
        assert event_id in body["detail"] and HELD_TOPIC in body["detail"]
        assert body["checks"]["projections"]["stalled"]["position"] == position

        metrics = client.get("/metrics", headers=ADMIN).text
        assert "ledger_projection_stalled 1.0" in metrics

        balance = client.get("/v1/patients/p1/balance", headers=BACKEND)
        assert balance.status_code == 503 and balance.json()["code"] == "projections_behind"
        assert balance.headers["Retry-After"] and f"position {position}" in balance.json()["detail"]
        assert balance.json()["position"] < position  # how far it got: before the poison
        # a projection the poison does not touch still answers, current
        wallet = client.get("/v1/doctors/d1/wallet", headers=BACKEND)
        assert wallet.status_code == 200, wallet.text
        assert int(wallet.headers["Ledger-Position"]) >= position
    assert "PROJECTION STALLED" in caplog.text


def test_a_catch_up_that_raises_no_stall_leaves_every_projection_applying(world):
    world.grant("pay-1", "p1", world.at(minutes=1))
    projector = world.projector()
    assert projector.catch_up() > 0
    assert projector.health()["stalled"] is None and projector.stalls() == []
    assert set(projector.lag().values()) == {0}
    assert PLAN_30["units"]["voice"] == projector.patient_balance(
        "p1", world.at(minutes=2))["buckets"]["voice"]["available"]
