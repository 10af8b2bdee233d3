"""`ledger reconcile`: each legacy bug of legacy-system.md §5/§10 with its numbers, clean sessions
without a difference, the reports, and `--apply` (idempotent; balances then equal the rules).

Histories are built by hand (no database): one builder per scenario, every scenario with its own
patient/doctor so that they can also be reconciled together.
"""

from __future__ import annotations

import csv
import json
import sys
import types
from collections import defaultdict
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from typer import Typer
from typer.testing import CliRunner

from ledger.rules import Policy, units_owed
from ledger.tariff import rate_at
from legacy.adjustments import ReconciliationAdjustment
from legacy.log import LegacyLedger, open_legacy
from legacy.history import (Adjustment, Appointment, CallSession, Doctor, Fact, LegacyHistory,
                            Member, Subscription, TextAppointmentSession, TextSession, Wallet,
                            Withdrawal)
from legacy.reconcile import (Difference, apply_adjustments, changed_adjustments, format_money,
                              plan_adjustments, reconcile)
from legacy.report import write_reports

T = datetime(2026, 2, 2, 8, 0, tzinfo=timezone.utc)  # tariff 2026-01-12: 3500.00 MWK per unit
MWK = 350000


def at(minutes: float = 0, seconds: int = 0) -> datetime:
    return T + timedelta(minutes=minutes, seconds=seconds)


class Build:
    """A LegacyHistory under construction; fact ids are numbered in insertion order."""

    def __init__(self) -> None:
        self.h = LegacyHistory()

    def doctor(self, doctor_id: str, country: str = "MW") -> str:
        legacy = "malawi" if country == "MW" else "kenya"
        self.h.doctors[doctor_id] = Doctor(doctor_id, legacy, country)
        return doctor_id

    def sub(self, key: str, owner: str, ref: str, text=10, voice=10, video=10,
            starts: datetime = T - timedelta(days=1), days: int = 30) -> str:
        granted = {"text": text, "voice": voice, "video": video}
        self.h.subscriptions[key] = Subscription(key, owner, ref, "Plan", days, starts,
                                                 starts + timedelta(days=days), 1, True, granted,
                                                 dict(granted))
        return key

    def text(self, key: str, patient: str, doctor: str, activated, ended, *, status="ended",
             last=None, p=0, used=0, n=10, appointment=None) -> str:
        self.h.text_sessions[key] = TextSession(key, patient, doctor, status, T, activated, ended,
                                                last, None, used, p, n, appointment, None)
        return key

    def call(self, key: str, patient: str, doctor: str, connected, ended, *, kind="voice",
             p=0, used=0, status="ended") -> str:
        self.h.call_sessions[key] = CallSession(key, patient, doctor, kind, status, "direct", None,
                                                connected, connected, connected, ended, ended, None,
                                                None, used, p, True, None)
        return key

    def _fact(self, **kw) -> None:
        self.h.facts.append(Fact(fact_id=f"f{len(self.h.facts)}", **kw))

    def charge(self, subject, patient, bucket, units, when, sub, source="sessions_used") -> None:
        self._fact(kind="LegacyCharge", subject=subject, at=when, source=source, patient_id=patient,
                   bucket=bucket, units=units, subscription_key=sub)

    def credit(self, subject, doctor, amount, when, currency="MWK", table=None, ptid=None,
               source="wallet_transactions") -> None:
        detail = {"session_table": table, "payment_transaction_id": ptid}
        self._fact(kind="LegacyCredit", subject=subject, at=when, source=source, doctor_id=doctor,
                   amount_minor=amount, currency=currency, detail=detail)

    def debit(self, subject, doctor, amount, when, currency="MWK") -> None:
        self._fact(kind="LegacyDebit", subject=subject, at=when, source="wallet_transactions",
                   doctor_id=doctor, amount_minor=amount, currency=currency)


# ---------------------------------------------------------------- scenarios (one patient each)


def clean_text(b: Build) -> None:
    """12-min text: 1 auto at 10 min + 1 at end = 2 units, 2 × 3500 (§10 #4)."""
    b.doctor("d-ct"), b.sub("subscriptions:ct", "p-ct", "TXN_ct")
    s = b.text("text_sessions:ct", "p-ct", "d-ct", at(0), at(12), last=at(11), p=1, used=2)
    for when in (at(10), at(12)):
        b.charge(s, "p-ct", "text", 1, when, "subscriptions:ct")
        b.credit(s, "d-ct", MWK, when, table="text_sessions", ptid="TXN_ct")


def clean_call(b: Build) -> None:
    """25-min call: 2 auto + 1 hangup = 3 units (§10 #25)."""
    b.doctor("d-cc"), b.sub("subscriptions:cc", "p-cc", "TXN_cc")
    s = b.call("call_sessions:cc", "p-cc", "d-cc", at(0), at(25), p=2, used=3)
    for when, table in ((at(10), "call_sessions_auto"), (at(20), "call_sessions_auto"),
                        (at(25), "call_sessions_manual")):
        b.charge(s, "p-cc", "voice", 1, when, "subscriptions:cc")
        b.credit(s, "d-cc", MWK, when, table=table)


def h1(b: Build) -> None:
    """H1: 25-min call, end billed floor(25/10) + 1 = 3 on top of 2 auto → 5 (correct 3)."""
    b.doctor("d-h1"), b.sub("subscriptions:h1", "p-h1", "TXN_h1")
    s = b.call("call_sessions:h1", "p-h1", "d-h1", at(0), at(25), p=2, used=5)
    for when, units in ((at(10), 1), (at(20), 1), (at(25), 3)):
        b.charge(s, "p-h1", "voice", units, when, "subscriptions:h1")
        b.credit(s, "d-h1", units * MWK, when, table="call_sessions")


def h2(b: Build) -> None:
    """H2: 25-min text; P advanced to 2 with no charge, the end billed floor(25/10)+1−2 = 1."""
    b.doctor("d-h2"), b.sub("subscriptions:h2", "p-h2", "TXN_h2")
    s = b.text("text_sessions:h2", "p-h2", "d-h2", at(0), at(25), last=at(24), p=2, used=1)
    b.charge(s, "p-h2", "text", 1, at(25), "subscriptions:h2")
    b.credit(s, "d-h2", MWK, at(25), ptid="TXN_h2")


def b3(b: Build) -> None:
    """B3(b): text ended at 20:30 with P = 1: end charges 2, a later poll re-bills bucket 2 → 4."""
    b.doctor("d-b3"), b.sub("subscriptions:b3", "p-b3", "TXN_b3")
    s = b.text("text_sessions:b3", "p-b3", "d-b3", at(0), at(20, 30), last=at(20), p=1, used=4)
    for when, units in ((at(10), 1), (at(20, 30), 2), (at(21), 1)):
        b.charge(s, "p-b3", "text", units, when, "subscriptions:b3")
        b.credit(s, "d-b3", units * MWK, when, ptid="TXN_b3")


