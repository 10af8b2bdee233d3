"""The ASGI application factory uvicorn runs: `runtime.asgi:create_app` (`--factory`).

The factory configures JSON logging (observability/logs.py). The lifespan builds, per process,
the clock, the Ledger application (waiting for the database with bounded, logged retries: see
`wait_for_store`), the Projector (its background thread started: projections are
applied outside requests, docs/design.md), the webhook Notifier (started if
`settings.webhook_delivery_enabled`), the audit follower (if `settings.audit_enabled`) — the
three followers, which `create_request_app` leaves to a child process — the tick and (if
`settings.tick_enabled`) the in-process tick scheduler, keeps them in `app.state`, and closes
them in reverse order on shutdown.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, Callable

import structlog
from fastapi import FastAPI

from api.app import build_app
from console import install as install_console
from observability import configure_logging
from ledger.group_commit import GroupCommit
from runtime.clock import ManualClock, SystemClock
from runtime.collector import collecting_less_often
from runtime.settings import Settings
from runtime.wiring import open_audit, open_ledger, open_notifier, wait_for_store
from storage import is_unavailable, redacted_url
from scheduler.jobs import observed_tick, start_scheduler

log = structlog.get_logger("ledger.service")

ProjectorFactory = Callable[[Any, str, Any], Any]  # (ledger, database_url, policy) -> Projector


def build_clock(settings: Settings):
    """The clock `settings.clock` names: the wall clock, or a manual one starting now."""
    if settings.clock == "manual":
        return ManualClock(datetime.now(timezone.utc).replace(microsecond=0))
    return SystemClock()


def create_request_app() -> FastAPI:
    """`create_app` for the workers of a `ledger serve` that runs the followers (projector,
    webhook notifier, audit follower) in its own child process (runtime/followers.py): the
    projector answers reads and is not started, the notifier only manages endpoints, no
    audit follower."""
    return create_app(followers=False)


def create_app(settings: Settings | None = None, *, clock: Callable[[], datetime] | None = None,
               projector_factory: ProjectorFactory | None = None,
               followers: bool = True) -> FastAPI:
    """The service's HTTP API with its resources. `clock` overrides the clock chosen by
    `settings.clock` (tests pass one); `projector_factory(ledger, database_url, policy)`
    overrides `projections.Projector`. `followers`: start the projector's background thread,
    the webhook notifier and the audit follower (per `settings`) in this process."""
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format, settings.secrets())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        state.clock = clock if clock is not None else build_clock(settings)
        state.ledger = state.projector = state.scheduler = state.tick = state.notifier = None
        state.audit = state.audit_follower = state.group_commit = None
        metrics = state.metrics
        try:
            state.ledger, state.projector = wait_for_store(settings, lambda: open_ledger(
                settings, state.clock, projector_factory,
                on_conflict=lambda operation: metrics.conflicts.labels(operation).inc()))
            state.audit, state.audit_follower = open_audit(
                settings, state.ledger, follow=None if followers else False)
            state.group_commit = GroupCommit(state.ledger, is_unavailable,
                                             settings.group_commit_max)
            state.tick = lambda as_of: observed_tick(state.ledger, state.projector, as_of,
                                                     metrics, source="api")
            start = getattr(state.projector, "start", None)
            if start is not None and followers:  # projections are applied outside requests
                start(settings.projection_poll_seconds, settings.follower_coalesce_seconds)
            state.notifier = wait_for_store(settings, lambda: open_notifier(
                settings, state.ledger,
                observe=lambda outcome, kind: metrics.webhooks.labels(outcome, kind).inc()),
                what="open the webhook tables")
            if settings.webhook_delivery_enabled and followers:
                state.notifier.start()
            if settings.tick_enabled:
                state.scheduler = start_scheduler(state)
            log.info("ready", store=redacted_url(settings.database_url),
                     tick_enabled=settings.tick_enabled)
            with collecting_less_often():  # runtime/collector.py
                yield
        finally:
            _close(state)
            metrics.process_exited()

    app = build_app(settings, lifespan)
    install_console(app)  # /console: the auditor's read-only pages (docs/console.md)
    return app


def _close(state) -> None:
    """Shut the scheduler down, then close the notifier, the audit, the projector and the
    ledger, whatever fails."""
    for name in ("scheduler", "notifier", "audit_follower", "audit", "projector", "ledger"):
        resource = getattr(state, name, None)
        if resource is None:
            continue
        try:
            resource.shutdown() if name == "scheduler" else resource.close()
        except Exception:  # noqa: BLE001 - close the rest regardless
            log.exception("error closing", resource=name)
        setattr(state, name, None)
