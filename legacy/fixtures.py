"""A legacy database with one scenario per legacy bug, and what the reconciliation must find.

`build_legacy_database(conninfo, schema)` creates `schema`, loads `legacy/schema.sql` into it and
inserts the rows the legacy code (legacy-system.md §3, §4) would have written for each scenario:
sessions with their sessions_used / auto_deductions_processed, wallet_transactions with their
session_table / session_id / created_at, subscription counters decremented by what was really
deducted, and doctor_wallets consistent with the wallet rows except where the bug says otherwise
(B18 moved the balance with no row; B22's second debit is raw SQL that leaves total_withdrawn).

`EXPECTED` states, per scenario, the subject, the bug code and the numbers: units the legacy
counters lost, units billing-rules.md owes, doctor pay legacy vs rules (minor units). `CLEAN`
lists subjects that must produce no difference. Rates: 3500.00 MWK (Malawi doctor) / 3.00 USD
per unit from 2026-01-12; H1 (2025-11) ran under the old tariff: legacy paid 4000 MWK for a
voice unit (calls passed the `voice` rate key, which fell back to the text rate, B16), while the
rules' tariff `legacy-2025` owes 5000 MWK per voice unit. Timestamps are naive UTC, as Laravel
stores them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.types.json import Json

SCHEMA_SQL = Path(__file__).with_name("schema.sql")
MWK = Decimal("3500.00")
USD = Decimal("3.00")
OLD_MWK_TEXT = Decimal("4000.00")  # the pre-2026-01-12 text rate, paid for voice too (B16)
MWK_UNIT, USD_UNIT = 350000, 300  # minor units per unit under tariff 2026-01-12
OLD_VOICE_UNIT = 500000  # tariff legacy-2025, MW voice


@dataclass(frozen=True)
class Expected:
    """A difference the reconciliation must report, in `legacy.reconcile.Difference`'s sign
    conventions: `units_*` are units taken from the patient (a grant counts as negative units
    taken, B24), legacy (the counters) vs owed by billing-rules.md; `paid_*_minor` is money put
    into the doctor's wallet in minor units of `currency` (a withdrawal counts as negative,
    B22); `blocked_minor` is what legacy would not let the doctor withdraw (B23), and
    `refused_minor` a withdrawal request it refused for that reason."""

    bug: str
    subject: str
    units_legacy: int
    units_rules: int
    paid_legacy_minor: int
    paid_rules_minor: int
    currency: str | None
    note: str
    blocked_minor: int = 0
    refused_minor: int = 0


EXPECTED: tuple[Expected, ...] = (
    Expected("H1", "call_sessions:401", 5, 3, 5 * 400000, 3 * OLD_VOICE_UNIT, "MWK",
             "2025-11 25-min call: 2 periodic + end billed floor(25/10)+1=3 → 5; owed 3"),
    Expected("H2", "text_sessions:501", 1, 3, MWK_UNIT, 3 * MWK_UNIT, "MWK",
             "25-min text: cron advanced P before deducting; only the end +1 billed"),
    Expected("B3", "text_sessions:502", 4, 3, 4 * USD_UNIT, 3 * USD_UNIT, "USD",
             "text ended at 20 min 30 s: auto 1 + end 2 + poll re-billed bucket 2 = 4"),
    Expected("B4", "text_sessions:503", 1, 1, 2 * MWK_UNIT, MWK_UNIT, "MWK",
             "N=1 run-out at 11 min: patient debited 1, doctor credited twice"),
    Expected("B5", "text_sessions:504", 0, 0, MWK_UNIT, 0, "MWK",
             "patient without subscription: doctor credited, nobody debited"),
    Expected("B6", "text_sessions:505", 1, 2, USD_UNIT, 2 * USD_UNIT, "USD",
             "end at 10 min 20 s billed 2 on the oldest sub (1 left): 1 taken, 1 forgiven"),
    Expected("B7", "call_sessions:402", 2, 3, 2 * MWK_UNIT, 3 * MWK_UNIT, "MWK",
             "doctor hung up a 25-min call: the +1 was looked for in the doctor's subs"),
    Expected("B9", "call_sessions:403", 2, 1, 2 * USD_UNIT, USD_UNIT, "USD",
             "ended 9:00 (1 unit); retried /end at 10:30 overwrote ended_at → +1 bucket"),
    Expected("B12", "text_sessions:506", 6, 2, 6 * MWK_UNIT, 2 * MWK_UNIT, "MWK",
             "abandoned session still active: cron drained both subs; rules idle-end 18:14"),
    Expected("B13", "text_sessions:507", 1, 0, USD_UNIT, 0, "USD",
             "never activated (doctor silent), ended by the patient: billed 1"),
    Expected("B14", "text_sessions:508", 3, 2, 3 * MWK_UNIT, 2 * MWK_UNIT, "MWK",
             "text ended at exactly 20:00: floor+1 = 3"),
    Expected("B14", "call_sessions:404", 3, 2, 3 * MWK_UNIT, 2 * MWK_UNIT, "MWK",
             "call of exactly 1200 s: 2 buckets + hangup 1 = 3"),
    Expected("B16", "call_sessions:410", 2, 2, 2 * 400000, 2 * OLD_VOICE_UNIT, "MWK",
             "2025-12 12-min voice call: 2 units as owed, each paid the text rate 4000.00"),
    Expected("B17", "appointments:601", 2, 0, 2 * MWK_UNIT, 0, "MWK",
             "unlinked audio appointment ended twice: 2 units, 2 credits; an appointment owes 0"),
    Expected("A2", "appointments:602", 1, 0, MWK_UNIT, 0, "MWK",
             "completed unlinked video appointment billed 1 unit and 1 credit; it owes 0"),
    Expected("B18", "doctor_wallets:3", 0, 0, 2 * MWK_UNIT, 0, "MWK",
             "process-payment twice: balance +7000.00 with no row, total_earned unchanged"),
    Expected("B19", "appointments:604", 2, 0, 2 * MWK_UNIT, 0, "MWK",
             "legacy text appointment: processDeduction(1) and endSession(1) on manual end"),
    Expected("B22", "withdrawal_requests:701", 0, 0, -2 * 1000000, -1000000, "MWK",
             "10 000.00 withdrawal debited at request and again when the admin completed it"),
    Expected("B23", "doctor_wallets:4", 0, 0, 0, 0, "USD",
             "doctor paid only for calls: credits lack payment_transaction_id → withdrawable 0",
             blocked_minor=3 * USD_UNIT),
    Expected("B23", "doctor_wallets:1", 0, 0, 0, 0, "MWK",
             "doctor 101's call credits (H1, B7, B14, B16) carry no payment_transaction_id",
             blocked_minor=5_250_000),
    Expected("B23", "withdrawal_requests:702", 0, 0, 0, 0, "MWK",
             "doctor 101's request for 60,000.00 refused: 56,000.00 verified of 108,500.00",
             refused_minor=6_000_000),
    Expected("B23", "doctor_wallets:2", 0, 0, 0, 0, "USD",
             "doctor 102's call credits (B9, and call 411's) carry no payment_transaction_id",
             blocked_minor=900),
    Expected("B24", "subscriptions:318", -5, 0, 0, 0, None,
             "webhook retry granted a second subscription for tx_ref of payment 801"),
)

@dataclass(frozen=True)
class Reject:
    """A row the import must reject, with a fragment of its reason. Wallet transactions are
    numbered when the fixture is built: `description` finds theirs (`rejected_rows`)."""

    table: str
    row_id: int | None
    reason: str
    description: str | None = None


REJECTED: tuple[Reject, ...] = (
    Reject("call_sessions", 411, "connected_at 2026-02-25T09:40:00+00:00 before "
                                 "2026-02-25T10:00:00+00:00"),
    Reject("text_sessions", 517, "status ended but no ended_at"),
    Reject("text_sessions", 518, "status 'closed' is not a text_sessions status"),
    Reject("call_sessions", 412, "doctor_id 201 names a patient, not a doctor"),
    Reject("wallet_transactions", None, "doctor_id 201 names a patient, not a doctor",
           "Payment for voice session 412"),
    Reject("doctor_wallets", 101, "doctor_id 201 names a patient, not a doctor"),
    Reject("wallet_transactions", None, "a credit that references nothing",
           "Manual balance adjustment"),
    Reject("withdrawal_requests", 703, "status 'processing' is not a withdrawal_requests status"),
    Reject("appointments", 606, "status 9 is not an appointment status"),
)
# What the rejected rows' facts are about: kept as legacy recorded them, never corrected.
REJECTED_SUBJECTS = ("call_sessions:411", "text_sessions:517", "text_sessions:518",
                     "withdrawal_requests:703")


def rejected_rows(rows: dict[str, list[dict]] | None = None) -> set[tuple[str, str, str]]:
    """(table, row id, reason fragment) of every row of `REJECTED` in the built fixture."""
    rows = rows if rows is not None else legacy_rows().rows
    out = set()
    for r in REJECTED:
        if r.row_id is not None:
            out.add((r.table, str(r.row_id), r.reason))
            continue
        for row in rows[r.table]:
            if row.get("description") == r.description:
                out.add((r.table, str(row["id"]), r.reason))
    return out


CLEAN: tuple[tuple[str, str], ...] = (
    ("text_sessions:509", "12-min text: auto 1 + end 1 = 2"),
    ("text_sessions:510", "8-min text: end 1"),
    ("text_sessions:511", "5-min text serving linked appointment 603"),
    ("text_sessions:512", "owner of an enterprise sub, 5-min text"),
    ("text_sessions:513", "member drawing on the owner's sub, 12-min text"),
    ("text_sessions:514", "B34: expired, sessions_used left at the default 1, nothing billed"),
    ("call_sessions:405", "25-min call after the 2025-12 fix: 2 auto + hangup = 3"),
    ("call_sessions:406", "B11: cut at 10 min by exhaustion of the oldest sub; 1 unit, owed 1"),
    ("call_sessions:407", "missed call (status outside the enum)"),
    ("call_sessions:408", "status `answered`, hung up 3 s after the answer: under the grace"),
    ("call_sessions:409", "40-s call: under the 60-s grace, 0 units"),
    ("appointments:603", "appointment linked to text session 511, billed through it"),
    ("appointments:605", "appointment linked to the expired session 514"),
)


def at(day: str, clock: str) -> datetime:
    """A naive UTC timestamp from "2026-02-02", "10:00:30"."""
    return datetime.fromisoformat(f"{day}T{clock}")


class LegacyRows:
    """Rows per legacy table, plus what doctor_wallets must hold, built by the scenarios."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict]] = defaultdict(list)
        self.wallet: dict[int, list[Decimal]] = defaultdict(lambda: [Decimal(0)] * 3)

    def add(self, table: str, **values) -> None:
        self.rows[table].append(values)

    def doctor(self, doctor_id: int, country: str | None) -> None:
        self.add("users", id=doctor_id, user_type="doctor", country=country,
                 email=f"doctor{doctor_id}@example.org")

    def patient(self, patient_id: int, country: str = "Malawi") -> None:
        self.add("users", id=patient_id, user_type="patient", country=country,
                 email=f"patient{patient_id}@example.org")

    def sub(self, sub_id: int, user_id: int, start: datetime, granted: tuple[int, int, int],
            used: tuple[int, int, int] = (0, 0, 0), plan_id: int = 2,
            tx_ref: str | None = None) -> None:
        """A subscription: counters `granted` (text, voice, video) minus `used`."""
        (gt, gv, gd), (ut, uv, ud) = granted, used
        self.add("subscriptions", id=sub_id, user_id=user_id, plan_id=plan_id, status=1,
                 is_active=True, start_date=start, end_date=start + timedelta(days=30),
                 activated_at=start, total_text_sessions=gt, total_voice_calls=gv,
                 total_video_calls=gd, text_sessions_remaining=gt - ut,
                 voice_calls_remaining=gv - uv, video_calls_remaining=gd - ud,
                 payment_transaction_id=tx_ref or tx_ref_for(sub_id, user_id),
                 payment_gateway="paychangu", payment_status="completed", created_at=start)

    def text(self, session_id: int, patient: int, doctor: int, activated: datetime | None,
             ended: datetime | None, used: int, processed: int, status: str = "ended",
             **extra) -> None:
        started = extra.pop("started_at", None) or (activated or ended) - timedelta(minutes=2)
        self.add("text_sessions", id=session_id, patient_id=patient, doctor_id=doctor,
                 status=status, started_at=started, activated_at=activated, ended_at=ended,
                 last_activity_at=extra.pop("last_activity_at", ended), sessions_used=used,
                 auto_deductions_processed=processed, created_at=started, **extra)

    def call(self, session_id: int, patient: int, doctor: int, kind: str,
             connected: datetime | None, ended: datetime | None, used: int, processed: int,
             status: str = "ended", **extra) -> None:
        started = extra.pop("started_at", None) or connected - timedelta(seconds=20)
        routing = extra.pop("appointment_id", f"direct_session_{session_id}_ab12cd34")
        duration = int((ended - connected).total_seconds()) if connected and ended else None
        self.add("call_sessions", id=session_id, patient_id=patient, doctor_id=doctor,
                 call_type=kind, status=status, started_at=started, answered_at=connected,
                 connected_at=connected, ended_at=ended, is_connected=connected is not None,
                 call_duration=duration, sessions_used=used, auto_deductions_processed=processed,
                 appointment_id=routing, created_at=started, **extra)

    def credit(self, doctor: int, amount: Decimal, when: datetime, table: str, session_id: int,
               session_type: str, ptid: str | None = None, description: str = "") -> None:
        """DoctorWallet::credit: a row, balance += amount, total_earned += amount."""
        self.add("wallet_transactions", doctor_id=doctor, type="credit", amount=amount,
                 description=description or f"Payment for {session_type} session {session_id}",
                 session_type=session_type, session_id=session_id, session_table=table,
                 payment_transaction_id=ptid, payment_gateway="paychangu" if ptid else None,
                 created_at=when)
        self.wallet[doctor][0] += amount
        self.wallet[doctor][1] += amount

    def debit(self, doctor: int, amount: Decimal, when: datetime, description: str,
              metadata: dict | None = None, via_debit: bool = True) -> None:
        """DoctorWallet::debit (balance −, total_withdrawn +) or the admin panel's raw
        `balance - amount` plus a row (`via_debit=False`, B22)."""
        self.add("wallet_transactions", doctor_id=doctor, type="debit", amount=amount,
                 description=description, session_type="withdrawal",
                 metadata=Json(metadata) if metadata else None, created_at=when)
        self.wallet[doctor][0] -= amount
        if via_debit:
            self.wallet[doctor][2] += amount

    def wallets(self) -> None:
        """doctor_wallets rows (id = doctor id − 100) from what the scenarios moved."""
        for doctor in sorted(self.wallet):
            balance, earned, withdrawn = self.wallet[doctor]
            self.add("doctor_wallets", id=doctor - 100, doctor_id=doctor, balance=balance,
                     total_earned=earned, total_withdrawn=withdrawn)