def b4(b: Build) -> None:
    """B4: N = 1; minute 10 deducts the only unit; the forced end at 11 min pays again."""
    b.doctor("d-b4"), b.sub("subscriptions:b4", "p-b4", "TXN_b4", text=1)
    s = b.text("text_sessions:b4", "p-b4", "d-b4", at(0), at(11, 10), last=at(11), p=1, used=1, n=1)
    b.charge(s, "p-b4", "text", 1, at(10), "subscriptions:b4")
    b.credit(s, "d-b4", MWK, at(10), ptid="TXN_b4")
    b.credit(s, "d-b4", MWK, at(11, 10), ptid="TXN_b4")


def b5(b: Build) -> None:
    """B5: no subscription at all; T5 credits the doctor 2 × 3500 first, the debit fails."""
    b.doctor("d-b5")
    s = b.text("text_sessions:b5", "p-b5", "d-b5", at(0), at(12), last=at(12))
    b.credit(s, "d-b5", 2 * MWK, at(12))


def b6(b: Build) -> None:
    """B6: manual end owes 2, the oldest sub has 1 left: 1 deducted, 1 forgiven (newer has 5)."""
    b.doctor("d-b6")
    b.sub("subscriptions:b6a", "p-b6", "TXN_b6a", text=1, starts=T - timedelta(days=20))
    b.sub("subscriptions:b6b", "p-b6", "TXN_b6b", text=5, starts=T - timedelta(days=2))
    s = b.text("text_sessions:b6", "p-b6", "d-b6", at(0), at(12), last=at(12), used=2)
    b.charge(s, "p-b6", "text", 1, at(12), "subscriptions:b6a")
    b.credit(s, "d-b6", MWK, at(12), ptid="TXN_b6a")


def b7(b: Build) -> None:
    """B7: doctor hangs up a 25-min call after 2 auto buckets: the +1 is skipped → 2 (correct 3)."""
    b.doctor("d-b7"), b.sub("subscriptions:b7", "p-b7", "TXN_b7")
    s = b.call("call_sessions:b7", "p-b7", "d-b7", at(0), at(25), p=2, used=2)
    for when in (at(10), at(20)):
        b.charge(s, "p-b7", "voice", 1, when, "subscriptions:b7")
        b.credit(s, "d-b7", MWK, when, table="call_sessions_auto")


def b9(b: Build) -> None:
    """B9: call ended at 9:00 (+1), a retried /end at 10:30 re-bills bucket 1 → 2 (correct 1)."""
    b.doctor("d-b9"), b.sub("subscriptions:b9", "p-b9", "TXN_b9")
    s = b.call("call_sessions:b9", "p-b9", "d-b9", at(0), at(10, 30), p=1, used=2)
    b.charge(s, "p-b9", "voice", 1, at(9), "subscriptions:b9")
    b.credit(s, "d-b9", MWK, at(9), table="call_sessions_manual")
    b.charge(s, "p-b9", "voice", 1, at(10, 30), "subscriptions:b9")
    b.credit(s, "d-b9", MWK, at(10, 30), table="call_sessions_auto")


def b12(b: Build) -> None:
    """B12: text left active after its last message at 5 min; the cron drained 6 units in 60 min."""
    b.doctor("d-b12"), b.sub("subscriptions:b12", "p-b12", "TXN_b12")
    s = b.text("text_sessions:b12", "p-b12", "d-b12", at(0), None, status="active", last=at(5),
               p=6, used=6)
    for k in range(1, 7):
        b.charge(s, "p-b12", "text", 1, at(10 * k), "subscriptions:b12")
        b.credit(s, "d-b12", MWK, at(10 * k), ptid="TXN_b12")


def b13(b: Build) -> None:
    """B13: waiting_for_doctor session ended by the patient: m = 0 → 1 unit and the doctor paid."""
    b.doctor("d-b13"), b.sub("subscriptions:b13", "p-b13", "TXN_b13")
    s = b.text("text_sessions:b13", "p-b13", "d-b13", None, at(3))
    b.charge(s, "p-b13", "text", 1, at(3), "subscriptions:b13")
    b.credit(s, "d-b13", MWK, at(3), ptid="TXN_b13")


def b14(b: Build) -> None:
    """B14: call of exactly 1200 s: 2 auto + 1 hangup = 3 (ceil = 2); text of exactly 20:00 too."""
    b.doctor("d-b14"), b.sub("subscriptions:b14", "p-b14", "TXN_b14")
    s = b.call("call_sessions:b14", "p-b14", "d-b14", at(0), at(20), p=2, used=3)
    for when, table in ((at(10), "call_sessions_auto"), (at(20), "call_sessions_auto"),
                        (at(20), "call_sessions_manual")):
        b.charge(s, "p-b14", "voice", 1, when, "subscriptions:b14")
        b.credit(s, "d-b14", MWK, when, table=table)
    t = b.text("text_sessions:b14", "p-b14", "d-b14", at(60), at(80), last=at(79), p=2, used=3)
    for when in (at(70), at(80), at(80)):
        b.charge(t, "p-b14", "text", 1, when, "subscriptions:b14")
        b.credit(t, "d-b14", MWK, when, ptid="TXN_b14")


def b17(b: Build) -> None:
    """B17: /appointments/{id}/end-session twice: 2 units and 2 credits (an appointment owes 0)."""
    b.doctor("d-b17"), b.sub("subscriptions:b17", "p-b17", "TXN_b17")
    b.h.appointments["appointments:b17"] = Appointment(
        "appointments:b17", "p-b17", "d-b17", "voice", "completed", at(0), None, at(30), at(0), at(30))
    for when in (at(30), at(31)):
        b.charge("appointments:b17", "p-b17", "voice", 1, when, "subscriptions:b17")
        b.credit("appointments:b17", "d-b17", MWK, when, table="appointments", ptid="TXN_b17")


def b18(b: Build) -> None:
    """B18: +3500 straight into the balance (process-payment), no row; and the appointment's
    own legacy billing (A2: 1 unit, 1 credit), which the rules never bill."""
    b.doctor("d-b18"), b.sub("subscriptions:b18", "p-b18", "TXN_b18")
    b.h.wallets["d-b18"] = Wallet("d-b18", "MWK", 2 * MWK, MWK, 0, key="doctor_wallets:18")
    b.h.appointments["appointments:b18"] = Appointment(
        "appointments:b18", "p-b18", "d-b18", "text", "completed", at(0), None, at(30), at(0), at(30))
    b.charge("appointments:b18", "p-b18", "text", 1, at(30), "subscriptions:b18")
    b.credit("appointments:b18", "d-b18", MWK, at(30), table="appointments", ptid="TXN_b18")
    b.credit("doctor_wallets:18", "d-b18", MWK, None, source="balance_residual")


