"""The audit follower: a daemon thread that keeps the chains and the history caught up.

Every `poll_seconds` it calls `AuditService.catch_up` (bounded per call); while a call still
finds work it calls again at once, so a backlog drains without waiting a poll per batch. It is
never on the write path: requests commit without it, and it reads only what is committed up
to the safe head (audit/logs.py). An error is logged and retried at the next poll.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("ledger.audit")
EVENTS_PER_CALL = 10_000


class AuditFollower:
    """Runs `service.catch_up()` in the background until `close()`."""

    def __init__(self, service, poll_seconds: float = 1.0) -> None:
        self.service, self.poll_seconds = service, poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-follower", daemon=True)
        self.failures = 0
        self.cpu_seconds = 0.0  # CPU time this thread has used (time.thread_time)

    def start(self) -> "AuditFollower":
        self._thread.start()
        return self

    def _run(self) -> None:
        wait = self.poll_seconds
        while not self._stop.wait(wait):
            started = time.thread_time()
            try:
                done = self.service.catch_up(EVENTS_PER_CALL)
            except Exception:  # noqa: BLE001 - a follower must outlive a bad poll
                self.failures += 1
                log.exception("audit catch-up failed; retrying at the next poll")
                wait = self.poll_seconds
                continue
            finally:
                self.cpu_seconds += time.thread_time() - started
            wait = 0.0 if sum(done.values()) >= EVENTS_PER_CALL else self.poll_seconds

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the current call (bounded by `timeout`)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
