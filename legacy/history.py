"""The legacy history as the importer recorded it: items (what the legacy rows say) and facts
(every legacy money movement and unit deduction as it actually happened).

This is the contract between the importer (`legacy.importer`, which writes the legacy log) and
the reconciliation (`legacy.reconcile`, which reads it): `legacy.replay.load_history(app)` folds
the legacy log into one `LegacyHistory`. Times are aware UTC datetimes truncated to seconds;
money is integer minor units with an ISO 4217 currency; buckets are `text`, `voice`, `video`.
Item keys are "<legacy table>:<row id>", e.g. "call_sessions:7" (the `subject` of a fact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

BUCKETS = ("text", "voice", "video")


@dataclass(frozen=True)
class Subscription:
    """A `subscriptions` row. `granted`/`remaining` per bucket (total_*/*_remaining columns)."""

    key: str
    owner_id: str
    payment_reference: str | None
    plan_name: str | None
    plan_duration_days: int | None
    starts_at: datetime | None
    ends_at: datetime | None
    status: int | None
    is_active: bool
    granted: dict[str, int]
    remaining: dict[str, int]


@dataclass(frozen=True)
class Member:
    """A `subscription_members` row."""

    key: str
    subscription_key: str
    patient_id: str
    status: str
    role: str


@dataclass(frozen=True)
class Doctor:
    """A doctor from `users`: legacy country string and its ISO 3166-1 alpha-2 code (`MW` for
    "malawi" in any case; otherwise the importer's best mapping, None if unknown)."""

    doctor_id: str
    country_legacy: str | None
    country: str | None


@dataclass(frozen=True)
class TextSession:
    """A `text_sessions` row (status kept verbatim, also when outside the enum)."""

    key: str
    patient_id: str
    doctor_id: str
    status: str
    started_at: datetime | None
    activated_at: datetime | None
    ended_at: datetime | None
    last_activity_at: datetime | None
    doctor_response_deadline: datetime | None
    sessions_used: int
    auto_deductions_processed: int
    sessions_remaining_before_start: int | None
    appointment_key: str | None  # "appointments:<id>" when linked
    reason: str | None


@dataclass(frozen=True)
class CallSession:
    """A `call_sessions` row. `manual_deduction_applied` is None when the column is missing (⚠)."""

    key: str
    patient_id: str
    doctor_id: str
    call_type: str  # voice | video
    status: str
    appointment_ref: str | None  # the legacy routing string, verbatim
    appointment_key: str | None  # "appointments:<id>" when the routing string is numeric
    started_at: datetime | None
    answered_at: datetime | None
    connected_at: datetime | None
    ended_at: datetime | None
    last_activity_at: datetime | None
    declined_at: datetime | None
    call_duration: int | None
    sessions_used: int
    auto_deductions_processed: int
    manual_deduction_applied: bool | None
    reason: str | None


@dataclass(frozen=True)
class Appointment:
    """An `appointments` row. `kind` is text | voice | video (legacy `audio`/`voice` → voice);
    `status` is the legacy int's name (pending, confirmed, cancelled, completed, …, or
    `unknown:<n>`); `session_key` is "text_sessions:<id>" when linked."""

    key: str
    patient_id: str
    doctor_id: str
    kind: str
    status: str
    starts_at: datetime | None
    session_key: str | None
    completed_at: datetime | None
    actual_start_time: datetime | None
    actual_end_time: datetime | None
    sessions_deducted: int | None = None  # ⚠ never persisted by legacy (B17): 0 or None
    earnings_awarded_minor: int | None = None  # ⚠ likewise


@dataclass(frozen=True)
class Wallet:
    """A `doctor_wallets` row in minor units of `currency` (MWK for a Malawi doctor, else USD)."""

    doctor_id: str
    currency: str
    balance_minor: int
    total_earned_minor: int
    total_withdrawn_minor: int
    key: str | None = None  # "doctor_wallets:<id>", the subject of its residual facts


@dataclass(frozen=True)
class Withdrawal:
    """A `withdrawal_requests` row."""

    key: str
    doctor_id: str
    amount_minor: int
    currency: str
    status: str
    requested_at: datetime | None
    paid_at: datetime | None
    reason: str | None = None  # rejection_reason, verbatim


@dataclass(frozen=True)
class Payment:
    """A `payment_transactions` row (`reference` = tx_ref = subscriptions.payment_transaction_id).
    `user_id`/`plan_id` are None when the ⚠ columns `user_id`/`metadata` are missing."""

    key: str
    reference: str | None
    amount_minor: int | None
    currency: str | None
    status: str
    user_id: str | None
    plan_id: str | None
    created_at: datetime | None
    processed_at: datetime | None
    gateway_reference: str | None = None  # ⚠ column may be missing


@dataclass(frozen=True)
class TextAppointmentSession:
    """A `text_appointment_sessions` row (legacy paths A6/A7): units billed by the client."""

    key: str
    appointment_key: str | None
    patient_id: str
    doctor_id: str | None
    sessions_used: int
    is_ended: bool
    start_time: datetime | None
    ended_at: datetime | None


@dataclass(frozen=True)
class Fact:
    """One legacy movement, exactly as it happened (never recomputed, I10).

    `kind`:
    - "LegacyCharge": `units` taken off `subscription_key`'s `bucket` counter for `subject`
      (a session, an appointment, or the subscription itself when no evidence names one).
    - "LegacyCredit": `amount_minor` credited to `doctor_id`'s wallet for `subject`
      (one per wallet_transactions credit row; `source` "balance_residual" for balance moved
      without a transaction row, e.g. the hard-coded +3500 of B18).
    - "LegacyDebit": `amount_minor` debited from `doctor_id`'s wallet (withdrawals, B22).
    Replay (`legacy.replay.legacy_balances`): a credit adds `amount_minor` to the balance if
    `affects_balance` and to total_earned if `affects_total_earned`; a debit subtracts it from the
    balance if `affects_balance` and adds it to total_withdrawn if `affects_total_withdrawn`.
    Residual facts (`source` "balance_residual", "total_earned_residual",
    "total_withdrawn_residual", subject "doctor_wallets:<id>") carry the signed difference between
    a `doctor_wallets` row and its transaction rows, so that replay is exact; only they (and
    "unattributed" charges, whose `units` may be negative) may carry a negative amount.
    `fact_id` is deterministic from the legacy table and row id; `source` names the evidence
    ("wallet_transactions:55", "sessions_used", "unattributed", …); `detail` keeps the raw values
    the reconciliation may need (description, session_table, payment_transaction_id, …).
    """

    fact_id: str
    kind: str
    subject: str
    at: datetime | None
    source: str
    patient_id: str | None = None
    doctor_id: str | None = None
    bucket: str | None = None
    units: int = 0
    subscription_key: str | None = None
    amount_minor: int = 0
    currency: str | None = None
    affects_total_earned: bool = True
    detail: dict = field(default_factory=dict)
    affects_balance: bool = True
    affects_total_withdrawn: bool = True


@dataclass(frozen=True)
class Adjustment:
    """A correction recorded by `ledger reconcile --apply` (never edits a fact).

    Units: positive `units` give units back to `patient_id`'s `bucket` (over-charge refunded),
    negative take them (under-charge collected); `patient_id` is the pool owner whose units
    these are. Money: positive `amount_minor` credits `doctor_id`'s wallet in `currency`,
    negative debits it. Ids: "<subject>:units-<bucket>[-<owner>]" or "<subject>:pay-<currency>",
    plus "#r<n>" for a revision recording only a later difference (`bug` is the bug at the
    time, "reversed" when no correction is owed any more).
    """

    adjustment_id: str
    subject: str
    bug: str
    patient_id: str | None = None
    bucket: str | None = None
    units: int = 0
    doctor_id: str | None = None
    amount_minor: int = 0
    currency: str | None = None


@dataclass
class LegacyHistory:
    """Everything imported, keyed by item key; facts and adjustments in log order."""

    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    members: dict[str, Member] = field(default_factory=dict)
    doctors: dict[str, Doctor] = field(default_factory=dict)
    text_sessions: dict[str, TextSession] = field(default_factory=dict)
    call_sessions: dict[str, CallSession] = field(default_factory=dict)
    appointments: dict[str, Appointment] = field(default_factory=dict)
    wallets: dict[str, Wallet] = field(default_factory=dict)  # by doctor_id
    withdrawals: dict[str, Withdrawal] = field(default_factory=dict)
    payments: dict[str, Payment] = field(default_factory=dict)
    text_appointment_sessions: dict[str, TextAppointmentSession] = field(default_factory=dict)
    facts: list[Fact] = field(default_factory=list)
    adjustments: list[Adjustment] = field(default_factory=list)
