"""The availability gate and the classification of store errors (storage/availability.py)."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
from eventsourcing.persistence import ConnectionUnavailableError, IntegrityError, OperationalError
from psycopg_pool import PoolTimeout

from storage import StoreGate, StoreUnavailable, is_unavailable


class Probe:
    def __init__(self) -> None:
        self.calls, self.up = 0, False

    def __call__(self) -> None:
        self.calls += 1
        if not self.up:
            raise psycopg.OperationalError("connection refused")


def test_gate_fails_fast_probes_once_per_interval_and_reopens(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("storage.availability.time.monotonic", lambda: now[0])
    probe = Probe()
    gate = StoreGate(probe, probe_interval_seconds=1.0)
    gate.check()  # up: no probe
    assert probe.calls == 0
    gate.failed(PoolTimeout("couldn't get a connection"), probed=True)
    for _ in range(5):  # within the interval: refused at once, the database is not asked
        with pytest.raises(StoreUnavailable):
            gate.check()
    assert probe.calls == 0 and not gate.up
    now[0] += 1.5
    with pytest.raises(StoreUnavailable):
        gate.check()  # the interval's one probe fails
    assert probe.calls == 1
    probe.up, now[0] = True, now[0] + 1.5
    gate.check()  # the next probe connects: open again, and stays open without probing
    gate.check()
    assert gate.up and probe.calls == 2


def test_errors_a_retry_can_cure_are_unavailable_and_bugs_are_not():
    def chained(outer: BaseException, inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise outer from exc
        except BaseException as exc:
            return exc

    assert is_unavailable(StoreUnavailable("down"))
    assert is_unavailable(chained(OperationalError("x"), PoolTimeout("no connection in 3 s")))
    assert is_unavailable(chained(RuntimeError("tick"), psycopg.OperationalError("refused")))
    assert is_unavailable(sqlite3.OperationalError("database is locked"))
    assert is_unavailable(ConnectionUnavailableError("Timed out waiting for return of writer"))
    assert not is_unavailable(sqlite3.OperationalError("no such table: receipts"))
    assert not is_unavailable(chained(OperationalError("x"),
                                      sqlite3.OperationalError("no such column: y")))
    assert not is_unavailable(IntegrityError("duplicate key"))
    assert not is_unavailable(KeyError("voice"))
