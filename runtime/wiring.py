"""Wiring: settings → eventsourcing environment → Ledger application and Projector."""

from __future__ import annotations

from datetime import datetime
from typing import Callable

from ledger.application import Ledger
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
