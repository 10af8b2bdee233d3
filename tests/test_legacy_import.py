"""`ledger import-legacy`: the legacy fixture database (legacy/fixtures.py) imported into the
legacy log, replayed, and compared with its source.

The legacy source lives in its own PostgreSQL schema next to the test's target schema; targets
are PostgreSQL (pg_url) and, where cheap, SQLite.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from datetime import datetime, timezone

import psycopg
import pytest
from psycopg import sql
from typer.testing import CliRunner

from legacy.log import open_legacy
from legacy.facts import (Evidence, Pool, RequestRef, allocate_charges, match_second_debit,
                          transaction_fact)
from legacy.fixtures import REJECTED_SUBJECTS, build_legacy_database, rejected_rows
from legacy.importer import State, _observe, import_legacy
from legacy.items import withdrawal_item
from legacy.normalise import (Rejected, appointment_status, country_code, currency_of, to_minor,
                              to_utc)
from legacy.replay import legacy_balances, load_history, verify_against_source
from storage import postgres_conninfo, postgres_parts

pytestmark = pytest.mark.postgres


class LegacySource:
    """The fixture database in schema `<target schema>_src`; `execute` changes it for a test."""

    def __init__(self, pg_url: str) -> None:
        self.conninfo = postgres_conninfo(pg_url)
        self.schema = postgres_parts(pg_url)["schema"] + "_src"
        self.dsn = f"{pg_url.split('?')[0]}?schema={self.schema}"
        self.counts = build_legacy_database(self.conninfo, self.schema)

    def execute(self, statement: str, params=None) -> list[tuple]:
        with psycopg.connect(self.conninfo, autocommit=True,
                             options=f"-c search_path={self.schema}") as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def drop(self) -> None:
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(self.schema)))


@pytest.fixture
def source(pg_url):
    legacy = LegacySource(pg_url)
    yield legacy
    legacy.drop()


def history_of(url: str):
    app = open_legacy(url)
    try:
        return load_history(app)
    finally:
        app.close()


def log_position(url: str) -> int:
    app = open_legacy(url)
    try:
        return app.recorder.max_notification_id() or 0
    finally:
        app.close()


# ---- pure normalisation and inference --------------------------------------------------------

def test_money_becomes_exact_minor_units():
    assert to_minor("3500.00") == 350000
    assert to_minor(3) == 300
    with pytest.raises(Rejected, match="more than 2 decimals"):
        to_minor("3.005")
    with pytest.raises(Rejected, match="not a number"):
        to_minor("abc")


def test_timestamps_become_aware_utc_seconds():
    naive = datetime(2026, 2, 3, 9, 0, 0, 700000)
    assert to_utc(naive) == datetime(2026, 2, 3, 9, 0, tzinfo=timezone.utc)
    assert to_utc("2026-02-03T11:00:00+02:00") == datetime(2026, 2, 3, 9, 0, tzinfo=timezone.utc)


def test_country_currency_and_status_names():
    assert [country_code(c) for c in ("Malawi", "MALAWI", " malawi ", "Zambia", None, "Atlantis")] \
        == ["MW", "MW", "MW", "ZM", None, None]
    assert [currency_of(c) for c in ("malawi", "Kenya", None)] == ["MWK", "USD", "USD"]
    # §1.6: the legacy normaliser maps the string "in_progress" to 1 (confirmed); the int 7 is
    # in_progress; a name of the table is kept; a status outside the table is no state legacy
    # had: the row is rejected
    assert [appointment_status(n) for n in (0, 3, 7, "in_progress", " In_Progress", "Completed")] \
        == ["pending", "completed", "in_progress", "confirmed", "confirmed", "completed"]
    for outside in (9, -1, "done", None):
        with pytest.raises(Rejected, match="is not an appointment status"):
            appointment_status(outside)


def test_allocation_is_fifo_capped_and_explains_every_counter():
    """Oldest pool first, capped at what its counters show; the rest forgiven (B6); what no
    evidence explains is charged to the pool itself."""
    t = datetime(2026, 2, 1, tzinfo=timezone.utc)
    one_text = {"text": 1, "voice": 0, "video": 0}
    pools = {"subscriptions:1": Pool("subscriptions:1", "p", t, dict(one_text)),
             "subscriptions:2": Pool("subscriptions:2", "p", t.replace(day=2), dict(one_text))}
    later = t.replace(day=5)
    evidence = [Evidence("text_sessions:9", "text_sessions:9", "p", "d", "text", 3, later, later,
                         "sessions_used")]
    result = allocate_charges(pools, {"p": {"subscriptions:1", "subscriptions:2"}}, evidence)
    assert [(f.subscription_key, f.units) for f in result.charges] \
        == [("subscriptions:1", 1), ("subscriptions:2", 1)]
    assert result.forgiven == {"text_sessions:9": 1}
    pools["subscriptions:2"].consumed["text"] = 3
    result = allocate_charges(pools, {"p": {"subscriptions:1", "subscriptions:2"}}, evidence)
    assert [(f.subject, f.units, f.source) for f in result.charges][-1] \
        == ("subscriptions:2", 1, "unattributed")


def _admin_debit(row_id: int, when: datetime) -> dict:
    """The admin panel's second debit (B22): names no withdrawal, 50,000.00 MWK, doctor 105."""
    return {"id": row_id, "doctor_id": 105, "type": "debit", "amount": "50000.00",
            "description": "Withdrawal processed - mobile_money", "session_table": None,
            "session_id": None, "metadata": None, "created_at": when}