def tx_ref_for(sub_id: int, user_id: int) -> str:
    """A PayChangu tx_ref in the legacy shape TXN_{microtime digits}_{userId}."""
    return f"TXN_17700000{sub_id:06d}_{user_id}"


# ---- reference data ----------------------------------------------------------------------------

def _people_and_plans(w: LegacyRows) -> None:
    for doctor, country in ((101, "Malawi"), (102, "Zambia"), (103, "malawi"), (104, "Kenya"),
                            (105, "MALAWI"), (106, None)):
        w.doctor(doctor, country)
    for patient in range(201, 230):
        w.patient(patient)
    for plan_id, name, currency, price, days, counters, seats in (
            (1, "Life Balance", "MWK", 55, 21, (5, 3, 2), 1),
            (2, "Basic Life", "USD", 999, 30, (10, 2, 1), 1),
            (3, "Enterprise Essential", "MWK", 130000, 30, (10, 4, 1), 50),
            (4, "Chat Bundle", "MWK", 5000, 30, (5, 0, 0), 1)):
        w.add("plans", id=plan_id, name=name, currency=currency, price=price, duration=days,
              text_sessions=counters[0], voice_calls=counters[1], video_calls=counters[2],
              max_members=seats, category="enterprise" if seats > 1 else "individual")