def b22(b: Build) -> None:
    """B22: 10,000.00 MWK request debited at request and again at completion; earnings 60,000.00."""
    b.doctor("d-b22")
    b.credit("text_sessions:gone", "d-b22", 6_000_000, at(-600), ptid="TXN_old")  # row deleted (B29)
    b.h.withdrawals["withdrawal_requests:22"] = Withdrawal(
        "withdrawal_requests:22", "d-b22", 1_000_000, "MWK", "completed", at(0), at(60))
    b.debit("withdrawal_requests:22", "d-b22", 1_000_000, at(0))
    b.debit("withdrawal_requests:22", "d-b22", 1_000_000, at(60))


def b23(b: Build) -> None:
    """B23: a doctor paid only for calls (no payment_transaction_id) can withdraw nothing."""
    b.doctor("d-b23"), b.sub("subscriptions:b23", "p-b23", "TXN_b23")
    s = b.call("call_sessions:b23", "p-b23", "d-b23", at(0), at(5), used=1)
    b.charge(s, "p-b23", "voice", 1, at(5), "subscriptions:b23")
    b.credit(s, "d-b23", MWK, at(5), table="call_sessions_manual")


def b24(b: Build) -> None:
    """B24: a webhook retry granted payment TXN_24 twice (5/2/1 each); 1 text unit used."""
    b.doctor("d-b24")
    b.sub("subscriptions:b24a", "p-b24", "TXN_24", text=5, voice=2, video=1)
    b.sub("subscriptions:b24b", "p-b24", "TXN_24", text=5, voice=2, video=1, starts=T - timedelta(hours=23))
    s = b.text("text_sessions:b24", "p-b24", "d-b24", at(0), at(8), last=at(8), used=1)
    b.charge(s, "p-b24", "text", 1, at(8), "subscriptions:b24a")
    b.credit(s, "d-b24", MWK, at(8), ptid="TXN_24")


def b24_used(b: Build) -> None:
    """B24 consequence: TXN_25 granted 1 text unit twice; both 8-min sessions charged one each.
    One pool per payment reference pays only the first."""
    b.doctor("d-b25")
    b.sub("subscriptions:b25a", "p-b25", "TXN_25", text=1, voice=0, video=0)
    b.sub("subscriptions:b25b", "p-b25", "TXN_25", text=1, voice=0, video=0, starts=T - timedelta(hours=23))
    for key, start, sub in (("text_sessions:b25a", 0, "subscriptions:b25a"),
                            ("text_sessions:b25b", 30, "subscriptions:b25b")):
        s = b.text(key, "p-b25", "d-b25", at(start), at(start + 8), last=at(start + 8), used=1)
        b.charge(s, "p-b25", "text", 1, at(start + 8), sub)
        b.credit(s, "d-b25", MWK, at(start + 8), ptid="TXN_25")


def b12_ended(b: Build) -> None:
    """B12: last message at 5 min, ended by a manual clean-up at 45 min after 4 auto + 1 = 5."""
    b.doctor("d-b12e"), b.sub("subscriptions:b12e", "p-b12e", "TXN_b12e")
    s = b.text("text_sessions:b12e", "p-b12e", "d-b12e", at(0), at(45), last=at(5), p=4, used=5)
    for when in (at(10), at(20), at(30), at(40), at(45)):
        b.charge(s, "p-b12e", "text", 1, when, "subscriptions:b12e")
        b.credit(s, "d-b12e", MWK, when, ptid="TXN_b12e")


def b6_call(b: Build) -> None:
    """B6 (calls): 25-min call, 2 voice units left: the counter is clamped at 0, 3 recorded and
    paid; the rules end at exhaustion owing 2."""
    b.doctor("d-b6c"), b.sub("subscriptions:b6c", "p-b6c", "TXN_b6c", voice=2)
    s = b.call("call_sessions:b6c", "p-b6c", "d-b6c", at(0), at(25), p=2, used=3)
    for when, units, table in ((at(10), 1, "call_sessions_auto"), (at(20), 1, "call_sessions_auto"),
                               (at(25), 0, "call_sessions_manual")):
        if units:
            b.charge(s, "p-b6c", "voice", units, when, "subscriptions:b6c")
        b.credit(s, "d-b6c", MWK, when, table=table)


def b22_failed(b: Build) -> None:
    """B22: a failed withdrawal never refunds its request debit (70.00 USD, Kenyan doctor)."""
    b.doctor("d-b22f", "KE")
    b.credit("text_sessions:gone-f", "d-b22f", 30_000, at(-600), currency="USD", ptid="TXN_f")
    b.h.withdrawals["withdrawal_requests:23"] = Withdrawal(
        "withdrawal_requests:23", "d-b22f", 7_000, "USD", "failed", at(0), None)
    b.debit("withdrawal_requests:23", "d-b22f", 7_000, at(0), currency="USD")


def member_clean(b: Build) -> None:
    """A family-plan member draws on the owner's pool: a clean 8-min text, no difference."""
    b.doctor("d-mem"), b.sub("subscriptions:fam", "p-owner", "TXN_fam", text=1)
    b.h.members["subscription_members:1"] = Member("subscription_members:1", "subscriptions:fam",
                                                   "p-member", "active", "member")
    s = b.text("text_sessions:mem", "p-member", "d-mem", at(0), at(8), last=at(8), used=1)
    b.charge(s, "p-member", "text", 1, at(8), "subscriptions:fam")
    b.credit(s, "d-mem", MWK, at(8), ptid="TXN_fam")


def t5_clean(b: Build) -> None:
    """A 25-min text ended through check-response (T5): 2 auto units in sessions_used, the end's
    unit paid but only visible as the importer's "unattributed" charge on the subscription."""
    b.doctor("d-t5"), b.sub("subscriptions:t5", "p-t5", "TXN_t5")
    s = b.text("text_sessions:t5", "p-t5", "d-t5", at(0), at(25), last=at(25), p=2, used=2)
    b.charge(s, "p-t5", "text", 2, at(0), "subscriptions:t5")
    b.charge("subscriptions:t5", "p-t5", "text", 1, T - timedelta(days=1), "subscriptions:t5",
             source="unattributed")
    for when in (at(10), at(20), at(25)):
        b.credit(s, "d-t5", MWK, when, ptid="TXN_t5")


def b3_polls(b: Build) -> None:
    """B3(a): N = 2, P = 2 at m = 21; two concurrent check-response polls each end it via T5:
    2 extra units (unattributed) and the doctor paid 4 (correct 3)."""
    b.doctor("d-b3p"), b.sub("subscriptions:b3p", "p-b3p", "TXN_b3p", text=5)
    s = b.text("text_sessions:b3p", "p-b3p", "d-b3p", at(0), at(21, 5), last=at(21), p=2, used=2, n=5)
    b.charge(s, "p-b3p", "text", 2, at(0), "subscriptions:b3p")
    b.charge("subscriptions:b3p", "p-b3p", "text", 2, T - timedelta(days=1), "subscriptions:b3p",
             source="unattributed")
    for when in (at(10), at(20), at(21, 5), at(21, 5)):
        b.credit(s, "d-b3p", MWK, when, ptid="TXN_b3p")


