"""End to end: the legacy fixture database → `import_legacy` → `load_history` → `reconcile`.

Each scenario of `legacy.fixtures.EXPECTED` (one per legacy bug of legacy-system.md §5 and §10,
with its numbers) must be found with its bug code and numbers, and the clean rows
(`legacy.fixtures.CLEAN`) must give no difference. `legacy.reconcile` is the reconciliation
helper's module: if it is missing, these tests skip (and fail in CI, where skips are failures).
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from legacy import reconcile as reconcile_module
from legacy.log import open_legacy
from legacy.fixtures import CLEAN, EXPECTED, REJECTED_SUBJECTS, build_legacy_database
from legacy.importer import import_legacy
from legacy.replay import legacy_balances, load_history, verify_against_source
from storage import postgres_conninfo, postgres_parts


pytestmark = pytest.mark.postgres

@pytest.fixture
def imported(pg_url):
    """(legacy DSN, ledger URL) with the fixture imported; the source schema dropped after."""
    conninfo = postgres_conninfo(pg_url)
    schema = postgres_parts(pg_url)["schema"] + "_src"
    build_legacy_database(conninfo, schema)
    dsn = f"{pg_url.split('?')[0]}?schema={schema}"
    import_legacy(dsn, pg_url)
    yield dsn, pg_url
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def reconciled(url: str):
    app = open_legacy(url)
    try:
        history = load_history(app)
    finally:
        app.close()
    return history, reconcile_module.reconcile(history)


def numbers(row) -> tuple:
    return (row.bug, row.units_legacy, row.units_rules, row.paid_legacy_minor,
            row.paid_rules_minor, row.currency, row.blocked_minor, row.refused_minor)


def mismatches(differences, expected) -> list[str]:
    """For each expected scenario not found with its numbers: what was found instead."""
    by_subject: dict[str, list] = {}
    for row in differences:
        by_subject.setdefault(row.subject, []).append(row)
    out = []
    for case in expected:
        want = (case.bug, case.units_legacy, case.units_rules, case.paid_legacy_minor,
                case.paid_rules_minor, case.currency, case.blocked_minor, case.refused_minor)
        found = [numbers(row) for row in by_subject.get(case.subject, [])]
        if want not in found:
            out.append(f"{case.bug} {case.subject}: want {want}, found {found} ({case.note})")
    return out


def test_the_reconciliation_finds_every_legacy_bug_with_its_numbers(imported):
    dsn, url = imported
    history, result = reconciled(url)
    assert verify_against_source(dsn, history) == []  # the facts are exactly the legacy's
    assert mismatches(result.differences, EXPECTED) == []


def test_the_reconciliation_finds_exactly_those(imported):
    _, url = imported
    _, result = reconciled(url)
    assert sorted((row.subject, row.bug) for row in result.differences) == sorted(
        (case.subject, case.bug) for case in EXPECTED)


def test_after_apply_every_balance_equals_the_rules_and_a_second_apply_adds_nothing(imported):
    _, url = imported
    history, result = reconciled(url)
    app = open_legacy(url)
    try:
        planned = reconcile_module.plan_adjustments(result, history)
        assert reconcile_module.apply_adjustments(app, planned) == len(planned) > 0
        assert reconcile_module.apply_adjustments(app, planned) == 0
        after = load_history(app)
    finally:
        app.close()
    units, money = folded(after)
    rules_units, rules_money = result.rules_balances()
    assert nonzero(units) == nonzero(rules_units)
    assert nonzero(money) == nonzero(rules_money)
    assert reconcile_module.reconcile(after).differences == result.differences  # facts untouched


def folded(history) -> tuple[dict, dict]:
    """(units per (owner, bucket), money per (doctor, currency)) from facts + adjustments."""
    balances = legacy_balances(history)
    units: dict = {}
    for key, per_bucket in balances.subscriptions.items():
        for bucket, n in per_bucket.items():
            owner = (history.subscriptions[key].owner_id, bucket)
            units[owner] = units.get(owner, 0) + n
    for patient, per_bucket in balances.patient_adjustments.items():
        for bucket, n in per_bucket.items():
            units[(patient, bucket)] = units.get((patient, bucket), 0) + n
    money = {key: wallet.balance_minor for key, wallet in balances.wallets.items()}
    return units, money


def nonzero(balances: dict) -> dict:
    return {key: n for key, n in balances.items() if n}


def test_clean_rows_give_no_difference(imported):
    _, url = imported
    _, result = reconciled(url)
    clean = {subject for subject, _ in CLEAN}
    assert [(row.subject, row.bug) for row in result.differences if row.subject in clean] == []


def test_a_second_import_adds_nothing_and_changes_no_difference(imported):
    dsn, url = imported
    _, before = reconciled(url)
    assert import_legacy(dsn, url).appended == 0
    _, after = reconciled(url)
    assert after.differences == before.differences


def test_self_contradicting_rows_are_never_reconciled_into_money(imported):
    """Issue 9 §3: the rows the import rejected (legacy/fixtures.py REJECTED) have no
    difference and no correction; what legacy moved for them is kept as it recorded it."""
    _, url = imported
    history, result = reconciled(url)
    rejected = set(REJECTED_SUBJECTS)
    assert not [d for d in result.differences if d.subject in rejected]
    assert not [a for a in reconcile_module.plan_adjustments(result) if a.subject in rejected]
    assert rejected <= set(result.accepted_unmatched)
    # doctor 103's balance residual: 7,000.00 of B18, and 3,500.00 moved by a credit row that
    # references nothing, kept as recorded (not B18, not undone)
    b18 = [d for d in result.differences if d.subject == "doctor_wallets:3"]
    assert [(d.bug, d.paid_over) for d in b18] == [("B18", 700000)]
    money_facts = [f for f in history.facts if f.doctor_id == "103"
                   and f.kind != "LegacyCharge" and f.affects_balance]
    assert sorted((f.source.split(":")[0], f.subject, f.amount_minor) for f in money_facts) == [
        ("balance_residual", "doctor_wallets:3", 700000),
        ("rejected_rows_residual", "doctor_wallets:3", 350000),
        ("wallet_transactions", "appointments:602", 350000)]
    # the rules: appointment 602's credit (A2) and B18's 7,000.00 undone, the rejected row's kept
    _, money = result.rules_balances()
    assert money[("103", "MWK")] == 350000
