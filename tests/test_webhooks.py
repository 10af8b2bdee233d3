"""Outbound webhooks (issue 13, docs/webhooks.md): derived from the committed log with
tracking, signed with Standard Webhooks, delivered at least once in order per session.

A receiver (simulation/receiver.py) verifies every delivery with the `standardwebhooks`
library and records what it got. The ledger is a real one on SQLite (and PostgreSQL where the
store matters); the notifier runs its real threads and sends real HTTP to loopback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import T0, FakeClock, make_ledger
from notifications import DeliveryPolicy, Notifier, NotifierConfig
from notifications.deriver import Deriver
from notifications.endpoints import UrlPolicy
from notifications.units import Units
from projections.store import open_store
from simulation.receiver import Receiver
from test_billing import MIN, Desk

ROOT = Path(__file__).resolve().parents[1]
FAST = DeliveryPolicy(timeout_seconds=2.0, retry_base_seconds=0.05, retry_max_seconds=0.2,
                      poll_seconds=0.02, claim_margin_seconds=0.5)
WAIT = 30.0  # bound on waiting for deliveries (seconds); never a pass/fail timing


class WallClock:
    """The notifier's wall clock: real time plus an offset the test can move forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset


def notifier(ledger, url: str, policy: DeliveryPolicy = FAST, clock=None,
             threshold: int = 1) -> Notifier:
    config = NotifierConfig(balance_low_units=threshold, policy=policy,
                            allow_http_hosts=frozenset({"127.0.0.1"}), derive_poll_seconds=0.02)
    return Notifier(ledger, url, config, clock=clock or WallClock())


def _world(url: str):
    """A ledger on `url`, the backend's desk, and what to close afterwards."""
    clock = FakeClock()
    ledger = make_ledger(url, clock)
    desk = Desk(clock, ledger=ledger)
    desk.doctor()
    closing: list = []
    yield url, desk, closing
    for thing in reversed(closing):
        thing.close()
    ledger.close()


@pytest.fixture
def world(tmp_path):
    """A ledger on a SQLite file, the backend's desk, and what to close afterwards."""
    yield from _world(f"sqlite:///{tmp_path / 'ledger.db'}")


@pytest.fixture
def any_world(store_url):
    """`world` on SQLite and on PostgreSQL (the dispatcher's SQL on both stores)."""
    yield from _world(store_url)


def receiver(closing: list, secrets=()) -> Receiver:
    rx = Receiver(list(secrets))
    closing.append(rx)
    return rx


def day(desk: Desk, sessions: int = 3) -> None:
    """Calls of p0..pN with doctors d0..dN (p0 has one voice unit and runs out), activity
    every 10 minutes, a tick every 10 minutes, ends reported, then settlement."""
    start = desk.clock()
    for i in range(sessions):
        desk.doctor(f"d{i}", "MW" if i % 2 == 0 else "ZM")
        desk.grant(ref=f"pay-{i}", owner=f"p{i}", voice=1 if i == 0 else 3)
    for i in range(sessions):
        desk.at(start + i * MIN)
        desk.request(f"s{i}", "voice", patient=f"p{i}", doctor=f"d{i}")
        desk.connect(f"s{i}")
    for k in (1, 2, 3):
        for i in range(sessions):
            if _live(desk, f"s{i}"):
                desk.activity(f"s{i}", desk.at(start + (k * 10 - 5) * MIN))
        desk.ledger.tick(desk.at(start + (k * 10 + 2) * MIN), desk.sessions, desk.pools)
    for i in range(sessions):
        if _live(desk, f"s{i}"):
            desk.end(f"s{i}", desk.at(start + (33 + i) * MIN))
    desk.ledger.tick(desk.at(start + 60 * MIN), desk.sessions, desk.pools)


def _live(desk: Desk, sid: str) -> bool:
    return desk.ledger.get_session(sid).state == "active"


def messages(url: str) -> dict[str, dict]:
    """Every derived message (id → envelope), read from the notifier's table."""
    store = open_store(url)
    try:
        return {mid: json.loads(body) for mid, body in
                store.query("SELECT message_id, body FROM webhook_messages")}
    finally:
        store.close()