# ---- scenarios -------------------------------------------------------------------------------

def _h1(w: LegacyRows) -> None:
    """H1 (2025-11, before 55c1576): 2 periodic deductions + end billed 3 from client duration."""
    w.sub(301, 201, at("2025-11-01", "08:00:00"), (0, 10, 0), (0, 5, 0))
    w.call(401, 201, 101, "voice", at("2025-11-20", "10:00:00"), at("2025-11-20", "10:25:00"),
           used=5, processed=2)
    for clock in ("10:10:05", "10:20:05"):
        w.credit(101, OLD_MWK_TEXT, at("2025-11-20", clock), "call_sessions", 401, "voice")
    w.credit(101, 3 * OLD_MWK_TEXT, at("2025-11-20", "10:25:00"), "call_sessions", 401, "voice",
             description="Call ended: 3 sessions (client duration 25 min)")


def _h2(w: LegacyRows) -> None:
    """H2: the cron set P = 2 before the service looked; only the end's +1 was billed."""
    w.sub(302, 202, at("2026-01-20", "08:00:00"), (10, 0, 0), (1, 0, 0))
    w.text(501, 202, 101, at("2026-02-03", "09:00:00"), at("2026-02-03", "09:25:00"),
           used=1, processed=2)
    w.credit(101, MWK, at("2026-02-03", "09:25:00"), "text_sessions", 501, "text",
             tx_ref_for(302, 202))


