"""The periodic tick inside the service: an APScheduler 3.x BackgroundScheduler job, and
`observed_tick`, the one way every tick is run (scheduler, `POST /v1/ticks`, `ledger tick`):
timed, counted in the metrics and logged as one JSON line.

`start_scheduler(state)` reads `state.ledger`, `state.projector`, `state.clock`,
`state.settings` and `state.metrics`; every `settings.tick_seconds` the leader runs one tick as
of the clock's now.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from scheduler.leader import AlwaysLeader, PostgresLeader, lock_key
from scheduler.tick import run_tick
from storage import is_postgres, is_unavailable, postgres_conninfo, postgres_parts

log = structlog.get_logger("ledger.tick")
# What a tick reports doing, by kind; `consultations`: priced consultations' steps (§10).
TICK_WORK = ("charged", "ended", "settled", "expired", "failed", "consultations")
MAX_FAILED_LOGGED = 20  # the first failed sessions named in a tick's log line


class TickSkipped(RuntimeError):
    """The tick did not run: the store is unreachable (it is retried whole next interval)."""


def observed_tick(ledger: Any, projector: Any, as_of: datetime, metrics: Any = None,
                  source: str = "api"):
    """`run_tick` timed, counted (`ledger_ticks_total`, `ledger_tick_duration_seconds`,
    `ledger_tick_work_total`, `ledger_optimistic_conflicts_total{operation="tick"}`) and logged
    as one line with outcome ok | failed (some session failed; named) | skipped (store
    unreachable: raises TickSkipped) | error (re-raised). Returns the TickReport."""
    started = time.perf_counter()
    try:
        report = run_tick(ledger, projector, as_of)
    except Exception as exc:
        seconds = time.perf_counter() - started
        if is_unavailable(exc):
            _count(metrics, source, "skipped", seconds)
            log.warning("tick", source=source, as_of=as_of.isoformat(), outcome="skipped",
                        reason="store unreachable", duration_ms=round(seconds * 1000, 1),
                        error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise TickSkipped("the event store is unreachable") from exc
        _count(metrics, source, "error", seconds)
        log.exception("tick", source=source, as_of=as_of.isoformat(), outcome="error",
                      duration_ms=round(seconds * 1000, 1))
        raise
    seconds = time.perf_counter() - started
    outcome = "failed" if report.failed else "ok"
    _count(metrics, source, outcome, seconds, report)
    work = {name: len(getattr(report, name)) for name in TICK_WORK}
    fields = {"source": source, "as_of": report.as_of.isoformat(), "outcome": outcome,
              "duration_ms": round(seconds * 1000, 1), **work, "conflicts": report.conflicts,
              "more": report.more}
    if report.failed:
        log.error("tick", **fields, failed_sessions=report.failures[:MAX_FAILED_LOGGED])
    else:
        log.info("tick", **fields)
    return report


def _count(metrics: Any, source: str, outcome: str, seconds: float, report: Any = None) -> None:
    if metrics is None:
        return
    metrics.ticks.labels(source, outcome).inc()
    metrics.tick_seconds.labels(source).observe(seconds)
    if report is not None:
        for name in TICK_WORK:
            if getattr(report, name):
                metrics.tick_work.labels(name).inc(len(getattr(report, name)))
        if report.conflicts:
            metrics.conflicts.labels("tick").inc(report.conflicts)


@dataclass
class TickJob:
    """One scheduled tick: skip unless leader; observed; never raise into APScheduler."""

    ledger: object
    projector: object
    clock: object
    leader: object
    metrics: object = None
    last_outcome: str | None = None

    def __call__(self) -> None:
        if not self.leader.is_leader():
            error = getattr(self.leader, "last_error", None)
            if error:  # not "another worker leads" but "the store cannot be reached"
                self.last_outcome = "skipped"
                _count(self.metrics, "scheduler", "skipped", 0.0)
                log.warning("tick", source="scheduler", outcome="skipped",
                            reason="store unreachable (leader lock)", error=error)
            return
        try:
            report = observed_tick(self.ledger, self.projector, self.clock(), self.metrics,
                                   source="scheduler")
        except TickSkipped:
            self.last_outcome = "skipped"
            return
        except Exception:  # noqa: BLE001 - logged by observed_tick; retried whole next interval
            self.last_outcome = "error"
            return
        self.last_outcome = "failed" if report.failed else "ok"


class SchedulerHandle:
    """What the lifespan keeps: shut the scheduler down and release the leader lock."""

    def __init__(self, scheduler: BackgroundScheduler, leader, job: TickJob) -> None:
        self.scheduler, self.leader, self.job = scheduler, leader, job

    @property
    def running(self) -> bool:
        """Whether the scheduler thread runs (readiness)."""
        return bool(self.scheduler.running)

    @property
    def last_outcome(self) -> str | None:
        """The last scheduled tick's outcome in this process (None: none ran yet)."""
        return self.job.last_outcome

    def shutdown(self) -> None:
        self.scheduler.shutdown(wait=True)
        self.leader.close()


def start_scheduler(state) -> SchedulerHandle:
    """Start the interval tick (coalescing, one instance at a time, 30 s misfire grace)."""
    settings = state.settings
    url = settings.database_url
    leader = (PostgresLeader(postgres_conninfo(url), lock_key(postgres_parts(url)["schema"]),
                             settings.store_timeout_seconds)
              if is_postgres(url) else AlwaysLeader())
    scheduler = BackgroundScheduler(
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        timezone="UTC")
    job = TickJob(state.ledger, state.projector, state.clock, leader,
                  getattr(state, "metrics", None))
    scheduler.add_job(job, "interval", seconds=settings.tick_seconds, id="tick",
                      replace_existing=True)
    scheduler.start()
    return SchedulerHandle(scheduler, leader, job)
