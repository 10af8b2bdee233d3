"""Read models (projections/): balances, wallets, live sessions; exactly once; replay (I6, I7).

Every test runs on SQLite and PostgreSQL through the `store_url` fixture. Scenarios are built
only through `Ledger.ingest` and `Ledger.tick`; the tick is fed from the live view.
"""

from __future__ import annotations

import io
import json
import threading
from datetime import datetime, timedelta
from typing import Callable
from uuid import UUID

import pytest

import projections.projector as projector_module
from ledger.rules import Policy
from ledger.application import Ledger
from projections import Projector, VerifyReport, export_events, replay_verify
from storage import persistence_env, postgres_conninfo, postgres_parts

POLICY = Policy()
MWK_UNIT = 350_000  # 3500.00 MWK per unit, tariff 2026-01-12, doctor in MW
USD_UNIT = 300  # 3.00 USD per unit elsewhere
PLAN_30 = {"name": "Family", "price_minor": 100, "currency": "MWK", "seats": 2,
           "duration_days": 30, "units": {"text": 4, "voice": 6, "video": 2}}


class World:
    """A ledger on `url` plus helpers to post events and run ticks from the live view."""

    def __init__(self, url: str, clock) -> None:
        self.url, self.clock, self.t0, self.n = url, clock, clock.now, 0
        self.ledger = Ledger(env=persistence_env(url), clock=clock, policy=POLICY,
                             withdrawal_minimum_minor={"MWK": 0, "USD": 0})
        self.projectors: list[Projector] = []

    def at(self, **delta) -> datetime:
        return self.t0 + timedelta(**delta)

    def post(self, event_type: str, at: datetime, **payload) -> dict:
        """Ingest one event occurring (and received) at `at`."""
        self.n += 1
        self.clock.set(at)
        return self.ledger.ingest(f"ev-{self.n}", event_type, at, payload).result

    def projector(self) -> Projector:
        projector = Projector(self.ledger, self.url, POLICY)
        self.projectors.append(projector)
        return projector

    def tick(self, projector: Projector, as_of: datetime) -> None:
        """Catch up, let the ledger decide what the live view says is due, repeat (bounded)."""
        self.clock.set(as_of)
        for _ in range(20):
            projector.catch_up()
            sessions, pools = projector.due_sessions(as_of), projector.due_pools(as_of)
            if not sessions and not pools:
                return
            self.ledger.tick(as_of, sessions, pools)
        raise AssertionError("tick did not converge")

    def grant(self, reference: str, owner: str, at: datetime, plan: dict = PLAN_30) -> str:
        return self.post("subscription.granted", at, payment_reference=reference, owner_id=owner,
                         plan=plan, starts_at=at.isoformat())["pool_id"]

    def close(self) -> None:
        for projector in self.projectors:
            projector.close()
        self.ledger.close()


@pytest.fixture
def world(store_url, clock):
    w = World(store_url, clock)
    yield w
    w.close()


# ----------------------------------------------------------------------------- scenarios


def voice_call(w: World, projector: Projector, sid: str = "call-1", patient: str = "p1",
               doctor: str = "d1", start: datetime | None = None) -> datetime:
    """A 25-minute voice call with activity pings every 5 min, ticked as it goes (not settled).

    Returns the instant the call ended.
    """
    start = start or w.at(minutes=0)
    w.post("session.requested", start, session_id=sid, kind="voice", patient_id=patient,
           doctor_id=doctor)
    connected = start + timedelta(seconds=10)
    w.post("call.connected", connected, session_id=sid)
    for minute in (5, 10, 15, 20):
        w.post("session.activity", connected + timedelta(minutes=minute), session_id=sid)
        w.tick(projector, connected + timedelta(minutes=minute))
    ended = connected + timedelta(minutes=25)
    w.tick(projector, ended)
    w.post("session.ended", ended, session_id=sid, ended_by="doctor")
    return ended