def wait_until(predicate, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def in_order_per_key(received) -> bool:
    last: dict[str, int] = {}
    for item in received:
        data, key = item.data, item.payload["type"].split(".")[0]
        owner = data.get("session_id") or data.get("patient_id") or data.get("pool_id") \
            or data.get("doctor_id")
        name = f"{key}:{owner}"
        if item.payload["position"] < last.get(name, 0):
            return False
        last[name] = item.payload["position"]
    return True


# ------------------------------------------------------------------------------ catalogue


def test_a_call_produces_its_notifications_in_order_with_paid_until_and_links(world):
    url, desk, closing = world
    n = notifier(desk.ledger, url)
    closing.append(n)
    rx = receiver(closing)
    _, secret = n.create_endpoint(rx.url, [])
    rx.secrets.append(secret)
    desk.grant(voice=2)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 14 * MIN)
    desk.ledger.tick(desk.at(T0 + 11 * MIN), ["s1"], [])
    desk.end("s1", desk.at(T0 + 15 * MIN))
    desk.ledger.tick(desk.at(T0 + 30 * MIN), ["s1"], [])
    n.start()
    assert wait_until(lambda: n.health()["lag_events"] == 0)
    assert rx.wait_for(len(messages(url)))
    got = [(r.type, r.data) for r in rx.snapshot()]
    session = [(t, d) for t, d in got if t.startswith("session.")]
    assert [t for t, _ in session] == [
        "session.paid_until_changed", "session.paid_until_changed", "session.block_charged",
        "session.ended", "session.settled"]
    assert [d["paid_until"] for _, d in session[:2]] == [
        (T0 + 10 * MIN).isoformat(), (T0 + 20 * MIN).isoformat()]
    assert session[2][1]["block"] == 1 and session[2][1]["resource"] == "/v1/sessions/s1"
    ended = session[3][1]
    assert (ended["ended_by"], ended["reason"], ended["decided_by"]) == \
        ("patient", "completed", "report")
    settled = session[4][1]
    assert (settled["units_owed"], settled["units_charged_at_settlement"],
            settled["units_reversed"]) == (2, 1, 0)
    assert settled["doctor_pay"] == {"currency": "MWK", "per_unit_minor": 350_000,
                                     "net_minor": 700_000}
    lows = [d for t, d in got if t == "balance.low"]
    assert [(d["units_available"], d["level"]) for d in lows] == [(1, "low"), (0, "empty")]
    assert all(r.payload["version"] == 1 for r in rx.snapshot())


def test_ends_the_ledger_decides_say_so_and_exhaustion_is_announced(world):
    url, desk, closing = world
    n = notifier(desk.ledger, url)
    closing.append(n)
    desk.grant(voice=1)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 10 * MIN)
    desk.ledger.tick(desk.at(T0 + 12 * MIN), ["s1"], [])
    n.derive()
    ended = [m["data"] for m in messages(url).values() if m["type"] == "session.ended"]
    assert [(e["reason"], e["ended_by"], e["decided_by"], e["ended_at"]) for e in ended] == \
        [("balance_exhausted", "system", "ledger", (T0 + 10 * MIN).isoformat())]


def test_withdrawals_and_pool_expiry_are_notified(world):
    url, desk, closing = world
    n = notifier(desk.ledger, url)
    closing.append(n)
    desk.grant(text=1, voice=0, video=0, days=1)
    desk.request("t1", "text")
    desk.activate("t1")
    desk.end("t1", desk.at(T0 + 5 * MIN))
    desk.ledger.tick(desk.at(T0 + 20 * MIN), ["t1"], [])
    desk.ledger.withdrawal_minimum_minor = {}
    desk.post("withdrawal.requested", request_id="w1", doctor_id="d1", currency="MWK",
              amount_minor=100_000)
    desk.post("withdrawal.rejected", request_id="w1", doctor_id="d1", currency="MWK",
              reason="bank refused")
    desk.ledger.tick(desk.at(T0 + timedelta(days=1, minutes=2)), [], desk.pools)
    n.derive()
    by_type = defaultdict(list)
    for m in messages(url).values():
        by_type[m["type"]].append(m["data"])
    assert [(w["request_id"], w["amount_minor"], w["status"]) for w in by_type["withdrawal.held"]] \
        == [("w1", 100_000, "held")]
    assert by_type["withdrawal.rejected"][0]["reason"] == "bank refused"
    assert [p["payment_reference"] for p in by_type["pool.expired"]] == ["pay-1"]