def b19(b: Build) -> None:
    """B19: a legacy text appointment; the chat screen sent processDeduction(1) and
    endSession(1) (A6 + A7): 2 units (text_appointment_sessions.sessions_used) and 2 credits."""
    b.doctor("d-b19"), b.sub("subscriptions:b19", "p-b19", "TXN_b19")
    b.h.appointments["appointments:b19"] = Appointment(
        "appointments:b19", "p-b19", "d-b19", "text", "completed", at(0), None, at(12), at(0), at(12))
    b.h.text_appointment_sessions["text_appointment_sessions:1"] = TextAppointmentSession(
        "text_appointment_sessions:1", "appointments:b19", "p-b19", "d-b19", 2, True, at(0), at(12))
    b.charge("appointments:b19", "p-b19", "text", 2, at(0), "subscriptions:b19",
             source="text_appointment_sessions:1")
    for when in (at(12), at(12, 1)):
        b._fact(kind="LegacyCredit", subject="text_appointment_sessions:1", at=when,
                source="wallet_transactions", doctor_id="d-b19", amount_minor=MWK, currency="MWK",
                detail={"session_table": "text_appointment_sessions", "session_type": "text_appointment",
                        "payment_transaction_id": "TXN_b19"})


SCENARIOS = [clean_text, clean_call, h1, h2, b3, b4, b5, b6, b7, b9, b12, b13, b14, b17, b18,
             b19, b22, b23, b24, b24_used, b12_ended, b6_call, b22_failed, member_clean, t5_clean,
             b3_polls]


def build(*scenarios) -> LegacyHistory:
    b = Build()
    for scenario in scenarios:
        scenario(b)
    return b.h


def rows(history: LegacyHistory, subject: str) -> list[Difference]:
    return [d for d in reconcile(history).differences if d.subject == subject]


def one(history: LegacyHistory, subject: str) -> Difference:
    found = rows(history, subject)
    assert len(found) == 1, found
    return found[0]


# ---------------------------------------------------------------- classification with numbers


@pytest.mark.parametrize("scenario, subject", [(clean_text, "text_sessions:ct"),
                                               (clean_call, "call_sessions:cc")])
def test_clean_sessions_have_no_difference(scenario, subject):
    rec = reconcile(build(scenario))
    assert [d for d in rec.differences if d.bug != "B23"] == []


# (scenario, subject, bug, units legacy, units rules, paid legacy, paid rules)
EXPECTED = [
    (h1, "call_sessions:h1", "H1", 5, 3, 5 * MWK, 3 * MWK),
    (h2, "text_sessions:h2", "H2", 1, 3, MWK, 3 * MWK),
    (b3, "text_sessions:b3", "B3", 4, 3, 4 * MWK, 3 * MWK),
    (b4, "text_sessions:b4", "B4", 1, 1, 2 * MWK, MWK),
    (b5, "text_sessions:b5", "B5", 0, 0, 2 * MWK, 0),
    (b6, "text_sessions:b6", "B6", 1, 2, MWK, 2 * MWK),
    (b7, "call_sessions:b7", "B7", 2, 3, 2 * MWK, 3 * MWK),
    (b9, "call_sessions:b9", "B9", 2, 1, 2 * MWK, MWK),
    (b12, "text_sessions:b12", "B12", 6, 2, 6 * MWK, 2 * MWK),
    (b13, "text_sessions:b13", "B13", 1, 0, MWK, 0),
    (b14, "call_sessions:b14", "B14", 3, 2, 3 * MWK, 2 * MWK),
    (b14, "text_sessions:b14", "B14", 3, 2, 3 * MWK, 2 * MWK),
    (b17, "appointments:b17", "B17", 2, 0, 2 * MWK, 0),
    (b18, "doctor_wallets:18", "B18", 0, 0, MWK, 0),
    (b18, "appointments:b18", "A2", 1, 0, MWK, 0),
    (b19, "appointments:b19", "B19", 2, 0, 2 * MWK, 0),
    (b24_used, "text_sessions:b25b", "B24", 1, 0, MWK, 0),
    (b12_ended, "text_sessions:b12e", "B12", 5, 2, 5 * MWK, 2 * MWK),
    (b6_call, "call_sessions:b6c", "B6", 2, 2, 3 * MWK, 2 * MWK),
    (b3_polls, "text_sessions:b3p", "B3", 4, 3, 4 * MWK, 3 * MWK),
]


@pytest.mark.parametrize("scenario, subject, bug, u_legacy, u_rules, p_legacy, p_rules", EXPECTED,
                         ids=[e[1] for e in EXPECTED])
def test_bug_classified_with_its_numbers(scenario, subject, bug, u_legacy, u_rules, p_legacy, p_rules):
    d = one(build(scenario), subject)
    assert (d.bug, d.units_legacy, d.units_rules) == (bug, u_legacy, u_rules)
    assert (d.currency, d.paid_legacy_minor, d.paid_rules_minor) == ("MWK", p_legacy, p_rules)
    assert d.units_over == u_legacy - u_rules and d.paid_over == p_legacy - p_rules
    assert str(u_legacy) in d.explanation and bug in d.explanation


def test_every_scenario_keeps_its_classification_when_reconciled_together():
    rec = reconcile(build(*SCENARIOS))
    found = {(d.subject, d.bug, d.units_legacy, d.units_rules, d.paid_legacy_minor, d.paid_rules_minor)
             for d in rec.differences}
    for _, subject, *numbers in EXPECTED:
        assert (subject, *numbers) in found
    assert not [d for d in rec.differences if d.bug == "unexplained"]


def test_b4_doctor_paid_twice_for_one_unit():
    d = one(build(b4), "text_sessions:b4")
    assert d.paid_over == MWK and format_money(d.paid_legacy_minor, d.currency) == "7,000.00 MWK"


def test_b22_withdrawal_debited_twice():
    d = one(build(b22), "withdrawal_requests:22")
    assert (d.bug, d.item_type, d.paid_legacy_minor, d.paid_rules_minor) == \
        ("B22", "withdrawal", -2_000_000, -1_000_000)
    assert "10,000.00 MWK" in d.explanation
    rec = reconcile(build(b22))
    assert rec.per_doctor()[("d-b22", "MWK")]["withdrawal_over_debit"] == 1_000_000
    assert rec.accepted_unmatched == ["text_sessions:gone"]


def test_b22_failed_withdrawal_never_refunded():
    d = one(build(b22_failed), "withdrawal_requests:23")
    assert (d.bug, d.currency, d.paid_legacy_minor, d.paid_rules_minor) == ("B22", "USD", -7_000, 0)
    assert "70.00 USD" in d.explanation