def rich_scenario(w: World, projector: Projector) -> dict:
    """Family plan with a member, text and calls, a reversal, a refund with a hold, an expiry
    with a hold, withdrawals; everything settled. Returns pool ids by short name."""
    w.post("doctor.registered", w.at(), doctor_id="d1", country="MW")
    w.post("doctor.registered", w.at(), doctor_id="d2", country="ZM")
    pools = {"fam": w.grant("pay-fam", "p1", w.at()),
             "ref": w.grant("pay-ref", "p4", w.at(), {**PLAN_30, "seats": 1,
                                                      "units": {"voice": 3}}),
             "short": w.grant("pay-short", "p3", w.at(), {**PLAN_30, "seats": 1,
                                                          "duration_days": 1,
                                                          "units": {"text": 2}})}
    w.post("member.added", w.at(), payment_reference="pay-fam", patient_id="p2")
    ended = voice_call(w, projector)
    w.tick(projector, ended + timedelta(minutes=15))
    member_text(w, projector, w.at(hours=1))
    reversed_call(w, projector, w.at(hours=2))
    refund_while_held(w, projector, w.at(hours=3))
    expiry_while_held(w, projector, w.at(days=1))
    withdrawals(w, w.at(days=1, hours=1))
    projector.catch_up()
    return pools


def member_text(w: World, projector: Projector, start: datetime) -> None:
    """p2 (member of pay-fam) texts d2: activated at +2 min, ended at +14 min -> 2 units USD."""
    w.post("session.requested", start, session_id="text-1", kind="text", patient_id="p2",
           doctor_id="d2")
    w.post("session.patient_message", start + timedelta(minutes=1), session_id="text-1")
    w.post("text.activated", start + timedelta(minutes=2), session_id="text-1")
    w.post("session.activity", start + timedelta(minutes=8), session_id="text-1")
    w.post("session.ended", start + timedelta(minutes=14), session_id="text-1",
           ended_by="patient")
    w.tick(projector, start + timedelta(minutes=40))


def reversed_call(w: World, projector: Projector, start: datetime) -> None:
    """p4 calls d2; blocks 1-2 are charged, then an earlier end (5 min) arrives -> reversal."""
    w.post("session.requested", start, session_id="call-rev", kind="voice", patient_id="p4",
           doctor_id="d2")
    w.post("call.connected", start + timedelta(seconds=10), session_id="call-rev")
    for minute in (5, 10, 15, 20):
        at = start + timedelta(minutes=minute, seconds=10)
        w.post("session.activity", at, session_id="call-rev")
        w.tick(projector, at)
    w.tick(projector, start + timedelta(minutes=22))
    w.post("session.ended", start + timedelta(minutes=5, seconds=10), session_id="call-rev",
           ended_by="patient")
    w.tick(projector, start + timedelta(minutes=40))


def refund_while_held(w: World, projector: Projector, start: datetime) -> None:
    """p4 requests a call (unit held), pay-ref is refunded, the call is declined: revoked."""
    w.post("session.requested", start, session_id="call-ref", kind="voice", patient_id="p4",
           doctor_id="d1")
    w.post("payment.refunded", start + timedelta(seconds=30), payment_reference="pay-ref")
    w.post("call.declined", start + timedelta(seconds=60), session_id="call-ref")
    w.tick(projector, start + timedelta(minutes=30))


def expiry_while_held(w: World, projector: Projector, expiry: datetime) -> None:
    """p3 requests a text 5 min before pay-short expires; never activated: forfeited."""
    w.post("session.requested", expiry - timedelta(minutes=5), session_id="text-exp",
           kind="text", patient_id="p3", doctor_id="d1")
    w.tick(projector, expiry + timedelta(minutes=30))
    w.tick(projector, expiry + timedelta(minutes=50))


def withdrawals(w: World, at: datetime) -> None:
    """d1 withdraws part of the settled MWK pay: w1 completes, w2 is rejected."""
    for request_id, amount in (("w1", 500_000), ("w2", 200_000)):
        w.post("withdrawal.requested", at, doctor_id="d1", currency="MWK", amount_minor=amount,
               request_id=request_id)
    w.post("withdrawal.completed", at + timedelta(hours=1), doctor_id="d1", currency="MWK",
           request_id="w1")
    w.post("withdrawal.rejected", at + timedelta(hours=1), doctor_id="d1", currency="MWK",
           request_id="w2", reason="bank refused")


# ------------------------------------------------------------------------------ checkers


def pool_rows(projector: Projector) -> dict[tuple[str, str], dict]:
    rows = projector._store.query(
        "SELECT pool_id, bucket, granted, free, held, charged, reversed, forfeited, revoked "
        "FROM balance_pool_buckets")
    names = ("granted", "free", "held", "charged", "reversed", "forfeited", "revoked")
    return {(r[0], r[1]): dict(zip(names, map(int, r[2:]))) for r in rows}


