"""The ledger on real stores: SQLite (a file) and PostgreSQL (a fresh schema), via `store_url`.

* the same small scenario (grant, request, connect, end, tick, settle) gives the same money;
* idempotent re-ingest after reopening the application (a new Ledger on the same store);
* optimistic concurrency: two stale copies of one session → IntegrityError for the second
  save, and nothing of it is written.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from eventsourcing.persistence import IntegrityError

from conftest import T0, FakeClock, make_ledger
from ledger import errors
from ledger.billing import Work, apply_step, next_step
from ledger.domain import Pool, Session
from ledger.application import Ledger
from test_billing import MIN, MW_RATE, S, Desk, named
from test_invariants import check_all, events_of, fold


@contextmanager
def opened(url: str, clock: FakeClock):
    ledger = make_ledger(url, clock)
    try:
        yield ledger
    finally:
        ledger.close()


def small_scenario(desk: Desk) -> None:
    desk.doctor("d1", "MW")
    desk.grant("pay-1", owner="p1", voice=3, text=1, video=0)
    desk.call("s1", T0)
    desk.activity("s1", desk.at(T0 + 9 * MIN))
    desk.tick(T0 + 11 * MIN)  # block 1 charged, block 3 held
    desk.end("s1", desk.at(T0 + 14 * MIN))
    desk.tick(T0 + 24 * MIN)  # settled: 2 units (14 minutes)


def summary(ledger: Ledger) -> dict:
    events = events_of(ledger)
    folded = fold(events)
    s = folded.by_sid["s1"]
    pool: Pool = ledger.repository.get(Pool.create_id("pay-1"))
    return {"types": [type(e).__qualname__ for e in events if not
                      type(e).__qualname__.startswith("Receipt")],
            "owed": s.settled.units_owed, "net": s.net_units(), "ended_at": s.ended_at,
            "free": pool.free, "charged": sorted(pool.charged),
            "wallet": {k: w.credited for k, w in folded.wallets.items()}}


def test_same_scenario_same_money_on_every_store(store_url: str) -> None:
    clock = FakeClock()
    with opened(store_url, clock) as ledger:
        desk = Desk(clock, ledger=ledger)
        small_scenario(desk)
        events = events_of(ledger)
        check_all(events, ledger, accepted_ids=[f"ev-{k}" for k in range(1, desk.n + 1)])
        got = summary(ledger)
    # The same scenario on POPO is the reference.
    ref_clock = FakeClock()
    ref = Desk(ref_clock)
    small_scenario(ref)
    assert got == summary(ref.ledger)
    assert (got["owed"], got["net"], got["ended_at"]) == (2, 2, T0 + 14 * MIN)
    assert got["free"] == {"text": 1, "voice": 1, "video": 0}
    assert got["wallet"] == {("d1", "MWK"): 2 * MW_RATE}


def test_idempotent_reingest_after_reopening(store_url: str) -> None:
    clock = FakeClock()
    request = {"session_id": "s1", "kind": "voice", "patient_id": "p1", "doctor_id": "d1"}
    with opened(store_url, clock) as first:
        desk = Desk(clock, ledger=first)
        desk.doctor("d1", "MW")
        desk.grant("pay-1", voice=3)
        original = first.ingest("req-s1", "session.requested", T0, request)
        first.ingest("con-s1", "call.connected", T0 + 5 * S, {"session_id": "s1"})
        n_events = len(events_of(first))
    clock.advance(3600)
    with opened(store_url, clock) as second:  # a new process on the same store
        assert len(events_of(second)) == n_events
        again = second.ingest("req-s1", "session.requested", T0, request)
        assert again.replayed and again.result == original.result
        with pytest.raises(errors.IdempotencyConflict):
            second.ingest("req-s1", "session.requested", T0, {**request, "kind": "video"})
        # The grant re-posted under a new event id with the same content is a no-op too.
        pool_id = second.ingest("grant-again", "subscription.granted", T0, {
            "payment_reference": "pay-1", "owner_id": "p1",
            "plan": {"name": "Basic", "price_minor": 1_000_000, "currency": "MWK",
                     "units": {"text": 3, "voice": 3, "video": 3}, "seats": 1,
                     "duration_days": 30},
            "starts_at": T0.isoformat()}).result["pool_id"]
        assert pool_id == str(Pool.create_id("pay-1"))
        assert len(events_of(second)) == n_events + 1  # only that event id's receipt
        # And the reopened ledger carries on: end, tick, settle.
        second.ingest("end-s1", "session.ended", T0 + 30 * MIN, {"session_id": "s1"})
        second.tick(T0 + 2 * 60 * MIN, ["s1"])
        second.tick(T0 + 3 * 60 * MIN, ["s1"])
        session = second.get_session("s1")
        assert session.settled and session.settlement["units_owed"] == 2  # idle end at 15:05
        check_all(events_of(second), second)


def test_two_stale_copies_of_one_session_second_save_conflicts(store_url: str) -> None:
    clock = FakeClock()
    with opened(store_url, clock) as ledger, opened(store_url, clock) as other:
        desk = Desk(clock, ledger=ledger)
        desk.doctor("d1", "MW")
        desk.grant("pay-1", voice=5)
        desk.call("s1", T0)
        desk.activity("s1", desk.at(T0 + 9 * MIN))
        as_of = T0 + 11 * MIN
        # Two workers (two applications on one store) load the same session version.
        w1, w2 = Work(ledger.load), Work(other.load)
        s1, s2 = w1.get(Session.create_id("s1")), w2.get(Session.create_id("s1"))
        assert s1.version == s2.version
        for work, session in ((w1, s1), (w2, s2)):
            step = next_step(session, ledger.policy)
            assert (step.action, step.block) == ("charge", 1)
            apply_step(work, session, step, as_of, ledger.policy)
        ledger.save(*w1.to_save())
        n_events = len(events_of(ledger))
        pool_version = ledger.repository.get(Pool.create_id("pay-1")).version
        with pytest.raises(IntegrityError):
            other.save(*w2.to_save())
        # Nothing of the losing save was written: not the session's, not the pool's events.
        assert len(events_of(ledger)) == n_events
        assert ledger.repository.get(Pool.create_id("pay-1")).version == pool_version
        events = events_of(ledger)
        assert [e.n for e in named(events, "Session.AutoDeducted")] == [1]
        assert len(named(events, "Pool.Charged")) == 1
        # A stale pool alone (session fresh) also loses, atomically.
        w3 = Work(other.load)
        stale_pool = w3.get(Pool.create_id("pay-1"))
        ledger.ingest("act", "session.activity", T0 + 11 * MIN, {"session_id": "s1"})
        desk.request("s2", "text", at=T0 + 11 * MIN)  # takes a unit: the pool moves on
        stale_pool.hold(session_id="sX", block=1, bucket="voice", patient_id="p1",
                        at=T0 + 11 * MIN)
        receipt_like = Session(session_id="sX", kind="voice", patient_id="p1", doctor_id="d1",
                               requested_at=T0 + 11 * MIN, pool_id=str(stale_pool.id))
        n_events = len(events_of(ledger))
        with pytest.raises(IntegrityError):
            other.save(receipt_like, stale_pool)
        assert len(events_of(ledger)) == n_events
        assert other.load(Session.create_id("sX")) is None  # the new aggregate was not written
        check_all(events_of(ledger), ledger)


def test_tick_on_reopened_store_does_not_repeat_decisions(store_url: str) -> None:
    clock = FakeClock()
    with opened(store_url, clock) as ledger:
        desk = Desk(clock, ledger=ledger)
        desk.doctor("d1", "MW")
        desk.grant("pay-1", voice=5)
        desk.call("s1", T0)
        desk.pings("s1", T0, T0 + 20 * MIN)
        ledger.tick(T0 + 21 * MIN, ["s1"])
    with opened(store_url, clock) as again:  # a restart: the same tick runs again
        report = again.tick(T0 + 21 * MIN, ["s1"])
        assert report.charged == []
        again.tick(T0 + 60 * MIN, ["s1"])
        again.tick(T0 + 90 * MIN, ["s1"])
        events = events_of(again)
        # Idle end at 20:00 + 15:00: blocks 1–3 auto-deducted once each, block 4 at settlement.
        assert [e.n for e in named(events, "Session.AutoDeducted")] == [1, 2, 3]
        assert again.get_session("s1").settlement["units_owed"] == 4
        check_all(events, again)


def test_tick_on_an_inconsistent_snapshot_retries_instead_of_crashing() -> None:
    """A worker reads a session before another worker charged block 1, and its pool after:
    the pool no longer holds the unit the stale session wants to charge. That is a lost race:
    the tick reloads and decides again (nothing charged twice), it does not crash."""
    desk = Desk(FakeClock())
    desk.doctor("d1", "MW")
    desk.grant("pay-1", voice=5)
    desk.call("s1", T0)
    desk.activity("s1", desk.at(T0 + 9 * MIN))
    sid = Session.create_id("s1")
    before = desk.ledger.repository.get(sid)
    desk.tick(T0 + 11 * MIN)  # the other worker charges block 1
    real_load = desk.ledger.load
    served = []

    def racing_load(aggregate_id):
        if aggregate_id == sid:
            served.append(aggregate_id)
            if len(served) == 1:  # the tick's candidate read, reused for its first decision
                return desk.ledger.repository.get(sid, version=before.version)
        return real_load(aggregate_id)

    real_many = desk.ledger.load_many

    def racing_many(aggregate_ids, shared=False):  # the tick's units read through load_many
        loaded = real_many(aggregate_ids, shared)
        if sid in loaded and not served:
            served.append(sid)
            loaded[sid] = desk.ledger.repository.get(sid, version=before.version)
        return loaded

    desk.ledger.load = racing_load  # this worker's first reads of the session are stale
    desk.ledger.load_many = racing_many
    report = desk.ledger.tick(T0 + 11 * MIN, ["s1"])
    assert served and report.conflicts == 1 and report.charged == []
    events = desk.events()
    assert [e.n for e in named(events, "Session.AutoDeducted")] == [1]
    check_all(events, desk.ledger)


@pytest.mark.parametrize("with_snapshots", [False, True])
def test_stream_reads_use_the_index_on_a_store_not_yet_analyzed(pg_url, with_snapshots) -> None:
    """A new store (or one just bulk-imported) has no planner statistics until autovacuum
    analyzes it; the batched stream read must still look each aggregate up by the primary key,
    not hash-join the ids against a scan of the whole log (storage/streams.py EVENTS_AFTER)."""
    import uuid

    import psycopg

    ledger = make_ledger(pg_url, FakeClock(T0))
    recorder = ledger.recorder
    table = recorder.events_table_name
    snapshots = ledger.snapshots.recorder.events_table_name if with_snapshots else None
    ids = [uuid.uuid4() for _ in range(8)]
    with recorder.datastore.get_connection() as conn:
        conn.execute(psycopg.sql.SQL(
            "INSERT INTO {}.{} (originator_id, originator_version, topic, state) "
            "SELECT md5((g / 4)::text)::uuid, g % 4 + 1, 'bench', '\\x00' "
            "FROM generate_series(0, 39999) AS g").format(
                psycopg.sql.Identifier(recorder.datastore.schema), psycopg.sql.Identifier(table)))
        plan = conn.execute(psycopg.sql.SQL("EXPLAIN (FORMAT JSON) ")
                            + recorder.streams_statement(snapshots),
                            (ids, [0] * len(ids))).fetchone()["QUERY PLAN"]
    ledger.close()

    def nodes(node: dict):
        yield node
        for child in node.get("Plans", ()):
            yield from nodes(child)

    scans = {(n["Node Type"], n.get("Relation Name")) for n in nodes(plan[0]["Plan"])}
    assert ("Seq Scan", table) not in scans, scans
    assert any(relation == table for _, relation in scans), scans
