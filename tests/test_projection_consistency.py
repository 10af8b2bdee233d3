"""The read contract once projections are applied outside the request (docs/design.md,
"Projections outside the request: consistency the API gives").

- An accepted write's own response is always current (it comes from the aggregates), and
  carries `Ledger-Position`: the notification id a reader must wait for to see it.
- A read of a projection reflects every event up to `min_position` (default: the head when the
  read began) and says in `Ledger-Position` up to where; if the projection cannot get there in
  `read_wait_seconds` it answers 503 `projections_behind` with Retry-After, never stale data
  silently. `min_position=0` asks for the projection as it is, at once.
- Several processes: one background projector leads per PostgreSQL schema; the others follow
  the tracking rows; every event is applied exactly once (replay --verify agrees).

Runs on SQLite and PostgreSQL. No assertion is about timing.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ledger.rules import Policy
from projections import Projector, ProjectionsBehind, replay_verify
from runtime.asgi import create_app
from test_api import BACKEND, Api, make_settings, usable_now
from test_projections import World
from conftest import T0, FakeClock

POSITION = "Ledger-Position"


@pytest.fixture
def service(tmp_path, store_url):
    settings = make_settings(tmp_path, database_url=store_url, read_wait_seconds=0.5,
                             projection_poll_seconds=0.05)
    clock = FakeClock(T0)
    with TestClient(create_app(settings, clock=clock)) as client:
        yield Api(client, clock)


def head(api: Api) -> int:
    return int(api.ledger.recorder.max_notification_id() or 0)


def balance(api: Api, patient: str = "p1", **params):
    return api.client.get(f"/v1/patients/{patient}/balance", headers=BACKEND, params=params)


def test_a_write_answers_the_position_to_read_it_at(service):
    service.doctor()
    response = service.post(service.event("subscription.granted", payment_reference="pay1",
                                          owner_id="p1", plan=_plan(voice=3),
                                          starts_at=T0.isoformat()))
    assert response.status_code == 201
    position = int(response.headers[POSITION])
    assert position == head(service)
    again = service.post(service.event("doctor.registered", event_id="ev-1", doctor_id="d1",
                                       country="MW"))
    assert again.status_code == 200 and int(again.headers[POSITION]) >= 1  # a replay too
    batch = service.client.post("/v1/events", headers=BACKEND, json={"events": [
        service.event("doctor.registered", doctor_id="d2", country="MW"),
        service.event("doctor.registered", doctor_id="d3", country="MW")]})
    assert batch.status_code == 200 and int(batch.headers[POSITION]) == head(service)


def test_a_read_at_the_write_position_sees_the_write(service):
    service.doctor()
    for units in (1, 2, 3):
        response = service.post(service.event(
            "subscription.granted", payment_reference=f"pay{units}", owner_id="p1",
            plan=_plan(voice=units), starts_at=T0.isoformat()))
        position = int(response.headers[POSITION])
        read = balance(service, min_position=position)
        assert read.status_code == 200, read.text
        assert int(read.headers[POSITION]) >= position
        assert usable_now(read.json(), "voice") == sum(range(1, units + 1))
        default = balance(service)  # default: the head when the read began
        assert usable_now(default.json(), "voice") == sum(range(1, units + 1))


def test_coalescing_followers_still_apply_every_write(tmp_path, store_url):
    """A projector that waits between catch-ups (LEDGER_FOLLOWER_COALESCE_SECONDS, here far
    longer than usual) loses no wake: every write of a trickle is read back at its position."""
    settings = make_settings(tmp_path, database_url=store_url, read_wait_seconds=5,
                             projection_poll_seconds=5, follower_coalesce_seconds=0.3)
    clock = FakeClock(T0)
    with TestClient(create_app(settings, clock=clock)) as client:
        api = Api(client, clock)
        api.doctor()
        for units in range(1, 6):
            response = api.post(api.event(
                "subscription.granted", payment_reference=f"pay{units}", owner_id="p1",
                plan=_plan(text=units), starts_at=T0.isoformat()))
            read = balance(api, min_position=int(response.headers[POSITION]))
            assert read.status_code == 200, read.text
            assert usable_now(read.json(), "text") == sum(range(1, units + 1))


def test_a_position_beyond_the_head_is_422(service):
    service.doctor()
    response = balance(service, min_position=head(service) + 1)
    assert response.status_code == 422 and response.json()["code"] == "validation_error"
    assert balance(service, min_position=-1).status_code == 422


def test_a_projection_that_cannot_catch_up_in_time_answers_503_never_stale(service):
    service.doctor()
    service.grant(voice=3)
    projector = service.client.app.state.projector
    assert usable_now(balance(service).json(), "voice") == 3
    with projector._catching_up:  # the background projector is held mid-way
        write = service.post(service.event("session.requested", session_id="s1", kind="voice",
                                           patient_id="p1", doctor_id="d1"))
        assert write.status_code == 201  # the event's own result is current regardless
        late = balance(service, min_position=int(write.headers[POSITION]))
        assert late.status_code == 503, late.text
        problem = late.json()
        assert problem["code"] == "projections_behind" and late.headers["Retry-After"]
        assert problem["position"] < int(write.headers[POSITION])
        assert balance(service).status_code == 503  # the default waits for the head too
        stale = balance(service, min_position=0)  # asked for as-it-is: answered, and says so
        assert stale.status_code == 200 and int(stale.headers[POSITION]) == problem["position"]
        assert usable_now(stale.json(), "voice") == 3
    current = balance(service, min_position=int(write.headers[POSITION]))
    assert current.status_code == 200 and usable_now(current.json(), "voice") == 2  # one held


def test_wallet_and_marketplace_reads_follow_the_same_contract(service):
    response = service.post(service.event("doctor.registered", doctor_id="d1", country="MW"))
    position = int(response.headers[POSITION])
    wallet = service.client.get("/v1/doctors/d1/wallet", headers=BACKEND,
                                params={"min_position": position})
    assert wallet.status_code == 200 and int(wallet.headers[POSITION]) >= position
    money = service.client.get("/v1/patients/p1/wallet", headers=BACKEND,
                               params={"min_position": position})
    assert money.status_code == 200 and int(money.headers[POSITION]) >= position


def test_two_processes_project_once_one_leading_the_other_following(pg_url, clock):
    world = World(pg_url, clock)
    first = Projector(world.ledger, pg_url, Policy()).start(poll_seconds=0.05)
    second = Projector(world.ledger, pg_url, Policy()).start(poll_seconds=0.05)
    try:
        for n in range(5):
            world.grant(f"pay{n}", f"p{n}", world.at(minutes=n + 1))
        target = int(world.ledger.recorder.max_notification_id())
        for projector in (first, second):  # both see the head, whichever applied it
            assert projector.wait_for(target, (), timeout=10) >= target
        leaders = [p._signal.leader for p in (first, second)]
        assert sorted(leaders) == [False, True]
        for n in range(5):
            pools = second.patient_balance(f"p{n}", world.at(minutes=10))["pools"]
            assert len(pools) == 1
        report = replay_verify(world.ledger, pg_url, Policy())
        assert report.ok, report.differences
    finally:
        first.close()
        second.close()
        world.close()


def test_wait_for_a_position_nobody_applies_times_out(store_url, clock):
    world = World(store_url, clock)
    projector = Projector(world.ledger, store_url, Policy())  # not started: nobody projects
    try:
        world.grant("pay1", "p1", world.at(minutes=1))
        target = int(world.ledger.recorder.max_notification_id())
        with pytest.raises(ProjectionsBehind) as raised:
            projector.wait_for(target, ("balances",), timeout=0.2)
        assert raised.value.reached < target
        projector.catch_up()
        assert projector.wait_for(target, ("balances",), timeout=0.2) >= target
    finally:
        projector.close()
        world.close()


def _plan(text=0, voice=0, video=0) -> dict:
    return {"name": "Life", "price_minor": 1_500_000, "currency": "MWK",
            "units": {"text": text, "voice": voice, "video": video}, "seats": 1,
            "duration_days": 30}


def test_a_durable_transaction_commits_synchronously_on_a_followers_connection(pg_url):
    """`transaction(durable=True)` on a derived (asynchronous) PostgreSQL connection commits
    synchronously, and only that transaction: what a request acknowledges is never left to
    the WAL writer."""
    from projections.store import open_store

    store = open_store(pg_url, derived=True)
    try:
        levels = []
        for durable in (True, False):
            with store.transaction(durable=durable):
                levels.append(store.query("SHOW synchronous_commit")[0][0])
        assert levels == ["on", "off"]
    finally:
        store.close()


def test_only_the_followers_commit_asynchronously(pg_url, clock):
    """The followers' writes (projector, webhook deriver, audit) are derived from the log and
    committed with their tracking position, so they may commit without waiting for the WAL
    flush (PostgresStore `derived`); everything a request writes (the events, webhook
    endpoints, delivery claims) stays a durable commit."""
    from notifications.notifier import Notifier
    from audit.service import AuditService
    from conftest import make_ledger

    def synchronous_commit(conn) -> str:
        return conn.execute("SHOW synchronous_commit").fetchone()[0]

    ledger = make_ledger(pg_url, clock)
    projector, notifier = Projector(ledger, pg_url, Policy()), Notifier(ledger, pg_url)
    audit = AuditService(ledger, pg_url)
    try:
        assert synchronous_commit(projector._store.conn) == "off"
        assert synchronous_commit(notifier._derive_store.conn) == "off"
        assert synchronous_commit(audit.store.conn) == "off"
        assert synchronous_commit(notifier.store.conn) == "on"
        with ledger.recorder.datastore.get_connection() as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "on"
    finally:
        for close in (audit.close, notifier.close, projector.close, ledger.close):
            close()
