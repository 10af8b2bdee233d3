"""Load from several threads that start together: the harness of the bench's client loops
(bench/http_load.py, bench/raw_postgres.py)."""

from __future__ import annotations

import threading
import time
from typing import Callable


def run_together(count: int, body: Callable[[int, threading.Barrier], None],
                 arm: Callable[[], float]) -> float:
    """Run `body(index, barrier)` in `count` daemon threads, each of which waits on `barrier`
    once it is ready (its connection open); `arm()` runs just before the threads are released
    (it sets the run's deadline or start) and returns the perf_counter instant the run counts
    from. Returns the seconds from that instant until the last thread has ended."""
    barrier = threading.Barrier(count + 1)
    threads = [threading.Thread(target=body, args=(i, barrier), daemon=True)
               for i in range(count)]
    for thread in threads:
        thread.start()
    counted_from = arm()
    barrier.wait()
    for thread in threads:
        thread.join()
    return time.perf_counter() - counted_from
