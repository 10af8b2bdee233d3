"""DDL of the audit tables, in the ledger's database beside the views (projections/schema.py).

Templates: {TS} instant, {KEY} byte-ordered text key, {BOOL} boolean, {BLOB} bytes.
Units and money are integers (BIGINT). Every history row carries the `position` of the event
that produced it and its `recorded_at`: the running maximum of recorded times in log order, so
"the rows with recorded_at <= T" is always a prefix of the log (docs/audit.md "As of").
"""

from __future__ import annotations

TRACKING = [
    # One row per follower: the chain of each log (`chain:ledger`, `chain:legacy`) and the
    # history (`history`). position = last position applied; link/events: the chain's head.
    """CREATE TABLE IF NOT EXISTS audit_tracking (
        name {KEY} PRIMARY KEY,
        position BIGINT NOT NULL,
        link TEXT,
        events BIGINT NOT NULL,
        recorded_at {TS})""",
]

CHAIN = [
    # link_n of every chained event: lets `ledger audit verify` name the first position where
    # the log no longer gives the link recorded when the event was chained.
    """CREATE TABLE IF NOT EXISTS audit_chain (
        chain {KEY} NOT NULL,
        position BIGINT NOT NULL,
        link {BLOB} NOT NULL,
        PRIMARY KEY (chain, position))""",
]

HISTORY = [
    # One row per folded event: what it was, both times, and the ids it names.
    """CREATE TABLE IF NOT EXISTS audit_events (
        position BIGINT PRIMARY KEY,
        recorded_at {TS} NOT NULL,
        occurred_at {TS},
        event TEXT NOT NULL,
        originator_id TEXT NOT NULL,
        originator_version BIGINT NOT NULL,
        session_id TEXT, pool_id TEXT, block BIGINT, bucket TEXT,
        patient_id {KEY}, doctor_id {KEY}, currency TEXT, request_id TEXT)""",
    "CREATE INDEX IF NOT EXISTS audit_events_recorded ON audit_events (recorded_at, position)",
    "CREATE INDEX IF NOT EXISTS audit_events_originator ON audit_events "
    "(originator_id, originator_version)",
    "CREATE INDEX IF NOT EXISTS audit_events_patient ON audit_events (patient_id, event)",
    "CREATE INDEX IF NOT EXISTS audit_events_doctor ON audit_events (doctor_id, event)",
    """CREATE TABLE IF NOT EXISTS audit_pools (
        pool_id {KEY} NOT NULL,
        recorded_at {TS} NOT NULL,
        position BIGINT NOT NULL,
        payment_reference TEXT NOT NULL, owner_id TEXT NOT NULL,
        starts_at {TS} NOT NULL, effective_end {TS} NOT NULL,
        expired {BOOL} NOT NULL, refunded {BOOL} NOT NULL,
        PRIMARY KEY (pool_id, recorded_at, position))""",
    """CREATE TABLE IF NOT EXISTS audit_pool_buckets (
        pool_id {KEY} NOT NULL,
        bucket {KEY} NOT NULL,
        recorded_at {TS} NOT NULL,
        position BIGINT NOT NULL,
        granted BIGINT NOT NULL, free BIGINT NOT NULL, held BIGINT NOT NULL,
        charged BIGINT NOT NULL, reversed BIGINT NOT NULL, forfeited BIGINT NOT NULL,
        revoked BIGINT NOT NULL,
        PRIMARY KEY (pool_id, bucket, recorded_at, position))""",
    """CREATE TABLE IF NOT EXISTS audit_members (
        patient_id {KEY} NOT NULL,
        pool_id {KEY} NOT NULL,
        recorded_at {TS} NOT NULL,
        position BIGINT NOT NULL,
        role TEXT NOT NULL, active {BOOL} NOT NULL,
        added_at {TS} NOT NULL, removed_at {TS},
        PRIMARY KEY (patient_id, pool_id, recorded_at, position))""",
    """CREATE TABLE IF NOT EXISTS audit_patient_buckets (
        patient_id {KEY} NOT NULL,
        bucket {KEY} NOT NULL,
        recorded_at {TS} NOT NULL,
        position BIGINT NOT NULL,
        held BIGINT NOT NULL, charged BIGINT NOT NULL,
        PRIMARY KEY (patient_id, bucket, recorded_at, position))""",
    """CREATE TABLE IF NOT EXISTS audit_wallets (
        doctor_id {KEY} NOT NULL,
        currency {KEY} NOT NULL,
        recorded_at {TS} NOT NULL,
        position BIGINT NOT NULL,
        credited BIGINT NOT NULL, reversed BIGINT NOT NULL, pending BIGINT NOT NULL,
        available BIGINT NOT NULL, held BIGINT NOT NULL, withdrawn BIGINT NOT NULL,
        PRIMARY KEY (doctor_id, currency, recorded_at, position))""",
    # When each doctor's wallet in each currency first moved (the currencies of an as-of read).
    """CREATE TABLE IF NOT EXISTS audit_wallet_currencies (
        doctor_id {KEY} NOT NULL,
        currency {KEY} NOT NULL,
        recorded_at {TS} NOT NULL,
        PRIMARY KEY (doctor_id, currency))""",
    """CREATE TABLE IF NOT EXISTS audit_wallet_ids (
        wallet_id {KEY} PRIMARY KEY,
        doctor_id TEXT NOT NULL,
        currency TEXT NOT NULL)""",
]

ALL = TRACKING + CHAIN + HISTORY


def ddl_types(store) -> dict[str, str]:
    """The projections store's type names plus {BLOB} for this store."""
    return {**store.ddl_types, "BLOB": "BLOB" if store.kind == "sqlite" else "bytea"}
