"""Replaying the legacy log: the history it records, the balances it implies, and the proof that
those balances are the legacy database's own.

- `load_history(app)`: fold the legacy log, in log order and bounded batches, into `LegacyHistory`.
- `legacy_balances(history)`: per subscription and bucket, granted − Σ LegacyCharge; per doctor
  wallet (doctor, currency), balance / total_earned / total_withdrawn from the credit and debit
  facts (flags in `legacy.history.Fact`); optionally plus the reconciliation adjustments.
- `verify_against_source(dsn, history)`: those balances against the legacy database's counters
  and wallets; an empty list means the replay is exact.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, fields

from legacy.adjustments import ReconciliationAdjustment
from legacy.log import LegacyLedger
from legacy.history import (BUCKETS, Adjustment, Appointment, CallSession, Doctor,
                            LegacyHistory, Member, Payment, Subscription,
                            TextAppointmentSession, TextSession, Wallet, Withdrawal)
from legacy.items import wallet_item
from legacy.normalise import Context, Rejected, status_of, to_int
from legacy.records import LegacyFact, LegacyRecord, fact_of_event
from legacy.source import probe_columns, snapshot, stream

# table → (dataclass, the LegacyHistory dict it goes to, the item key that keys it)
FOLDS = {"subscriptions": (Subscription, "subscriptions", "key"),
         "subscription_members": (Member, "members", "key"),
         "text_sessions": (TextSession, "text_sessions", "key"),
         "call_sessions": (CallSession, "call_sessions", "key"),
         "appointments": (Appointment, "appointments", "key"),
         "doctor_wallets": (Wallet, "wallets", "doctor_id"),
         "withdrawal_requests": (Withdrawal, "withdrawals", "key"),
         "payment_transactions": (Payment, "payments", "key"),
         "text_appointment_sessions": (TextAppointmentSession, "text_appointment_sessions",
                                       "key")}


@dataclass(frozen=True)
class WalletBalance:
    """One doctor's wallet in one currency, in minor units."""

    balance_minor: int = 0
    total_earned_minor: int = 0
    total_withdrawn_minor: int = 0


@dataclass
class Balances:
    """`subscriptions[key][bucket]` remaining units; `patient_adjustments[patient][bucket]`
    units given back (+) or collected (−) by reconciliation; `wallets[(doctor_id, currency)]`."""

    subscriptions: dict[str, dict[str, int]] = field(default_factory=dict)
    patient_adjustments: dict[str, dict[str, int]] = field(default_factory=dict)
    wallets: dict[tuple[str, str], WalletBalance] = field(default_factory=dict)


def load_history(app: LegacyLedger, batch: int = 1000) -> LegacyHistory:
    """The legacy log folded in log order (`app.all_events` reads bounded batches)."""
    history = LegacyHistory()
    for domain_event in app.all_events(batch=batch):
        if isinstance(domain_event, LegacyRecord.Imported):
            _fold_item(history, domain_event.table, domain_event.item)
        elif isinstance(domain_event, LegacyFact.Recorded):
            history.facts.append(fact_of_event(domain_event))
        elif isinstance(domain_event, ReconciliationAdjustment.Recorded):
            history.adjustments.append(Adjustment(**domain_event.adjustment))
    return history


def _fold_item(history: LegacyHistory, table: str, item: dict) -> None:
    """Put one imported item where it belongs (plans and patients are reference data only)."""
    if table == "users":
        if item["user_type"] == "doctor":
            history.doctors[item["user_id"]] = Doctor(
                item["user_id"], item["country_legacy"], item["country"])
        return
    fold = FOLDS.get(table)
    if fold is None:
        return
    cls, attribute, key = fold
    # unknown keys are ignored and fields added later take their defaults, so a log written by
    # an older or newer importer still folds
    names = {f.name for f in fields(cls)}
    getattr(history, attribute)[item[key]] = cls(**{n: v for n, v in item.items() if n in names})


def legacy_balances(history: LegacyHistory, include_adjustments: bool = True) -> Balances:
    """Balances the facts imply (rule: replay reproduces the legacy counters and wallets)."""
    balances = Balances()
    for key, sub in history.subscriptions.items():
        balances.subscriptions[key] = dict(sub.granted)
    wallets: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for fact in history.facts:
        if fact.kind == "LegacyCharge" and fact.subscription_key in balances.subscriptions:
            balances.subscriptions[fact.subscription_key][fact.bucket] -= fact.units
        elif fact.kind in ("LegacyCredit", "LegacyDebit"):
            _apply_money(wallets[(fact.doctor_id, fact.currency)], fact)
    if include_adjustments:
        _apply_adjustments(history, balances, wallets)
    balances.wallets = {k: WalletBalance(*v) for k, v in wallets.items()}
    return balances