def _withdrawal(state: State, wid: int, requested: datetime, paid: datetime | None,
                status: str = "completed") -> None:
    row = {"id": wid, "doctor_id": 105, "amount": "50000.00", "status": status,
           "created_at": requested, "paid_at": paid}
    _observe("withdrawal_requests", withdrawal_item(row, state.ctx), state)


def test_b22_second_debits_of_equal_amounts_are_matched_by_time():
    """Review #5: two completed 50,000.00 MWK requests of one doctor. Each admin debit names no
    withdrawal: it goes to the unmatched request completed closest to it (one each), not to
    none as when only doctor and amount were compared; a failed request is never a candidate."""
    t = datetime(2026, 3, 30, 9, 0)
    state = State()
    _withdrawal(state, 701, t, t.replace(day=31, hour=15))
    _withdrawal(state, 702, t.replace(hour=10), t.replace(day=31, hour=16))
    _withdrawal(state, 703, t.replace(hour=11), None, status="failed")
    late = transaction_fact(_admin_debit(78, t.replace(day=31, hour=16, second=2)), "MWK",
                            state.withdrawal_for)
    early = transaction_fact(_admin_debit(77, t.replace(day=31, hour=15, second=1)), "MWK",
                             state.withdrawal_for)
    assert (late.subject, early.subject) == ("withdrawal_requests:702", "withdrawal_requests:701")
    assert late.detail["withdrawal_match"] == "doctor, amount, time"
    with pytest.raises(Rejected, match="a debit that references nothing"):
        transaction_fact(_admin_debit(79, t.replace(day=31, hour=17)), "MWK",
                         state.withdrawal_for)  # every request has its second debit


def test_b22_tied_second_debits_stay_unmatched_and_name_their_candidates():
    """Review #5 (reproducer test_r7_b22): two requests completed in the same second are equally
    close: the debit is not given to either but keeps its own subject and lists both, so that
    the reconciliation reports it instead of accepting it silently."""
    t = datetime(2026, 3, 31, 15, 0)
    state = State()
    _withdrawal(state, 701, t.replace(day=30), t)
    _withdrawal(state, 702, t.replace(day=30, hour=10), t)
    fact = transaction_fact(_admin_debit(77, t), "MWK", state.withdrawal_for)
    assert fact.subject == "wallet_transactions:77"
    assert fact.detail["withdrawal_candidates"] == ["withdrawal_requests:701", "withdrawal_requests:702"]
    assert match_second_debit(None, [RequestRef("withdrawal_requests:9", None)], set()) \
        == ("withdrawal_requests:9", ())  # a single candidate needs no time


# ---- import --------------------------------------------------------------------------------

def test_import_records_every_row_once_per_table(source, pg_url):
    report = import_legacy(source.dsn, pg_url, batch_size=7)
    rejected = Counter(table for table, _, _ in rejected_rows())
    assert {t: (c.read, c.recorded, c.present, c.rejected) for t, c in report.tables.items()} \
        == {t: (n, n - rejected[t], 0, rejected[t]) for t, n in source.counts.items()}
    assert {k: c.recorded for k, c in report.facts.items()} \
        == {"LegacyCharge": 28, "LegacyCredit": 3, "LegacyDebit": 1}
    # B6's second unit and B34's default sessions_used = 1 were never deducted: no charge
    assert report.forgiven_units == {"text_sessions:505": 1, "text_sessions:514": 1}
    assert len(report.rejects) == len(rejected_rows()) and report.notes == []


