"""Group commit (ledger/group_commit.py): single events queued while a unit is being written are
decided and saved together, and each caller gets exactly its own outcome — the one ingesting
the events one after the other in queue order gives; a refused event writes nothing; a
duplicate replays (I8); a unit that raises leaves each caller to redo its own event alone.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from conftest import T0, FakeClock, make_ledger
from ledger import errors
from ledger.application import Accepted
from ledger.group_commit import GroupCommit
from test_write_path import grant


class HeldLedger:
    """The ledger behind a gate: its first `ingest` waits until `release`, so the events posted
    meanwhile queue behind it; records the size of every unit it runs."""

    def __init__(self, ledger, batch_fails: bool = False) -> None:
        self.ledger, self.batch_fails = ledger, batch_fails
        self.units: list[int] = []
        self.gate, self.entered = threading.Event(), threading.Event()

    def ingest(self, *item) -> Accepted:
        self.units.append(1)
        self.entered.set()
        self.gate.wait(10)
        return self.ledger.ingest(*item)

    def ingest_batch(self, items, fatal):
        self.units.append(len(items))
        if self.batch_fails:
            raise RuntimeError("the store went away mid-unit")
        return self.ledger.ingest_batch(items, fatal)


def post_queued(group: GroupCommit, held: HeldLedger, items: list[tuple]) -> list:
    """Post items[0] (it leads and is held), then each other item once the previous one is
    queued, release the gate; each caller's outcome (Accepted or the exception it raised)."""
    outcomes: list = [None] * len(items)

    def post(index: int) -> None:
        try:
            outcomes[index] = group.ingest(*items[index])
        except Exception as exc:  # noqa: BLE001 - asserted on below
            outcomes[index] = exc

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(items))]
    threads[0].start()
    assert held.entered.wait(10)
    for queued, thread in enumerate(threads[1:], start=1):
        thread.start()
        deadline = time.monotonic() + 10
        while len(group._queue) < queued and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(group._queue) == queued
    held.gate.set()
    for thread in threads:
        thread.join(20)
    return outcomes


ITEMS = [("e1", "doctor.registered", T0, {"doctor_id": "d1", "country": "MW"}),
         grant("e2", "pay1", "p1", units=1),
         ("e3", "session.requested", T0, {"session_id": "s1", "kind": "text",
                                           "patient_id": "p1", "doctor_id": "d1"}),
         ("e4", "session.requested", T0, {"session_id": "s2", "kind": "text",
                                           "patient_id": "p1", "doctor_id": "d1"}),
         ("e5", "session.requested", T0, {"session_id": "s3", "kind": "voice",
                                           "patient_id": "p1", "doctor_id": "d9"}),
         ("e2", *grant("e2", "pay1", "p1", units=1)[1:]),
         ("e1", "doctor.registered", T0, {"doctor_id": "d1", "country": "KE"}),
         ("e6", "session.ended", T0 + timedelta(seconds=30),
          {"session_id": "s1", "ended_by": "patient", "reason": "done"})]


def describe(outcome) -> tuple:
    if isinstance(outcome, Accepted):
        return ("accepted", outcome.replayed, outcome.result)
    return (type(outcome).__name__, str(outcome))


def test_queued_events_form_one_unit_and_each_caller_gets_its_own_outcome(store_url) -> None:
    clock = FakeClock(T0 + timedelta(minutes=1))
    ledger, reference = make_ledger(store_url, clock), make_ledger(None, clock)
    try:
        held = HeldLedger(ledger)
        group = GroupCommit(held, fatal=lambda exc: True, max_items=32)
        outcomes = post_queued(group, held, ITEMS)
        assert held.units == [1, len(ITEMS) - 1]  # the leader alone, then the queue as one unit

        expected = []
        for item in ITEMS:
            try:
                expected.append(reference.ingest(*item))
            except errors.LedgerError as exc:
                expected.append(exc)
        assert [describe(o) for o in outcomes] == [describe(e) for e in expected]
        for (event_id, *_), outcome in zip(ITEMS, outcomes):
            if isinstance(outcome, Accepted):
                assert outcome.result["event_id"] == event_id  # its own result, no one else's
        assert [type(o).__name__ for o in outcomes] == [
            "Accepted", "Accepted", "Accepted", "SessionConflict", "UnknownDoctor",
            "Accepted", "IdempotencyConflict", "Accepted"]
        assert outcomes[5].replayed and not outcomes[1].replayed
        assert ledger.get_receipt("e4") is None and ledger.get_receipt("e5") is None
        assert ledger.get_session("s1").ended_at is not None
        assert ledger.recorder.max_notification_id() == max(
            o.position for o in outcomes if isinstance(o, Accepted) and not o.replayed)
    finally:
        ledger.close()
        reference.close()


def test_a_unit_that_raises_leaves_each_caller_to_ingest_its_own_event_alone() -> None:
    clock = FakeClock(T0 + timedelta(minutes=1))
    ledger = make_ledger(None, clock)
    for item in ITEMS[:2]:
        ledger.ingest(*item)
    held = HeldLedger(ledger, batch_fails=True)
    group = GroupCommit(held, fatal=lambda exc: True, max_items=32)
    # e3 leads alone; e4 (the patient's second text session) and a re-post of e3 form a unit
    # that raises; their callers then ingest alone, in either order, with the same outcomes.
    outcomes = post_queued(group, held, [ITEMS[2], ITEMS[3], ITEMS[2]])
    assert held.units[:2] == [1, 2]  # the unit of two raised ...
    assert held.units[2:] == [1, 1]  # ... so each waiter ingested its own event alone
    assert [type(o).__name__ for o in outcomes] == ["Accepted", "SessionConflict", "Accepted"]
    assert outcomes[2].replayed and outcomes[2].result == outcomes[0].result
    assert ledger.get_receipt("e4") is None


def test_one_event_per_unit_when_grouping_is_off() -> None:
    clock = FakeClock(T0 + timedelta(minutes=1))
    ledger = make_ledger(None, clock)
    group = GroupCommit(ledger, fatal=lambda exc: True, max_items=1)
    assert group.ingest(*ITEMS[0]).result["event_id"] == "e1"
    with pytest.raises(errors.IdempotencyConflict):
        group.ingest(*ITEMS[6])
    with pytest.raises(ValueError):
        GroupCommit(ledger, fatal=lambda exc: True, max_items=0)