@pytest.mark.parametrize(("before", "after", "reported"), [
    (3, 2, False), (2, 1, True), (1, 0, True), (5, 0, True), (1, 1, False), (0, 1, False),
    (2, 0, True), (0, 0, False)])
def test_balance_low_is_sent_on_falling_to_the_threshold_and_again_at_zero(before, after, reported):
    assert Units(threshold=1).falls(before, after) is reported


def test_derivation_is_exactly_once_and_equals_a_replay_from_zero(store_url, tmp_path):
    """Two notifiers derive the same log concurrently while it grows; every message exists
    once, and a fresh derivation of the whole log from position 0 gives the same messages."""
    clock = FakeClock()
    ledger = make_ledger(store_url, clock)
    desk = Desk(clock, ledger=ledger)
    desk.doctor()
    a, b = notifier(ledger, store_url), notifier(ledger, store_url)
    stop = threading.Event()

    def follow(n: Notifier) -> None:
        while not stop.is_set():
            n.derive()

    threads = [threading.Thread(target=follow, args=(n,)) for n in (a, b)]
    for t in threads:
        t.start()
    try:
        day(desk, sessions=4)
    finally:
        stop.set()
        for t in threads:
            t.join()
    a.derive()
    live = messages(store_url)
    scratch = open_store(f"sqlite:///{tmp_path / 'scratch.db'}")
    replay = Deriver(ledger, scratch, clock=WallClock())
    replay.setup()
    while replay.catch_up():
        pass
    replayed = {mid: json.loads(body) for mid, body in
                scratch.query("SELECT message_id, body FROM webhook_messages")}
    scratch.close()
    assert live == replayed and len(live) > 20
    assert a.deriver.races_lost + b.deriver.races_lost >= 0  # both ran; either may have lost
    for n in (a, b):
        n.close()
    ledger.close()


# ------------------------------------------------------------------------------- delivery


def test_receiver_down_then_up_gets_everything_in_order_with_stable_ids(world):
    url, desk, closing = world
    n = notifier(desk.ledger, url)
    closing.append(n)
    rx = receiver(closing)
    _, secret = n.create_endpoint(rx.url, [])
    rx.secrets.append(secret)
    rx.mode = "fail"  # up but failing: every attempt is recorded
    n.start()
    day(desk)
    assert wait_until(lambda: n.health()["lag_events"] == 0)
    expected = set(messages(url))
    # While it fails, only the first undelivered notification of each session, patient and
    # pool is attempted (order), again and again.
    assert wait_until(lambda: len(rx.attempts) > 2 * len({w for w, _ in rx.attempts}))
    assert {w for w, _ in rx.attempts} < expected
    rx.stop()  # then down: connections refused
    time.sleep(0.3)
    rx.start()
    rx.mode = "ok"
    assert rx.wait_for(len(expected))
    got = rx.snapshot()
    assert {r.webhook_id for r in got} == expected  # nothing lost, no new id on a retry
    assert {wid for wid, _ in rx.attempts} == expected  # every attempt carried a known id
    assert in_order_per_key(got)
    assert not rx.rejected


def test_a_hanging_receiver_does_not_delay_another_endpoint(world):
    url, desk, closing = world
    policy = DeliveryPolicy(timeout_seconds=60, retry_base_seconds=0.05, poll_seconds=0.02,
                            concurrency=8, per_endpoint=4)
    n = notifier(desk.ledger, url, policy)
    closing.append(n)
    slow, fast = receiver(closing), receiver(closing)
    slow.mode, slow.hang_seconds = "block", 120
    for rx in (slow, fast):
        rx.secrets.append(n.create_endpoint(rx.url, [])[1])
    n.start()
    day(desk)
    wait_until(lambda: n.health()["lag_events"] == 0)
    total = len(messages(url))
    try:
        assert fast.wait_for(total), "the fast endpoint waited for the hanging one"
        assert not slow.received and 1 <= slow.requests <= policy.per_endpoint
    finally:
        slow.release.set()
    assert slow.wait_for(total)