def _b3(w: LegacyRows) -> None:
    """B3(b): auto 1 at 10 min, end at 20:30 billed 2, the next poll billed bucket 2 again."""
    w.sub(303, 203, at("2026-01-20", "08:00:00"), (10, 0, 0), (4, 0, 0))
    w.text(502, 203, 102, at("2026-02-04", "14:00:00"), at("2026-02-04", "14:20:30"),
           used=4, processed=2)
    ptid = tx_ref_for(303, 203)
    w.credit(102, USD, at("2026-02-04", "14:10:40"), "text_sessions", 502, "text", ptid)
    w.credit(102, 2 * USD, at("2026-02-04", "14:20:30"), "text_sessions", 502, "text", ptid)
    w.credit(102, USD, at("2026-02-04", "14:20:45"), "text_sessions", 502, "text", ptid)


def _b4(w: LegacyRows) -> None:
    """B4: N = 1; cron took the only unit at 10 min; the run-out end at 11 min paid again."""
    w.sub(304, 204, at("2026-01-25", "08:00:00"), (1, 0, 0), (1, 0, 0), plan_id=4)
    w.text(503, 204, 101, at("2026-02-05", "08:00:00"), at("2026-02-05", "08:11:00"),
           used=1, processed=1, sessions_remaining_before_start=1,
           reason="Session time expired")
    ptid = tx_ref_for(304, 204)
    w.credit(101, MWK, at("2026-02-05", "08:10:30"), "text_sessions", 503, "text", ptid)
    w.credit(101, MWK, at("2026-02-05", "08:11:00"), "text_sessions", 503, "text", ptid)


def _b5(w: LegacyRows) -> None:
    """B5: no subscription at all; T5 credited the doctor first and found nothing to debit."""
    w.text(504, 205, 101, at("2026-02-06", "11:00:00"), at("2026-02-06", "11:03:00"),
           used=0, processed=0, reason="Insufficient sessions")
    w.credit(101, MWK, at("2026-02-06", "11:03:00"), "text_sessions", 504, "text")


def _b6(w: LegacyRows) -> None:
    """B6: end at 10:20 (before the cron) billed 2 on the oldest sub only, which had 1."""
    w.sub(306, 206, at("2026-01-20", "08:00:00"), (1, 0, 0), (1, 0, 0), plan_id=4)
    w.sub(307, 206, at("2026-02-01", "08:00:00"), (5, 0, 0), plan_id=4)
    w.text(505, 206, 102, at("2026-02-07", "16:00:00"), at("2026-02-07", "16:10:20"),
           used=2, processed=0)
    w.credit(102, USD, at("2026-02-07", "16:10:20"), "text_sessions", 505, "text",
             tx_ref_for(307, 206))


def _b7(w: LegacyRows) -> None:
    """B7: the doctor hung up a 25-min call; the +1 was sought among the doctor's subs."""
    w.sub(308, 207, at("2026-01-20", "08:00:00"), (0, 5, 0), (0, 2, 0))
    w.call(402, 207, 101, "voice", at("2026-02-08", "10:00:00"), at("2026-02-08", "10:25:00"),
           used=2, processed=2, reason="ended_by_doctor")
    for clock in ("10:10:30", "10:20:30"):
        w.credit(101, MWK, at("2026-02-08", clock), "call_sessions_auto", 402, "voice")


