"""One tick: bring projections up to date, find what is due, let the ledger decide it.

`run_tick(ledger, projector, as_of)` is what the APScheduler job, `ledger tick` and
`POST /v1/ticks` all call. It is safe to run concurrently: every decision is re-made on a freshly
loaded aggregate and saved optimistically (billing-rules.md I1, I9).
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from datetime import datetime
from typing import Iterator

from ledger.application import Ledger, TickReport
from ledger.marketplace import ConsultationTick, tick_consultations

PAGE = 1000  # due sessions fetched per round
MAX_ROUNDS = 50  # bound on rounds per tick; a longer backlog continues at the next tick
MAX_EVENTS = 50_000  # events one projector catch_up call applies at most
TICK_GC_GEN0 = 10_000  # the collector's first threshold while a tick runs, and for a worker's
# or the followers' process's life (runtime/collector.py); Python's is 700


def run_tick(ledger: Ledger, projector, as_of: datetime) -> TickReport:
    """Decide everything due by `as_of`; returns the merged report of every round.

    `projector` provides catch_up(), due_sessions(as_of, limit), due_pools(as_of, limit) and
    due_consultations(as_of, limit) (priced consultations, ledger/marketplace.py).

    Each pass catches the views up ONCE, reads every due id at once (at most PAGE per round
    left) and decides them PAGE at a time: catching up between pages would only project
    the previous page's writes. A session's own next step due by `as_of` is decided in the
    same pass (`Ledger.tick` queues it), so a pass that read every due id and finished
    without a conflict, a failure, an expired pool or a consultation step leaves nothing due
    by `as_of` that was known when the tick began (`_conclusive`): the tick ends there, and
    its writes reach the views through the background projector, as every request's do.
    Otherwise it catches up and reads again (work a pass made due, e.g. after a fallback).
    At most MAX_ROUNDS pages in all; a longer backlog continues at the next tick (`more`).
    The garbage collector runs less often meanwhile (`fewer_collections`).
    """
    with fewer_collections():
        return _run_tick(ledger, projector, as_of)


def _run_tick(ledger: Ledger, projector, as_of: datetime) -> TickReport:
    total, rounds = TickReport(as_of=as_of), 0
    catch_up_views(projector)
    while rounds < MAX_ROUNDS:
        limit = PAGE * (MAX_ROUNDS - rounds)
        sessions = projector.due_sessions(as_of, limit=limit)
        pools = projector.due_pools(as_of, limit=limit)
        consultations = projector.due_consultations(as_of, limit=limit)
        if not sessions and not pools and not consultations:
            break
        before = len(total.steps), total.conflicts
        progressed, rounds = _pass(ledger, as_of, sessions, pools, consultations, total, rounds)
        if _conclusive(total, before, limit, sessions, pools, consultations):
            return total
        catch_up_views(projector)
        if not progressed:
            break  # due rows whose work another tick already did; the view catches up next
    total.more = bool(projector.due_sessions(as_of, limit=1) or projector.due_pools(as_of, limit=1)
                      or projector.due_consultations(as_of, limit=1))
    return total


def _conclusive(total: TickReport, before: tuple[int, int], limit: int, sessions: list[str],
                pools: list[str], consultations: list[str]) -> bool:
    """Whether the pass just run left nothing due: it read every due id (fewer than `limit`
    of each kind), expired no pool and stepped no consultation (whose effects are not followed
    in the pass), and everything it tried was saved in units without a conflict or failure."""
    steps, conflicts = before
    return (len(sessions) < limit and not pools and not consultations and not total.failed
            and not total.more and total.conflicts == conflicts and len(total.steps) > steps)


def _pass(ledger: Ledger, as_of: datetime, sessions: list[str], pools: list[str],
          consultations: list[str], total: TickReport, rounds: int) -> tuple[bool, int]:
    """Decide the due ids read once, PAGE of each kind per round, while rounds remain;
    returns (whether any round changed something, rounds used so far)."""
    progressed = False
    for start in range(0, max(len(sessions), len(pools), len(consultations)), PAGE):
        if rounds >= MAX_ROUNDS:
            break
        rounds += 1
        page_sessions, page_pools = sessions[start:start + PAGE], pools[start:start + PAGE]
        report = ledger.tick(as_of, page_sessions, page_pools) if page_sessions or page_pools \
            else TickReport(as_of=as_of)
        _merge_consultations(report, tick_consultations(ledger, as_of,
                                                        consultations[start:start + PAGE]))
        _merge(total, report)
        progressed = progressed or bool(report.charged or report.ended or report.settled
                                        or report.expired or report.consultations)
    return progressed, rounds


_gc_lock = threading.Lock()
_gc_ticks: list[tuple[int, int, int]] = []  # the thresholds to restore, while ticks run


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Run the cyclic garbage collector less often meanwhile: its first threshold at least
    TICK_GC_GEN0 allocations instead of 700, restored when the last concurrent tick ends.

    Why: a tick loads thousands of aggregates that stay alive (the unit, the aggregate
    cache), so the young objects keep surviving into the old generations and the collector
    keeps walking a growing heap: 12-16 % of a cold tick's CPU (1,532 collections for 10,000
    blocks, three quarters of their time in full collections; docs/design.md, Write path).
    Nothing is left uncollected: collections still run, on 14x fewer allocations, and the
    tick itself is bounded (MAX_ROUNDS pages). Process-wide while it lasts (other threads'
    garbage is collected on the same, rarer, schedule)."""
    with _gc_lock:
        if not _gc_ticks:
            _gc_ticks.append(gc.get_threshold())
            first, *rest = _gc_ticks[0]
            gc.set_threshold(max(first, TICK_GC_GEN0), *rest)
        else:
            _gc_ticks.append(_gc_ticks[0])
    try:
        yield
    finally:
        with _gc_lock:
            saved = _gc_ticks.pop()
            if not _gc_ticks:
                gc.set_threshold(*saved)


def catch_up_views(projector) -> None:
    """Bring the views up to the head: one catch_up call per MAX_EVENTS events (bounded)."""
    for _ in range(MAX_ROUNDS):
        if projector.catch_up(max_events=MAX_EVENTS) < MAX_EVENTS:
            return


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
    total.more = total.more or report.more  # a page left steps undone (run_tick re-reads then)