def test_a_rotated_secret_verifies_during_the_grace_period_and_not_after(world):
    url, desk, closing = world
    clock = WallClock()
    n = notifier(desk.ledger, url, clock=clock)
    closing.append(n)
    rx = receiver(closing)
    endpoint, old = n.create_endpoint(rx.url, ["session.*"])
    rx.secrets.append(old)  # the backend has not deployed the new secret yet
    _, new = n.endpoints.rotate(endpoint.endpoint_id, timedelta(seconds=60))
    assert new != old and new.startswith("whsec_")
    n.start()
    desk.grant(voice=3)
    desk.call("s1", T0)
    assert rx.wait_for(2)  # both paid_until changes verified with the old secret
    assert not rx.rejected
    clock.offset = timedelta(seconds=61)  # the grace period is over (still within 5 min)
    desk.end("s1", desk.at(T0 + 5 * MIN))
    assert wait_until(lambda: rx.rejected)  # signed with the new secret only
    assert len(rx.received) == 2
    rx.secrets[:] = [new]
    assert rx.wait_for(3)
    assert rx.snapshot()[-1].type == "session.ended"


def test_failures_back_off_then_dead_letter_and_a_manual_retry_delivers(world):
    url, desk, closing = world
    policy = DeliveryPolicy(timeout_seconds=2, retry_base_seconds=0.05, retry_max_seconds=0.1,
                            retry_for=timedelta(seconds=0.5), poll_seconds=0.02)
    n = notifier(desk.ledger, url, policy)
    closing.append(n)
    rx = receiver(closing)
    endpoint, secret = n.create_endpoint(rx.url, ["pool.expired"])
    rx.secrets.append(secret)
    rx.mode = "fail"
    desk.grant(days=1)
    desk.ledger.tick(desk.at(T0 + timedelta(days=1, minutes=2)), [], desk.pools)
    n.start()
    assert wait_until(lambda: n.deliveries(status="dead"))
    dead = n.deliveries(status="dead")[0]
    assert dead["attempts"] >= 2 and dead["last_status_code"] == 503
    assert n.health()["dead"] == 1 and n.health()["undelivered"] == 0
    rx.mode = "ok"
    n.retry(dead["id"])
    assert rx.wait_for(1)
    assert rx.snapshot()[0].webhook_id == dead["webhook_id"]
    assert wait_until(lambda: n.delivery(dead["id"])["status"] == "delivered")


def test_backoff_doubles_with_jitter_up_to_the_cap():
    import random

    policy, rng = DeliveryPolicy(retry_base_seconds=5, retry_max_seconds=60), random.Random(1)
    for attempts, full in [(1, 5), (2, 10), (3, 20), (4, 40), (5, 60), (12, 60)]:
        delays = [policy.backoff(attempts, rng) for _ in range(200)]
        assert full / 2 <= min(delays) and max(delays) <= full
        assert max(delays) - min(delays) > full / 4  # jittered, not fixed


def test_redirects_are_not_followed_and_response_bodies_are_capped(world):
    url, desk, closing = world
    n = notifier(desk.ledger, url, DeliveryPolicy(timeout_seconds=5, retry_base_seconds=5,
                                                  poll_seconds=0.02, response_cap_bytes=64))
    closing.append(n)
    moved, chatty = receiver(closing), receiver(closing)
    moved.mode, chatty.mode = "redirect", "big"
    for rx in (moved, chatty):
        rx.secrets.append(n.create_endpoint(rx.url, ["pool.expired"])[1])
    desk.grant(days=1)
    desk.ledger.tick(desk.at(T0 + timedelta(days=1, minutes=2)), [], desk.pools)
    n.start()
    assert wait_until(lambda: len(n.deliveries(status="retrying")) == 1 and
                      len(n.deliveries(status="delivered")) == 1)
    redirected = n.deliveries(status="retrying")[0]
    assert redirected["last_status_code"] == 302 and moved.requests == 1  # not followed
    capped = n.delivery(n.deliveries(status="delivered")[0]["id"])
    assert capped["last_response"] == "x" * 64


