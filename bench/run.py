"""`make bench`: ingestion, tick and projection throughput on SQLite and PostgreSQL.

Timing lives here, never in pass/fail tests. Prints one row per (store, stage) with events/s.
Usage: python -m bench.run [--sessions N] [--postgres-url URL]; BENCH_QUICK=1: 30 sessions.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone

from projections import Projector
from scheduler.tick import run_tick
from runtime.wiring import build_ledger
from runtime.settings import Settings
from bench.notifier import bench_notifier
from bench.webhooks import bench_webhooks

T0 = datetime(2026, 11, 2, 8, tzinfo=timezone.utc)


class StepClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def _events(n_sessions: int):
    """Doctors, one pool per patient, and a 25-minute voice call per patient (with pings)."""
    yield "doctor.registered", T0, {"doctor_id": "d0", "country": "MW"}
    for i in range(n_sessions):
        yield "doctor.registered", T0, {"doctor_id": f"d{i}", "country": "MW" if i % 2 else "KE"}
        yield "subscription.granted", T0, {
            "payment_reference": f"pay{i}", "owner_id": f"p{i}", "starts_at": T0.isoformat(),
            "plan": {"name": "Life Max", "price_minor": 15900000, "currency": "MWK",
                     "units": {"text": 10, "voice": 7, "video": 4}, "seats": 1, "duration_days": 30}}
    for i in range(n_sessions):
        start = T0 + timedelta(seconds=i)
        yield "session.requested", start, {"session_id": f"s{i}", "kind": "voice",
                                           "patient_id": f"p{i}", "doctor_id": f"d{i}"}
        yield "call.connected", start + timedelta(seconds=20), {"session_id": f"s{i}"}
        for minute in (5, 10, 15, 20):
            yield "session.activity", start + timedelta(minutes=minute), {"session_id": f"s{i}"}
        yield "session.ended", start + timedelta(minutes=25, seconds=20), \
            {"session_id": f"s{i}", "ended_by": "patient", "reason": "completed"}


def bench_store(label: str, url: str, n_sessions: int) -> list[tuple[str, str, int, float]]:
    clock = StepClock()
    settings = Settings(database_url=url)
    ledger = build_ledger(settings, clock)
    projector = Projector(ledger, url, settings.policy())
    rows = []
    events = sorted(_events(n_sessions), key=lambda e: e[1])
    started = time.perf_counter()
    for k, (kind, at, payload) in enumerate(events):
        clock.now = max(clock.now, at)
        ledger.ingest(f"e{k}", kind, at, payload)
    rows.append((label, "ingest (load+decide+save)", len(events), time.perf_counter() - started))
    started = time.perf_counter()
    applied = projector.catch_up(max_events=10**7)
    rows.append((label, "projection catch-up", applied, time.perf_counter() - started))
    clock.now = T0 + timedelta(hours=2)
    started = time.perf_counter()
    report = run_tick(ledger, projector, clock.now)
    steps = len(report.charged) + len(report.settled) + len(report.ended)
    rows.append((label, "tick steps (charge/settle)", steps, time.perf_counter() - started))
    rows += bench_notifier(label, url, ledger)
    projector.close()
    ledger.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    quick = os.environ.get("BENCH_QUICK") == "1"
    parser.add_argument("--sessions", type=int, default=30 if quick else 300)
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench_store("sqlite", f"sqlite:///{tmp}/bench.db", args.sessions)
        rows += bench_webhooks(f"sqlite:///{tmp}/hooks.db", args.sessions, StepClock(), T0)
    schema = "bench_" + uuid.uuid4().hex[:8]
    try:
        rows += bench_store("postgres", f"{args.postgres_url}?schema={schema}", args.sessions)
    finally:
        _drop_schema(args.postgres_url, schema)
    print(f"{'store':10} {'stage':28} {'count':>8} {'seconds':>8} {'per s':>9}")
    for label, stage, count, seconds in rows:
        print(f"{label:10} {stage:28} {count:8d} {seconds:8.2f} {count / seconds:9.0f}")


def _drop_schema(url: str, schema: str) -> None:
    import psycopg

    from storage import postgres_conninfo
    try:
        with psycopg.connect(postgres_conninfo(url), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    except psycopg.Error:
        pass


if __name__ == "__main__":
    main()
