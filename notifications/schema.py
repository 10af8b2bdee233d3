"""DDL of the notifier's tables, beside the ledger's (same SQLite file or PostgreSQL schema).

Templates as in projections/schema.py: {TS} instant, {KEY} byte-ordered text key, {BOOL}.
Endpoints and deliveries are operational data, not billing facts: rows, not events
(docs/webhooks.md, "Where things are stored").
"""

from __future__ import annotations

TRACKING = """CREATE TABLE IF NOT EXISTS webhook_tracking (
    name {KEY} PRIMARY KEY,
    notification_id BIGINT NOT NULL)"""

ENDPOINTS = """CREATE TABLE IF NOT EXISTS webhook_endpoints (
    endpoint_id {KEY} PRIMARY KEY,
    url TEXT NOT NULL,
    description TEXT NOT NULL,
    event_types TEXT NOT NULL,
    enabled {BOOL} NOT NULL,
    secret TEXT NOT NULL,
    previous_secret TEXT,
    previous_secret_until {TS},
    start_position BIGINT NOT NULL,
    created_at {TS} NOT NULL,
    updated_at {TS} NOT NULL)"""

MESSAGES = [
    """CREATE TABLE IF NOT EXISTS webhook_messages (
        message_id {KEY} PRIMARY KEY,
        position BIGINT NOT NULL,
        ordinal INTEGER NOT NULL,
        event_type {KEY} NOT NULL,
        ordering_key {KEY} NOT NULL,
        body TEXT NOT NULL,
        created_at {TS} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS webhook_messages_position ON webhook_messages (position, ordinal)",
]

DELIVERIES = [
    """CREATE TABLE IF NOT EXISTS webhook_deliveries (
        delivery_id {KEY} PRIMARY KEY,
        message_id {KEY} NOT NULL,
        endpoint_id {KEY} NOT NULL,
        event_type {KEY} NOT NULL,
        ordering_key {KEY} NOT NULL,
        position BIGINT NOT NULL,
        ordinal INTEGER NOT NULL,
        status {KEY} NOT NULL,
        attempts INTEGER NOT NULL,
        created_at {TS} NOT NULL,
        deadline_at {TS} NOT NULL,
        next_attempt_at {TS} NOT NULL,
        claimed_until {TS},
        claim_token TEXT,
        last_attempt_at {TS},
        last_status_code INTEGER,
        last_error TEXT,
        last_response TEXT,
        delivered_at {TS},
        UNIQUE (message_id, endpoint_id))""",
    "CREATE INDEX IF NOT EXISTS webhook_deliveries_due "
    "ON webhook_deliveries (status, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS webhook_deliveries_order "
    "ON webhook_deliveries (endpoint_id, ordering_key, position, ordinal)",
]

UNITS = [
    """CREATE TABLE IF NOT EXISTS webhook_pools (
        pool_id {KEY} PRIMARY KEY,
        payment_reference TEXT NOT NULL,
        owner_id TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS webhook_pool_units (
        pool_id {KEY} NOT NULL,
        bucket {KEY} NOT NULL,
        free BIGINT NOT NULL,
        PRIMARY KEY (pool_id, bucket))""",
    """CREATE TABLE IF NOT EXISTS webhook_pool_links (
        pool_id {KEY} NOT NULL,
        patient_id {KEY} NOT NULL,
        PRIMARY KEY (pool_id, patient_id))""",
    """CREATE TABLE IF NOT EXISTS webhook_patient_units (
        patient_id {KEY} NOT NULL,
        bucket {KEY} NOT NULL,
        available BIGINT NOT NULL,
        PRIMARY KEY (patient_id, bucket))""",
]

ALL = [TRACKING, ENDPOINTS, *MESSAGES, *DELIVERIES, *UNITS]
