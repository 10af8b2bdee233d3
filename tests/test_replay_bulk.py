"""`replay --verify` in bulk (projections/verify.py `bulk_replay`): one pass over the log,
events folded in memory across pages, flushed in bulk (COPY on PostgreSQL), the `live`
projection skipping sessions settled by its stop. With tiny pages, flush bounds and COPY
threshold every path runs on a small log; the rebuild must equal the live views (which the
live projector built batch by batch), count the same events, and still find a corrupted row.
"""

from __future__ import annotations

import pytest

import projections.store as store_module
import projections.verify as verify_module
from projections import replay_verify
from test_projections import (POLICY, World, assert_conservation, rich_scenario, voice_call,
                              wipe_views)


@pytest.fixture
def world(store_url, clock):
    w = World(store_url, clock)
    yield w
    w.close()


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(verify_module, "REPLAY_PAGE", 7)
    monkeypatch.setattr(verify_module, "FLUSH_ROWS", 5)
    monkeypatch.setattr(store_module, "COPY_MIN_ROWS", 2)


def built(w: World):
    """The rich scenario (everything settled) plus one call left open, caught up."""
    projector = w.projector()
    rich_scenario(w, projector)
    voice_call(w, projector, sid="open-call", start=w.at(days=2))
    catch_up(projector)
    return projector


def catch_up(projector) -> int:
    applied = 0
    for _ in range(1000):
        got = projector.catch_up()
        applied += got
        if not got:
            return applied
    raise AssertionError("did not catch up")


def test_the_bulk_replay_rebuilds_the_live_views_exactly(world, tiny):
    projector = built(world)
    assert projector.live_session_ids()  # a session the replay must rebuild, not skip
    report = replay_verify(world.ledger, world.url, POLICY)
    assert report.ok, report.differences
    assert report.accounts > 10
    assert_conservation(projector)


def test_the_bulk_replay_counts_what_the_live_projector_applies(world, tiny):
    built(world)
    report = replay_verify(world.ledger, world.url, POLICY)
    assert report.ok, report.differences
    wipe_views(world)  # rebuild the live views batch by batch, counting
    assert catch_up(world.projector()) == report.events


def test_the_bulk_replay_finds_a_corrupted_live_row(world, tiny):
    projector = built(world)
    store = projector._store
    with store.locked(), store.transaction():
        store.execute("UPDATE balance_pool_buckets SET free = free + 1 WHERE bucket = 'voice'")
    report = replay_verify(world.ledger, world.url, POLICY)
    assert not report.ok
    assert any(" live free=" in d and "replay free=" in d for d in report.differences)
    assert any(d.startswith("I6 pool") for d in report.differences)


def test_the_replay_gathers_missing_planner_statistics_once(pg_url):
    """A table PostgreSQL never analysed (reltuples = -1) is analysed before the page scan (the
    planner otherwise reads the rest of the table for every page); an analysed one is left."""
    store = store_module.PostgresStore(pg_url)
    try:
        store.execute("CREATE TABLE events_here (notification_id bigint PRIMARY KEY)")
        store.execute("INSERT INTO events_here SELECT generate_series(1, 50)")

        def reltuples() -> float:
            return store.query("SELECT reltuples FROM pg_class "
                               "WHERE oid = to_regclass('events_here')")[0][0]

        assert reltuples() < 0
        verify_module.ensure_statistics(store, "events_here")
        assert reltuples() == 50
        store.execute("INSERT INTO events_here SELECT generate_series(51, 60)")
        verify_module.ensure_statistics(store, "events_here")
        assert reltuples() == 50  # statistics present: not gathered again
    finally:
        store.close()
