"""Concurrency on PostgreSQL: several workers, each its own Ledger application on the same schema
(like separate processes), act on the same sessions and the same family pool at once.

Asserted over the event log: no (session, block) charged twice, no block lost (every settled
session charged exactly its units owed), no pool's free count negative at any prefix of the log,
and a request that loses a race gets insufficient_units or retry_later, never a double hold.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Callable

import pytest

from conftest import T0, make_ledger
from ledger import errors
from ledger.domain import Pool
from ledger.application import Ledger
from runtime.clock import ManualClock
from test_billing import MIN, S, Desk, named
from test_invariants import check_all, events_of, fold

pytestmark = pytest.mark.postgres

WORKERS = 4


def at_once(fns: list[Callable[[], object]]) -> list[object]:
    """Run every fn in its own thread, released together; returns results or exceptions."""
    barrier = threading.Barrier(len(fns))

    def run(fn):
        barrier.wait()
        try:
            return fn()
        except Exception as exc:  # returned, asserted on by the caller
            return exc

    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(run, fns))


def no_crash(results: list[object], allowed: tuple[str, ...] = ()) -> list[object]:
    """Every result is a value or an expected refusal (by code); anything else fails the test."""
    for r in results:
        if isinstance(r, errors.LedgerError):
            assert r.code in allowed, f"unexpected refusal {r.code}: {r}"
        elif isinstance(r, BaseException):
            raise AssertionError(f"a worker crashed: {r!r}") from r
    return results


@pytest.fixture
def workers(pg_url):
    clock = ManualClock(T0)  # shared by every worker; only the main thread moves it
    main = make_ledger(pg_url, clock)
    ledgers = [make_ledger(pg_url, clock) for _ in range(WORKERS)]
    yield clock, main, ledgers
    for ledger in [main, *ledgers]:
        ledger.close()


def test_concurrent_ticks_and_ends_charge_every_block_exactly_once(workers) -> None:
    clock, main, ledgers = workers
    desk = Desk(clock, ledger=main)
    sessions = [f"s{k}" for k in range(6)]
    for k, sid in enumerate(sessions):
        desk.doctor(f"d{k}", "MW" if k % 2 else "KE")
        desk.grant(f"pay-{k}", owner=f"p{k}", voice=4 + k % 3, video=4, text=4)
        desk.request(sid, ("voice", "video", "text")[k % 3], patient=f"p{k}", doctor=f"d{k}")
        (desk.activate if k % 3 == 2 else desk.connect)(sid, T0 + k * S)
    reported: dict[str, datetime] = {}
    counts = Counter()

    def tick(ledger: Ledger, as_of: datetime):
        return lambda: ledger.tick(as_of, sessions)

    for minute in range(5, 61, 5):
        now = clock.set(T0 + minute * MIN)
        # Everyone keeps talking (the same report delivered to every worker at once).
        for sid in sessions:
            no_crash(at_once([lambda l=l, sid=sid: l.ingest(f"act-{sid}-{minute}",
                                                            "session.activity", now,
                                                            {"session_id": sid})
                              for l in ledgers]),
                     allowed=("session_ended", "session_settled", "retry_later"))
        if minute != 35:
            reports = no_crash(at_once([tick(l, now) for l in ledgers]))
            counts["conflicts"] += sum(r.conflicts for r in reports)
        else:
            # Ends reported at once: the same event from every worker, and per-worker reports
            # with different times (the earliest accepted one must stand).
            fns = []
            for i, ledger in enumerate(ledgers):
                for k, sid in enumerate(sessions):
                    ended = now - timedelta(seconds=97 * (i + 1) + 11 * k)
                    fns.append(lambda l=ledger, sid=sid, e=ended, i=i: (
                        sid, e, l.ingest(f"end-{sid}-w{i}", "session.ended", e,
                                         {"session_id": sid, "ended_by": "doctor"})))
                    fns.append(lambda l=ledger, sid=sid: (
                        sid, now, l.ingest(f"end-{sid}", "session.ended", now,
                                           {"session_id": sid})))
            fns += [tick(l, now) for l in ledgers]  # …while every worker ticks
            for result in no_crash(at_once(fns), allowed=("retry_later",)):
                if not isinstance(result, (tuple, errors.LedgerError)):
                    counts["conflicts"] += result.conflicts
                elif isinstance(result, tuple):
                    sid, ended, accepted = result
                    reported[sid] = min(ended, reported.get(sid, ended))
                    counts["replayed" if accepted.replayed else "accepted"] += 1
                else:
                    counts["retry_later"] += 1
    # Settle everything, still from every worker at once.
    for extra in (90, 120, 150):
        no_crash(at_once([tick(l, T0 + extra * MIN) for l in ledgers]))

    events = events_of(main)
    check_all(events, main, reported_ends=reported)  # I1, I2, I3 (every prefix), I5–I8, I10
    folded = fold(events)
    for sid in sessions:
        s = folded.by_sid[sid]
        assert s.settled is not None, f"{sid} never settled"
        assert s.ended_at == reported[sid], f"{sid}: the earliest accepted end must stand"
        blocks = [d.n for d in s.deducted] + [c["block"] for c in s.settled.charged]
        assert len(blocks) == len(set(blocks)), f"{sid}: a block charged twice: {blocks}"
    assert counts["replayed"] >= 1  # duplicates of "end-sK" really raced
    print(f"races: {dict(counts)}")
    # Every end report either won (one receipt per event id) or was told to retry.
    receipts = Counter(e.event_id for e in named(events, "Receipt.Recorded"))
    assert all(v == 1 for v in receipts.values())


def test_family_members_race_for_the_last_units(workers) -> None:
    clock, main, ledgers = workers
    desk = Desk(clock, ledger=main)
    rounds = 12
    outcomes = Counter()
    for r in range(rounds):
        base = clock.set(T0 + r * 3 * 60 * MIN)
        units = 1 + r % 2  # 1 unit: one request must lose; 2 units: the connects race for block 2
        ref = f"fam-{r}"
        desk.grant(ref, owner=f"mum-{r}", seats=3, voice=units, text=0, video=units)
        members = [f"a-{r}", f"b-{r}"]
        for m in members:
            desk.post("member.added", payment_reference=ref, patient_id=m)
        for m in members:
            desk.doctor(f"doc-{m}", "MW")
        # Both members request at once, each through its own worker.
        results = no_crash(at_once([
            lambda l=ledgers[i], m=m: l.ingest(f"req-{m}", "session.requested", base, {
                "session_id": f"s-{m}", "kind": "voice", "patient_id": m,
                "doctor_id": f"doc-{m}"})
            for i, m in enumerate(members)]), allowed=("insufficient_units", "retry_later"))
        won = [m for m, res in zip(members, results) if not isinstance(res, Exception)]
        lost = [res.code for res in results if isinstance(res, Exception)]
        outcomes.update(lost)
        if units == 1:
            assert len(won) == 1, f"round {r}: {results}"
        else:
            assert len(won) + lost.count("retry_later") == 2, f"round {r}: {results}"
        sids = [f"s-{m}" for m in won]
        desk.sessions.extend(sids)
        # The winners connect at once: at most one can hold the pool's last unit for block 2.
        clock.set(base + 10 * S)
        no_crash(at_once([lambda l=ledgers[i], sid=sid: l.ingest(
            f"con-{sid}", "call.connected", base + 10 * S, {"session_id": sid})
            for i, sid in enumerate(sids)]))
        # Ticks from every worker at once across the blocks; then the calls end and settle.
        for minutes in (11, 12, 21, 22):
            now = clock.set(base + minutes * MIN)
            no_crash(at_once([lambda l=l, now=now: l.tick(now, sids) for l in ledgers]))
        now = clock.set(base + 25 * MIN)
        no_crash(at_once([lambda l=ledgers[i], sid=sid: l.ingest(
            f"end-{sid}", "session.ended", now, {"session_id": sid})
            for i, sid in enumerate(sids)]), allowed=("session_settled",))
        for minutes in (40, 60):
            now = clock.set(base + minutes * MIN)
            no_crash(at_once([lambda l=l, now=now: l.tick(now, sids) for l in ledgers]))
        pool: Pool = main.repository.get(Pool.create_id(ref))
        assert pool.free["voice"] >= 0 and not pool.held
        assert len(pool.charged) <= units
    events = events_of(main)
    check_all(events, main)
    # Never a double hold: per family pool, holds never exceeded its units at any prefix (the
    # fold in check_all asserts free ≥ 0 after every event), and no (session, block) twice.
    holds = Counter((e.originator_id, e.session_id, e.block) for e in named(events, "Pool.Held"))
    assert all(v == 1 for v in holds.values())
    assert outcomes["insufficient_units"] + outcomes["retry_later"] >= rounds // 2
    folded = fold(events)
    for s in folded.sessions.values():
        assert s.settled is not None and s.net_units() == s.settled.units_owed