def _apply_money(wallet: list[int], fact) -> None:
    """[balance, total_earned, total_withdrawn] += the fact, by its flags."""
    sign = 1 if fact.kind == "LegacyCredit" else -1
    if fact.affects_balance:
        wallet[0] += sign * fact.amount_minor
    if fact.kind == "LegacyCredit" and fact.affects_total_earned:
        wallet[1] += fact.amount_minor
    if fact.kind == "LegacyDebit" and fact.affects_total_withdrawn:
        wallet[2] += fact.amount_minor


def _apply_adjustments(history: LegacyHistory, balances: Balances, wallets: dict) -> None:
    for adjustment in history.adjustments:
        if adjustment.units and adjustment.patient_id and adjustment.bucket:
            per_bucket = balances.patient_adjustments.setdefault(
                adjustment.patient_id, {b: 0 for b in BUCKETS})
            per_bucket[adjustment.bucket] += adjustment.units
        if adjustment.amount_minor and adjustment.doctor_id:
            wallets[(adjustment.doctor_id, adjustment.currency)][0] += adjustment.amount_minor


def verify_against_source(dsn: str, history: LegacyHistory, batch_size: int = 1000) -> list[str]:
    """Differences between the replayed balances (adjustments excluded) and the legacy
    database's subscription counters and doctor wallets; [] when the replay is exact."""
    balances = legacy_balances(history, include_adjustments=False)
    problems: list[str] = []
    with snapshot(dsn) as conn:
        present = probe_columns(conn)
        seen = _verify_subscriptions(conn, present, balances, batch_size, problems)
        _verify_wallets(conn, present, history, balances, batch_size, problems)
    problems.extend(f"{key}: in the legacy log, not in the source"
                    for key in sorted(set(balances.subscriptions) - seen))
    return problems


def _user_types(conn, present, batch_size: int) -> dict[str, str]:
    """users.id → user_type, as the import saw them (for the same role checks)."""
    if "users" not in present:
        return {}
    return {str(row["id"]): status_of(row["user_type"])
            for rows in stream(conn, "users", present["users"], batch_size) for row in rows}


def _verify_subscriptions(conn, present, balances: Balances, batch_size: int,
                          problems: list[str]) -> set[str]:
    seen: set[str] = set()
    if "subscriptions" not in present:
        return seen
    columns = {"text": "text_sessions_remaining", "voice": "voice_calls_remaining",
               "video": "video_calls_remaining"}
    for rows in stream(conn, "subscriptions", present["subscriptions"], batch_size):
        for row in rows:
            key = f"subscriptions:{row['id']}"
            seen.add(key)
            replayed = balances.subscriptions.get(key)
            if replayed is None:
                problems.append(f"{key}: not in the legacy log (rejected?)")
                continue
            for bucket, column in columns.items():
                source = to_int(row[column], column, 0)
                if replayed[bucket] != source:
                    problems.append(f"{key} {bucket}: replay {replayed[bucket]}, "
                                    f"source {source}")
    return seen


def _verify_wallets(conn, present, history: LegacyHistory, balances: Balances,
                    batch_size: int, problems: list[str]) -> None:
    """Every wallet row the import accepted against its replay; a row the import rejected (the
    same `wallet_item`, e.g. a doctor id naming a patient) is in the rejects report, not here."""
    if "doctor_wallets" not in present:
        return
    ctx = Context(doctor_currency={d: w.currency for d, w in history.wallets.items()},
                  user_types=_user_types(conn, present, batch_size))
    for rows in stream(conn, "doctor_wallets", present["doctor_wallets"], batch_size):
        for row in rows:
            try:
                source = wallet_item(row, ctx)
            except Rejected:
                continue
            replayed = balances.wallets.get((source["doctor_id"], source["currency"]),
                                            WalletBalance())
            for name in ("balance_minor", "total_earned_minor", "total_withdrawn_minor"):
                if getattr(replayed, name) != source[name]:
                    problems.append(f"{source['key']} {name}: replay "
                                    f"{getattr(replayed, name)}, source {source[name]}")