def _b9(w: LegacyRows) -> None:
    """B9: ended 12:09 (+1); a retried /end at 12:10:30 overwrote ended_at → 1 auto bucket."""
    w.sub(309, 208, at("2026-01-20", "08:00:00"), (0, 5, 0), (0, 2, 0))
    w.call(403, 208, 102, "audio", at("2026-02-09", "12:00:00"), at("2026-02-09", "12:10:30"),
           used=2, processed=1)
    w.credit(102, USD, at("2026-02-09", "12:09:00"), "call_sessions_manual", 403, "voice")
    w.credit(102, USD, at("2026-02-09", "12:10:30"), "call_sessions_auto", 403, "voice")


def _b12(w: LegacyRows) -> None:
    """B12: nobody polled; the cron billed 1 unit per 10 min across both subs until empty."""
    w.sub(310, 209, at("2026-01-25", "08:00:00"), (2, 0, 0), (2, 0, 0), plan_id=4)
    w.sub(311, 209, at("2026-02-01", "08:00:00"), (4, 0, 0), (4, 0, 0), plan_id=4)
    w.text(506, 209, 101, at("2026-02-10", "18:00:00"), None, used=6, processed=6,
           status="active", last_activity_at=at("2026-02-10", "18:04:00"),
           sessions_remaining_before_start=2)
    for minute in range(10, 70, 10):
        w.credit(101, MWK, at("2026-02-10", "18:00:30") + timedelta(minutes=minute),
                 "text_sessions", 506, "text", tx_ref_for(311, 209))


def _b13(w: LegacyRows) -> None:
    """B13: the doctor never answered; the patient ended the waiting session: 1 unit, paid."""
    w.sub(312, 210, at("2026-01-20", "08:00:00"), (5, 0, 0), (1, 0, 0), plan_id=4)
    w.text(507, 210, 102, None, at("2026-02-11", "07:02:00"), used=1, processed=0,
           started_at=at("2026-02-11", "07:00:00"),
           doctor_response_deadline=at("2026-02-11", "07:05:30"))
    w.credit(102, USD, at("2026-02-11", "07:02:00"), "text_sessions", 507, "text",
             tx_ref_for(312, 210))


def _b14(w: LegacyRows) -> None:
    """B14: a text ended at exactly 20:00 and a call of exactly 1200 s each cost 3."""
    w.sub(313, 211, at("2026-01-20", "08:00:00"), (5, 0, 0), (3, 0, 0), plan_id=4)
    w.text(508, 211, 101, at("2026-02-12", "09:00:00"), at("2026-02-12", "09:20:00"),
           used=3, processed=1)
    ptid = tx_ref_for(313, 211)
    w.credit(101, MWK, at("2026-02-12", "09:10:30"), "text_sessions", 508, "text", ptid)
    w.credit(101, 2 * MWK, at("2026-02-12", "09:20:00"), "text_sessions", 508, "text", ptid)
    w.sub(314, 212, at("2026-01-20", "08:00:00"), (0, 5, 0), (0, 3, 0))
    w.call(404, 212, 101, "voice", at("2026-02-12", "15:00:00"), at("2026-02-12", "15:20:00"),
           used=3, processed=2)
    w.credit(101, MWK, at("2026-02-12", "15:10:30"), "call_sessions_auto", 404, "voice")
    w.credit(101, MWK, at("2026-02-12", "15:20:00"), "call_sessions_manual", 404, "voice")
    w.credit(101, MWK, at("2026-02-12", "15:20:00"), "call_sessions_auto", 404, "voice")


def _appointment(w: LegacyRows, appointment_id: int, patient: int, doctor: int, kind: str,
                 status: int, when: datetime, session_id: int | None = None) -> None:
    w.add("appointments", id=appointment_id, patient_id=patient, doctor_id=doctor,
          appointment_date=when.date(), appointment_time=when.time(),
          appointment_datetime_utc=when, user_timezone="Africa/Blantyre",
          appointment_type=kind, status=status, session_id=session_id, created_at=when,
          actual_end_time=when + timedelta(minutes=30) if status == 3 else None,
          completed_at=when + timedelta(minutes=30) if status == 3 else None)


def _b17_b18(w: LegacyRows) -> None:
    """B17: end-session called twice on an unlinked audio appointment (2 units, 2 credits).
    B18: a completed video appointment (1 + 1, clean) whose process-payment was then POSTed
    twice: +3500 to the balance each time, no row, no total_earned."""
    w.sub(315, 213, at("2026-01-20", "08:00:00"), (0, 5, 0), (0, 2, 0))
    _appointment(w, 601, 213, 101, "audio", 3, at("2026-02-13", "10:00:00"))
    for clock in ("10:31:00", "10:31:20"):
        w.credit(101, MWK, at("2026-02-13", clock), "appointments", 601, "audio",
                 tx_ref_for(315, 213))
    w.sub(316, 214, at("2026-01-20", "08:00:00"), (0, 0, 2), (0, 0, 1))
    _appointment(w, 602, 214, 103, "video", 3, at("2026-02-14", "11:00:00"))
    w.credit(103, MWK, at("2026-02-14", "11:30:00"), "appointments", 602, "video",
             tx_ref_for(316, 214))
    w.wallet[103][0] += 2 * MWK


