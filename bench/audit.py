"""`make bench`, audit part (issue 12): what the hash chain costs the write path, and the rates
of chaining, folding the history, `ledger audit verify`, as-of reads and statements beside
`ledger replay --verify` and a raw scan of the same events table, in the same run.

Timing lives here, never in pass/fail tests. Usage:
    python -m bench.audit [--sessions 150] [--copies 80] [--rounds 6] [--postgres-url URL]
    (BENCH_QUICK=1: 20 sessions, 2 copies, 2 rounds: a smoke run)

- Write path: the bench's call workload (bench/run.py `_events`) ingested into a fresh store
  without and with the audit follower running in the same process (as in the service; polls
  5× as often as the default), in `--rounds` pairs; events/s, the pairs' median ratio, the follower thread's CPU
  share and its largest lag.
- Large store: the same workload ticked to settlement, then its stored events copied
  `--copies` times under fresh ids and COPY_HOURS later each (states rewritten consistently),
  so every copy is a valid history of its own, recorded after the one before; then chain,
  fold, verify, replay --verify, as-of reads and statements on it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

from audit import asof, statements
from audit.follower import AuditFollower
from audit.service import AuditService
from bench.run import T0, StepClock, _drop_schema, _events
from bench.stores import write_rows
from projections import Projector, replay_verify
from runtime.settings import Settings
from runtime.wiring import build_ledger
from storage import is_postgres, postgres_conninfo, postgres_parts, sqlite_path

ID = re.compile(r"^(d|p|pay|s|e)\d+$")  # the ids bench/run.py `_events` uses
COPY_HOURS = 3  # each copy of the workload is recorded this much later than the one before
POLL_SECONDS = 0.2  # the follower's polls while ingesting: 5× as often as the default (1 s)


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------- write path


def ingest_rate(url: str, sessions: int, follow: bool) -> tuple[float, int, float]:
    """(events/s ingesting the workload, largest follower lag in positions seen, the
    follower thread's CPU time as a share of the ingestion's wall time)."""
    clock, settings = StepClock(), Settings(database_url=url)
    ledger = build_ledger(settings, clock)
    service = AuditService(ledger, url)
    follower = AuditFollower(service, poll_seconds=POLL_SECONDS).start() if follow else None
    lag, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            lag[0] = max(lag[0], service.chainers["ledger"].lag())

    sampler = threading.Thread(target=sample, daemon=True)
    if follow:
        sampler.start()
    events = sorted(_events(sessions), key=lambda e: e[1])
    started = time.perf_counter()
    for k, (kind, at, payload) in enumerate(events):
        clock.now = max(clock.now, at)
        ledger.ingest(f"e{k}", kind, at, payload)
    elapsed = time.perf_counter() - started
    stop.set()
    cpu = follower.cpu_seconds if follower is not None else 0.0
    if follower is not None:
        follower.close()
        sampler.join()
    service.close()
    ledger.close()
    return len(events) / elapsed, lag[0], cpu / elapsed


def bench_write_path(label: str, fresh_url, sessions: int, rounds: int) -> list[tuple]:
    """Ingestion without and with the follower, in pairs whose order alternates (drift in the
    machine's load cancels); the ratio is the median of the pairs' ratios."""
    plain, followed, ratios, lags, shares = [], [], [], [], []
    for round_ in range(rounds):
        pair = {}
        for follow in ((False, True) if round_ % 2 == 0 else (True, False)):
            with fresh_url() as url:
                pair[follow] = ingest_rate(url, sessions, follow=follow)
        plain.append(pair[False][0])
        followed.append(pair[True][0])
        ratios.append(pair[True][0] / pair[False][0])
        lags.append(pair[True][1])
        shares.append(pair[True][2])
    return [(label, "ingest, no audit follower", statistics.median(plain),
             f"median of {rounds} runs, {min(plain):,.0f}–{max(plain):,.0f}"),
            (label, f"ingest, audit follower running ({POLL_SECONDS:g} s polls)",
             statistics.median(followed),
             f"paired ratio {statistics.median(ratios):.1%} (range {min(ratios):.0%}–"
             f"{max(ratios):.0%}); follower CPU {statistics.median(shares):.1%} of the "
             f"ingestion's wall time; lag ≤ {max(lags)} positions")]


# --------------------------------------------------------------------------- large store


def build_large_store(url: str, sessions: int, copies: int) -> tuple[Any, Projector, int]:
    """The workload ticked to settlement, then copied `copies` times (see the docstring)."""
    clock, settings = StepClock(), Settings(database_url=url)
    ledger = build_ledger(settings, clock)
    projector = Projector(ledger, url, settings.policy())
    for k, (kind, at, payload) in enumerate(sorted(_events(sessions), key=lambda e: e[1])):
        clock.now = max(clock.now, at)
        ledger.ingest(f"e{k}", kind, at, payload)
    from scheduler.tick import run_tick

    clock.now = T0 + timedelta(hours=2)
    run_tick(ledger, projector, clock.now)
    base = list(ledger.recorder.select_notifications(1, 10**7))
    for copy in range(1, copies + 1):
        write_rows(url, ledger.recorder.events_table_name, [_copied(n, copy) for n in base])
    projector.catch_up(max_events=10**8)
    return ledger, projector, int(ledger.recorder.max_notification_id())


def _copied(notification: Any, copy: int) -> tuple:
    """(originator_id, version, topic, state) of `notification` in copy number `copy`."""
    state = json.loads(notification.state)
    return (_uuid(notification.originator_id, copy), notification.originator_version,
            notification.topic, json.dumps(_rename(state, copy), separators=(",", ":")).encode())


def _uuid(value: Any, copy: int) -> uuid.UUID:
    return uuid.uuid5(uuid.UUID(str(value)), str(copy))


def _rename(value: Any, copy: int) -> Any:
    if isinstance(value, dict):
        if value.get("_type_") == "uuid_hex":
            return {**value, "_data_": _uuid(value["_data_"], copy).hex}
        if value.get("_type_") == "datetime_iso":
            moment = datetime.fromisoformat(value["_data_"]) + timedelta(hours=COPY_HOURS * copy)
            return {**value, "_data_": moment.isoformat()}
        return {k: _rename(v, copy) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename(v, copy) for v in value]
    if isinstance(value, str):
        if ID.match(value):
            return f"{value}x{copy}"
        if len(value) == 36 and value.count("-") == 4:
            return str(_uuid(value, copy))
    return value


def raw_scan_rate(ledger: Any, url: str) -> float:
    """Rows/s reading every stored event row into Python (no decoding): the hardware's pace."""
    table = ledger.recorder.events_table_name
    started = time.perf_counter()
    if is_postgres(url):
        import psycopg

        schema = postgres_parts(url)["schema"]
        with psycopg.connect(postgres_conninfo(url)) as conn:
            with conn.cursor(name="scan") as cursor:
                cursor.itersize = 5000
                cursor.execute(f'SELECT notification_id, originator_id, originator_version, '
                               f'topic, state FROM "{schema}".{table} ORDER BY notification_id')
                count = sum(1 for _ in cursor)
    else:
        import sqlite3

        with sqlite3.connect(sqlite_path(url)) as conn:
            count = sum(1 for _ in conn.execute(
                f"SELECT rowid, originator_id, originator_version, topic, state FROM {table} "
                "ORDER BY rowid"))
    return count / (time.perf_counter() - started)


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def small_store_verify_rss(fresh_url, sessions: int) -> tuple[int, float]:
    """(events, peak RSS in MB of `ledger audit verify`) on the workload without copies."""
    with fresh_url() as url:
        ledger, projector, head = build_large_store(url, sessions, 0)
        service = AuditService(ledger, url)
        service.catch_up(10**8)
        _, rss_mb = cli_verify(url, service.digest(), head)
        service.close()
        projector.close()
        ledger.close()
    return head, rss_mb


def bench_large_store(label: str, fresh_url, sessions: int, copies: int) -> list[tuple]:
    small_head, small_rss_mb = small_store_verify_rss(fresh_url, sessions)
    with fresh_url() as url:
        return _bench_large_store(label, url, sessions, copies, small_head, small_rss_mb)


def _bench_large_store(label: str, url: str, sessions: int, copies: int, small_head: int,
                       small_rss_mb: float) -> list[tuple]:
    ledger, projector, head = build_large_store(url, sessions, copies)
    rows = [(label, f"raw scan of the events table ({head:,} events)",
             raw_scan_rate(ledger, url), "the hardware's pace: rows read, not decoded")]
    service = AuditService(ledger, url)
    done, chain_seconds = timed(lambda: [service.chainers["ledger"].catch_up(10**8)])
    rows.append((label, "chain (chainer catch-up from zero)", head / chain_seconds, ""))
    folded, fold_seconds = timed(service.history.catch_up, 10**8)
    rows.append((label, "history fold (as-of, statements)", head / fold_seconds,
                 f"{folded:,} of the events move an account"))
    per_event_us = (chain_seconds + fold_seconds) / head * 1e6
    rows.append((label, "audit follower CPU per committed event (µs)", per_event_us,
                 f"{per_event_us * 3000 / 1e6:.0%} of a core at 3,000 events/s"))
    digest = service.digest()
    report, seconds = timed(service.verify, [digest])
    assert report.ok, "the untouched bench store must verify"
    verify_rate = head / seconds
    rows.append((label, "ledger audit verify", verify_rate, ""))
    rate, rss_mb = cli_verify(url, digest, head)
    rows.append((label, "ledger audit verify (the command, own process)", rate,
                 f"peak RSS {rss_mb:.0f} MB (on {small_head:,} events: {small_rss_mb:.0f} MB), "
                 "start-up included"))
    replayed, seconds = timed(replay_verify, ledger, url, Settings(database_url=url).policy())
    assert replayed.ok
    rows.append((label, "ledger replay --verify", replayed.events / seconds,
                 f"verify runs at {verify_rate / (replayed.events / seconds):.1f}× this"))
    rows += bench_reads(label, service, copies, sessions)
    service.close()
    projector.close()
    ledger.close()
    return rows


def cli_verify(url: str, digest: Any, head: int) -> tuple[float, float]:
    """(events/s, peak RSS in MB) of `ledger audit verify --digest` run as its own process."""
    import subprocess
    import sys

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as out:
        out.write(digest.to_json())
    # VmHWM, not ru_maxrss: Linux carries the forking parent's peak into ru_maxrss across exec.
    code = ("import sys\nfrom runtime.cli import main\n"
            "sys.argv = ['ledger', 'audit', 'verify', '--digest', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit as done:\n    code = done.code\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "print(hwm.split()[1], file=sys.stderr)\n")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, out.name], capture_output=True, text=True,
                          env={**os.environ, "LEDGER_DATABASE_URL": url}, check=False)
    elapsed = time.perf_counter() - started
    os.unlink(out.name)
    assert "verified" in done.stdout, done.stdout + done.stderr
    return head / elapsed, int(done.stderr.strip().splitlines()[-1]) / 1024


def bench_reads(label: str, service: AuditService, copies: int, sessions: int) -> list[tuple]:
    """As-of balances and wallets at random recorded instants; statements over random spans."""
    rng, store = random.Random(7), service.store
    copy_of = [rng.randrange(1, copies + 1) for _ in range(400)]
    instants = [T0 + timedelta(hours=COPY_HOURS * k, seconds=rng.randrange(0, 2 * 3600))
                for k in copy_of]
    accounts = [(f"p{rng.randrange(sessions)}x{k}", f"d{rng.randrange(sessions)}x{k}")
                for k in copy_of]
    latencies, answered = [], 0
    for moment, (patient, doctor) in zip(instants, accounts):
        started = time.perf_counter()
        answers = (asof.patient_balance_as_of(store, patient, moment),
                   asof.doctor_wallet_as_of(store, doctor, moment))
        latencies.append((time.perf_counter() - started) / 2)
        answered += sum(a is not None for a in answers)
    assert answered > len(instants), "most accounts exist at their instants"
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    rows = [(label, "as-of read (balance or wallet)", 1 / statistics.mean(latencies),
             f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; no replay")]
    started = time.perf_counter()
    for moment, (patient, _) in zip(instants[:100], accounts):
        assert statements.patient_statement(store, patient, T0 - timedelta(days=1),
                                            moment + timedelta(hours=2)) is not None
    rows.append((label, "patient statement (whole history)", 100 / (time.perf_counter() - started),
                 "statements/s"))
    return rows


# ---------------------------------------------------------------------------------- main


def sqlite_urls(tmp: str):
    from contextlib import contextmanager

    @contextmanager
    def fresh():
        yield f"sqlite:///{tmp}/w{uuid.uuid4().hex[:8]}.db"
    return fresh


def postgres_urls(base: str, made: list[str]):
    from contextlib import contextmanager

    @contextmanager
    def fresh():
        schema = "bench_audit_" + uuid.uuid4().hex[:8]
        made.append(schema)
        yield f"{base}?schema={schema}"
    return fresh


def main() -> None:
    parser = argparse.ArgumentParser()
    quick = os.environ.get("BENCH_QUICK") == "1"  # a smoke run: the smallest sizes
    parser.add_argument("--sessions", type=int, default=20 if quick else 150)
    parser.add_argument("--copies", type=int, default=2 if quick else 80)
    parser.add_argument("--rounds", type=int, default=2 if quick else 6)
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    print(f"audit bench: load average at start {loadavg()}")
    rows, made = [], []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = sqlite_urls(tmp)
        rows += bench_write_path("sqlite", fresh, args.sessions, args.rounds)
        rows += bench_large_store("sqlite", fresh, args.sessions, args.copies)
    fresh = postgres_urls(args.postgres_url, made)
    try:
        rows += bench_write_path("postgres", fresh, args.sessions, args.rounds)
        rows += bench_large_store("postgres", fresh, args.sessions, args.copies)
    finally:
        for schema in made:
            _drop_schema(args.postgres_url, schema)
    print(f"{'store':9} {'stage':50} {'per s':>10}  note")
    for label, stage, rate, note in rows:
        print(f"{label:9} {stage:50} {rate:10,.0f}  {note}")
    print(f"audit bench: load average at end {loadavg()}")


if __name__ == "__main__":
    main()
