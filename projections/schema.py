"""DDL of the views. Templates: {TS} instant, {KEY} byte-ordered text key, {BOOL} boolean.

Units and money are integers (BIGINT): units per pool/bucket, minor units per wallet.
"""

from __future__ import annotations

TRACKING = [
    """CREATE TABLE IF NOT EXISTS projection_tracking (
        name {KEY} PRIMARY KEY,
        notification_id BIGINT NOT NULL)""",
]

BALANCES = [
    """CREATE TABLE IF NOT EXISTS balance_pools (
        pool_id {KEY} PRIMARY KEY,
        payment_reference TEXT NOT NULL,
        owner_id TEXT NOT NULL,
        starts_at {TS} NOT NULL,
        effective_end {TS} NOT NULL,
        expired {BOOL} NOT NULL,
        refunded {BOOL} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS balance_pool_buckets (
        pool_id {KEY} NOT NULL,
        bucket {KEY} NOT NULL,
        granted BIGINT NOT NULL, free BIGINT NOT NULL, held BIGINT NOT NULL,
        charged BIGINT NOT NULL, reversed BIGINT NOT NULL, forfeited BIGINT NOT NULL,
        revoked BIGINT NOT NULL,
        PRIMARY KEY (pool_id, bucket))""",
    """CREATE TABLE IF NOT EXISTS balance_members (
        pool_id {KEY} NOT NULL,
        patient_id {KEY} NOT NULL,
        role TEXT NOT NULL,
        active {BOOL} NOT NULL,
        added_at {TS} NOT NULL,
        removed_at {TS},
        PRIMARY KEY (pool_id, patient_id))""",
    "CREATE INDEX IF NOT EXISTS balance_members_patient ON balance_members (patient_id)",
    """CREATE TABLE IF NOT EXISTS balance_patient_buckets (
        patient_id {KEY} NOT NULL,
        bucket {KEY} NOT NULL,
        held BIGINT NOT NULL, charged BIGINT NOT NULL,
        PRIMARY KEY (patient_id, bucket))""",
]

WALLETS = [
    """CREATE TABLE IF NOT EXISTS wallet_ids (
        wallet_id {KEY} PRIMARY KEY,
        doctor_id TEXT NOT NULL,
        currency TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS wallet_balances (
        doctor_id {KEY} NOT NULL,
        currency {KEY} NOT NULL,
        credited BIGINT NOT NULL, reversed BIGINT NOT NULL, pending BIGINT NOT NULL,
        available BIGINT NOT NULL, held BIGINT NOT NULL, withdrawn BIGINT NOT NULL,
        PRIMARY KEY (doctor_id, currency))""",
]

LIVE = [
    """CREATE TABLE IF NOT EXISTS live_sessions (
        session_id {KEY} PRIMARY KEY,
        patient_id TEXT NOT NULL,
        doctor_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        next_due_at {TS})""",
    "CREATE INDEX IF NOT EXISTS live_sessions_due ON live_sessions (next_due_at)",
    """CREATE TABLE IF NOT EXISTS live_pools (
        pool_id {KEY} PRIMARY KEY,
        effective_end {TS} NOT NULL,
        expired {BOOL} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS live_pools_due ON live_pools (expired, effective_end)",
]

# Priced consultations (billing-rules.md §10): money wallets per patient and currency, the
# platform and tax-payable accounts per currency, and consultations with a tick step due.
MARKETPLACE = [
    """CREATE TABLE IF NOT EXISTS money_wallets (
        patient_id {KEY} NOT NULL,
        currency {KEY} NOT NULL,
        topped_up BIGINT NOT NULL, refunded_to_source BIGINT NOT NULL,
        reversed_payments BIGINT NOT NULL, debt BIGINT NOT NULL, available BIGINT NOT NULL,
        held BIGINT NOT NULL, captured BIGINT NOT NULL, refunds BIGINT NOT NULL,
        PRIMARY KEY (patient_id, currency))""",
    """CREATE TABLE IF NOT EXISTS platform_accounts (
        currency {KEY} PRIMARY KEY,
        captured BIGINT NOT NULL, refunds BIGINT NOT NULL, shares BIGINT NOT NULL,
        shares_reversed BIGINT NOT NULL, platform BIGINT NOT NULL, tax_payable BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS live_consultations (
        consultation_id {KEY} PRIMARY KEY,
        patient_id TEXT NOT NULL,
        practitioner_id TEXT NOT NULL,
        status TEXT NOT NULL,
        next_due_at {TS})""",
    "CREATE INDEX IF NOT EXISTS live_consultations_due ON live_consultations (next_due_at)",
]

ALL = TRACKING + BALANCES + WALLETS + LIVE + MARKETPLACE
