"""Legacy import throughput: a scaled legacy database → `import_legacy` → replay check.

Builds the fixture database (legacy/fixtures.py) plus `--patients` synthetic patients, each with
a subscription, a 12-minute and an 8-minute text session, a 25-minute call and their six wallet
credits (about 12 rows per patient), then times the import into PostgreSQL and SQLite, a second
(no-op) import, and load_history + verify_against_source. Timing lives here, never in tests.
Usage: python -m bench.legacy_import [--patients N] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid

import psycopg
from psycopg import sql

from legacy.log import open_legacy
from legacy.fixtures import build_legacy_database
from legacy.importer import import_legacy
from legacy.replay import load_history, verify_against_source
from storage import postgres_conninfo

# Synthetic rows, ids from 100000 up so they never meet the fixture's. Patient i (1..N) has
# subscription 100000+i, text sessions 100000+2i and 100001+2i, call 100000+i, doctor 1000+i%50.
SCALE_SQL = """
INSERT INTO users (id, user_type, country)
  SELECT 1000 + d, 'doctor', CASE WHEN d % 2 = 0 THEN 'Malawi' ELSE 'Kenya' END
  FROM generate_series(0, 49) d;
INSERT INTO users (id, user_type, country)
  SELECT 100000 + i, 'patient', 'Malawi' FROM generate_series(1, %(n)s) i;
INSERT INTO subscriptions (id, user_id, plan_id, status, is_active, start_date, end_date,
    total_text_sessions, text_sessions_remaining, total_voice_calls, voice_calls_remaining,
    payment_transaction_id)
  SELECT 100000 + i, 100000 + i, 2, 1, true, '2026-02-01', '2026-03-03', 10, 7, 5, 2,
         'TXN_BENCH_' || i FROM generate_series(1, %(n)s) i;
INSERT INTO text_sessions (id, patient_id, doctor_id, status, started_at, activated_at, ended_at,
    last_activity_at, sessions_used, auto_deductions_processed)
  SELECT 100000 + 2 * i, 100000 + i, 1000 + i % 50, 'ended', '2026-02-10 09:58:00'::timestamp,
         '2026-02-10 10:00:00'::timestamp, '2026-02-10 10:12:00'::timestamp,
         '2026-02-10 10:12:00'::timestamp, 2, 1
  FROM generate_series(1, %(n)s) i
  UNION ALL
  SELECT 100001 + 2 * i, 100000 + i, 1000 + i % 50, 'ended', '2026-02-11 09:58:00',
         '2026-02-11 10:00:00', '2026-02-11 10:08:00', '2026-02-11 10:08:00', 1, 0
  FROM generate_series(1, %(n)s) i;
INSERT INTO call_sessions (id, patient_id, doctor_id, call_type, status, started_at,
    answered_at, connected_at, ended_at, call_duration, sessions_used, auto_deductions_processed)
  SELECT 100000 + i, 100000 + i, 1000 + i % 50, 'voice', 'ended', '2026-02-12 09:59:40',
         '2026-02-12 10:00:00', '2026-02-12 10:00:00', '2026-02-12 10:25:00', 1500, 3, 2
  FROM generate_series(1, %(n)s) i;
INSERT INTO wallet_transactions (id, doctor_id, type, amount, session_type, session_id,
    session_table, payment_transaction_id, created_at)
  SELECT 100000 + 6 * i + k, 1000 + i % 50, 'credit',
         CASE WHEN (i % 50) % 2 = 0 THEN 3500.00 ELSE 3.00 END,
         CASE WHEN k < 3 THEN 'text' ELSE 'voice' END,
         CASE WHEN k < 2 THEN 100000 + 2 * i WHEN k = 2 THEN 100001 + 2 * i ELSE 100000 + i END,
         CASE WHEN k < 3 THEN 'text_sessions' WHEN k = 5 THEN 'call_sessions_manual'
              ELSE 'call_sessions_auto' END,
         CASE WHEN k < 3 THEN 'TXN_BENCH_' || i END,
         '2026-02-10 10:10:30'::timestamp + make_interval(days => k)
  FROM generate_series(1, %(n)s) i, generate_series(0, 5) k;
INSERT INTO doctor_wallets (id, doctor_id, balance, total_earned, total_withdrawn)
  SELECT 1000 + doctor_id, doctor_id, sum(amount), sum(amount), 0
  FROM wallet_transactions WHERE id >= 100000 GROUP BY doctor_id;
"""


def build_source(conninfo: str, schema: str, patients: int) -> int:
    """The fixture plus `patients` synthetic patients in `schema`; returns the rows in it."""
    counts = build_legacy_database(conninfo, schema)
    with psycopg.connect(conninfo, options=f"-c search_path={schema}") as conn:
        conn.execute(SCALE_SQL.replace("%(n)s", str(int(patients))))
    return sum(counts.values()) + patients * 12 + 50 + 50


def timed(label: str, fn):
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    return label, seconds, result


def bench_target(label: str, dsn: str, url: str, rows: int, batch_size: int) -> None:
    _, seconds, report = timed("import", lambda: import_legacy(dsn, url, batch_size=batch_size))
    print(f"{label:10} import       {rows:8,d} rows {seconds:7.2f} s {rows / seconds:9,.0f} rows/s"
          f"  ({report.appended:,} aggregates)")
    _, seconds, again = timed("again", lambda: import_legacy(dsn, url, batch_size=batch_size))
    print(f"{label:10} re-import    {rows:8,d} rows {seconds:7.2f} s {rows / seconds:9,.0f} rows/s"
          f"  ({again.appended} appended)")
    app = open_legacy(url)
    try:
        _, seconds, history = timed("load", lambda: load_history(app))
    finally:
        app.close()
    print(f"{label:10} load_history {len(history.facts):8,d} facts {seconds:6.2f} s")
    _, seconds, problems = timed("verify", lambda: verify_against_source(dsn, history))
    print(f"{label:10} verify       {seconds:7.2f} s  {len(problems)} difference(s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    conninfo = postgres_conninfo(args.postgres_url)
    tag = "bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(tag)))
    try:
        rows = build_source(conninfo, tag + "_src", args.patients)
        dsn = f"{args.postgres_url}?schema={tag}_src"
        bench_target("postgres", dsn, f"{args.postgres_url}?schema={tag}", rows, args.batch_size)
        with tempfile.TemporaryDirectory() as tmp:
            bench_target("sqlite", dsn, f"sqlite:///{tmp}/ledger.db", rows, args.batch_size)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            for schema in (tag, tag + "_src"):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    sql.Identifier(schema)))


if __name__ == "__main__":
    main()
