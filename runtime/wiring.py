"""Wiring: settings → eventsourcing environment → Ledger application and Projector."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Callable, TypeVar

import structlog

from audit.follower import AuditFollower
from audit.service import AuditService
from ledger.application import Ledger
from legacy.log import open_legacy_if_present
from notifications import Notifier
from projections import Projector
from runtime.settings import Settings
from storage import ddl_lock, is_unavailable, persistence_env, redacted_url

log = structlog.get_logger("ledger.startup")
T = TypeVar("T")
FIRST_DELAY_SECONDS, MAX_DELAY_SECONDS = 0.5, 5.0


class StoreUnreachableAtStartup(RuntimeError):
    """The database did not answer within `startup_wait_seconds`."""


def build_ledger(settings: Settings, clock: Callable[[], datetime],
                 on_conflict: Callable[[str], None] | None = None) -> Ledger:
    """The Ledger application for these settings, with `clock` injected; `on_conflict(where)`
    is told of every optimistic-concurrency retry (metrics)."""
    env = persistence_env(settings.database_url, settings.store_timeout_seconds)
    return Ledger(env=env, clock=clock, policy=settings.policy(),
                  withdrawal_minimum_minor=settings.withdrawal_minimums, on_conflict=on_conflict,
                  cache_size=settings.aggregate_cache_size,
                  snapshot_interval=settings.snapshot_interval)


def wait_for_store(settings: Settings, attempt: Callable[[], T], what: str = "open the store") -> T:
    """`attempt()` until it succeeds, retrying while the store is unreachable, with a doubling
    delay (0.5 s → 5 s) for at most `settings.startup_wait_seconds`; every retry is logged.
    Raises StoreUnreachableAtStartup (a clear message, no traceback chain) when time is up, and
    any other error of `attempt` at once."""
    deadline = time.monotonic() + settings.startup_wait_seconds
    delay, number = FIRST_DELAY_SECONDS, 1
    while True:
        try:
            return attempt()
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not is_unavailable(exc):
                raise
            left = deadline - time.monotonic()
            store = redacted_url(settings.database_url)
            if left <= 0:
                log.error("store unreachable; giving up", store=store, attempts=number,
                          waited_seconds=settings.startup_wait_seconds, error=_first_line(exc))
                raise StoreUnreachableAtStartup(
                    f"could not {what}: the database at {store} did not answer within "
                    f"{settings.startup_wait_seconds} s ({number} attempts); last error: "
                    f"{_first_line(exc)}") from None
            pause = min(delay, left)
            log.warning("store unreachable; retrying", store=store, attempt=number,
                        retry_in_seconds=round(pause, 2), error=_first_line(exc))
            time.sleep(pause)
            delay, number = min(delay * 2, MAX_DELAY_SECONDS), number + 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def open_ledger(settings: Settings, clock: Callable[[], datetime],
                projector_factory: Callable | None = None,
                on_conflict: Callable[[str], None] | None = None):
    """(Ledger, Projector) on the configured store; table creation is serialised across
    processes (ddl_lock). `projector_factory(ledger, url, policy)` defaults to Projector."""
    projector_factory = projector_factory or Projector
    with ddl_lock(settings.database_url, settings.store_timeout_seconds):
        ledger = build_ledger(settings, clock, on_conflict)
        try:
            return ledger, projector_factory(ledger, settings.database_url, settings.policy())
        except BaseException:
            ledger.close()
            raise


def open_notifier(settings: Settings, ledger: Ledger,
                  observe: Callable[[str, str], None] | None = None) -> Notifier:
    """The webhook Notifier on the configured store (its tables are created if missing; it
    is not started). `observe(outcome, event_type)` counts delivery attempts (metrics)."""
    with ddl_lock(settings.database_url, settings.store_timeout_seconds):
        return Notifier(ledger, settings.database_url, settings.notifier_config(),
                        observe=observe)


def open_audit(settings: Settings, ledger: Ledger,
               follow: bool | None = None) -> tuple[AuditService, AuditFollower | None]:
    """The AuditService of the configured store (the legacy log joins once it exists) and, if
    `follow` (default `settings.audit_enabled`), its background follower, started."""
    url = settings.database_url
    with ddl_lock(url, settings.store_timeout_seconds):
        service = AuditService(ledger, url, legacy_log=lambda: open_legacy_if_present(url))
    follow = settings.audit_enabled if follow is None else follow
    follower = AuditFollower(service, settings.audit_poll_seconds).start() if follow else None
    return service, follower