def _b19(w: LegacyRows) -> None:
    """B19: a legacy text appointment: the chat screen sent processDeduction(1) and
    endSession(1) on manual end (A6 + A7)."""
    w.sub(326, 225, at("2026-01-20", "08:00:00"), (5, 0, 0), (2, 0, 0), plan_id=4)
    _appointment(w, 604, 225, 101, "text", 3, at("2026-02-22", "15:00:00"))
    w.add("text_appointment_sessions", id=1, appointment_id=604, patient_id=225, doctor_id=101,
          is_active=False, start_time=at("2026-02-22", "15:00:00"), sessions_used=2,
          is_ended=True, ended_at=at("2026-02-22", "15:12:00"))
    for clock in ("15:12:00", "15:12:01"):
        w.credit(101, MWK, at("2026-02-22", clock), "appointments", 604, "text_appointment",
                 tx_ref_for(326, 225))


def _b22_and_clean_texts(w: LegacyRows) -> None:
    """Doctor 105 earns 10 500.00 from two clean texts (12 min = 2, 8 min = 1), asks for
    10 000.00 (debited), and the admin panel's `completed` debits 10 000.00 again (B22)."""
    w.sub(319, 217, at("2026-01-20", "08:00:00"), (10, 0, 0), (3, 0, 0), plan_id=4)
    ptid = tx_ref_for(319, 217)
    w.text(509, 217, 105, at("2026-02-16", "10:00:00"), at("2026-02-16", "10:12:00"),
           used=2, processed=1)
    w.credit(105, MWK, at("2026-02-16", "10:10:30"), "text_sessions", 509, "text", ptid)
    w.credit(105, MWK, at("2026-02-16", "10:12:00"), "text_sessions", 509, "text", ptid)
    w.text(510, 217, 105, at("2026-02-17", "10:00:00"), at("2026-02-17", "10:08:00"),
           used=1, processed=0)
    w.credit(105, MWK, at("2026-02-17", "10:08:00"), "text_sessions", 510, "text", ptid)
    amount = Decimal("10000.00")
    w.add("withdrawal_requests", id=701, doctor_id=105, amount=amount,
          payment_method="mobile_money", status="completed", mobile_provider="airtel",
          mobile_number="+265991234567", created_at=at("2026-03-30", "09:00:00"),
          paid_at=at("2026-03-31", "15:00:00"), paid_by=1)
    w.debit(105, amount, at("2026-03-30", "09:00:00"), "Withdrawal Request (Pending Admin "
            "Approval)", {"payment_method": "mobile_money", "is_pending": True,
                          "withdrawal_request_id": 701})
    w.debit(105, amount, at("2026-03-31", "15:00:00"), "Withdrawal processed - mobile_money",
            via_debit=False)


def _b23_clean_call(w: LegacyRows) -> None:
    """Doctor 104 (Kenya) earned only from a clean 25-min call: 3 units, no payment id (B23)."""
    w.sub(320, 218, at("2026-01-20", "08:00:00"), (0, 5, 0), (0, 3, 0))
    w.call(405, 218, 104, "voice", at("2026-02-18", "14:00:00"), at("2026-02-18", "14:25:00"),
           used=3, processed=2)
    w.credit(104, USD, at("2026-02-18", "14:10:30"), "call_sessions_auto", 405, "voice")
    w.credit(104, USD, at("2026-02-18", "14:20:30"), "call_sessions_auto", 405, "voice")
    w.credit(104, USD, at("2026-02-18", "14:25:00"), "call_sessions_manual", 405, "voice")


def _b24(w: LegacyRows) -> None:
    """B24: a PayChangu webhook retry granted payment 801's plan twice (the dedupe looked for
    status completed, which the webhook never writes)."""
    tx_ref = "TXN_1771149600123456_216"
    w.add("payment_transactions", id=801, transaction_id=tx_ref, reference=tx_ref,
          amount=Decimal("5000.00"), currency="MWK", status="pending", user_id=216,
          metadata=Json({"plan_id": 4, "user_id": 216}), created_at=at("2026-02-15", "09:59:00"))
    w.sub(317, 216, at("2026-02-15", "10:00:00"), (5, 0, 0), plan_id=4, tx_ref=tx_ref)
    w.sub(318, 216, at("2026-02-15", "10:00:40"), (5, 0, 0), plan_id=4, tx_ref=tx_ref)
    w.add("payment_transactions", id=802, transaction_id=tx_ref_for(319, 217),
          reference=tx_ref_for(319, 217), amount=Decimal("5000.00"), currency="MWK",
          status="completed", user_id=217, metadata=Json({"plan_id": 4}),
          created_at=at("2026-01-20", "07:59:00"), processed_at=at("2026-01-20", "08:00:00"))


def _linked_appointment_and_b34(w: LegacyRows) -> None:
    """A text appointment served by text session 511 (billed through it), and B34: a session
    created from appointment 605 kept sessions_used = 1 (DB default) but expired unbilled."""
    w.sub(321, 219, at("2026-01-20", "08:00:00"), (5, 0, 0), (1, 0, 0), plan_id=4)
    _appointment(w, 603, 219, 102, "text", 1, at("2026-02-19", "09:00:00"), session_id=511)
    w.text(511, 219, 102, at("2026-02-19", "09:00:00"), at("2026-02-19", "09:05:00"),
           used=1, processed=0, appointment_id=603)
    w.credit(102, USD, at("2026-02-19", "09:05:00"), "text_sessions", 511, "text",
             tx_ref_for(321, 219))
    w.sub(327, 226, at("2026-01-20", "08:00:00"), (5, 0, 0), plan_id=4)
    _appointment(w, 605, 226, 101, "text", 1, at("2026-02-23", "10:00:00"), session_id=514)
    w.text(514, 226, 101, None, at("2026-02-23", "10:05:30"), used=1, processed=0,
           status="expired", started_at=at("2026-02-23", "10:00:00"), appointment_id=605,
           reason="Doctor did not respond within 5 minutes")


