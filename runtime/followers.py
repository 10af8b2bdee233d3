"""The followers in their own process: `ledger follow`, and `ledger serve`'s supervised child.

The followers are the background work that trails the event log: the Projector (the read
models), the webhook Notifier (derive, then send) and the audit follower (hash chains and the
as-of history). Run as threads of the request process they take about a quarter of its GIL
under a write load (docs/benchmarks.md), time the requests wait for. With
`LEDGER_FOLLOWERS=process` (the default on PostgreSQL with the system clock) `ledger serve`
starts them in ONE child process (`FollowerProcess`) and its uvicorn workers serve requests
only (`runtime.asgi:create_request_app`). Reads stay correct: a worker's Projector, not
started, answers from the views and follows the tracking rows the child advances
(`Projector.wait_for`); on PostgreSQL the child's projector is woken by NOTIFY of every write.

The child stops with `ledger serve` (SIGTERM; SIGKILL after a bound), on a signal to the
process group, and by itself when its parent is gone (killed with SIGKILL). An exit with an
error (a crash, SIGKILL) is logged and the child restarted, after a pause that doubles up to
RESTART_MAX_SECONDS; a clean exit (code 0: it was asked to stop) is not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import structlog

from runtime.collector import collecting_less_often
from runtime.settings import Settings

log = structlog.get_logger("ledger.followers")
RESTART_FIRST_SECONDS, RESTART_MAX_SECONDS = 0.5, 30.0
STOP_SECONDS = 30.0  # a child that has not stopped by then after SIGTERM is killed
PARENT_CHECK_SECONDS = 1.0


def run_followers(settings: Settings, stop: threading.Event) -> None:
    """Open the ledger and run its followers in this process until `stop` is set: the
    projector, the notifier if `settings.webhook_delivery_enabled`, the audit follower if
    `settings.audit_enabled`; then close them in reverse order. Waits for the store first
    (StoreUnreachableAtStartup when it never answers)."""
    from runtime.clock import SystemClock
    from runtime.wiring import open_audit, open_ledger, open_notifier, wait_for_store

    from observability import Metrics

    # counted in the workers' /metrics through the multiprocess directory `ledger serve` sets
    webhooks = Metrics().webhooks
    ledger, projector = wait_for_store(settings, lambda: open_ledger(settings, SystemClock()))
    opened: list[Callable[[], None]] = [ledger.close, projector.close]
    try:
        projector.start(settings.projection_poll_seconds, settings.follower_coalesce_seconds)
        if settings.webhook_delivery_enabled:
            notifier = wait_for_store(settings, lambda: open_notifier(
                settings, ledger,
                observe=lambda outcome, kind: webhooks.labels(outcome, kind).inc()),
                what="open the webhook tables")
            opened.append(notifier.close)
            notifier.start()
        audit, follower = open_audit(settings, ledger)
        opened += [audit.close] + ([follower.close] if follower is not None else [])
        log.info("following", projections=True, webhooks=settings.webhook_delivery_enabled,
                 audit=follower is not None)
        with collecting_less_often():  # runtime/collector.py
            stop.wait()
    finally:
        for close in reversed(opened):
            try:
                close()
            except Exception:  # noqa: BLE001 - close the rest regardless
                log.exception("error closing a follower")


def stop_on_signals_and_orphaning(stop: threading.Event) -> None:
    """Set `stop` on SIGINT or SIGTERM, and when this process's parent is gone (its parent id
    changes: `ledger serve` was killed outright)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()

    def watch() -> None:
        while not stop.wait(PARENT_CHECK_SECONDS):
            if os.getppid() != parent:
                log.warning("parent process gone; stopping the followers")
                stop.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class FollowerProcess:
    """`ledger follow` as a supervised child process of this one (module docstring).

    `command`: the child's argv (default: this interpreter running `runtime.cli follow`).
    `start()` returns at once; `stop()` ends the child and its supervision.
    """

    def __init__(self, command: list[str] | None = None) -> None:
        self.command = command or [sys.executable, "-m", "runtime.cli", "follow"]
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._spawned_at = 0.0

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before it starts or after it stops)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> "FollowerProcess":
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="followers-supervisor",
                                        daemon=True)
        self._thread.start()
        return self

    def _spawn(self) -> None:
        with self._lock:
            if not self._stopping.is_set():
                self._proc = subprocess.Popen(self.command)
                self._spawned_at = time.monotonic()
                log.info("followers started", pid=self._proc.pid)

    def _supervise(self) -> None:
        delay = RESTART_FIRST_SECONDS
        while not self._stopping.is_set():
            proc = self._proc
            code = proc.wait() if proc is not None else None
            if self._stopping.is_set():
                return
            if code == 0:  # it was asked to stop (a signal to the process group): no restart
                log.info("followers stopped", code=code)
                return
            if time.monotonic() - self._spawned_at > RESTART_MAX_SECONDS:
                delay = RESTART_FIRST_SECONDS  # it ran a good while: the back-off starts afresh
            log.error("followers exited; restarting", code=code, restart_in_seconds=delay)
            if self._stopping.wait(delay):
                return
            self._spawn()
            delay = min(delay * 2, RESTART_MAX_SECONDS)

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """SIGTERM the child and wait for it (SIGKILL after `timeout` seconds); no restart."""
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("followers did not stop in time; killing them", pid=proc.pid)
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(5)
