"""Prometheus metrics of one service process (prometheus-client).

With several uvicorn workers, `ledger serve` sets PROMETHEUS_MULTIPROC_DIR (prometheus-client's
multiprocess mode): every worker writes its samples there and a scrape of any worker sums them.
Values that are the same from every worker (projection lag, head) are read at scrape time by
`ProjectionCollector` instead. Names and meanings: docs/operations.md, "Metrics".
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STORE_UP_HELP = "1 if the event store answered this scrape's reads, 0 if it is unreachable"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TICK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

disable_created_metrics()  # the *_created series double the output and no alert uses them


def multiprocess_dir() -> str | None:
    """The multiprocess directory if prometheus-client runs in multiprocess mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class Metrics:
    """Every metric the service records, in one registry per process (per app in tests)."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        self.requests = Counter(
            "ledger_http_requests", "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"], registry=registry)
        self.request_seconds = Histogram(
            "ledger_http_request_duration_seconds", "HTTP request latency in seconds, by route",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.events = Counter(
            "ledger_events", "Events answered: outcome accepted, replayed or refused (with the "
            "problem code), by event type", ["type", "outcome", "code"], registry=registry)
        self.conflicts = Counter(
            "ledger_optimistic_conflicts", "Optimistic-concurrency retries (a concurrent writer "
            "won; the command was decided again), by operation", ["operation"], registry=registry)
        self.retry_later = Counter(
            "ledger_retry_later", "503 retry_later answers, by reason (conflicts, "
            "store_unavailable)", ["reason"], registry=registry)
        self.ticks = Counter(
            "ledger_ticks", "Ticks run, by source (scheduler, api, cli) and outcome (ok, failed: "
            "some session failed, skipped: store unreachable, error)", ["source", "outcome"],
            registry=registry)
        self.tick_seconds = Histogram(
            "ledger_tick_duration_seconds", "Tick duration in seconds", ["source"],
            buckets=TICK_BUCKETS, registry=registry)
        self.tick_work = Counter(
            "ledger_tick_work", "What ticks did: blocks charged, sessions ended, settled, pools "
            "expired, sessions failed, priced consultations' steps", ["kind"], registry=registry)
        self.webhooks = Counter(
            "ledger_webhook_deliveries", "Webhook delivery attempts by outcome (sent; failed: "
            "retried later; dead: dead-lettered) and notification type", ["outcome", "type"],
            registry=registry)
        self.pool = Gauge(
            "ledger_db_pool_connections", "Event-store connection pool (PostgreSQL): size, idle, "
            "max, and requests waiting for a connection; summed over live workers", ["state"],
            multiprocess_mode="livesum", registry=registry)

    def observe_pool(self, usage: dict[str, int] | None) -> None:
        """Record the pool's `{"size", "idle", "max", "waiting"}` (None: no pool to report)."""
        for state, value in (usage or {}).items():
            self.pool.labels(state).set(value)

    def exposition(self, extra: Iterable[Any] = ()) -> bytes:
        """The text exposition of every metric (all workers' in multiprocess mode) plus the
        `extra` collectors."""
        if multiprocess_dir():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            sources = [registry, *extra]
        else:
            sources = [self.registry, *extra]
        return generate_latest(_Union(sources))

    @staticmethod
    def process_exited() -> None:
        """Drop this process's live gauges (multiprocess mode), at a worker's clean shutdown."""
        if multiprocess_dir():
            mark_process_dead(os.getpid())


class _Union:
    """Several collectors/registries seen as one by `generate_latest`."""

    def __init__(self, sources: list[Any]) -> None:
        self.sources = sources

    def collect(self):
        for source in self.sources:
            yield from source.collect()


class ProjectionCollector:
    """Read at scrape time: `ledger_store_up` (1 if `health()` could read the store, else 0)
    and, when it could, the projections' head, position, lag and stall (Projector.health)."""

    def __init__(self, health: Callable[[], dict]) -> None:
        self.health = health

    def collect(self):
        try:
            health = self.health()
        except Exception:  # noqa: BLE001 - an unreachable store is what ledger_store_up says
            yield GaugeMetricFamily("ledger_store_up", STORE_UP_HELP, value=0)
            return
        yield GaugeMetricFamily("ledger_store_up", STORE_UP_HELP, value=1)
        gauges = (
            ("ledger_event_store_head", "Notification id of the newest stored event", health["head"]),
            ("ledger_projection_position", "Slowest projection's applied notification id",
             health["position"]),
            ("ledger_projection_lag_events", "Events stored but not yet applied to the read models",
             health["lag_events"]),
            ("ledger_projection_stalled", "1 if a projection stopped on an event it cannot apply",
             0 if health.get("stalled") is None else 1),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)
        if health.get("lag_seconds") is not None:
            yield GaugeMetricFamily("ledger_projection_lag_seconds",
                                    "Age in seconds of the oldest event not yet applied",
                                    value=health["lag_seconds"])


class WebhookCollector:
    """Read at scrape time from the notifier's tables (Notifier.health): the undelivered
    backlog of enabled endpoints, the age of its oldest notification, the dead letters and how
    far the deriver is behind the log."""

    def __init__(self, health: Callable[[], dict]) -> None:
        self.health = health

    def collect(self):
        try:
            health = self.health()
        except Exception:  # noqa: BLE001 - ledger_store_up says whether the store answers
            return
        gauges = (
            ("ledger_webhook_undelivered", "Webhook deliveries not yet delivered (pending or "
             "retrying) to enabled endpoints", health["undelivered"]),
            ("ledger_webhook_oldest_undelivered_seconds", "Age in seconds of the oldest "
             "undelivered webhook notification (0 when none)",
             health["oldest_undelivered_seconds"]),
            ("ledger_webhook_dead_letters", "Webhook deliveries dead-lettered (retries exhausted)",
             health["dead"]),
            ("ledger_webhook_derive_lag_events", "Events stored but not yet turned into webhook "
             "notifications", health["lag_events"]),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)