def test_urls_must_be_https_except_allowed_hosts():
    policy = UrlPolicy(frozenset({"127.0.0.1"}))
    assert policy.problem("https://backend.example/hook") is None
    assert policy.problem("http://127.0.0.1:8080/hook") is None
    assert "https" in policy.problem("http://backend.example/hook")
    assert "password" in policy.problem("https://user:pw@backend.example/hook")
    assert policy.problem("ftp://backend.example/hook") is not None


def test_replay_sends_history_again_with_the_same_ids_in_order(world):
    url, desk, closing = world
    n = notifier(desk.ledger, url)
    closing.append(n)
    day(desk)
    n.derive()
    rx = receiver(closing)
    endpoint, secret = n.create_endpoint(rx.url, ["session.*"])
    rx.secrets.append(secret)
    n.start()
    n.derive()
    assert n.deliveries(endpoint_id=endpoint.endpoint_id) == []  # history is not sent unasked
    session_messages = {m for m, body in messages(url).items() if body["type"].startswith("session.")}
    first = n.replay(endpoint.endpoint_id, from_position=0)
    assert first["deliveries"] == len(session_messages) and first["next_position"] is None
    assert rx.wait_for(len(session_messages))
    again = n.replay(endpoint.endpoint_id, from_position=0)
    assert again["deliveries"] == len(session_messages)
    assert wait_until(lambda: len(rx.snapshot()) == 2 * len(session_messages))
    assert {r.webhook_id for r in rx.snapshot()} == session_messages
    assert in_order_per_key(rx.snapshot()[:len(session_messages)])


def test_a_replay_while_the_same_delivery_is_in_flight_sends_it_again(any_world):
    """A replay asked while an attempt of the same delivery is in flight is not absorbed by
    that attempt: the attempt began before the replay (here: to the URL the endpoint had
    then), so the delivery is sent again after it, to the URL the endpoint has now."""
    url, desk, closing = any_world
    n = notifier(desk.ledger, url, DeliveryPolicy(timeout_seconds=20, retry_base_seconds=0.05,
                                                  poll_seconds=0.02))
    closing.append(n)
    old, new = receiver(closing), receiver(closing)
    old.mode, old.hang_seconds = "block", 20
    endpoint, secret = n.create_endpoint(old.url, ["pool.expired"])
    old.secrets.append(secret)
    new.secrets.append(secret)
    desk.grant(days=1)
    desk.ledger.tick(desk.at(T0 + timedelta(days=1, minutes=2)), [], desk.pools)
    n.start()
    try:
        assert wait_until(lambda: old.requests == 1)  # the attempt is in flight, blocked
        n.endpoints.update(endpoint.endpoint_id, {"url": new.url})
        assert n.replay(endpoint.endpoint_id, from_position=0)["deliveries"] == 1
    finally:
        old.release.set()  # the earlier attempt now succeeds, at the old URL
    assert old.wait_for(1)
    assert new.wait_for(1, timeout=10), "the replay was absorbed by the attempt in flight"
    assert new.snapshot()[0].webhook_id == old.snapshot()[0].webhook_id
    assert wait_until(lambda: n.deliveries(status="delivered"))


def test_a_manual_retry_while_in_flight_is_attempted_again_not_dead_lettered(any_world):
    """A manual retry of a delivery whose attempt is in flight, past its deadline, is not
    absorbed either: when that attempt fails it cannot dead-letter the delivery (the retry
    gave it a fresh window), and the delivery is attempted again."""
    url, desk, closing = any_world
    policy = DeliveryPolicy(timeout_seconds=4, retry_base_seconds=0.05, poll_seconds=0.02,
                            retry_for=timedelta(seconds=2))
    n = notifier(desk.ledger, url, policy)
    closing.append(n)
    rx = receiver(closing)
    rx.mode, rx.hang_seconds = "block", 30
    endpoint, secret = n.create_endpoint(rx.url, ["pool.expired"])
    rx.secrets.append(secret)
    desk.grant(days=1)
    desk.ledger.tick(desk.at(T0 + timedelta(days=1, minutes=2)), [], desk.pools)
    n.start()
    try:
        assert wait_until(lambda: rx.requests == 1)  # in flight; it will time out
        time.sleep(2.1)  # the delivery's window is over while its attempt hangs
        delivery = n.deliveries(endpoint_id=endpoint.endpoint_id)[0]
        n.retry(delivery["id"])
        assert wait_until(lambda: rx.requests >= 2, 15), \
            "the retry was absorbed by the attempt in flight"
    finally:
        rx.release.set()
    assert rx.wait_for(1)
    assert wait_until(lambda: n.delivery(delivery["id"])["status"] == "delivered")