def wallet_rows(projector: Projector) -> dict[tuple[str, str], dict]:
    rows = projector._store.query(
        "SELECT doctor_id, currency, credited, reversed, pending, available, held, withdrawn "
        "FROM wallet_balances")
    names = ("credited", "reversed", "pending", "available", "held", "withdrawn")
    return {(r[0], r[1]): dict(zip(names, map(int, r[2:]))) for r in rows}


def assert_conservation(projector: Projector) -> None:
    """I6 (and I3) on every pool/bucket and every wallet of the live views."""
    pools, wallets = pool_rows(projector), wallet_rows(projector)
    assert pools and wallets
    for key, v in pools.items():
        rest = v["free"] + v["held"] + v["charged"] + v["forfeited"] + v["revoked"]
        assert v["granted"] == rest, key
        assert min(v["free"], v["held"], v["charged"]) >= 0, key
    for key, v in wallets.items():
        rest = v["pending"] + v["available"] + v["held"] + v["withdrawn"]
        assert v["credited"] - v["reversed"] == rest, key
        assert min(v["pending"], v["available"], v["held"]) >= 0, key


def assert_matches_aggregates(w: World, projector: Projector) -> None:
    """The views equal the Pool and Wallet aggregates' own state (the write model)."""
    for (pool_id, bucket), v in pool_rows(projector).items():
        pool = w.ledger.repository.get(UUID(pool_id))
        assert v == {"granted": pool.granted[bucket], "free": pool.free[bucket],
                     "held": sum(1 for b in pool.held.values() if b == bucket),
                     "charged": sum(1 for b in pool.charged.values() if b == bucket),
                     "reversed": pool.reversed[bucket], "forfeited": pool.forfeited[bucket],
                     "revoked": pool.revoked[bucket]}, (pool_id, bucket)
    ids = projector._store.query("SELECT wallet_id, doctor_id, currency FROM wallet_ids")
    views = wallet_rows(projector)
    assert len(ids) == len(views)
    for wallet_id, doctor_id, currency in ids:
        wallet = w.ledger.repository.get(UUID(wallet_id))
        v = views[(doctor_id, currency)]
        assert (v["available"], v["held"], v["withdrawn"]) == (
            wallet.available_minor, wallet.held_minor, wallet.withdrawn_minor)


# ---------------------------------------------------------------------------------- tests


def test_voice_call_units_and_pay_pending_then_available(world):
    w = world
    projector = w.projector()
    w.post("doctor.registered", w.at(), doctor_id="d1", country="MW")
    pool_id = w.grant("pay-1", "p1", w.at())
    voice_call(w, projector)
    projector.catch_up()
    # Before settlement: blocks 1 and 2 auto-deducted, blocks 3 and 4 held (one block ahead
    # of the running block); the pay of the charged blocks is pending.
    balance = projector.patient_balance("p1", w.clock.now)
    assert balance["buckets"]["voice"] == {"available": 2, "usable_now": 2, "held": 2,
                                           "charged": 2}
    assert projector.doctor_wallet("d1")["wallets"] == [
        {"currency": "MWK", "pending_minor": 2 * MWK_UNIT, "available_minor": 0, "held_minor": 0,
         "withdrawn_minor": 0, "credited_minor": 2 * MWK_UNIT, "reversed_minor": 0}]
    assert projector.live_session_ids() == ["call-1"]
    settle_due = w.clock.now + timedelta(seconds=POLICY.settlement_grace_seconds)
    assert projector.due_sessions(settle_due - timedelta(seconds=1)) == []
    assert projector.due_sessions(settle_due) == ["call-1"]
    w.tick(projector, settle_due)
    projector.catch_up()
    # 25 minutes -> 3 units charged, 3 × 3500.00 MWK available to the doctor.
    balance = projector.patient_balance("p1", w.clock.now)
    assert balance["patient_id"] == "p1" and balance["as_of"] == w.clock.now.isoformat()
    assert balance["buckets"] == {
        "text": {"available": 4, "usable_now": 4, "held": 0, "charged": 0},
        "voice": {"available": 3, "usable_now": 3, "held": 0, "charged": 3},
        "video": {"available": 2, "usable_now": 2, "held": 0, "charged": 0}}
    [pool] = balance["pools"]
    assert pool["pool_id"] == pool_id and pool["role"] == "owner"
    assert pool["payment_reference"] == "pay-1" and not pool["expired"] and not pool["refunded"]
    assert pool["effective_end"] == w.at(days=37).isoformat()
    assert pool["buckets"]["voice"] == {"granted": 6, "available": 3, "held": 0, "charged": 3,
                                        "reversed": 0, "forfeited": 0, "revoked": 0}
    assert projector.doctor_wallet("d1") == {"doctor_id": "d1", "wallets": [
        {"currency": "MWK", "pending_minor": 0, "available_minor": 3 * MWK_UNIT, "held_minor": 0,
         "withdrawn_minor": 0, "credited_minor": 3 * MWK_UNIT, "reversed_minor": 0}]}
    assert projector.live_session_ids() == [] and projector.due_sessions(w.at(days=99)) == []
    assert_conservation(projector)
    assert_matches_aggregates(w, projector)


