"""The legacy facts the importer records: pure functions of rows and items.

- `transaction_fact`: one LegacyCredit / LegacyDebit per `wallet_transactions` row, verbatim.
- `allocate_charges`: LegacyCharge facts inferred from the subscription counters. The legacy
  database keeps no deduction log; the counters are the truth (consumed = total_* − *_remaining
  per subscription and bucket). The units are attributed to subjects by evidence (sessions_used,
  appointment credit rows, text_appointment_sessions.sessions_used), in subject time order, to the
  patient's subscriptions oldest start_date first (the legacy FIFO, legacy-system.md §1.2),
  capped at what each subscription's counters show. Evidence beyond the counters was forgiven
  (B6, B8, B25) and gets no charge; consumption no evidence explains is charged to the
  subscription itself (source "unattributed").
- `match_second_debit`: which withdrawal request a debit naming none belongs to (the admin
  panel's second debit, B22), by doctor, amount and time.
- `wallet_residuals`: what a `doctor_wallets` row holds beyond its transaction rows (B18's
  hard-coded +3500, B22's raw-SQL second debit), so that replaying the facts is exact.
See docs/legacy.md "Import" for the inference and a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from legacy.history import BUCKETS, Fact
from legacy.normalise import Rejected, id_of, json_of, required_id, status_of, to_minor, to_utc

CALL_TABLES = ("call_sessions", "call_sessions_auto", "call_sessions_manual")
SUBJECT_TABLES = ("text_sessions", "appointments", "withdrawal_requests",
                  "text_appointment_sessions")
# The admin panel's `completed` debits a second time and sets paid_at in the same request
# (legacy-system.md §7): its created_at is at paid_at or just after. Allow this much clock
# difference the other way (the panel and the database may stamp with different clocks).
SECOND_DEBIT_TOLERANCE_SECONDS = 60
# The balance moved by wallet_transactions rows the import rejected (wallet_residuals).
REJECTED_ROWS = "rejected_rows_residual"
# Statuses whose request the admin panel never debited a second time (only `completed` does).
NO_SECOND_DEBIT = frozenset({"pending", "rejected", "failed"})
EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
LATEST = datetime.max.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Evidence:
    """`units` the legacy code recorded as taken from `patient_id`'s `bucket` for `subject`,
    at `at` (the subject's start); `key` names the evidence row; `until` is the subject's end
    (None: still open), the latest start a subscription may have to have paid for it."""

    key: str
    subject: str
    patient_id: str
    doctor_id: str | None
    bucket: str
    units: int
    at: datetime | None
    until: datetime | None
    source: str


@dataclass
class Pool:
    """A subscription as the allocation sees it: FIFO position and units consumed per bucket."""

    key: str
    owner_id: str
    starts_at: datetime | None
    consumed: dict[str, int]

    def fifo_key(self) -> tuple:
        """Legacy FIFO order: start_date asc, id asc (§1.2)."""
        number = self.key.rpartition(":")[2]
        return (self.starts_at or EARLIEST, int(number) if number.isdigit() else 0, self.key)


@dataclass(frozen=True)
class RequestRef:
    """A withdrawal request as second-debit matching sees it: its key and when it was completed
    (`paid_at`, else `requested_at`; None when neither is known)."""

    key: str
    at: datetime | None


@dataclass
class WalletSums:
    """Σ of a doctor's transaction facts, in minor units, per replayed quantity."""

    balance: int = 0
    earned: int = 0
    withdrawn: int = 0

    def add(self, fact: Fact) -> None:
        sign = 1 if fact.kind == "LegacyCredit" else -1
        if fact.affects_balance:
            self.balance += sign * fact.amount_minor
        if fact.kind == "LegacyCredit" and fact.affects_total_earned:
            self.earned += fact.amount_minor
        if fact.kind == "LegacyDebit" and fact.affects_total_withdrawn:
            self.withdrawn += fact.amount_minor


@dataclass
class AllocationResult:
    """Charges in allocation order, and the evidence units no counter shows (forgiven)."""

    charges: list[Fact] = field(default_factory=list)
    forgiven: dict[str, int] = field(default_factory=dict)  # evidence key → units


# ---- wallet_transactions --------------------------------------------------------------------

def transaction_fact(row: dict, currency: str, withdrawal_for) -> Fact:
    """The LegacyCredit / LegacyDebit of one `wallet_transactions` row.

    `currency`: the doctor's (legacy-system.md §3.1, B32). `withdrawal_for(doctor_id,
    amount_minor, created_at)` → (withdrawal key or None, tied candidate keys) names the
    withdrawal a debit without `withdrawal_request_id` belongs to (`match_second_debit`); the
    detail then says so (`withdrawal_match`), or lists the tied candidates
    (`withdrawal_candidates`). Raises Rejected on an unknown type, a missing doctor or a
    non-numeric or negative amount, and on a row that references nothing (`transaction_subject`).
    """
    row_id = required_id(row, "id")
    doctor_id = required_id(row, "doctor_id")
    kind, amount = money_of(row)
    metadata = json_of(row.get("metadata"))
    at = to_utc(row.get("created_at"), "created_at")
    subject, note = transaction_subject(row, metadata, kind, doctor_id, amount, at, withdrawal_for)
    detail = {**transaction_detail(row, metadata), **note}
    return Fact(fact_id=f"wallet_transactions:{row_id}", kind=kind, subject=subject, at=at,
                source=f"wallet_transactions:{row_id}", doctor_id=doctor_id,
                amount_minor=amount, currency=currency, detail=detail)


def money_of(row: dict) -> tuple[str, int]:
    """(LegacyCredit | LegacyDebit, amount in minor units) of a wallet_transactions row;
    Rejected on an unknown type or a non-numeric or negative amount."""
    kind = {"credit": "LegacyCredit", "debit": "LegacyDebit"}.get(status_of(row.get("type")))
    if kind is None:
        raise Rejected(f"type {row.get('type')!r} is neither credit nor debit")
    amount = to_minor(row.get("amount"))
    if amount < 0:
        raise Rejected(f"negative amount {row.get('amount')!r}")
    return kind, amount


def transaction_subject(row: dict, metadata: dict, kind: str, doctor_id: str, amount: int,
                        at: datetime | None, withdrawal_for) -> tuple[str, dict]:
    """(subject, detail note) of a transaction row: its session_table/session_id, else the
    withdrawal named in its metadata, else — a debit naming none, like the admin panel's second
    debit (B22) — the withdrawal matched by doctor, amount and time (`match_second_debit`; note
    {"withdrawal_match": "doctor, amount, time"}), else, when two or more requests tie, the row
    itself (note {"withdrawal_candidates": [keys]}). Rejected: a row that references nothing (a
    credit naming no session or withdrawal, a debit matching no request), an unknown
    session_table, a session_table without a session_id."""
    table, session_id = row.get("session_table"), id_of(row.get("session_id"))
    if table and table not in CALL_TABLES + SUBJECT_TABLES:
        raise Rejected(f"session_table {table!r} is not a legacy billing table")
    if table and not session_id:
        raise Rejected(f"session_table {table!r} without a session_id")
    if session_id and table in CALL_TABLES:
        return f"call_sessions:{session_id}", {}
    if session_id and table in SUBJECT_TABLES:
        return f"{table}:{session_id}", {}
    request_id = id_of(metadata.get("withdrawal_request_id"))
    if request_id:
        return f"withdrawal_requests:{request_id}", {}
    if kind == "LegacyCredit":
        raise Rejected("a credit that references nothing: no session_table/session_id and no "
                       "withdrawal_request_id in its metadata")
    matched, tied = withdrawal_for(doctor_id, amount, at)
    if matched:
        return matched, {"withdrawal_match": "doctor, amount, time"}
    if not tied:
        raise Rejected("a debit that references nothing: no withdrawal_request_id, and no "
                       "request of this doctor and amount completed within "
                       f"{SECOND_DEBIT_TOLERANCE_SECONDS} s of it")
    return f"wallet_transactions:{required_id(row, 'id')}", {"withdrawal_candidates": list(tied)}


def match_second_debit(debit_at: datetime | None, requests: list[RequestRef],
                       taken: set[str]) -> tuple[str | None, tuple[str, ...]]:
    """The request a debit naming no withdrawal belongs to (the admin panel's second debit,
    B22), among `requests` (same doctor and amount, status not in NO_SECOND_DEBIT) not yet
    `taken` by an earlier such debit: one second debit per request.

    Rule: drop requests completed more than SECOND_DEBIT_TOLERANCE_SECONDS after the debit;
    one left → it; several → the one completed closest to the debit (|created_at − at|, an
    unknown time is farthest). Returns (key, ()) when matched, (None, ()) when no request fits,
    (None, tied keys sorted) when two or more are equally close: ambiguous, the caller reports
    it instead of guessing.
    """
    free = [r for r in requests if r.key not in taken]  # bounded: the doctor's requests
    if debit_at is not None:
        limit = debit_at + timedelta(seconds=SECOND_DEBIT_TOLERANCE_SECONDS)
        free = [r for r in free if r.at is None or r.at <= limit]
    if len(free) <= 1:
        return (free[0].key if free else None), ()

    def distance(r: RequestRef) -> float:
        if debit_at is None or r.at is None:
            return float("inf")
        return abs((debit_at - r.at).total_seconds())

    best = min(map(distance, free))
    tied = sorted(r.key for r in free if distance(r) == best)
    return (tied[0], ()) if len(tied) == 1 else (None, tuple(tied))


def transaction_detail(row: dict, metadata: dict) -> dict:
    """The raw values of a transaction row the reconciliation may need (JSON-safe)."""
    detail = {name: row.get(name) for name in
              ("description", "session_type", "session_table", "payment_transaction_id",
               "payment_gateway", "status", "payment_status")}
    detail["session_id"] = id_of(row.get("session_id"))
    detail["metadata"] = metadata
    return detail


def appointment_evidence(fact: Fact, appointment: dict | None) -> Evidence | None:
    """A2 deducted one unit per `appointments` credit row (§3.4); A6/A7 credits
    (session_type text_appointment) are evidenced by text_appointment_sessions instead."""
    detail = fact.detail
    if (fact.kind != "LegacyCredit" or detail.get("session_table") != "appointments"
            or detail.get("session_type") == "text_appointment" or appointment is None):
        return None
    return Evidence(key=fact.fact_id, subject=fact.subject, patient_id=appointment["patient_id"],
                    doctor_id=fact.doctor_id, bucket=appointment["kind"], units=1, at=fact.at,
                    until=fact.at, source=fact.fact_id)


# ---- evidence from items ---------------------------------------------------------------------

def text_session_evidence(item: dict) -> Evidence | None:
    """sessions_used of a text session (T2/T6 recorded every unit they took, and B6's forgiven
    ones; T5 recorded none — its units surface as unattributed, its pay as credits)."""
    return _evidence(item["key"], item["key"], item, "text", item["sessions_used"],
                     item["activated_at"] or item["started_at"], item["ended_at"])


def call_session_evidence(item: dict) -> Evidence | None:
    """sessions_used of a call (C1/C2 auto buckets, C3's +1 and trailing buckets)."""
    return _evidence(item["key"], item["key"], item, item["call_type"], item["sessions_used"],
                     item["connected_at"] or item["started_at"], item["ended_at"])


def text_appointment_evidence(item: dict) -> Evidence | None:
    """sessions_used of a legacy text appointment session (A6/A7), about its appointment."""
    subject = item["appointment_key"] or item["key"]
    return _evidence(item["key"], subject, item, "text", item["sessions_used"],
                     item["start_time"], item["ended_at"])


def _evidence(key, subject, item, bucket, units, at, until) -> Evidence | None:
    if units <= 0:
        return None
    return Evidence(key=key, subject=subject, patient_id=item["patient_id"],
                    doctor_id=item.get("doctor_id"), bucket=bucket, units=units, at=at,
                    until=until, source="sessions_used" if subject == key else key)


# ---- allocation ------------------------------------------------------------------------------

def allocate_charges(pools: dict[str, Pool], access: dict[str, set[str]],
                     evidence: list[Evidence]) -> AllocationResult:
    """LegacyCharge facts that explain every pool's consumed units exactly.

    `access[patient_id]`: keys of the pools the patient drew on (own and active memberships).
    Evidence is taken in time order; each takes from the patient's pools in FIFO order that had
    started by the evidence's end, up to what each pool's counters still leave unexplained.
    """
    left = {(key, bucket): max(0, pool.consumed[bucket])
            for key, pool in pools.items() for bucket in BUCKETS}
    result = AllocationResult()
    for item in sorted(evidence, key=lambda e: (e.at or EARLIEST, e.subject, e.key)):
        eligible = [pools[k] for k in access.get(item.patient_id, ()) if k in pools]
        remaining = _allocate_one(item, sorted(eligible, key=Pool.fifo_key), left, result)
        if remaining:
            result.forgiven[item.key] = remaining
    for key in sorted(pools, key=lambda k: pools[k].fifo_key()):
        result.charges.extend(_unattributed(pools[key], left))
    return result


def _allocate_one(item: Evidence, fifo: list[Pool], left: dict, result: AllocationResult) -> int:
    """Charge `item`'s units to `fifo` pools; returns the units no pool could explain."""
    units = item.units
    for pool in fifo:
        if units == 0:
            break
        if pool.starts_at is not None and pool.starts_at > (item.until or LATEST):
            continue  # bought after the subject ended: it cannot have paid for it
        taken = min(units, left[(pool.key, item.bucket)])
        if taken > 0:
            left[(pool.key, item.bucket)] -= taken
            units -= taken
            result.charges.append(_charge(item, pool, taken))
    return units


def _charge(item: Evidence, pool: Pool, units: int) -> Fact:
    return Fact(fact_id=f"charge:{item.key}:{pool.key}", kind="LegacyCharge",
                subject=item.subject, at=item.at, source=item.source,
                patient_id=item.patient_id, doctor_id=item.doctor_id, bucket=item.bucket,
                units=units, subscription_key=pool.key,
                detail={"evidence": item.key, "evidence_units": item.units})


def _unattributed(pool: Pool, left: dict) -> list[Fact]:
    """Consumption no evidence explains (or a counter above its total: negative units)."""
    facts = []
    for bucket in BUCKETS:
        consumed = pool.consumed[bucket]
        units = left[(pool.key, bucket)] if consumed >= 0 else consumed
        if units:
            facts.append(Fact(fact_id=f"charge:unattributed:{pool.key}:{bucket}",
                              kind="LegacyCharge", subject=pool.key, at=pool.starts_at,
                              source="unattributed", patient_id=pool.owner_id, bucket=bucket,
                              units=units, subscription_key=pool.key,
                              detail={"consumed": consumed}))
    return facts


# ---- wallet residuals -----------------------------------------------------------------------

def wallet_residuals(wallet: dict, sums: WalletSums, rejected: int = 0,
                     rejected_rows: tuple[str, ...] = ()) -> list[Fact]:
    """Facts for what the `doctor_wallets` row holds beyond its transaction facts (signed).

    balance → LegacyCredit "rejected_rows_residual" for what the doctor's rejected
    wallet_transactions rows moved (`rejected`, signed: credits − debits, naming
    `rejected_rows`): kept as recorded, never reconciled into money; the rest → LegacyCredit
    "balance_residual" (moves the balance only: B18 added 3500 with no row and no
    total_earned); total_earned → LegacyCredit "total_earned_residual" (that total only);
    total_withdrawn → LegacyDebit "total_withdrawn_residual" (that total only; B22's admin
    debit moved the balance, not total_withdrawn)."""
    key, doctor_id = wallet["key"], wallet["doctor_id"]
    wanted = (("LegacyCredit", REJECTED_ROWS, rejected,
               dict(affects_total_earned=False, affects_total_withdrawn=False,
                    detail={"rejected_rows": list(rejected_rows)})),
              ("LegacyCredit", "balance_residual",
               wallet["balance_minor"] - sums.balance - rejected,
               dict(affects_total_earned=False, affects_total_withdrawn=False)),
              ("LegacyCredit", "total_earned_residual",
               wallet["total_earned_minor"] - sums.earned,
               dict(affects_balance=False, affects_total_withdrawn=False)),
              ("LegacyDebit", "total_withdrawn_residual",
               wallet["total_withdrawn_minor"] - sums.withdrawn,
               dict(affects_balance=False, affects_total_earned=False)))
    return [Fact(fact_id=f"{source}:{key}", kind=kind, subject=key, at=None, source=source,
                 doctor_id=doctor_id, amount_minor=amount, currency=wallet["currency"],
                 **flags)
            for kind, source, amount, flags in wanted if amount != 0]
