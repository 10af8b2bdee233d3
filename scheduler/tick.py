"""One tick: bring projections up to date, find what is due, let the ledger decide it.

`run_tick(ledger, projector, as_of)` is what the APScheduler job, `ledger tick` and
`POST /v1/ticks` all call. It is safe to run concurrently: every decision is re-made on a freshly
loaded aggregate and saved optimistically (billing-rules.md I1, I9).
"""

from __future__ import annotations

from datetime import datetime

from ledger.application import Ledger, TickReport
from ledger.marketplace import ConsultationTick, tick_consultations

PAGE = 1000  # due sessions fetched per round
MAX_ROUNDS = 50  # bound on rounds per tick; a longer backlog continues at the next tick


def run_tick(ledger: Ledger, projector, as_of: datetime) -> TickReport:
    """Decide everything due by `as_of`; returns the merged report of every round.

    `projector` provides catch_up(), due_sessions(as_of, limit), due_pools(as_of, limit) and
    due_consultations(as_of, limit) (priced consultations, ledger/marketplace.py).
    """
    total = TickReport(as_of=as_of)
    for _ in range(MAX_ROUNDS):
        projector.catch_up()
        sessions = projector.due_sessions(as_of, limit=PAGE)
        pools = projector.due_pools(as_of, limit=PAGE)
        consultations = projector.due_consultations(as_of, limit=PAGE)
        if not sessions and not pools and not consultations:
            break
        report = ledger.tick(as_of, sessions, pools) if sessions or pools \
            else TickReport(as_of=as_of)
        _merge_consultations(report, tick_consultations(ledger, as_of, consultations))
        _merge(total, report)
        progressed = (report.charged or report.ended or report.settled or report.expired
                      or report.consultations)
        if not progressed and not report.more:
            break  # due rows whose work another tick already did; the view catches up next
    projector.catch_up()
    total.more = bool(projector.due_sessions(as_of, limit=1) or projector.due_pools(as_of, limit=1)
                      or projector.due_consultations(as_of, limit=1))
    return total


def _merge_consultations(report: TickReport, consultations: ConsultationTick) -> None:
    """Fold one round's consultation steps into the round's report."""
    report.consultations.extend(consultations.lines)
    report.consultation_steps.extend(consultations.steps)
    report.failed.extend(consultations.failed)
    report.failures.extend(consultations.failures)
    report.conflicts += consultations.conflicts
    report.more = report.more or consultations.more


def _merge(total: TickReport, report: TickReport) -> None:
    for name in ("charged", "ended", "settled", "expired", "failed", "steps", "pools", "failures",
                 "consultations", "consultation_steps"):
        getattr(total, name).extend(getattr(report, name))
    total.conflicts += report.conflicts