def test_t5_end_units_found_among_unattributed_charges():
    rec = reconcile(build(t5_clean))
    assert rec.differences == [] and rec.accepted_unmatched == []
    assert "incl. 2 unattributed" in one(build(b3_polls), "text_sessions:b3p").explanation


def test_member_draws_on_the_owners_pool():
    assert reconcile(build(member_clean)).differences == []


def test_pool_exhausted_by_earlier_sessions_is_unexplained_and_says_so():
    b = Build()
    b.doctor("d-x"), b.sub("subscriptions:x", "p-x", "TXN_x", text=2)
    for key, start, minutes in (("text_sessions:x1", 0, 15), ("text_sessions:x2", 30, 8)):
        s = b.text(key, "p-x", "d-x", at(start), at(start + minutes), last=at(start + minutes))
        units = units_owed("text", at(start), at(start + minutes))
        b.charge(s, "p-x", "text", units, at(start + minutes), "subscriptions:x")
        b.credit(s, "d-x", units * MWK, at(start + minutes), ptid="TXN_x")
    d = one(b.h, "text_sessions:x2")
    assert (d.bug, d.units_legacy, d.units_rules) == ("unexplained", 1, 0)
    assert "pay only 0 of the 1 owed" in d.explanation
    assert rows(b.h, "text_sessions:x1") == []


def test_call_paid_at_the_text_rate_under_legacy_2025_names_b16():
    b = Build()
    start = datetime(2025, 12, 1, 9, tzinfo=timezone.utc)  # legacy-2025: voice 5000.00 MWK
    b.doctor("d-r"), b.sub("subscriptions:r", "p-r", "TXN_r", starts=start - timedelta(days=1))
    s = b.call("call_sessions:r", "p-r", "d-r", start, start + timedelta(minutes=5), used=1)
    b.charge(s, "p-r", "voice", 1, start + timedelta(minutes=5), "subscriptions:r")
    b.credit(s, "d-r", 400_000, start + timedelta(minutes=5), table="call_sessions_manual")
    d = one(b.h, s)
    assert (d.bug, d.units_over, d.paid_legacy_minor, d.paid_rules_minor) == \
        ("B16", 0, 400_000, 500_000)
    assert "the text rate" in d.explanation
    # any other per-unit amount is not B16: it says what legacy paid, unexplained
    b.h.facts[-1] = replace(b.h.facts[-1], amount_minor=450_000)
    d = one(b.h, s)
    assert (d.bug, d.paid_legacy_minor) == ("unexplained", 450_000)
    assert "legacy paid 450000 minor units per unit" in d.explanation


def test_b23_reports_blocked_amount_without_money_difference():
    d = one(build(b23), "users:d-b23")
    assert (d.bug, d.paid_over, d.units_over, d.blocked_minor) == ("B23", 0, 0, MWK)
    assert plan_adjustments(reconcile(build(b23))) == []


def test_b23_names_each_withdrawal_request_legacy_refused_for_it():
    """Issue 9 §3: besides the doctor's blocked total, each `rejected` request whose amount the
    balance covered but the 'verified earnings' did not is named: id, amount, currency."""
    b = Build()
    b23(b)  # 3,500.00 MWK from a call: no payment id
    b.sub("subscriptions:b23t", "p-b23t", "TXN_b23t")
    t = b.text("text_sessions:b23t", "p-b23t", "d-b23", at(20), at(28), last=at(27), used=1)
    b.charge(t, "p-b23t", "text", 1, at(28), "subscriptions:b23t")
    b.credit(t, "d-b23", MWK, at(28), ptid="TXN_b23t")  # verified: 3,500.00 of 7,000.00
    for key, amount, status in (("withdrawal_requests:r1", 500_000, "rejected"),
                                ("withdrawal_requests:r2", 900_000, "rejected"),  # > balance
                                ("withdrawal_requests:r3", 300_000, "rejected"),  # ≤ verified
                                ("withdrawal_requests:r4", 500_000, "pending")):
        b.h.withdrawals[key] = Withdrawal(key, "d-b23", amount, "MWK", status, at(60), None,
                                          "exceeds verified earnings")
        if status == "pending":
            b.debit(key, "d-b23", amount, at(60))
    rec = reconcile(b.h)
    refused = [d for d in rec.differences if d.refused_minor]
    assert [(d.subject, d.bug, d.currency, d.refused_minor, d.paid_over, d.blocked_minor)
            for d in refused] == [("withdrawal_requests:r1", "B23", "MWK", 500_000, 0, 0)]
    assert "5,000.00 MWK was refused" in refused[0].explanation
    assert "exceeds verified earnings" in refused[0].explanation
    doctor = one(b.h, "users:d-b23")
    assert "refused: withdrawal_requests:r1 (5,000.00 MWK)" in doctor.explanation
    assert not [a for a in plan_adjustments(rec) if a.subject.startswith("withdrawal_requests:r")
                and a.subject != "withdrawal_requests:r4"]


def test_facts_about_a_row_the_import_rejected_are_kept_as_recorded_and_never_corrected():
    """A rejected row has no item: the money and units legacy moved for it are accepted as
    recorded (no difference, no adjustment), however its own fields would have billed."""
    b = Build()
    b.doctor("d-rj"), b.sub("subscriptions:rj", "p-rj", "TXN_rj")
    b.charge("call_sessions:rejected", "p-rj", "voice", 1, at(5), "subscriptions:rj")
    b.credit("call_sessions:rejected", "d-rj", MWK, at(5), table="call_sessions_manual",
             ptid="TXN_rj")
    rec = reconcile(b.h)
    assert rec.differences == [] and plan_adjustments(rec) == []
    assert rec.accepted_unmatched == ["call_sessions:rejected"]
    units, money = rec.rules_balances()
    assert (units[("p-rj", "voice")], money[("d-rj", "MWK")]) == (10 - 1, MWK)


def test_b24_second_grant_is_over_granted():
    found = {d.bucket: d for d in rows(build(b24), "subscriptions:b24b")}
    assert {b: (d.bug, d.units_over) for b, d in found.items()} == \
        {"text": ("B24", -5), "voice": ("B24", -2), "video": ("B24", -1)}
    assert rows(build(b24), "text_sessions:b24") == []


def test_linked_appointment_is_billed_only_through_its_session():
    b = Build()
    clean_text(b)
    b.h.appointments["appointments:l"] = Appointment(
        "appointments:l", "p-ct", "d-ct", "text", "completed", at(0), "text_sessions:ct", at(12),
        at(0), at(12))
    b.charge("appointments:l", "p-ct", "text", 1, at(12), "subscriptions:ct")
    b.credit("appointments:l", "d-ct", MWK, at(12), ptid="TXN_ct")
    d = one(b.h, "appointments:l")
    assert (d.bug, d.units_legacy, d.units_rules, d.paid_over) == ("unexplained", 1, 0, MWK)
    b.charge("appointments:l", "p-ct", "text", 1, at(13), "subscriptions:ct")
    assert one(b.h, "appointments:l").bug == "B17"


