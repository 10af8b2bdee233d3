"""The deriver's units rows kept between batches (notifications/units.py): reused only while
the tracking row still reads the position they were committed at, dropped on any other start,
on a lost race, on an exception, and beyond their bounds. Every test compares the outcome (the
messages and the units tables) with a fresh deriver's derivation of the whole log from zero.
"""

from __future__ import annotations

from unittest.mock import patch

import pytest

from conftest import T0, FakeClock, make_ledger
from notifications.deriver import Deriver
from notifications.units import UnitsBatch
from projections.store import open_store
from test_billing import MIN, Desk
from test_webhooks import WallClock

UNITS_TABLES = {"webhook_pools": "pool_id, payment_reference, owner_id",
                "webhook_pool_units": "pool_id, bucket, free",
                "webhook_pool_links": "pool_id, patient_id",
                "webhook_patient_units": "patient_id, bucket, available"}


def phases(desk: Desk):
    """Pool activity in steps (yield between them), each changing units rows that the
    previous steps' batches read: grants and a member, holds down to `balance.low`, a removed
    member, charges and releases at a tick, then drawing to zero."""
    desk.doctor("d2")
    desk.doctor("d3")
    desk.grant("fam", owner="mum", seats=3, voice=4)
    desk.grant("solo", owner="p1", voice=2)
    desk.post("member.added", payment_reference="fam", patient_id="kid")
    yield
    desk.call("s1", T0 + MIN, patient="kid")
    desk.call("s2", T0 + MIN, patient="p1", doctor="d2")
    yield
    desk.pings("s1", T0 + MIN, T0 + 12 * MIN)
    desk.pings("s2", T0 + MIN, T0 + 12 * MIN)
    desk.tick(T0 + 13 * MIN)
    yield
    desk.at(T0 + 14 * MIN)
    desk.post("member.removed", payment_reference="fam", patient_id="kid")
    desk.end("s1", desk.at(T0 + 15 * MIN))
    desk.end("s2", desk.at(T0 + 15 * MIN))
    desk.tick(T0 + 40 * MIN)
    yield
    desk.grant("kids", owner="kid", voice=1, at=desk.at(T0 + 41 * MIN))
    desk.call("s3", T0 + 42 * MIN, patient="kid", doctor="d3")
    desk.call("s4", T0 + 42 * MIN, patient="mum", doctor="d2")
    desk.pings("s4", T0 + 42 * MIN, T0 + 60 * MIN)
    desk.tick(T0 + 61 * MIN)
    yield


def outcome(store) -> tuple:
    """The derived messages (without created_at) and the units tables, sorted."""
    messages = sorted(store.query("SELECT message_id, position, ordinal, event_type, "
                                  "ordering_key, body FROM webhook_messages"))
    return (messages, {t: sorted(tuple(r) for r in store.query(f"SELECT {cols} FROM {t}"))
                       for t, cols in UNITS_TABLES.items()})