def test_rich_scenario_conservation_and_write_model(world):
    w = world
    projector = w.projector()
    pools = rich_scenario(w, projector)
    assert_conservation(projector)
    assert_matches_aggregates(w, projector)
    rows = pool_rows(projector)
    assert rows[(pools["ref"], "voice")] == {"granted": 3, "free": 0, "held": 0, "charged": 1,
                                              "reversed": 1, "forfeited": 0, "revoked": 2}
    assert rows[(pools["short"], "text")] == {"granted": 2, "free": 0, "held": 0, "charged": 0,
                                               "reversed": 0, "forfeited": 2, "revoked": 0}
    assert rows[(pools["fam"], "text")]["charged"] == 2  # the member's text session
    wallets = wallet_rows(projector)
    assert wallets[("d1", "MWK")] == {"credited": 3 * MWK_UNIT, "reversed": 0, "pending": 0,
                                      "available": 3 * MWK_UNIT - 500_000, "held": 0,
                                      "withdrawn": 500_000}
    assert wallets[("d2", "USD")] == {"credited": 4 * USD_UNIT, "reversed": USD_UNIT,
                                      "pending": 0, "available": 3 * USD_UNIT, "held": 0,
                                      "withdrawn": 0}
    member = projector.patient_balance("p2", w.clock.now)
    assert member["buckets"]["text"] == {"available": 2, "usable_now": 2, "held": 0, "charged": 2}
    assert [(p["role"], p["payment_reference"]) for p in member["pools"]] == [("member", "pay-fam")]
    refunded = projector.patient_balance("p4", w.clock.now)
    assert refunded["pools"][0]["refunded"] and refunded["buckets"]["voice"]["available"] == 0
    assert refunded["buckets"]["voice"]["charged"] == 1
    expired = projector.patient_balance("p3", w.clock.now)
    assert expired["pools"][0]["expired"] and expired["buckets"]["text"]["available"] == 0
    assert projector.due_pools(w.at(days=99)) == sorted([pools["fam"], pools["ref"]])
    assert projector.live_session_ids() == []


def test_withdrawal_hold_then_release(world):
    w = world
    projector = w.projector()
    w.post("doctor.registered", w.at(), doctor_id="d1", country="MW")
    w.grant("pay-1", "p1", w.at())
    w.tick(projector, voice_call(w, projector) + timedelta(minutes=15))
    w.post("withdrawal.requested", w.at(hours=1), doctor_id="d1", currency="MWK",
           amount_minor=400_000, request_id="w1")
    projector.catch_up()
    [wallet] = projector.doctor_wallet("d1")["wallets"]
    assert (wallet["available_minor"], wallet["held_minor"]) == (3 * MWK_UNIT - 400_000, 400_000)
    assert_conservation(projector)
    w.post("withdrawal.rejected", w.at(hours=2), doctor_id="d1", currency="MWK",
           request_id="w1", reason="closed account")
    projector.catch_up()
    [wallet] = projector.doctor_wallet("d1")["wallets"]
    assert (wallet["available_minor"], wallet["held_minor"], wallet["withdrawn_minor"]) == (
        3 * MWK_UNIT, 0, 0)
    assert projector.doctor_wallet("nobody") == {"doctor_id": "nobody", "wallets": []}