def _b11(w: LegacyRows) -> None:
    """B11: the oldest sub's only voice unit went at 10 min and the call was cut there,
    though a newer sub had 5 — 1 unit for 600 s, as the rules owe."""
    w.sub(322, 220, at("2026-02-01", "08:00:00"), (0, 1, 0), (0, 1, 0))
    w.sub(323, 220, at("2026-02-10", "08:00:00"), (0, 5, 0))
    w.call(406, 220, 101, "voice", at("2026-02-20", "10:00:00"), at("2026-02-20", "10:10:00"),
           used=1, processed=1, reason="server_billing_remaining_calls_0")
    w.credit(101, MWK, at("2026-02-20", "10:10:30"), "call_sessions_auto", 406, "voice")


def _members(w: LegacyRows) -> None:
    """An enterprise sub shared with an active member (and an inactive one who drew nothing);
    patient 224 also has a sub whose 1 consumed unit no row explains (unattributed)."""
    w.sub(324, 222, at("2026-01-20", "08:00:00"), (10, 4, 1), (3, 0, 0), plan_id=3)
    w.add("subscription_members", id=1, subscription_id=324, user_id=223, status="active",
          role="member")
    w.add("subscription_members", id=2, subscription_id=324, user_id=224, status="inactive",
          role="member")
    ptid = tx_ref_for(324, 222)
    w.text(512, 222, 102, at("2026-02-21", "08:00:00"), at("2026-02-21", "08:05:00"),
           used=1, processed=0)
    w.credit(102, USD, at("2026-02-21", "08:05:00"), "text_sessions", 512, "text", ptid)
    w.text(513, 223, 102, at("2026-02-21", "12:00:00"), at("2026-02-21", "12:12:00"),
           used=2, processed=1)
    w.credit(102, USD, at("2026-02-21", "12:10:30"), "text_sessions", 513, "text", ptid)
    w.credit(102, USD, at("2026-02-21", "12:12:00"), "text_sessions", 513, "text", ptid)
    w.sub(325, 224, at("2026-01-20", "08:00:00"), (5, 0, 0), (1, 0, 0), plan_id=4)


def _out_of_enum(w: LegacyRows) -> None:
    """Statuses outside the legacy enums (B31) and a 40-s call; nothing billed."""
    w.sub(328, 221, at("2026-01-20", "08:00:00"), (5, 5, 5))
    day = "2026-02-24"
    w.call(407, 221, 106, "video", None, None, used=0, processed=0, status="missed",
           started_at=at(day, "10:00:00"), failure_reason="no_answer_timeout")
    w.call(408, 221, 106, "voice", None, at(day, "11:00:08"), used=0, processed=0,
           status="answered", started_at=at(day, "11:00:00"), appointment_id="607")
    w.rows["call_sessions"][-1]["answered_at"] = at(day, "11:00:05")
    w.call(409, 221, 106, "voice", at(day, "12:00:00"), at(day, "12:00:40"), used=0,
           processed=0)
    w.text(515, 221, 106, None, None, used=0, processed=0, status="scheduled",
           started_at=at(day, "13:00:00"), scheduled_at=at("2026-03-01", "09:00:00"))
    w.text(516, 221, 106, None, None, used=0, processed=0, status="pending",
           started_at=at(day, "13:30:00"))
    _appointment(w, 607, 221, 106, "audio", 7, at(day, "11:00:00"))


def _b16(w: LegacyRows) -> None:
    """B16: a 12-minute voice call in 2025-12 (after the H1 fix, before tariff 2026-01-12):
    1 auto + 1 hangup = 2 units, as owed, but each paid the text rate 4000.00 (the rate key
    `voice` fell back to text), where tariff legacy-2025 pays 5000.00 per voice unit."""
    w.sub(329, 227, at("2025-12-01", "08:00:00"), (0, 5, 0), (0, 2, 0))
    w.call(410, 227, 101, "voice", at("2025-12-15", "10:00:00"), at("2025-12-15", "10:12:00"),
           used=2, processed=1)
    w.credit(101, OLD_MWK_TEXT, at("2025-12-15", "10:10:30"), "call_sessions_auto", 410, "voice")
    w.credit(101, OLD_MWK_TEXT, at("2025-12-15", "10:12:00"), "call_sessions_manual", 410,
             "voice")


def _b23_refused(w: LegacyRows) -> None:
    """B23: doctor 101 asked for 60,000.00 MWK when the balance held 108,500.00 but only
    56,000.00 were 'verified earnings' (credits with a payment id): legacy refused it."""
    w.add("withdrawal_requests", id=702, doctor_id=101, amount=Decimal("60000.00"),
          payment_method="bank_transfer", status="rejected", bank_name="NBM",
          account_number="1001", rejection_reason="Amount exceeds verified earnings",
          created_at=at("2026-03-01", "09:00:00"))