def test_self_contradicting_rows_are_rejected_with_their_reason(source, pg_url, tmp_path):
    """Each kind (issue 9 §3): connected before it started, `ended` without ended_at, a status
    §1 does not list, a doctor id naming a patient, a transaction referencing nothing."""
    rejects = tmp_path / "rejects.csv"
    report = import_legacy(source.dsn, pg_url, rejects_path=rejects)
    found = {(r.table, r.row_id): r.reason for r in report.rejects}
    for table, row_id, fragment in rejected_rows():
        assert fragment in found[(table, row_id)], (table, row_id, found.get((table, row_id)))
    assert len(found) == len(rejected_rows())
    with rejects.open() as handle:
        assert {(r["table"], r["row_id"]) for r in csv.DictReader(handle)} == set(found)
    history = history_of(pg_url)
    for subject in REJECTED_SUBJECTS + ("appointments:606", "call_sessions:412"):
        table = subject.split(":")[0].replace("withdrawal_requests", "withdrawals")
        assert subject not in getattr(history, table), subject
    assert "201" not in history.wallets  # a patient's "wallet"
    # statuses legacy does write outside the DB enums stay (B31)
    assert history.call_sessions["call_sessions:407"].status == "missed"
    assert history.call_sessions["call_sessions:408"].status == "answered"
    # the rows legacy moved money with stay in the facts, the wallets replay exactly, and the
    # balance the rejected credit moved is kept apart from B18's residual
    assert verify_against_source(source.dsn, history) == []
    residuals = {f.source: f.amount_minor for f in history.facts
                 if f.subject == "doctor_wallets:3" and f.affects_balance}
    assert residuals == {"balance_residual": 700000, "rejected_rows_residual": 350000}


def test_replay_reproduces_every_legacy_counter_and_wallet_exactly(source, pg_url):
    import_legacy(source.dsn, pg_url)
    history = history_of(pg_url)
    assert verify_against_source(source.dsn, history) == []
    balances = legacy_balances(history)
    # independently of verify_against_source: every subscription counter, read here
    rows = source.execute("SELECT id, text_sessions_remaining, voice_calls_remaining, "
                          "video_calls_remaining FROM subscriptions")
    assert {f"subscriptions:{i}": {"text": t, "voice": v, "video": d} for i, t, v, d in rows} \
        == balances.subscriptions
    wallets = {(str(d), b, e, w) for d, b, e, w in source.execute(
        "SELECT doctor_id, balance * 100, total_earned * 100, total_withdrawn * 100 "
        "FROM doctor_wallets WHERE doctor_id <> 201")}  # 201 is a patient: rejected
    assert {(d, w.balance_minor, w.total_earned_minor, w.total_withdrawn_minor)
            for (d, _), w in balances.wallets.items()} == wallets
    # B18: +7000.00 with no row (and +3500.00 by a credit row the import rejected); B22:
    # balance 10 500 − 2 × 10 000, total_withdrawn 10 000 only
    assert balances.wallets[("103", "MWK")].balance_minor == 1400000
    assert balances.wallets[("103", "MWK")].total_earned_minor == 700000
    assert balances.wallets[("105", "MWK")].balance_minor == -950000
    assert balances.wallets[("105", "MWK")].total_withdrawn_minor == 1000000


def test_facts_are_the_legacy_movements_verbatim(source, pg_url):
    import_legacy(source.dsn, pg_url)
    facts = history_of(pg_url).facts
    by_subject = {}
    for fact in facts:
        by_subject.setdefault((fact.kind, fact.subject), []).append(fact)
    charges = {s: fs for (kind, s), fs in by_subject.items() if kind == "LegacyCharge"}
    h1 = by_subject[("LegacyCredit", "call_sessions:401")]
    assert [f.amount_minor for f in h1] == [400000, 400000, 1200000]
    assert {f.currency for f in h1} == {"MWK"}
    assert [(f.units, f.subscription_key) for f in charges["text_sessions:506"]] \
        == [(2, "subscriptions:310"), (4, "subscriptions:311")]  # B12 drained both, FIFO
    assert [f.units for f in charges["text_sessions:505"]] == [1]  # B6: 1 taken, 1 forgiven
    assert "text_sessions:504" not in charges  # B5: nobody debited
    assert sorted((f.source, f.amount_minor) for f in by_subject[("LegacyCredit",
                                                                  "doctor_wallets:3")]) \
        == [("balance_residual", 700000), ("rejected_rows_residual", 350000),
            ("total_earned_residual", 350000)]
    # B22: the request's debit names the withdrawal in its metadata; the admin panel's second
    # debit names nothing and is matched by doctor and amount
    b22 = by_subject[("LegacyDebit", "withdrawal_requests:701")]
    assert [(f.amount_minor, f.detail["metadata"].get("withdrawal_request_id")) for f in b22] \
        == [(1000000, 701), (1000000, None)]
    assert [f.units for f in charges["subscriptions:325"]] == [1]  # consumed, no evidence


