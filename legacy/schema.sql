-- The legacy Laravel (DocAvailable) billing tables, as legacy-system.md §1 describes them.
--
-- Written from the spec, not from the legacy migrations: it is the lower bound the importer must
-- read. Deliberate choices:
-- * statuses are plain text (the legacy enums were violated in production, B31: `missed`,
--   `answered`, `scheduled`, `pending`, `cancelled` were all written);
-- * timestamps are `timestamp(0) without time zone` as Laravel creates them (values are UTC, B30);
-- * money is numeric(10,2) as in the legacy migrations;
-- * `call_sessions.manual_deduction_applied` is left out: no legacy migration creates it (⚠ §1.5,
--   B10); tests add it with ALTER TABLE to check the importer copes either way;
-- * the ⚠ columns the code writes but no migration creates (payment_transactions.user_id,
--   gateway_reference, metadata, payment_status) are included, as production evidently had them;
--   tests drop some of them.
-- Loaded into the current search_path by legacy.fixtures.build_legacy_database.

CREATE TABLE plans (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL,
    category      text NOT NULL DEFAULT 'individual',
    max_members   integer NOT NULL DEFAULT 1,
    features      jsonb,
    currency      text NOT NULL DEFAULT 'MWK',
    price         integer NOT NULL DEFAULT 0,
    duration      integer NOT NULL DEFAULT 30,
    status        integer NOT NULL DEFAULT 1,
    text_sessions integer NOT NULL DEFAULT 0,
    voice_calls   integer NOT NULL DEFAULT 0,
    video_calls   integer NOT NULL DEFAULT 0,
    created_at    timestamp(0),
    updated_at    timestamp(0)
);

CREATE TABLE users (
    id         bigserial PRIMARY KEY,
    first_name text,
    last_name  text,
    email      text,
    user_type  text NOT NULL DEFAULT 'patient',
    country    text,
    created_at timestamp(0),
    updated_at timestamp(0)
);

CREATE TABLE subscriptions (
    id                      bigserial PRIMARY KEY,
    user_id                 bigint,
    plan_id                 bigint REFERENCES plans(id) ON DELETE CASCADE,
    plan_name               text,
    plan_price              integer,
    plan_currency           char(3) DEFAULT 'USD',
    status                  integer DEFAULT 1,
    is_active               boolean DEFAULT true,
    start_date              timestamp(0),
    end_date                timestamp(0),
    activated_at            timestamp(0),
    expires_at              timestamp(0),
    text_sessions_remaining integer NOT NULL DEFAULT 0,
    voice_calls_remaining   integer NOT NULL DEFAULT 0,
    video_calls_remaining   integer NOT NULL DEFAULT 0,
    total_text_sessions     integer NOT NULL DEFAULT 0,
    total_voice_calls       integer NOT NULL DEFAULT 0,
    total_video_calls       integer NOT NULL DEFAULT 0,
    appointments_remaining  integer NOT NULL DEFAULT 0,
    payment_transaction_id  text,
    payment_gateway         text,
    payment_status          text DEFAULT 'pending',
    payment_metadata        json,
    created_at              timestamp(0),
    updated_at              timestamp(0)
);

CREATE TABLE subscription_members (
    id              bigserial PRIMARY KEY,
    subscription_id bigint NOT NULL REFERENCES subscriptions(id) ON DELETE CASCADE,
    user_id         bigint NOT NULL,
    status          text NOT NULL DEFAULT 'active',
    role            text NOT NULL DEFAULT 'member',
    created_at      timestamp(0),
    updated_at      timestamp(0),
    UNIQUE (subscription_id, user_id)
);

CREATE TABLE payment_transactions (
    id                bigserial PRIMARY KEY,
    transaction_id    text UNIQUE,
    reference         text,
    amount            numeric(10,2),
    currency          char(3) DEFAULT 'MWK',
    status            text DEFAULT 'pending',
    phone_number      text,
    payment_method    text DEFAULT 'mobile_money',
    gateway           text DEFAULT 'paychangu',
    webhook_data      json,
    processed_at      timestamp(0),
    created_at        timestamp(0),
    updated_at        timestamp(0),
    user_id           bigint,   -- ⚠ written by code, in no migration
    gateway_reference text,     -- ⚠
    metadata          json,     -- ⚠
    payment_status    text      -- ⚠ written by the admin panel
);