def _self_contradicting(w: LegacyRows) -> None:
    """Rows whose own fields contradict each other (`REJECTED`), each with money or units the
    reconciliation would have turned into corrections had the import kept the row."""
    day = "2026-02-25"
    # connected 20 minutes before the call started: the rules would bill 25 minutes (3 units)
    w.sub(330, 228, at("2026-01-20", "08:00:00"), (0, 5, 5), (0, 2, 1))
    w.call(411, 228, 102, "video", at(day, "09:40:00"), at(day, "10:05:00"), used=1,
           processed=0, started_at=at(day, "10:00:00"))
    w.credit(102, USD, at(day, "10:05:00"), "call_sessions_manual", 411, "video")
    # `ended` with no ended_at, and a status §1.4 does not list
    w.sub(331, 229, at("2026-01-20", "08:00:00"), (5, 0, 0), (2, 0, 0), plan_id=4)
    ptid = tx_ref_for(331, 229)
    w.text(517, 229, 106, at("2026-02-26", "09:00:00"), None, used=1, processed=0,
           last_activity_at=at("2026-02-26", "09:03:00"))
    w.credit(106, USD, at("2026-02-26", "09:03:00"), "text_sessions", 517, "text", ptid)
    w.text(518, 229, 106, at("2026-02-26", "11:00:00"), at("2026-02-26", "11:25:00"), used=1,
           processed=0, status="closed")
    w.credit(106, USD, at("2026-02-26", "11:25:00"), "text_sessions", 518, "text", ptid)
    # a doctor id that names a patient (201): the call, its credits and that "wallet"
    w.call(412, 228, 201, "voice", at("2026-02-27", "10:00:00"), at("2026-02-27", "10:12:00"),
           used=2, processed=1)
    for clock, table in (("10:10:30", "call_sessions_auto"), ("10:12:00", "call_sessions_manual")):
        w.credit(201, MWK, at("2026-02-27", clock), table, 412, "voice",
                 description="Payment for voice session 412")
    # a credit that references nothing (doctor 103's balance holds it; it is not B18)
    w.add("wallet_transactions", doctor_id=103, type="credit", amount=MWK,
          description="Manual balance adjustment", created_at=at("2026-02-28", "09:00:00"))
    w.wallet[103][0] += MWK
    w.wallet[103][1] += MWK
    # a withdrawal in a status §1.11 does not list, debited once by its request
    w.add("withdrawal_requests", id=703, doctor_id=102, amount=Decimal("5.00"),
          payment_method="mobile_money", status="processing", created_at=at("2026-03-02", "09:00:00"))
    w.debit(102, Decimal("5.00"), at("2026-03-02", "09:00:00"),
            "Withdrawal Request (Pending Admin Approval)", {"withdrawal_request_id": 703})
    # an appointment status outside §1.6
    _appointment(w, 606, 221, 106, "video", 9, at("2026-02-24", "14:00:00"))


SCENARIOS = (_people_and_plans, _h1, _h2, _b3, _b4, _b5, _b6, _b7, _b9, _b12, _b13, _b14,
             _b17_b18, _b19, _b22_and_clean_texts, _b23_clean_call, _b24,
             _linked_appointment_and_b34, _b11, _members, _out_of_enum, _b16, _b23_refused,
             _self_contradicting)


def legacy_rows() -> LegacyRows:
    """Every scenario's rows, wallet_transactions numbered in insertion order."""
    w = LegacyRows()
    for scenario in SCENARIOS:
        scenario(w)
    w.wallets()
    for number, row in enumerate(w.rows["wallet_transactions"], start=1):
        row["id"] = number
    return w


INSERT_ORDER = ("plans", "users", "subscriptions", "subscription_members",
                "payment_transactions", "appointments", "text_sessions", "call_sessions",
                "text_appointment_sessions", "withdrawal_requests", "doctor_wallets",
                "wallet_transactions")


def build_legacy_database(conninfo: str, schema: str) -> dict[str, int]:
    """Create `schema` in the database at `conninfo` (libpq string), load the legacy DDL and
    the scenario rows; returns rows per table. Fails if the schema's tables already exist."""
    rows = legacy_rows().rows
    with psycopg.connect(conninfo) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(SCHEMA_SQL.read_text())
        for table in INSERT_ORDER:
            insert_rows(conn, table, rows.get(table, []))
    return {table: len(rows.get(table, [])) for table in INSERT_ORDER}


def insert_rows(conn: psycopg.Connection, table: str, rows: list[dict]) -> None:
    """INSERT the rows (each may name different columns), then move the id sequence past them."""
    for row in rows:
        columns = list(row)
        conn.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns))), [row[c] for c in columns])
    if rows:
        conn.execute(sql.SQL("SELECT setval(pg_get_serial_sequence({}, 'id'), "
                             "(SELECT max(id) FROM {}))").format(sql.Literal(table),
                                                                  sql.Identifier(table)))


def main(dsn: str = "postgresql://postgres@127.0.0.1:5432/test", schema: str = "legacy_demo") -> None:
    """`python -m legacy.fixtures --dsn URL --schema NAME`: (re)build the fixture database."""
    from storage import postgres_conninfo

    conninfo = postgres_conninfo(dsn) if dsn.startswith("postgres") else dsn
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    counts = build_legacy_database(conninfo, schema)
    print(f"legacy fixture in schema {schema}: {sum(counts.values())} rows {counts}")


if __name__ == "__main__":
    import typer

    typer.run(main)