def fresh(ledger, tmp_path) -> tuple:
    """The outcome of a new deriver on its own SQLite file, from position 0, reading every
    row on first use (no read-ahead, nothing kept: the reference)."""
    scratch = open_store(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        replay = Deriver(ledger, scratch, clock=WallClock())
        replay.units.max_pools = 0
        replay.setup()
        with patch.object(UnitsBatch, "read_ahead", lambda self, events: None):
            while replay.catch_up():
                pass
        return outcome(scratch)
    finally:
        scratch.close()


@pytest.fixture
def two(store_url):
    """A desk on `store_url` and two derivers on it (separate connections, one schema)."""
    clock = FakeClock()
    ledger = make_ledger(store_url, clock)
    desk = Desk(clock, ledger=ledger)
    desk.doctor()
    stores = [open_store(store_url) for _ in range(2)]
    a, b = (Deriver(ledger, s, clock=WallClock()) for s in stores)
    a.setup()
    yield desk, a, b
    for s in stores:
        s.close()
    ledger.close()


def test_kept_rows_are_dropped_when_another_deriver_advanced(two, tmp_path):
    """a derives, b derives (a's rows are stale now), a derives again: all as from zero; then
    an operator resets the derivation to 0 (tables emptied) and a derives it all again."""
    desk, a, b = two
    for i, _ in enumerate(phases(desk)):
        (b if i % 2 else a).catch_up(max_events=7)  # several batches each, reusing kept rows
        a.catch_up()
    assert a.units.kept_position() == a.position()
    expected = fresh(desk.ledger, tmp_path)
    assert outcome(a.store) == expected
    assert any('"balance.low"' in m[5] for m in expected[0])
    with a.store.transaction():
        for table in ("webhook_messages", *UNITS_TABLES):
            a.store.execute(f"DELETE FROM {table}")
        a.store.execute("UPDATE webhook_tracking SET notification_id = 0")
    a.catch_up()
    assert outcome(a.store) == expected


@pytest.mark.parametrize("where", ["derive", "transaction", "race"])
def test_a_batch_that_fails_or_loses_leaves_nothing_stale(two, tmp_path, monkeypatch, where):
    """A batch that raises while deriving (after changing some rows), raises inside its
    transaction, or loses the race to b: the next batches give what a fresh deriver gives."""
    desk, a, b = two
    steps = phases(desk)
    next(steps)
    a.catch_up()
    next(steps)
    target = {"derive": "_pool", "transaction": "_record", "race": "_derive"}[where]
    original, calls = getattr(a, target), []

    def once(*args):
        result = original(*args)
        calls.append(1)
        if len(calls) == 2 and where == "race":
            b.catch_up()
        elif len(calls) == 2:
            raise RuntimeError("injected")
        return result

    monkeypatch.setattr(a, target, once)
    for _ in steps:
        try:
            a.catch_up()
        except RuntimeError:
            pass
        a.catch_up()
    assert len(calls) >= 2 and (where != "race" or a.races_lost == 1)
    assert outcome(a.store) == fresh(desk.ledger, tmp_path)


@pytest.mark.parametrize("bound", ["max_pools", "max_available"])
def test_kept_rows_are_bounded(two, tmp_path, bound):
    """Rows beyond a bound are not kept (the next batch reads the tables); within it they are;
    either way the outcome is a fresh deriver's."""
    desk, a, _ = two
    setattr(a.units, bound, 1)
    steps = phases(desk)
    next(steps)  # two pools, three patients: over either bound
    a.catch_up()
    assert a.units.kept_position() is None
    setattr(a.units, bound, 1_000)
    for _ in steps:
        a.catch_up()
        assert a.units.kept_position() == a.position()
    assert outcome(a.store) == fresh(desk.ledger, tmp_path)


@pytest.mark.parametrize("count", [3, 1200])  # 1200: SQLite's chunks, PostgreSQL's COPY
def test_insert_new_leaves_existing_rows_and_query_keys_reads_them(store_url, count):
    """Store.insert_new skips a key that exists (in the table or earlier in the rows) and
    leaves the stored row as it was; Store.query_keys finds rows by any number of keys."""
    store = open_store(store_url)
    try:
        with store.transaction():
            store.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
            store.insert_new("kv", ("k",), ("k", "v"), [("a", "old")])
        rows = [(f"k{i:05}", "new") for i in range(count)] + [("a", "new"), ("k00000", "dup")]
        with store.transaction():
            store.insert_new("kv", ("k",), ("k", "v"), rows)
        assert sorted(store.query("SELECT k, v FROM kv WHERE k IN ('a', 'k00000')")) == [
            ("a", "old"), ("k00000", "new")]
        assert store.query("SELECT count(*) FROM kv") == [(count + 1,)]
        keys = [f"k{i:05}" for i in range(0, count, 2)] + ["a", "absent"]
        assert sorted(store.query_keys("kv", ("k", "v"), "k", keys)) == sorted(
            [(k, "new") for k in keys[:-2]] + [("a", "old")])
        assert store.query_keys("kv", ("k", "v"), "k", []) == []
    finally:
        store.close()


def test_key_lookups_on_postgresql_use_the_index_after_the_table_grew(pg_url):
    """Store.query_keys on PostgreSQL reads through the key's index whatever the table's
    statistics say: used while its table held 300 rows (analysed then, as autovacuum does),
    then again once it holds 30,000, not analysed since (a follower's table grows faster
    than autovacuum analyses it), it probes the index. A prepared `key = ANY(array)` kept
    the plan made for the small table: a scan of every row (the webhook deriver's lookups,
    docs/benchmarks.md, the tenth stop). The plans are the server's own, reported by
    auto_explain for each statement the store runs."""
    store = open_store(pg_url)
    try:
        store.execute('CREATE TABLE kv (k TEXT COLLATE "C" PRIMARY KEY, v TEXT NOT NULL)')
        store.execute("INSERT INTO kv SELECT 'k' || i, 'v' FROM generate_series(1, 300) i")
        store.execute("ANALYZE kv")
        absent = [f"x{i}" for i in range(200)]  # a deriver's batch names hundreds of pools
        for _ in range(20):  # past psycopg's prepare threshold (5), then the server's (5)
            assert store.query_keys("kv", ("k", "v"), "k", ["k1", *absent]) == [("k1", "v")]
        store.execute("INSERT INTO kv SELECT 'k' || i, 'v' FROM generate_series(301, 30000) i")
        plans: list[str] = []
        store.conn.add_notice_handler(lambda notice: plans.append(notice.message_primary))
        for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                        "SET auto_explain.log_level = 'notice'"):
            store.execute(setting)
        assert sorted(store.query_keys("kv", ("k", "v"), "k", ["k1", "k29999", *absent])) == [
            ("k1", "v"), ("k29999", "v")]
        assert len(plans) == 1 and "Seq Scan" not in plans[0] and "kv_pkey" in plans[0], plans
    finally:
        store.close()