CREATE TABLE appointments (
    id                        bigserial PRIMARY KEY,
    patient_id                bigint,
    doctor_id                 bigint,
    appointment_date          date,
    appointment_time          time,
    appointment_datetime_utc  timestamp(0),
    user_timezone             text DEFAULT 'UTC',
    appointment_type          text,
    duration_minutes          integer DEFAULT 30,
    status                    integer DEFAULT 0,
    reason                    text,
    patient_joined            timestamp(0),
    doctor_joined             timestamp(0),
    actual_start_time         timestamp(0),
    actual_end_time           timestamp(0),
    completed_at              timestamp(0),   -- ⚠ not fillable
    cancelled_reason          text,
    session_id                bigint,
    call_unlocked_at          timestamp(0),
    sessions_deducted         integer DEFAULT 0,       -- ⚠ not fillable
    earnings_awarded          numeric(10,2) DEFAULT 0, -- ⚠ not fillable
    created_at                timestamp(0),
    updated_at                timestamp(0)
);

CREATE TABLE text_sessions (
    id                               bigserial PRIMARY KEY,
    patient_id                       bigint,
    doctor_id                        bigint,
    status                           text DEFAULT 'waiting_for_doctor',
    started_at                       timestamp(0),
    activated_at                     timestamp(0),
    ended_at                         timestamp(0),
    last_activity_at                 timestamp(0),
    doctor_response_deadline         timestamp(0),
    sessions_remaining_before_start  integer,
    sessions_used                    integer DEFAULT 1,
    auto_deductions_processed        integer DEFAULT 0,
    max_duration_minutes             integer,
    reason                           text,
    chat_id                          text,
    scheduled_at                     timestamp(0),
    appointment_id                   bigint,
    session_type                     text,
    text_enabled                     boolean,
    call_enabled                     boolean,
    created_at                       timestamp(0),
    updated_at                       timestamp(0)
);

CREATE TABLE call_sessions (
    id                               bigserial PRIMARY KEY,
    patient_id                       bigint,
    doctor_id                        bigint,
    call_type                        text,
    appointment_id                   text,
    status                           text DEFAULT 'connecting',
    started_at                       timestamp(0),
    ended_at                         timestamp(0),
    last_activity_at                 timestamp(0),
    answered_at                      timestamp(0),
    answered_by                      bigint,
    declined_at                      timestamp(0),
    declined_by                      bigint,
    decline_reason                   text,
    connected_at                     timestamp(0),
    is_connected                     boolean DEFAULT false,
    call_duration                    integer,
    sessions_used                    integer DEFAULT 1,
    sessions_remaining_before_start  integer,
    auto_deductions_processed        integer DEFAULT 0,
    failure_reason                   text,
    reason                           text,
    created_at                       timestamp(0),
    updated_at                       timestamp(0)
    -- manual_deduction_applied: ⚠ no migration creates it (B10)
);

CREATE TABLE text_appointment_sessions (
    id                   bigserial PRIMARY KEY,
    appointment_id       bigint,
    patient_id           bigint,
    doctor_id            bigint,
    is_active            boolean DEFAULT true,
    start_time           timestamp(0),
    last_activity_time   timestamp(0),
    has_patient_activity boolean DEFAULT false,
    has_doctor_activity  boolean DEFAULT false,
    sessions_used        integer DEFAULT 0,
    is_ended             boolean DEFAULT false,
    ended_at             timestamp(0),
    created_at           timestamp(0),
    updated_at           timestamp(0)
);

CREATE TABLE doctor_wallets (
    id              bigserial PRIMARY KEY,
    doctor_id       bigint UNIQUE,
    balance         numeric(10,2) DEFAULT 0,
    total_earned    numeric(10,2) DEFAULT 0,
    total_withdrawn numeric(10,2) DEFAULT 0,
    created_at      timestamp(0),
    updated_at      timestamp(0)
);

CREATE TABLE wallet_transactions (
    id                     bigserial PRIMARY KEY,
    doctor_id              bigint,
    type                   text,
    amount                 numeric(10,2),
    description            text,
    session_type           text,
    session_id             bigint,
    session_table          text,
    status                 text DEFAULT 'completed',
    metadata               json,
    payment_transaction_id text,
    payment_gateway        text,
    payment_status         text DEFAULT 'completed',
    created_at             timestamp(0),
    updated_at             timestamp(0)
);

CREATE TABLE withdrawal_requests (
    id                  bigserial PRIMARY KEY,
    doctor_id           bigint,
    amount              numeric(10,2),
    payment_method      text,
    status              text DEFAULT 'pending',
    bank_name           text,
    bank_branch         text,
    account_number      text,
    account_holder_name text,
    mobile_provider     text,
    mobile_number       text,
    rejection_reason    text,
    approved_at         timestamp(0),
    approved_by         bigint,
    paid_at             timestamp(0),
    paid_by             bigint,
    payment_details     json,
    created_at          timestamp(0),
    updated_at          timestamp(0)
);
