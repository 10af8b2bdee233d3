"""`run_tick` (scheduler/tick.py) reads the due ids once per pass and decides them a page at a
time without catching the views up between pages: every due block is charged exactly once,
the MAX_ROUNDS bound leaves the rest to the next tick (`more`), and a second tick finishes it
(I1: no block charged twice). On SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest

import scheduler.tick as tick_module
from scheduler.tick import run_tick
from test_projections import World

SESSIONS = 5


def due_texts(w: World) -> tuple:
    """SESSIONS text sessions (one patient, doctor and pool each) whose block 1 is due."""
    start = w.at(minutes=1)
    for i in range(SESSIONS):
        w.post("doctor.registered", w.t0, doctor_id=f"d{i}", country="MW")
        w.grant(f"pay{i}", f"p{i}", w.t0)
        w.post("session.requested", start, session_id=f"s{i}", kind="text", patient_id=f"p{i}",
               doctor_id=f"d{i}")
        w.post("text.activated", start + timedelta(seconds=30), session_id=f"s{i}")
        w.post("session.activity", start + timedelta(minutes=9), session_id=f"s{i}")
    as_of = start + timedelta(minutes=12)
    w.clock.set(as_of)
    return w.projector(), as_of


def charges(report) -> Counter:
    return Counter((s["session_id"], s["block"]) for s in report.steps if s["action"] == "charge")


@pytest.fixture
def world(store_url, clock):
    w = World(store_url, clock)
    yield w
    w.close()


def test_pages_in_one_pass_charge_every_due_block_once(world, monkeypatch) -> None:
    monkeypatch.setattr(tick_module, "PAGE", 2)
    projector, as_of = due_texts(world)
    report = run_tick(world.ledger, projector, as_of)
    assert charges(report) == Counter({(f"s{i}", 1): 1 for i in range(SESSIONS)})
    assert not report.more and not report.failed
    assert not run_tick(world.ledger, projector, as_of).steps  # nothing left, nothing twice


def test_the_round_bound_leaves_the_rest_to_the_next_tick(world, monkeypatch) -> None:
    monkeypatch.setattr(tick_module, "PAGE", 2)
    monkeypatch.setattr(tick_module, "MAX_ROUNDS", 2)
    projector, as_of = due_texts(world)
    first = run_tick(world.ledger, projector, as_of)
    assert sum(charges(first).values()) == 4 and first.more
    second = run_tick(world.ledger, projector, as_of)
    assert charges(first) + charges(second) == Counter({(f"s{i}", 1): 1 for i in range(SESSIONS)})
    assert not second.more