def test_a_second_import_adds_nothing(source, pg_url):
    import_legacy(source.dsn, pg_url)
    position = log_position(pg_url)
    again = import_legacy(source.dsn, pg_url, batch_size=3)
    assert again.appended == 0
    assert all(c.recorded == 0 and c.present == c.read - c.rejected
               for c in again.tables.values())
    assert all(c.recorded == 0 for c in again.facts.values())
    assert log_position(pg_url) == position


class Interrupt(Exception):
    pass


def test_an_interrupted_import_resumes_to_the_same_log(source, pg_url, tmp_path):
    """Stopped after 5 saved batches (on SQLite), run again: the same history as one
    uninterrupted run (on PostgreSQL), fact for fact, in the same order."""
    import_legacy(source.dsn, pg_url, batch_size=4)
    sqlite_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    calls = []

    def stop_after_five(table, done, total):
        calls.append(table)
        if len(calls) == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        import_legacy(source.dsn, sqlite_url, batch_size=4, progress=stop_after_five)
    partial = log_position(sqlite_url)
    assert 0 < partial < log_position(pg_url)
    resumed = import_legacy(source.dsn, sqlite_url, batch_size=4)
    assert resumed.appended == log_position(pg_url) - partial
    assert history_of(sqlite_url) == history_of(pg_url)
    assert verify_against_source(source.dsn, history_of(sqlite_url)) == []


@pytest.mark.parametrize("column_present", [False, True])
def test_manual_deduction_applied_may_be_missing(source, pg_url, column_present):
    """⚠ No legacy migration creates call_sessions.manual_deduction_applied (B10)."""
    if column_present:
        source.execute("ALTER TABLE call_sessions ADD COLUMN manual_deduction_applied boolean")
        source.execute("UPDATE call_sessions SET manual_deduction_applied = true "
                       "WHERE id IN (403, 404, 405, 406)")
    report = import_legacy(source.dsn, pg_url)
    assert report.tables["call_sessions"].recorded == source.counts["call_sessions"] - 2
    calls = history_of(pg_url).call_sessions
    expected = True if column_present else None
    assert calls["call_sessions:406"].manual_deduction_applied is expected
    assert calls["call_sessions:407"].manual_deduction_applied is None  # NULL either way
    assert verify_against_source(source.dsn, history_of(pg_url)) == []


def test_other_missing_columns_become_none(source, pg_url):
    for table, column in (("payment_transactions", "user_id"),
                          ("payment_transactions", "metadata"),
                          ("payment_transactions", "gateway_reference"),
                          ("payment_transactions", "payment_status"),
                          ("appointments", "completed_at"),
                          ("appointments", "sessions_deducted"),
                          ("appointments", "earnings_awarded")):
        source.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    source.execute("DROP TABLE text_appointment_sessions")
    report = import_legacy(source.dsn, pg_url)
    assert {(r.table, r.row_id) for r in report.rejects} \
        == {(table, row_id) for table, row_id, _ in rejected_rows()}
    assert report.notes == ["table text_appointment_sessions is missing in the source: "
                            "nothing read"]
    history = history_of(pg_url)
    payment = history.payments["payment_transactions:801"]
    assert (payment.user_id, payment.plan_id, payment.status) == (None, None, "pending")
    appointment = history.appointments["appointments:601"]
    assert (appointment.completed_at, appointment.sessions_deducted,
            appointment.earnings_awarded_minor) == (None, None, None)
    # B19's two units are no longer evidenced by a row: charged to the subscription itself
    assert [(f.subject, f.units, f.source) for f in history.facts
            if f.subscription_key == "subscriptions:326"] \
        == [("subscriptions:326", 2, "unattributed")]
    assert verify_against_source(source.dsn, history) == []


