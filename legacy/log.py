"""The legacy log: an event-sourced application of its own, beside the Ledger's.

Imported legacy facts and reconciliation adjustments live in their own log so that the Ledger's
projections, invariants and replay never see them (I10: they keep their own types and are never
recomputed). On PostgreSQL the log is the table `legacy_events` in the ledger's schema; on SQLite
(which names every application's table `stored_events`) it is a sibling file `<name>-legacy.db`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError

from legacy.stored import stored_ids
from storage import is_postgres, persistence_env, postgres_conninfo, postgres_parts, sqlite_path


def legacy_store_url(ledger_url: str) -> str:
    """The legacy log's URL for the ledger's database URL (same PG schema; sibling SQLite file)."""
    if is_postgres(ledger_url):
        return ledger_url
    path = sqlite_path(ledger_url)
    if path == ":memory:":
        return ledger_url
    p = Path(path)
    return f"sqlite:///{p.with_name(p.stem + '-legacy' + p.suffix)}"


class LegacyLedger(Application):
    """Stores legacy aggregates; `save_new` makes re-imports and re-applies no-ops."""

    name = "Legacy"

    def load(self, aggregate_id) -> Aggregate | None:
        try:
            return self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None

    def save_new(self, aggregates: Iterable[Aggregate]) -> int:
        """Save aggregates whose ids are not stored yet; returns how many were saved.

        One transaction for the batch; if a concurrent or earlier run stored one of them, the
        batch is retried one by one so every new aggregate still lands exactly once.
        """
        candidates = list(aggregates)
        stored = stored_ids(self, [a.id for a in candidates])
        fresh = [a for a in candidates if a.id not in stored]
        if not fresh:
            return 0
        try:
            self.save(*fresh)
            return len(fresh)
        except IntegrityError:
            saved = 0
            for aggregate in fresh:
                try:
                    self.save(aggregate)
                    saved += 1
                except IntegrityError:
                    pass
            return saved

    def all_events(self, batch: int = 1000) -> Iterator:
        """Every domain event of the legacy log up to its head when called, in log order, read
        in bounded batches (pages of `batch`; at most head / batch + 1 of them)."""
        head = int(self.recorder.max_notification_id() or 0)
        start = 1
        for _ in range(head // batch + 2):
            page = self.recorder.select_notifications(start=start, limit=batch, stop=head)
            for notification in page:
                yield self.mapper.to_domain_event(notification)
            if len(page) < batch:
                return
            start = page[-1].id + 1


def open_legacy(ledger_url: str) -> LegacyLedger:
    """The legacy log next to the ledger at `ledger_url` (tables created if missing)."""
    return LegacyLedger(env=persistence_env(legacy_store_url(ledger_url)))


def legacy_log_exists(ledger_url: str) -> bool:
    """Whether a legacy log was ever created beside the ledger at `ledger_url` (a
    `legacy_events` table in its PostgreSQL schema, or the sibling SQLite file)."""
    url = legacy_store_url(ledger_url)
    if not is_postgres(url):
        path = sqlite_path(url)
        return path != ":memory:" and url != ledger_url and Path(path).exists()
    import psycopg

    schema = postgres_parts(url)["schema"]
    with psycopg.connect(postgres_conninfo(url), autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (f'"{schema}".legacy_events',)).fetchone()
    return row[0] is not None


def open_legacy_if_present(ledger_url: str) -> LegacyLedger | None:
    """The legacy log next to the ledger, or None if none was ever imported (nothing created)."""
    return open_legacy(ledger_url) if legacy_log_exists(ledger_url) else None