def test_member_removal_and_usable_now(world):
    w = world
    projector = w.projector()
    w.grant("pay-later", "p1", w.at(minutes=3))  # starts in 3 minutes
    w.post("member.added", w.at(minutes=3), payment_reference="pay-later", patient_id="p2")
    projector.catch_up()
    before = projector.patient_balance("p2", w.at(minutes=1))
    assert before["buckets"]["voice"] == {"available": 6, "usable_now": 0, "held": 0, "charged": 0}
    assert projector.patient_balance("p2", w.at(minutes=4))["buckets"]["voice"]["usable_now"] == 6
    w.post("member.removed", w.at(minutes=5), payment_reference="pay-later", patient_id="p2")
    projector.catch_up()
    after = projector.patient_balance("p2", w.at(minutes=6))
    assert after["buckets"]["voice"] == {"available": 0, "usable_now": 0, "held": 0, "charged": 0}
    assert after["pools"][0]["active"] is False
    assert projector.patient_balance("nobody", w.at())["pools"] == []


def test_catch_up_twice_is_a_no_op_and_survives_restart(world):
    w = world
    projector = w.projector()
    rich_scenario(w, projector)
    before = (pool_rows(projector), wallet_rows(projector), projector.live_session_ids())
    assert projector.catch_up() == 0
    assert projector.catch_up() == 0
    restarted = w.projector()  # a new process: positions are in the database
    assert restarted.catch_up() == 0
    assert (pool_rows(restarted), wallet_rows(restarted), restarted.live_session_ids()) == before


def test_lag_and_bounded_catch_up(world):
    w = world
    w.post("doctor.registered", w.at(), doctor_id="d1", country="MW")
    w.grant("pay-1", "p1", w.at())
    voice_call(w, w.projector())
    wipe_views(w)  # a rebuild: every projection starts again from position zero
    projector = w.projector()
    lag = projector.lag()
    assert set(lag) == {"balances", "wallets", "live", "marketplace"}
    assert all(v > 0 for v in lag.values())
    assert projector.catch_up(max_events=5) == 5
    assert any(v > 0 for v in projector.lag().values())
    for _ in range(10):
        if not projector.catch_up(max_events=7):
            break
    assert projector.lag() == {"balances": 0, "wallets": 0, "live": 0, "marketplace": 0}
    w.post("session.requested", w.at(hours=1), session_id="s2", kind="text", patient_id="p1",
           doctor_id="d1")
    assert all(v > 0 for v in projector.lag().values())
    projector.catch_up()
    assert projector.lag() == {"balances": 0, "wallets": 0, "live": 0, "marketplace": 0}
    assert projector.live_session_ids() == ["call-1", "s2"]


def test_concurrent_projectors_apply_each_event_exactly_once(world, monkeypatch):
    """Two projectors catch up in threads while a writer ingests: same result as one."""
    monkeypatch.setattr(projector_module, "BATCH_EVENTS", 7)  # many small racing batches
    w = world
    first, second = w.projector(), w.projector()
    w.post("doctor.registered", w.at(), doctor_id="d1", country="MW")
    for i in range(6):
        w.grant(f"pay-{i}", f"p{i}", w.at())
    done, errors = threading.Event(), []

    def follow(index: int, projector: Projector) -> None:
        try:
            for _ in range(10_000):
                projector.catch_up(max_events=23)
                if done.is_set() and not any(projector.lag().values()):
                    return
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=follow, args=(i, p)) for i, p in enumerate((first, second))]
    for thread in threads:
        thread.start()
    try:
        for i in range(6):
            voice_call(w, first if i % 2 else second, sid=f"call-{i}", patient=f"p{i}",
                       start=w.at(hours=i))
            w.tick(second, w.at(hours=i, minutes=40))
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    first.catch_up(), second.catch_up()
    report = replay_verify(w.ledger, w.url, POLICY)
    assert report.ok, report.differences
    assert report.events > 0
    assert pool_rows(first) == pool_rows(second)
    assert_conservation(first)
    assert_matches_aggregates(w, first)
    wallet = first.doctor_wallet("d1")["wallets"][0]
    assert (wallet["available_minor"], wallet["pending_minor"]) == (18 * MWK_UNIT, 0)