def test_statuses_outside_the_legacy_enums_are_imported(source, pg_url):
    import_legacy(source.dsn, pg_url)
    history = history_of(pg_url)
    assert history.call_sessions["call_sessions:407"].status == "missed"
    assert history.call_sessions["call_sessions:408"].status == "answered"
    assert history.call_sessions["call_sessions:408"].appointment_key == "appointments:607"
    assert history.text_sessions["text_sessions:515"].status == "scheduled"
    assert history.text_sessions["text_sessions:516"].status == "pending"
    assert history.appointments["appointments:607"].status == "in_progress"
    assert history.appointments["appointments:607"].kind == "voice"  # legacy `audio`
    # B17: the guards were never persisted (not fillable), so they read 0 after two ends
    b17 = history.appointments["appointments:601"]
    assert (b17.sessions_deducted, b17.earnings_awarded_minor) == (0, 0)
    assert history.call_sessions["call_sessions:403"].call_type == "voice"  # legacy `audio`
    assert {d: (x.country_legacy, x.country) for d, x in history.doctors.items()} == {
        "101": ("Malawi", "MW"), "102": ("Zambia", "ZM"), "103": ("malawi", "MW"),
        "104": ("Kenya", "KE"), "105": ("MALAWI", "MW"), "106": (None, None)}
    assert {d: w.currency for d, w in history.wallets.items()} == {
        "101": "MWK", "102": "USD", "103": "MWK", "104": "USD", "105": "MWK", "106": "USD"}


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_uninterpretable_rows_are_rejected_and_the_rest_imported(source, pg_url, tmp_path,
                                                                 suffix):
    source.execute("INSERT INTO text_sessions (id, patient_id, doctor_id, status) "
                   "VALUES (900, NULL, 101, 'expired')")
    source.execute("INSERT INTO call_sessions (id, patient_id, doctor_id, call_type, status, "
                   "connected_at, ended_at) VALUES (901, 221, 106, 'voice', 'ended', "
                   "'2026-02-24 15:00:00', '2026-02-24 14:00:00')")
    source.execute("INSERT INTO call_sessions (id, patient_id, doctor_id, call_type, status) "
                   "VALUES (902, 221, 106, 'hologram', 'ended')")
    source.execute("ALTER TABLE wallet_transactions ALTER COLUMN amount TYPE text")
    source.execute("INSERT INTO wallet_transactions (id, doctor_id, type, amount) "
                   "VALUES (99, 101, 'credit', 'abc')")
    rejects = tmp_path / f"rejects{suffix}"
    report = import_legacy(source.dsn, pg_url, batch_size=5, rejects_path=rejects)
    fixture = {(t, i) for t, i, _ in rejected_rows()}
    expected = {("text_sessions", "900", "no patient_id"),
                ("call_sessions", "901", "call session: ended_at 2026-02-24T14:00:00+00:00 "
                                         "before 2026-02-24T15:00:00+00:00"),
                ("call_sessions", "902", "call_type 'hologram' is not voice, audio or video"),
                ("wallet_transactions", "99", "amount: not a number: 'abc'")}
    found = {(r.table, r.row_id, r.reason) for r in report.rejects
             if (r.table, r.row_id) not in fixture}
    assert found == expected
    if suffix == ".csv":
        with rejects.open() as handle:
            written = {tuple(row.values()) for row in csv.DictReader(handle)}
    else:
        written = {tuple(row.values()) for row in json.loads(rejects.read_text())}
    assert {w for w in written if w[:2] not in fixture} == expected
    assert report.tables["call_sessions"].rejected == 2 + 2
    assert report.tables["call_sessions"].recorded == source.counts["call_sessions"] - 2
    assert report.tables["wallet_transactions"].recorded \
        == source.counts["wallet_transactions"] - 3
    # the rejected credit never reached the wallet row, so the replay is still exact
    assert verify_against_source(source.dsn, history_of(pg_url)) == []


def test_verify_reports_a_source_that_moved_after_import(source, pg_url):
    import_legacy(source.dsn, pg_url)
    source.execute("UPDATE subscriptions SET text_sessions_remaining = 1 WHERE id = 302")
    source.execute("UPDATE doctor_wallets SET balance = balance + 1 WHERE doctor_id = 104")
    assert verify_against_source(source.dsn, history_of(pg_url)) == [
        "subscriptions:302 text: replay 9, source 1",
        "doctor_wallets:4 balance_minor: replay 900, source 1000"]


def test_cli_imports_prints_the_report_and_checks_the_replay(source, pg_url, tmp_path,
                                                             monkeypatch):
    from runtime.cli import app

    monkeypatch.setenv("LEDGER_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    runner = CliRunner()
    args = ["import-legacy", "--dsn", source.dsn, "--batch-size", "20",
            "--rejects", str(tmp_path / "rejects.csv")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "replay matches the source" in result.output
    assert "wallet_transactions" in result.output
    # a moved source: B18's balance residual is already recorded, so nothing re-explains it
    source.execute("UPDATE doctor_wallets SET balance = balance + 1 WHERE doctor_id = 103")
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "doctor_wallets:3 balance_minor: replay 1400000, source 1400100" in result.output
