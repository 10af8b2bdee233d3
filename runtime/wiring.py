"""Wiring: settings → eventsourcing environment → Ledger application and Projector."""

from __future__ import annotations

from datetime import datetime
from typing import Callable

from audit.follower import AuditFollower
from audit.service import AuditService
from ledger.application import Ledger
from legacy.log import open_legacy_if_present
from projections import Projector
from runtime.settings import Settings
from storage import ddl_lock, persistence_env


def build_ledger(settings: Settings, clock: Callable[[], datetime]) -> Ledger:
    """The Ledger application for these settings, with `clock` injected."""
    env = persistence_env(settings.database_url)
    return Ledger(env=env, clock=clock, policy=settings.policy(),
                  withdrawal_minimum_minor=settings.withdrawal_minimums)


def open_ledger(settings: Settings, clock: Callable[[], datetime],
                projector_factory: Callable | None = None):
    """(Ledger, Projector) on the configured store; table creation is serialised across
    processes (ddl_lock). `projector_factory(ledger, url, policy)` defaults to Projector."""
    projector_factory = projector_factory or Projector
    with ddl_lock(settings.database_url):
        ledger = build_ledger(settings, clock)
        try:
            return ledger, projector_factory(ledger, settings.database_url, settings.policy())
        except BaseException:
            ledger.close()
            raise


def open_audit(settings: Settings, ledger: Ledger,
               follow: bool | None = None) -> tuple[AuditService, AuditFollower | None]:
    """The AuditService of the configured store (the legacy log joins once it exists) and, if
    `follow` (default `settings.audit_enabled`), its background follower, started."""
    url = settings.database_url
    with ddl_lock(url):
        service = AuditService(ledger, url, legacy_log=lambda: open_legacy_if_present(url))
    follow = settings.audit_enabled if follow is None else follow
    follower = AuditFollower(service, settings.audit_poll_seconds).start() if follow else None
    return service, follower