def test_exactly_once_counts_under_racing_catch_ups(world, monkeypatch):
    """Two projectors race on an idle store: the events they report applied add up to one."""
    monkeypatch.setattr(projector_module, "BATCH_EVENTS", 5)
    w = world
    loader = w.projector()
    rich_scenario(w, loader)
    loader.close()
    w.projectors.remove(loader)
    wipe_views(w)
    racers = [w.projector() for _ in range(3)]
    counts, barrier = [0] * len(racers), threading.Barrier(len(racers))

    def race(index: int) -> None:
        barrier.wait()
        for _ in range(1_000):
            got = racers[index].catch_up(max_events=11)
            counts[index] += got
            if not any(racers[index].lag().values()):
                return

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(racers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    report = replay_verify(w.ledger, w.url, POLICY)
    assert report.ok, report.differences
    assert sum(counts) == report.events
    assert_conservation(racers[0])


def wipe_views(w: World) -> None:
    """Empty every view and reset tracking (a rebuild), through a throwaway projector."""
    projector = w.projector()
    store = projector._store
    with store.transaction():
        for table in ("balance_pools", "balance_pool_buckets", "balance_members",
                      "balance_patient_buckets", "wallet_ids", "wallet_balances", "live_sessions",
                      "live_pools", "money_wallets", "platform_accounts", "live_consultations",
                      "projection_tracking"):
            store.execute(f"DELETE FROM {table}")


def test_replay_verify_ok_then_names_corrupted_accounts(world):
    w = world
    projector = w.projector()
    pools = rich_scenario(w, projector)
    progress: list[tuple[int, int]] = []
    report = replay_verify(w.ledger, w.url, POLICY, progress=lambda a, b: progress.append((a, b)))
    assert isinstance(report, VerifyReport)
    assert report.ok, report.differences
    assert report.events > 0 and report.accounts > 10
    head = w.ledger.recorder.max_notification_id()
    assert progress and progress[-1] == (head, head)
    store = projector._store
    store.execute("UPDATE balance_pool_buckets SET free = free + 1 "
                  "WHERE pool_id = ? AND bucket = ?", (pools["fam"], "voice"))
    store.execute("UPDATE wallet_balances SET available = available - 7 WHERE doctor_id = ?",
                  ("d2",))
    store.execute("DELETE FROM balance_members WHERE patient_id = ?", ("p2",))
    report = replay_verify(w.ledger, w.url, POLICY)
    assert not report.ok
    text = "\n".join(report.differences)
    assert f"pool {pools['fam']}/voice: live free=" in text
    assert f"member {pools['fam']}/p2: missing in live" in text
    assert "wallet d2/USD: live available=893 replay available=900" in text
    assert any(line.startswith(f"I6 pool {pools['fam']}/voice") for line in report.differences)
    assert_scratch_dropped(w.url)


def assert_scratch_dropped(url: str) -> None:
    if not url.startswith("postgresql://"):
        return
    import psycopg

    with psycopg.connect(postgres_conninfo(url)) as conn:
        rows = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                            (postgres_parts(url)["schema"] + "_replay",)).fetchall()
    assert rows == []


def test_export_writes_one_json_line_per_event(world):
    w = world
    projector = w.projector()
    rich_scenario(w, projector)
    out = io.StringIO()
    count = export_events(w.ledger, out)
    lines = out.getvalue().splitlines()
    stored = w.ledger.recorder.select_notifications(start=0, limit=100_000,
                                                    inclusive_of_start=False)
    assert count == len(lines) == len(stored)
    records = [json.loads(line) for line in lines]
    assert [r["position"] for r in records] == [n.id for n in stored]
    granted = next(r for r in records if r["topic"].endswith("Pool.Granted"))
    assert {"position", "originator_id", "originator_version", "topic", "timestamp",
            "payment_reference", "plan", "starts_at", "effective_end"} <= set(granted)
    assert datetime.fromisoformat(granted["starts_at"]).tzinfo is not None
    UUID(granted["originator_id"])


def test_postgres_notification_gaps_are_skipped(pg_url, clock):
    """PostgreSQL ids have gaps (failed inserts use up bigserial values): resume after them."""
    import psycopg

    w = World(pg_url, clock)
    try:
        projector = w.projector()
        w.post("doctor.registered", w.at(), doctor_id="d1", country="MW")
        w.grant("pay-1", "p1", w.at())
        projector.catch_up()
        schema = postgres_parts(pg_url)["schema"]
        with psycopg.connect(postgres_conninfo(pg_url), autocommit=True) as conn:
            for _ in range(5):
                conn.execute(f"SELECT nextval('\"{schema}\".ledger_events_notification_id_seq')")
        voice_call(w, projector)
        w.tick(projector, w.at(hours=1))
        projector.catch_up()
        assert projector.lag() == {"balances": 0, "wallets": 0, "live": 0, "marketplace": 0}
        assert projector.patient_balance("p1", w.at(hours=1))["buckets"]["voice"]["charged"] == 3
        assert replay_verify(w.ledger, pg_url, POLICY).ok
    finally:
        w.close()


