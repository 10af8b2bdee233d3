"""The garbage collector of a long-running process (runtime/collector.py): while a service's
lifespan runs, and while the followers' process follows, the startup heap is frozen and young
objects are collected on the tick's threshold (10,000 allocations, not Python's 700); both
are undone when it stops, so a process that lives on (this one) is as it was. What it saves is
measured in `make bench` (docs/benchmarks.md, the eighth stop), not here."""

from __future__ import annotations

import gc
import threading
import time

from fastapi.testclient import TestClient

from conftest import T0, FakeClock
from runtime.asgi import create_app
from runtime.followers import run_followers
from runtime.settings import Settings
from scheduler.tick import TICK_GC_GEN0


def settings(tmp_path) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path}/l.db", tick_enabled=False,
                    clock="manual")


def test_a_running_service_collects_young_objects_less_often(tmp_path) -> None:
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert before[0] < TICK_GC_GEN0  # Python's default here, or the test proves nothing
    with TestClient(create_app(settings(tmp_path), clock=FakeClock(T0))) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_threshold()[0] == TICK_GC_GEN0
        assert gc.get_freeze_count() > frozen
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen


def test_the_followers_process_collects_young_objects_less_often(tmp_path) -> None:
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    stop = threading.Event()
    follower = threading.Thread(target=run_followers, args=(settings(tmp_path), stop))
    follower.start()
    try:
        deadline = time.monotonic() + 60
        while gc.get_threshold()[0] != TICK_GC_GEN0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gc.get_threshold()[0] == TICK_GC_GEN0
        assert gc.get_freeze_count() > frozen
    finally:
        stop.set()
        follower.join(timeout=60)
    assert not follower.is_alive()
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen
