"""The followers in their own process (runtime/followers.py): `ledger serve` on PostgreSQL
starts the projector, the webhook notifier and the audit follower in one child process, its
request worker reads what that child projects (the read contract: `Ledger-Position` /
`min_position`), and the child ends with the service. The supervisor restarts a child that
fails and leaves one that exits cleanly. No timing is asserted: waits are bounded generously.
"""

from __future__ import annotations

import sys
import time

import httpx
import psutil
import pytest

from runtime.followers import FollowerProcess
from runtime.settings import Settings
from simulation.crash import ADMIN_KEY, Service

HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


def children(pid: int) -> list[int]:
    return [child.pid for child in psutil.Process(pid).children()]


def alive(pid: int) -> bool:
    """Running (not ended, nor a zombie waiting to be reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.postgres
def test_serve_on_postgres_projects_in_a_child_process_and_reads_see_the_writes(pg_url,
                                                                               tmp_path):
    service = Service(pg_url, tmp_path / "service.log",
                      env={"LEDGER_TICK_ENABLED": "false", "LEDGER_CLOCK": "system"})
    service.start()
    try:
        service.wait_ready()
        followers = children(service.proc.pid)
        assert len(followers) == 1, "one followers process beside the request worker"
        at = httpx.get(service.base_url + "/v1/clock", headers=HEADERS).json()["now"]
        posted = httpx.post(service.base_url + "/v1/events", headers=HEADERS, json={
            "event_id": "fp-1", "type": "subscription.granted", "occurred_at": at,
            "payload": {"payment_reference": "fp-pay", "owner_id": "fp-patient",
                        "starts_at": at,
                        "plan": {"name": "Solo", "price_minor": 100, "currency": "MWK",
                                 "units": {"text": 3, "voice": 0, "video": 0}, "seats": 1,
                                 "duration_days": 30}}})
        assert posted.status_code == 201, posted.text
        position = posted.headers["Ledger-Position"]
        balance = httpx.get(service.base_url + "/v1/patients/fp-patient/balance",
                            params={"min_position": position}, headers=HEADERS, timeout=30)
        assert balance.status_code == 200, balance.text
        assert balance.json()["buckets"]["text"]["available"] == 3
        assert int(balance.headers["Ledger-Position"]) >= int(position)
    finally:
        service.stop()
    assert wait_until(lambda: not alive(followers[0])), "the followers stop with the service"


def test_followers_run_in_the_worker_with_a_manual_clock_or_sqlite_or_when_told():
    pg = "postgresql://x@127.0.0.1/db"
    assert Settings(database_url=pg).followers_in_child()
    assert not Settings(database_url=pg, clock="manual").followers_in_child()
    assert not Settings(database_url=pg, followers="inline").followers_in_child()
    assert not Settings(database_url="sqlite:///x.db").followers_in_child()
    assert Settings(database_url="sqlite:///x.db", followers="process").followers_in_child()


def test_a_failed_child_is_restarted_and_a_clean_exit_is_left_alone(tmp_path):
    marker = tmp_path / "runs"
    failing = FollowerProcess([sys.executable, "-c",
                               f"open({str(marker)!r}, 'a').write('x'); raise SystemExit(1)"])
    failing.start()
    try:
        assert wait_until(lambda: marker.exists() and len(marker.read_text()) >= 2)
    finally:
        failing.stop()
    clean = tmp_path / "clean"
    quiet = FollowerProcess([sys.executable, "-c", f"open({str(clean)!r}, 'a').write('x')"])
    quiet.start()
    try:
        assert wait_until(lambda: quiet.pid is None and clean.exists())
        time.sleep(1.5)  # longer than the first restart pause: no second run
        assert clean.read_text() == "x"
    finally:
        quiet.stop()
