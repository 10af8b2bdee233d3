"""Clocks injected into the ledger: the wall clock, and a manual clock for simulations."""

from __future__ import annotations

import threading
from datetime import datetime, timezone


class SystemClock:
    """The wall clock, UTC, whole seconds."""

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc).replace(microsecond=0)


class ManualClock:
    """A clock that only moves when told to (`set`), never backwards; thread-safe."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def set(self, moment: datetime) -> datetime:
        """Move to `moment` if it is later; returns the clock's time afterwards."""
        with self._lock:
            self._now = max(self._now, moment.astimezone(timezone.utc).replace(microsecond=0))
            return self._now