def live_rows(projector: Projector) -> list[tuple]:
    return sorted(projector._store.query(
        "SELECT session_id, patient_id, doctor_id, kind, state, next_due_at FROM live_sessions"))


def restarted_reads_together(w: World, rows: Callable[[Projector], list[tuple]]) -> list[tuple]:
    """`rows` of a new projector caught up from the stored tracking position; asserts it read
    no aggregate on its own (`ledger.events.get`, a follower's miss) and that its rows are a
    rebuild's from zero."""
    restarted = w.projector()
    loads: list = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(w.ledger.events, "get", lambda *a, **k: loads.append(a) or [])
        restarted.catch_up()
    assert loads == []
    seen = rows(restarted)
    wipe_views(w)
    rebuilt = w.projector()
    rebuilt.catch_up()
    assert rows(rebuilt) == seen
    return seen


def test_a_projector_starting_mid_log_reads_the_sessions_it_missed_together(world):
    """A projector that starts where sessions are mid-stream (the followers' process after a
    restart, or beside a tick) advances them from one read of their streams
    (AggregateFollower.prefetch), never a read per session, and its live view is a rebuild's
    from zero."""
    w = world
    for i in range(6):
        w.post("doctor.registered", w.at(), doctor_id=f"d{i}", country="MW")
        w.grant(f"pay-{i}", f"p{i}", w.at())
        w.post("session.requested", w.at(minutes=1), session_id=f"s{i}", kind="text",
               patient_id=f"p{i}", doctor_id=f"d{i}")
    w.projector().catch_up()  # followed up to here, then that process is gone
    for i in range(6):
        w.post("text.activated", w.at(minutes=2), session_id=f"s{i}")
        if i % 2:
            w.post("session.activity", w.at(minutes=9), session_id=f"s{i}")
    w.tick(w.projector(), w.at(minutes=12))  # another process charges the next blocks
    for i in range(0, 6, 2):
        w.post("session.ended", w.at(minutes=13), session_id=f"s{i}", ended_by="patient")
    for i in range(1, 6, 2):
        w.post("session.activity", w.at(minutes=13), session_id=f"s{i}")
    seen = restarted_reads_together(w, live_rows)
    assert [row[4] for row in seen] == ["ended", "active"] * 3, seen


def marketplace_rows(projector: Projector) -> list[tuple]:
    return sorted(projector._store.query(
        "SELECT consultation_id, patient_id, practitioner_id, status, next_due_at "
        "FROM live_consultations"))


def test_a_projector_starting_mid_log_reads_the_consultations_it_missed_together(world):
    """The marketplace view does the same for priced consultations (§10): a projector that
    starts where they are mid-stream reads them together, never one by one, and its rows
    are a rebuild's from zero."""
    w = world
    w.post("doctor.registered", w.at(), doctor_id="t1", country="IN")
    w.post("price_list.published", w.at(), practitioner_id="t1", version="v1",
           currency="INR", tax_bps=1800, share_bps=5000, fees=[
               {"consultation_type": "individual", "duration_minutes": 50,
                "fee_minor": 100_000}])
    start = w.at(hours=3)
    for i in range(4):
        w.post("wallet.topped_up", w.at(minutes=1), patient_id=f"p{i}", currency="INR",
               amount_minor=118_000, payment_reference=f"pay-{i}", provider="razorpay")
        w.post("consultation.booked", w.at(minutes=2), consultation_id=f"c{i}",
               patient_id=f"p{i}", practitioner_id="t1", consultation_type="individual",
               mode="video", start=(start + timedelta(hours=i)).isoformat(),
               duration_minutes=50)
    w.projector().catch_up()  # followed up to here, then that process is gone
    for i in range(4):
        w.post("consultation.activated", w.at(minutes=3), consultation_id=f"c{i}",
               admin_id="admin-7")
    seen = restarted_reads_together(w, marketplace_rows)
    assert [row[3] for row in seen] == ["activated"] * 4, seen