def test_secrets_are_never_logged(world, caplog):
    url, desk, closing = world
    n = notifier(desk.ledger, url, DeliveryPolicy(timeout_seconds=1, retry_base_seconds=0.05,
                                                  poll_seconds=0.02))
    closing.append(n)
    rx = receiver(closing)
    rx.mode = "fail"
    endpoint, secret = n.create_endpoint(rx.url, [])
    _, rotated = n.endpoints.rotate(endpoint.endpoint_id, timedelta(hours=1))
    caplog.set_level(logging.DEBUG)
    n.start()
    desk.grant(voice=2)
    desk.call("s1", T0)
    assert wait_until(lambda: any("failed" in r.getMessage() for r in caplog.records))
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for value in (secret, rotated, secret.removeprefix("whsec_"), rotated.removeprefix("whsec_")):
        assert value not in text


# -------------------------------------------------------------- crash: the notifier killed


def _notify_process(url: str) -> subprocess.Popen:
    env = {**os.environ, "LEDGER_DATABASE_URL": url, "LEDGER_WEBHOOK_ALLOW_HTTP_HOSTS": "127.0.0.1",
           "LEDGER_WEBHOOK_TIMEOUT_SECONDS": "5", "LEDGER_WEBHOOK_CLAIM_MARGIN_SECONDS": "0.5",
           "LEDGER_WEBHOOK_RETRY_BASE_SECONDS": "0.05", "LEDGER_WEBHOOK_RETRY_MAX_SECONDS": "0.2",
           "LEDGER_LOG_LEVEL": "warning",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    return subprocess.Popen([sys.executable, "-m", "runtime.cli", "notify"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_notifier_killed_mid_delivery_loses_nothing_and_resends_the_same_ids(world):
    url, desk, closing = world
    n = notifier(desk.ledger, url)  # only to register the endpoint; the CLI process sends
    closing.append(n)
    rx = receiver(closing)
    rx.secrets.append(n.create_endpoint(rx.url, [])[1])
    day(desk)
    while n.derive():  # the messages exist before either process sends
        pass
    rx.mode, rx.hang_seconds = "hang", 1.0
    first = _notify_process(url)
    try:
        assert wait_until(lambda: rx.requests >= 3)  # some delivered, one in flight
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    rx.mode = "ok"
    second = _notify_process(url)
    try:
        expected = set(messages(url))
        assert expected and wait_until(lambda: set(rx.distinct()) >= expected, 60)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    got = rx.snapshot()
    assert {r.webhook_id for r in got} == expected  # nothing lost, nothing new
    assert len(got) > len(expected)  # what was in flight came again, with the same ids
    assert in_order_per_key(sorted(rx.distinct().values(), key=lambda r: r.seq))


def test_a_priced_consultation_announces_its_lifecycle(tmp_path, clock):
    from test_marketplace import END, GRACE, SKEW, TOTAL, Clinic

    c = Clinic(clock)  # the ledger on POPO; the notifier's tables in a SQLite file
    url = f"sqlite:///{tmp_path / 'hooks.db'}"
    n = notifier(c.ledger, url)
    c.practitioner()
    c.top_up()
    c.in_progress("c1")
    c.tick_at(END + SKEW)  # completed by time: captured
    c.tick_at(END + SKEW + GRACE)  # the practitioner's share becomes available
    c.refund("c1")
    while n.derive():
        pass
    lifecycle = sorted((m for m in messages(url).values() if m["type"].startswith("consultation.")),
                       key=lambda m: m["position"])
    n.close()
    assert [m["type"] for m in lifecycle] == [
        "consultation.booked", "consultation.activated", "consultation.started",
        "consultation.closed", "consultation.earning_released", "consultation.refunded"]
    closed = lifecycle[3]["data"]
    assert (closed["status"], closed["reason"], closed["money"], closed["total_minor"]) == \
        ("completed", "completed_by_time", "captured", TOTAL)
    assert lifecycle[2]["data"]["first_joined"] == "patient"
    assert lifecycle[5]["data"]["refunded_minor"] == TOTAL
    assert all(m["data"]["resource"] == "/v1/consultations/c1" for m in lifecycle)


def test_drain_sends_everything_due_and_returns(world):
    """`ledger notify --once`: derive what is committed, send all that is due, return."""
    url, desk, closing = world
    n = notifier(desk.ledger, url)
    closing.append(n)
    rx = receiver(closing)
    rx.secrets.append(n.create_endpoint(rx.url, [])[1])
    day(desk, sessions=4)
    handed = n.drain()
    assert handed == len(messages(url)) and not n.dispatcher.busy()
    assert len(rx.distinct()) == handed and n.health()["undelivered"] == 0


def test_a_kept_alive_receiver_gets_each_delivery_once_over_reused_connections(any_world):
    """Connections are reused (the receiver answers HTTP/1.1 keep-alive): every delivery is
    sent once, succeeds at its first attempt, in order per key."""
    url, desk, closing = any_world
    n = notifier(desk.ledger, url)
    closing.append(n)
    rx = Receiver(keep_alive=True)
    closing.append(rx)
    rx.secrets.append(n.create_endpoint(rx.url, [])[1])
    day(desk, sessions=4)
    handed = n.drain()
    assert handed == len(messages(url)) == len(rx.snapshot()) == len(rx.distinct())
    assert {d["attempts"] for d in n.deliveries(limit=500)} == {1}
    assert in_order_per_key(rx.snapshot())



def test_an_answer_whose_body_stalls_is_a_timeout_not_a_crash():
    """A receiver that sends its status line, then stalls mid-body: the attempt is a timeout
    without a status (retried later), and the sender does not raise."""
    import socket
    import threading

    from notifications.sender import Sender

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stalled = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        stalled.wait(5)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        attempt = Sender(0.3, 1024, 2, "ua").post(
            f"http://127.0.0.1:{server.getsockname()[1]}/", b"{}", {})
    finally:
        stalled.set()
        server.close()
    assert attempt.status_code is None and not attempt.ok
    assert attempt.error.startswith("timed out")



def test_acknowledged_webhook_writes_commit_durably_on_sqlite(world):
    """What a request acknowledges (an endpoint created, changed or rotated; a delivery
    retried; a replay) commits at `synchronous=FULL` on SQLite, as the events do; the
    notifier's connection otherwise commits at `NORMAL` (the dispatcher's claims and outcomes
    may roll back on a power loss and are sent again: at-least-once). Traced at the
    connection: the level in force at each COMMIT of each call."""
    url, desk, closing = world
    n = notifier(desk.ledger, url)
    closing.append(n)
    rx = receiver(closing)
    level, commits = ["NORMAL"], []

    def trace(sql: str) -> None:
        if sql.startswith("PRAGMA synchronous="):
            level[0] = sql.partition("=")[2]
        elif sql == "COMMIT":
            commits.append(level[0])

    def levels(call) -> list[str]:
        commits.clear()
        call()
        return list(commits)

    n.store.conn.set_trace_callback(trace)
    endpoint, _ = n.create_endpoint(rx.url, ["pool.expired"])
    assert commits == ["FULL"]
    assert levels(lambda: n.endpoints.update(endpoint.endpoint_id, {"description": "b"})) \
        == ["FULL"]
    assert levels(lambda: rx.secrets.append(
        n.endpoints.rotate(endpoint.endpoint_id, timedelta(minutes=5))[1])) == ["FULL"]
    desk.grant(days=1)
    desk.ledger.tick(desk.at(T0 + timedelta(days=1, minutes=2)), [], desk.pools)
    sent = levels(lambda: (n.drain(max_seconds=WAIT), rx.wait_for(1), n.drain(WAIT)))
    assert sent and set(sent) == {"NORMAL"}  # claims and outcomes
    delivery = n.deliveries()[0]
    assert delivery["status"] == "delivered"
    assert levels(lambda: n.retry(delivery["id"])) == ["FULL"]
    assert levels(lambda: n.replay(endpoint.endpoint_id, from_position=0)) == ["FULL"]
    n.store.conn.set_trace_callback(None)
    assert n.store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL again