def test_an_appointment_with_no_session_evidence_owes_nothing_and_its_charge_is_over_billed():
    """Issue 9 §3: an appointment has no billable start (billing-rules §2, §9, I10): legacy's
    one unit and one credit for it are over-billing, class A2 (how legacy billed it)."""
    d = one(build(b18), "appointments:b18")
    assert (d.bug, d.units_over, d.paid_over, d.units_rules, d.paid_rules_minor) == \
        ("A2", 1, MWK, 0, 0)
    assert "owes 0" in d.explanation
    rec = reconcile(build(b18))
    targets = {a.adjustment_id: a for a in plan_adjustments(rec)}
    assert targets["appointments:b18:units-text"].units == 1  # the unit goes back
    assert targets["appointments:b18:pay-MWK"].amount_minor == -MWK  # the credit is taken back


def test_reconcile_never_changes_the_facts():
    history = build(*SCENARIOS)
    before = list(history.facts)
    reconcile(history)
    assert history.facts == before and history.adjustments == []


# ---------------------------------------------------------------- reports


def test_reports_written_and_parseable(tmp_path):
    rec = reconcile(build(*SCENARIOS))
    paths = write_reports(rec, tmp_path / "out")
    with paths["csv"].open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rec.differences)
    assert {r["subject"] for r in table} == {d.subject for d in rec.differences}
    doc = json.loads(paths["json"].read_text())
    assert [Difference.from_dict(r) for r in doc["differences"]] == rec.differences
    assert doc["by_bug"]["H1"]["count"] == 1
    summary = paths["summary"].read_text()
    for text in ("| H1 | 1 | 2 | 0 | 7,000.00 MWK", "| p-h2 | text | 0 | 2 |",
                 "| d-b22 | MWK | 0.00 MWK | 0.00 MWK | 10,000.00 MWK |", "3,500.00 MWK"):
        assert text in summary


# ---------------------------------------------------------------- apply


def fold(history: LegacyHistory) -> tuple[dict, dict]:
    """Balances from the facts plus adjustments, per owner: every subscription row's grant
    minus the charges on it (a member's charge comes off the owner's pool); credits minus
    debits (balance-moving facts only)."""
    units, money = defaultdict(int), defaultdict(int)
    for sub in history.subscriptions.values():
        for bucket, n in sub.granted.items():
            units[(sub.owner_id, bucket)] += n
    for f in history.facts:
        if f.kind == "LegacyCharge":
            sub = history.subscriptions.get(f.subscription_key)
            units[(sub.owner_id if sub else f.patient_id, f.bucket)] -= f.units
        elif f.affects_balance:
            sign = 1 if f.kind == "LegacyCredit" else -1
            money[(f.doctor_id, f.currency)] += sign * f.amount_minor
    for a in history.adjustments:
        if a.units:
            units[(a.patient_id, a.bucket)] += a.units
        if a.amount_minor:
            money[(a.doctor_id, a.currency)] += a.amount_minor
    return units, money


def nonzero(mapping: dict) -> dict:
    return {k: v for k, v in mapping.items() if v}


def recorded(app: LegacyLedger) -> list[Adjustment]:
    return [Adjustment(**e.adjustment) for e in app.all_events()
            if isinstance(e, ReconciliationAdjustment.Recorded)]


@pytest.mark.parametrize("store", ["popo", "sqlite"])
def test_apply_is_idempotent_and_balances_equal_the_rules(tmp_path, store):
    app = LegacyLedger() if store == "popo" else open_legacy(f"sqlite:///{tmp_path}/ledger.db")
    history = build(*SCENARIOS)
    rec = reconcile(history)
    planned = plan_adjustments(rec, history)
    assert apply_adjustments(app, planned) == len(planned) > 0
    assert apply_adjustments(app, plan_adjustments(rec, history)) == 0
    history.adjustments = recorded(app)
    assert sorted(a.adjustment_id for a in history.adjustments) == sorted(a.adjustment_id for a in planned)
    units, money = fold(history)
    rules_units, rules_money = rec.rules_balances()
    assert nonzero(units) == nonzero(rules_units)
    assert nonzero(money) == nonzero(rules_money)
    assert plan_adjustments(reconcile(history), history) == []
    app.close()


def test_balances_after_apply_by_hand():
    history = build(*SCENARIOS)
    rec = reconcile(history)
    history.adjustments = plan_adjustments(rec, history)
    units, money = fold(history)
    assert units[("p-b24", "text")] == 5 - 1  # one pool for TXN_24
    assert units[("p-h1", "voice")] == 10 - 3 and units[("p-b12", "text")] == 10 - 2
    assert units[("p-b4", "text")] == 0 and units[("p-b6", "text")] == 6 - 2
    assert money[("d-b4", "MWK")] == MWK and money[("d-b5", "MWK")] == 0
    assert money[("d-b22", "MWK")] == 6_000_000 - 1_000_000
    assert money[("d-b18", "MWK")] == 0 and units[("p-b18", "text")] == 10  # B18 and A2 undone
    assert units[("p-b25", "text")] == 1 - 1 and money[("d-b25", "MWK")] == MWK
    assert money[("d-b6c", "MWK")] == 2 * MWK and units[("p-b6c", "voice")] == 0
    assert money[("d-b22f", "USD")] == 30_000
    assert units[("p-owner", "text")] == 0 and units[("p-member", "text")] == 0  # owner's pool
    assert units[("p-t5", "text")] == 10 - 3 and units[("p-b3p", "text")] == 5 - 3
    assert money[("d-b3p", "MWK")] == 3 * MWK
    ids = {a.adjustment_id for a in history.adjustments}
    assert "call_sessions:h1:units-voice" in ids and "call_sessions:h1:pay-MWK" in ids
    assert "text_sessions:mem:units-text-p-owner" not in ids  # clean: nothing to correct


def test_changed_plan_is_flagged_and_only_the_difference_recorded():
    """A correction recorded earlier with another amount is never recorded twice under its id:
    it is flagged, and only the difference is planned, as revision "#r1"."""
    history = build(h1)
    rec = reconcile(history)
    planned = plan_adjustments(rec)
    units = next(a for a in planned if a.units)
    history.adjustments = [replace(units, units=units.units + 1)] + \
        [a for a in planned if a is not units]
    assert changed_adjustments(planned, history) == [units.adjustment_id]
    revision = plan_adjustments(rec, history)
    assert [(a.adjustment_id, a.units, a.patient_id) for a in revision] == \
        [(units.adjustment_id + "#r1", -1, "p-h1")]
    history.adjustments += revision
    assert plan_adjustments(rec, history) == [] and changed_adjustments(planned, history) == []


