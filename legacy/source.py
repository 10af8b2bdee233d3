"""Reading the legacy PostgreSQL database: read-only, one snapshot, bounded batches.

`--dsn` is a libpq connection string or a postgresql:// URL; a `?schema=name` query parameter
(the ledger's own URL convention, which libpq does not know) sets the search_path instead.
Columns the spec marks ⚠ (legacy-system.md §1) are probed in information_schema and selected as
NULL when absent, so the importer sees every expected key whatever the production schema was.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from storage import is_postgres, postgres_conninfo, postgres_parts

# What the importer reads per table, in import order (a table read later may refer to an
# earlier one: subscriptions name plans, wallets and withdrawals name doctors in users, debits
# name withdrawals).
COLUMNS: dict[str, tuple[str, ...]] = {
    "plans": ("id", "name", "category", "max_members", "currency", "price", "duration",
              "text_sessions", "voice_calls", "video_calls"),
    "users": ("id", "user_type", "country"),
    "subscriptions": ("id", "user_id", "plan_id", "plan_name", "status", "is_active",
                      "start_date", "end_date", "text_sessions_remaining",
                      "voice_calls_remaining", "video_calls_remaining", "total_text_sessions",
                      "total_voice_calls", "total_video_calls", "payment_transaction_id"),
    "subscription_members": ("id", "subscription_id", "user_id", "status", "role"),
    "payment_transactions": ("id", "transaction_id", "reference", "amount", "currency",
                             "status", "payment_status", "user_id", "metadata",
                             "gateway_reference", "processed_at", "created_at"),
    "appointments": ("id", "patient_id", "doctor_id", "appointment_date", "appointment_time",
                     "appointment_datetime_utc", "user_timezone", "appointment_type", "status",
                     "session_id", "actual_start_time", "actual_end_time", "completed_at",
                     "sessions_deducted", "earnings_awarded"),
    "text_sessions": ("id", "patient_id", "doctor_id", "status", "started_at", "activated_at",
                      "ended_at", "last_activity_at", "doctor_response_deadline",
                      "sessions_remaining_before_start", "sessions_used",
                      "auto_deductions_processed", "reason", "appointment_id"),
    "call_sessions": ("id", "patient_id", "doctor_id", "call_type", "appointment_id", "status",
                      "started_at", "ended_at", "last_activity_at", "answered_at",
                      "declined_at", "connected_at", "call_duration", "sessions_used",
                      "auto_deductions_processed", "manual_deduction_applied",
                      "failure_reason", "reason"),
    "text_appointment_sessions": ("id", "appointment_id", "patient_id", "doctor_id",
                                  "start_time", "sessions_used", "is_ended", "ended_at"),
    "withdrawal_requests": ("id", "doctor_id", "amount", "status", "created_at", "paid_at",
                            "rejection_reason"),
    "doctor_wallets": ("id", "doctor_id", "balance", "total_earned", "total_withdrawn"),
    "wallet_transactions": ("id", "doctor_id", "type", "amount", "description",
                            "session_type", "session_id", "session_table", "status",
                            "metadata", "payment_transaction_id", "payment_gateway",
                            "payment_status", "created_at"),
}
TABLES = tuple(COLUMNS)


def connect_source(dsn: str) -> psycopg.Connection:
    """A connection to the legacy database (schema from `?schema=` when given as a URL)."""
    if is_postgres(dsn) and "schema=" in dsn:
        schema = postgres_parts(dsn)["schema"]
        return psycopg.connect(postgres_conninfo(dsn), options=f"-c search_path={schema}",
                               connect_timeout=10)
    return psycopg.connect(dsn, connect_timeout=10)


@contextmanager
def snapshot(dsn: str) -> Iterator[psycopg.Connection]:
    """One REPEATABLE READ, READ ONLY transaction: every read sees the same snapshot and the
    importer cannot write to the legacy database. Rolled back (nothing to commit) on exit."""
    conn = connect_source(dsn)
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield conn
    finally:
        conn.rollback()
        conn.close()


def probe_columns(conn: psycopg.Connection) -> dict[str, set[str]]:
    """table → its columns, for the tables of the current schema."""
    rows = conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema()").fetchall()
    found: dict[str, set[str]] = {}
    for table, column in rows:
        found.setdefault(table, set()).add(column)
    return found


def select_query(table: str, present: set[str]) -> sql.Composed:
    """SELECT the expected columns of `table` (NULL AS a missing one) ORDER BY id."""
    parts = [sql.Identifier(column) if column in present
             else sql.SQL("NULL AS {}").format(sql.Identifier(column))
             for column in COLUMNS[table]]
    return sql.SQL("SELECT {} FROM {} ORDER BY id").format(sql.SQL(", ").join(parts),
                                                            sql.Identifier(table))


def count_rows(conn: psycopg.Connection, table: str) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
                        ).fetchone()[0]


def stream(conn: psycopg.Connection, table: str, present: set[str],
           batch_size: int) -> Iterator[list[dict]]:
    """Batches of at most `batch_size` rows (dicts) of `table` in id order, through a
    server-side cursor, so memory stays bounded by the batch whatever the table size."""
    if not 1 <= batch_size <= 100_000:
        raise ValueError(f"batch_size {batch_size} outside 1..100000")
    with conn.cursor(name=f"legacy_{table}", row_factory=dict_row) as cursor:
        cursor.itersize = batch_size
        cursor.execute(select_query(table, present))
        while True:
            rows = cursor.fetchmany(batch_size)
            if not rows:
                return
            yield rows
