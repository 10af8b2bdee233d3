"""The crash test's short version (`make crash-test` runs 20 kills per store): the service
with two workers is SIGKILLed 5 times under concurrent posts and ticks, on each store; nothing
acknowledged may be lost, no (session, block) charged twice, no amount negative, HTTP balances
equal to the log's charges, and `ledger replay --verify` clean (simulation/crash.py)."""

from __future__ import annotations

import pytest

from conftest import PG_URL
from simulation.crash import emptied, run_crash_test

KILLS = 5


def _run(store: str, tmp_path) -> None:
    report = run_crash_test(kills=KILLS, store=store, workers=2, clients=3, seed=11,
                            workdir=tmp_path, postgres_url=PG_URL, max_up_seconds=2.0,
                            progress=lambda line: None)
    assert report.ok, "\n".join(report.lines())
    # It ran under load, through kills, and the ticks charged and settled meanwhile.
    assert report.acknowledged > 50 and report.retries > 0
    assert report.blocks_charged > 0 and report.sessions_settled > 0


def test_crash_sqlite(tmp_path):
    _run("sqlite", tmp_path)


@pytest.mark.postgres
def test_crash_postgres(pg_url, tmp_path):  # pg_url: fails in CI if PostgreSQL is unreachable
    _run("postgres", tmp_path)


def test_a_second_run_starts_from_an_emptied_workdir(tmp_path):
    """What a run leaves (the SQLite files, the service log, the workers' metrics directory
    with its files) is removed before the next one, which used to stop on the directory."""
    workdir = tmp_path / "sqlite"
    (workdir / "metrics").mkdir(parents=True)
    (workdir / "metrics" / "counter_1.db").write_bytes(b"x")
    (workdir / "ledger.db").write_bytes(b"x")
    (workdir / "service.log").write_text("x")
    assert emptied(workdir) == workdir and list(workdir.iterdir()) == []
    assert list(emptied(tmp_path / "new").iterdir()) == []