def test_cli_reconcile_writes_reports_and_applies_once(tmp_path, monkeypatch):
    history = build(*SCENARIOS)
    fake = types.ModuleType("legacy.replay")
    fake.load_history = lambda app: history
    monkeypatch.setitem(sys.modules, "legacy.replay", fake)
    monkeypatch.setenv("LEDGER_DATABASE_URL", f"sqlite:///{tmp_path}/ledger.db")
    from legacy import cli_reconcile

    app = Typer()

    @app.command()
    def other() -> None:  # a second command keeps `reconcile` a named subcommand
        """Unused."""
    console = Console(width=200)
    from runtime.settings import Settings

    cli_reconcile.register(app, console, console, Settings)
    out = tmp_path / "rec"
    first = CliRunner().invoke(app, ["reconcile", "--out", str(out), "--apply"])
    assert first.exit_code == 0, first.output
    planned = len(plan_adjustments(reconcile(history)))
    assert f"adjustments: {planned} recorded ({planned} corrections in all)" in first.output
    assert "H1" in first.output
    again = CliRunner().invoke(app, ["reconcile", "--out", str(out), "--apply"])
    assert f"adjustments: 0 recorded ({planned} corrections in all; all {planned} were " \
           "recorded by an earlier --apply)" in again.output
    assert "already recorded" not in again.output
    assert (out / "summary.md").exists() and (out / "differences.csv").exists()


# ---------------------------------------------------------------- review regressions


def test_pool_expiring_mid_session_ends_it_at_that_block_like_the_ledger():
    """Review #3 (reproducer test_r8_expiry): a 14-day plan expiring 5 min into a 25-min text.
    The ledger holds each block at its own start (`try_hold`), finds no usable pool for the
    block at 10:00 and ends the session there owing 1; reconcile must owe the same 1, not 3."""
    from conftest import T0
    from test_billing import Desk

    minute = timedelta(minutes=1)
    start = T0 - timedelta(days=14) + 5 * minute  # effective_end = T0 + 5 min
    desk = Desk()
    desk.clock.set(start)
    desk.doctor(), desk.grant(starts_at=start, text=10, days=14)
    desk.clock.set(T0), desk.request("t1", "text"), desk.activate("t1", T0)
    for m in (5, 9):
        desk.clock.set(T0 + m * minute), desk.activity("t1", T0 + m * minute)
    for m in (12, 60):
        desk.clock.set(T0 + m * minute), desk.ledger.tick(desk.clock(), desk.sessions, desk.pools)
    session = desk.ledger.get_session("t1")
    assert (session.ended_at - T0, session.end_reason, session.settlement["units_owed"]) == \
        (10 * minute, "balance_exhausted", 1)

    def legacy(units: int) -> LegacyHistory:
        b = Build()
        b.doctor("d1"), b.sub("subscriptions:S", "P", "TXN", text=10, voice=0, video=0,
                              starts=start, days=14)
        s = b.text("text_sessions:1", "P", "d1", T0, T0 + 25 * minute, last=T0 + 24 * minute,
                   p=units, used=units)
        b.charge(s, "P", "text", units, T0, "subscriptions:S")
        b.credit(s, "d1", units * MWK, T0, ptid="TXN")
        return b.h

    assert reconcile(legacy(1)).differences == []  # legacy charged 1, as the ledger would
    d = one(legacy(3), "text_sessions:1")  # had legacy charged the 3 the times owe
    assert (d.units_legacy, d.units_rules, d.paid_rules_minor) == (3, 1, MWK)
    assert f"end it at {(T0 + 10 * minute).isoformat()} (balance exhausted)" in d.explanation


def family_split(b: Build, from_family: int, family_first: bool = False) -> str:
    """P holds its own 14-day pool A (1 text unit) and is a member of owner O's 30-day pool B
    (5). A 25-min text owes 3: the rules take 1 from A (it expires first) and 2 from B. Legacy
    took 1 from A and `from_family` from B, or (`family_first`) all from B."""
    b.doctor("d1")
    b.sub("subscriptions:A", "P", "TXN_A", text=1, starts=T - timedelta(days=2), days=14)
    b.sub("subscriptions:B", "O", "TXN_B", text=5, starts=T - timedelta(days=1), days=30)
    b.h.members["subscription_members:1"] = Member("subscription_members:1", "subscriptions:B",
                                                   "P", "active", "member")
    own = 0 if family_first else 1
    s = b.text("text_sessions:1", "P", "d1", at(0), at(25), last=at(24), p=2, used=own + from_family)
    if own:
        b.charge(s, "P", "text", own, at(10), "subscriptions:A")
    b.charge(s, "P", "text", from_family, at(20), "subscriptions:B")
    for i in range(own + from_family):
        b.credit(s, "d1", MWK, at(10 + 5 * i), ptid="TXN_A")
    return s


@pytest.mark.parametrize("from_family, family_first, rows_expected", [
    (2, False, []),  # legacy = rules per owner
    (3, False, [("B3", "O", 3, 2, 4 * MWK)]),  # one unit too many, from O's pool
    (3, True, [("B26", None, 0, 1, 3 * MWK), ("B26", "O", 3, 2, 0)]),  # same total, other pools
])
def test_units_of_a_session_are_booked_to_each_pool_owner(from_family, family_first, rows_expected):
    """Review #4 (reproducer test_r4_recon): a session paid partly by the patient's own pool and
    partly by a family pool. Legacy units and the rules' draw are kept per pool owner, each
    owner gets their own units adjustment, and after apply every balance equals the rules."""
    b = Build()
    subject = family_split(b, from_family, family_first)
    rec = reconcile(b.h)
    found = [(d.bug, d.account_id, d.units_legacy, d.units_rules, d.paid_legacy_minor)
             for d in rec.differences]
    assert found == rows_expected
    b.h.adjustments = plan_adjustments(rec, b.h)
    assert all(a.adjustment_id.startswith(subject) for a in b.h.adjustments)
    units, money = fold(b.h)
    rules_units, rules_money = rec.rules_balances()
    assert nonzero(units) == nonzero(rules_units) == {("P", "voice"): 10, ("P", "video"): 10,
                                                      ("O", "text"): 3, ("O", "voice"): 10,
                                                      ("O", "video"): 10}
    assert nonzero(money) == nonzero(rules_money) == {("d1", "MWK"): 3 * MWK}


def test_b26_rows_give_units_back_to_one_owner_and_take_them_from_the_other():
    """Review #4: same total, other pools (legacy FIFO by start_date, B26): one adjustment per
    owner, ids deterministic (owner suffix only for a pool owner other than the patient)."""
    b = Build()
    subject = family_split(b, 3, family_first=True)
    adjustments = plan_adjustments(reconcile(b.h))
    assert [(a.adjustment_id, a.patient_id, a.units) for a in adjustments] == [
        (f"{subject}:units-text", "P", -1), (f"{subject}:units-text-O", "O", 1)]


