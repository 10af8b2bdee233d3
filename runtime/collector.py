"""The garbage collector of a long-running ledger process: a service worker (runtime/asgi.py)
and the followers' process (runtime/followers.py).

`collecting_less_often()`, around the process's working life:
- *The startup heap is frozen.* Modules, classes, schemas and routes (about 127,000 objects
  in a worker) move to the permanent generation after one full collection, so full
  collections stop traversing them. A full collection holds the GIL and stops every request
  in flight (docs/design.md, "The p99 tail").
- *Young collections run on 10,000 allocations instead of Python's 700* (`fewer_collections`,
  the tick's setting, scheduler/tick.py). The cache of aggregates, the units and the
  followers' pages keep objects alive across requests. With the default threshold, the
  collector kept walking them: 14 % of a worker's CPU under batches of 100, and 16 % of the
  followers' process (A/B, docs/benchmarks.md, the eighth stop).

Nothing is left uncollected: reference counting frees what it always did, and cycles are
still collected, on 14× fewer allocations. On exit the thresholds are restored and the heap
unfrozen, so a process that lives on (the tests start many apps) is as it was.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

from scheduler.tick import fewer_collections


@contextmanager
def collecting_less_often() -> Iterator[None]:
    """Freeze what is alive now (after one full collection) and collect young objects less
    often, until the block ends; then unfreeze and restore the thresholds."""
    gc.collect()
    gc.freeze()
    try:
        with fewer_collections():
            yield
    finally:
        gc.unfreeze()