def test_a_deriver_starting_mid_log_reads_the_sessions_it_missed_together(two, tmp_path,
                                                                           monkeypatch):
    """A deriver that starts where sessions are mid-stream (the followers' process after a
    restart) folds them, and the doctors' wallets, from one read of their streams
    (AggregateFollower.prefetch), never a read per aggregate, and derives what a fresh deriver
    derives from zero."""
    desk, a, b = two
    steps = phases(desk)
    next(steps)
    next(steps)  # calls requested and connected
    a.catch_up()  # then that process is gone; b starts at its position
    loads: list = []
    for follower in (b.sessions, b.wallets, b.consultations):
        monkeypatch.setattr(follower, "_events", lambda *args: loads.append(args) or [])
    for _ in steps:
        b.catch_up()
    assert loads == []
    assert outcome(b.store) == fresh(desk.ledger, tmp_path)


def test_a_deriver_starting_mid_log_reads_the_wallets_it_missed_together(two, tmp_path,
                                                                          monkeypatch):
    """The same for the doctors' wallets: a settlement that credits a wallet another process
    followed is folded from one read of its stream (with the session's), not a read of its
    own, and the deriver derives what a fresh one derives from zero."""
    desk, a, b = two
    for _ in phases(desk):
        pass
    a.catch_up()  # d2's wallet (s2's settlement) and s4 were followed by that process
    desk.end("s3", desk.at(T0 + 62 * MIN))
    desk.end("s4", desk.at(T0 + 62 * MIN))
    desk.tick(T0 + 120 * MIN)  # settles s4: d2's wallet is credited a second time
    loads: list = []
    for follower in (b.sessions, b.wallets, b.consultations):
        monkeypatch.setattr(follower, "_events", lambda *args: loads.append(args) or [])
    b.catch_up()
    assert loads == []
    assert outcome(b.store) == fresh(desk.ledger, tmp_path)