def two_withdrawals(b: Build, paid: tuple[datetime, datetime]) -> None:
    """Two completed 50,000.00 MWK requests of d1, each debited at request and again by the
    admin panel at its paid_at; the second debits name no withdrawal (imported before the time
    rule, or tied) and earnings of 200,000.00 MWK came from rows legacy deleted."""
    b.doctor("d1")
    b.credit("text_sessions:gone", "d1", 20_000_000, at(-600), ptid="TXN")
    for wid, when in zip(("701", "702"), paid):
        key = f"withdrawal_requests:{wid}"
        b.h.withdrawals[key] = Withdrawal(key, "d1", 5_000_000, "MWK", "completed", at(0), when)
        b.debit(key, "d1", 5_000_000, at(0))
        b.debit(f"wallet_transactions:9{wid}", "d1", 5_000_000, when)


def test_b22_second_debits_of_equal_amounts_are_matched_by_time_in_reconcile():
    """Review #5: two requests of one doctor and amount completed at different times: each
    unnamed second debit goes to the request completed closest to it: two B22 rows."""
    b = Build()
    two_withdrawals(b, (at(60), at(120)))
    rec = reconcile(b.h)
    assert sorted((d.subject, d.bug, d.paid_legacy_minor, d.paid_rules_minor)
                  for d in rec.differences) == [
        ("withdrawal_requests:701", "B22", -10_000_000, -5_000_000),
        ("withdrawal_requests:702", "B22", -10_000_000, -5_000_000)]
    assert rec.accepted_unmatched == ["text_sessions:gone"]
    assert rec.rules_money == {("d1", "MWK"): 20_000_000 - 2 * 5_000_000}


def test_b22_tied_second_debits_are_reported_not_silently_accepted():
    """Review #5 (reproducer test_r7_b22): both requests completed at the same second, so each
    unnamed debit fits both equally well: each is reported (unexplained, candidates named),
    kept as recorded, and gets no adjustment."""
    b = Build()
    two_withdrawals(b, (at(60), at(60)))
    rec = reconcile(b.h)
    found = [(d.subject, d.bug, d.paid_over) for d in rec.differences]
    assert found == [("wallet_transactions:9701", "unexplained", 0),
                     ("wallet_transactions:9702", "unexplained", 0)]
    assert "withdrawal_requests:701, withdrawal_requests:702" in rec.differences[0].explanation
    assert "B22" in rec.differences[0].explanation
    assert plan_adjustments(rec) == []


def test_a_relabelled_item_is_corrected_once_by_a_revision():
    """Review #6 (reproducer test_r5_apply): max_duration changes between two --apply runs, so
    an item first judged B3 (1 unit over) is B12 (2 over) the second time. Ids carry no bug:
    the second run flags the change and records only the difference (#r1), and the balances
    end equal to the rules of the second run, not corrected twice."""
    b = Build()
    b.doctor("d1"), b.sub("subscriptions:S", "P", "TXN_S", text=20)
    s = b.text("text_sessions:1", "P", "d1", at(0), at(65), last=at(64), p=6, used=8)
    for i in range(8):
        b.charge(s, "P", "text", 1, at(10 * i), "subscriptions:S")
        b.credit(s, "d1", MWK, at(10 * i), ptid="TXN_S")
    app, history = LegacyLedger(), b.h
    first = reconcile(history)
    assert [d.bug for d in first.differences] == ["B3"]
    assert apply_adjustments(app, plan_adjustments(first, history)) == 2
    history.adjustments = recorded(app)
    second = reconcile(history, Policy(max_duration_seconds=3600))
    assert [d.bug for d in second.differences] == ["B12"]
    targets = plan_adjustments(second)
    assert changed_adjustments(targets, history) == [f"{s}:pay-MWK", f"{s}:units-text"]
    revisions = plan_adjustments(second, history)
    assert [(a.adjustment_id, a.bug, a.units, a.amount_minor) for a in revisions] == [
        (f"{s}:pay-MWK#r1", "B12", 0, -MWK), (f"{s}:units-text#r1", "B12", 1, 0)]
    assert apply_adjustments(app, revisions) == 2
    history.adjustments = recorded(app)
    assert plan_adjustments(second, history) == [] and changed_adjustments(targets, history) == []
    units, money = fold(history)
    rules_units, rules_money = second.rules_balances()
    assert units[("P", "text")] == rules_units[("P", "text")] == 20 - 6
    assert money[("d1", "MWK")] == rules_money[("d1", "MWK")] == 6 * MWK
    # back to the first policy: the revisions are undone by a second revision each
    again = plan_adjustments(first, history)
    assert [(a.adjustment_id, a.units, a.amount_minor) for a in again] == [
        (f"{s}:pay-MWK#r2", 0, MWK), (f"{s}:units-text#r2", -1, 0)]
    app.close()


def test_a_correction_no_longer_owed_is_reversed():
    """Review #6: a correction recorded earlier that the rules no longer owe is undone by a
    revision with bug "reversed", so balances still end equal to the rules."""
    history = build(h1)
    history.adjustments = plan_adjustments(reconcile(history))
    history.facts = [f for f in history.facts if f.subject != "call_sessions:h1"]
    del history.call_sessions["call_sessions:h1"]  # e.g. a row judged differently now
    reversal = plan_adjustments(reconcile(history), history)
    assert [(a.adjustment_id, a.bug, a.units, a.amount_minor) for a in reversal] == [
        ("call_sessions:h1:pay-MWK#r1", "reversed", 0, 2 * MWK),
        ("call_sessions:h1:units-voice#r1", "reversed", -2, 0)]


# ---------------------------------------------------------------- property


SESSION = st.tuples(st.sampled_from(["text", "voice", "video"]),
                    st.integers(0, 50 * 24 * 60),  # start, minutes after 2025-12-20
                    st.integers(0, 3 * 3600),  # duration, seconds
                    st.sampled_from(["MW", "KE"]))


@given(st.lists(SESSION, min_size=1, max_size=5))
def test_clean_sessions_whose_facts_equal_the_rules_have_no_difference(sessions):
    b = Build()
    base = datetime(2025, 12, 20, tzinfo=timezone.utc)  # spans the 2026-01-12 tariff change
    b.sub("subscriptions:1", "p", "TXN_1", text=100, voice=100, video=100,
          starts=base - timedelta(days=1), days=365)
    for i, (kind, start_min, seconds, country) in enumerate(sessions):
        doctor = b.doctor(f"d{i}", country)
        start = base + timedelta(minutes=start_min)
        end = start + timedelta(seconds=seconds)
        if kind == "text":
            key = b.text(f"text_sessions:{i}", "p", doctor, start, end, last=end)
        else:
            key = b.call(f"call_sessions:{i}", "p", doctor, start, end, kind=kind)
        owed = units_owed(kind, start, end)
        rate = rate_at(country, kind, start)
        if owed:
            b.charge(key, "p", kind, owed, end, "subscriptions:1")
            b.credit(key, doctor, owed * rate.pay_minor, end, currency=rate.currency, ptid="TXN_1")
    assert reconcile(b.h).differences == []
