"""The periodic tick inside the service: an APScheduler 3.x BackgroundScheduler job.

`start_scheduler(state)` reads `state.ledger`, `state.projector`, `state.clock` and
`state.settings`; every `settings.tick_seconds` the leader runs one tick as of the clock's now.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from apscheduler.schedulers.background import BackgroundScheduler

from scheduler.leader import AlwaysLeader, PostgresLeader, lock_key
from scheduler.tick import run_tick
from storage import is_postgres, postgres_conninfo, postgres_parts

log = logging.getLogger("ledger.tick")


@dataclass
class TickJob:
    """One scheduled tick: skip unless leader; log what it decided; never raise into APScheduler."""

    ledger: object
    projector: object
    clock: object
    leader: object

    def __call__(self) -> None:
        if not self.leader.is_leader():
            return
        try:
            report = run_tick(self.ledger, self.projector, self.clock())
        except Exception:  # a failed tick is retried whole at the next interval
            log.exception("tick failed")
            return
        if report.charged or report.ended or report.settled or report.expired or report.failed:
            log.info("tick as_of=%s charged=%d ended=%d settled=%d expired=%d failed=%d "
                     "conflicts=%d", report.as_of.isoformat(), len(report.charged),
                     len(report.ended), len(report.settled), len(report.expired),
                     len(report.failed), report.conflicts)


class SchedulerHandle:
    """What the lifespan keeps: shut the scheduler down and release the leader lock."""

    def __init__(self, scheduler: BackgroundScheduler, leader) -> None:
        self.scheduler, self.leader = scheduler, leader

    def shutdown(self) -> None:
        self.scheduler.shutdown(wait=True)
        self.leader.close()


def start_scheduler(state) -> SchedulerHandle:
    """Start the interval tick (coalescing, one instance at a time, 30 s misfire grace)."""
    settings = state.settings
    url = settings.database_url
    leader = (PostgresLeader(postgres_conninfo(url), lock_key(postgres_parts(url)["schema"]))
              if is_postgres(url) else AlwaysLeader())
    scheduler = BackgroundScheduler(
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        timezone="UTC")
    job = TickJob(state.ledger, state.projector, state.clock, leader)
    scheduler.add_job(job, "interval", seconds=settings.tick_seconds, id="tick",
                      replace_existing=True)
    scheduler.start()
    return SchedulerHandle(scheduler, leader)
