"""`reconcile`: the whole comparison of one legacy history with the rules. Index the facts by
item, build the items and draw their units from the pools, match unattributed units, judge and
classify every item, add the wallet rows, and total what the rules grant, take and pay
(`_accept_unmatched`: facts with no item are kept as legacy recorded them).
"""

from __future__ import annotations

from collections import defaultdict

from ledger.rules import Policy
from legacy.history import Fact, LegacyHistory
from legacy.reconcile.classify import _judge
from legacy.reconcile.matching import (_Facts, _index, _items, _linked_appointments, _rate,
                                       _reattribute)
from legacy.reconcile.model import Reconciliation
from legacy.reconcile.pools import _allocate, _granted, _pools
from legacy.reconcile.wallets import _b23_rows, _residual_rows, _second_debits, _withdrawal_rows


def reconcile(history: LegacyHistory, policy: Policy = Policy()) -> Reconciliation:
    """Compare every legacy item with the rules for the same event times and classify each
    difference. Pure: reads `history`, never changes it. Raises ValueError on naive datetimes."""
    alias, ambiguous = _second_debits(history)
    alias.update((t.key, t.appointment_key) for t in history.text_appointment_sessions.values()
                 if t.appointment_key in history.appointments)
    facts = _index(history.facts, alias,
                   {key: sub.owner_id for key, sub in history.subscriptions.items()})
    linked = _linked_appointments(history)
    items = _items(history, facts, policy, linked)
    known = {item.subject for item, _, _ in items} | set(history.withdrawals)
    orphans = [f for subject, fs in facts.charges.items() if subject not in known for f in fs]
    pools, rows = _pools(history, facts)
    dups = frozenset(d.patient_id for d in rows)  # patients holding a duplicate grant (B24)
    _allocate([item for item, _, _ in items], pools)
    items, taken = _reattribute(history, facts, items, orphans)
    rules_units, rules_money = defaultdict(int), defaultdict(int)
    for item, row, lg in sorted(items, key=lambda triple: triple[0].subject):
        rate = _rate(history, item)
        rows.extend(_judge(item, row, lg, rate, item.subject in linked, dups,
                           _rate(history, item, "text").pay_minor))
        for owner, n in item.drawn.items():
            rules_units[(owner, item.bucket)] += n
        rules_money[(item.doctor_id, rate.currency)] += item.rules_units * rate.pay_minor
    w_rows, made = _withdrawal_rows(history, facts)
    accepted = _accept_unmatched(facts, known, orphans, taken, rules_units, rules_money)
    for key, amount in made.items():
        rules_money[key] -= amount
    rows += w_rows + ambiguous + _residual_rows(facts) + _b23_rows(history, facts)
    return Reconciliation(rows, len(items) + len(history.withdrawals), accepted,
                          _granted(pools), dict(rules_units), dict(rules_money))


def _accept_unmatched(facts: _Facts, known: set[str], orphans: list[Fact], taken: dict[str, int],
                      rules_units: dict, rules_money: dict) -> list[str]:
    """Facts with no item to judge them by (e.g. unattributed consumption, rows of sessions
    legacy deleted, B29) are kept as legacy recorded them: the rules take the same, less the
    units `_reattribute` matched to a session."""
    subjects = {f.subject for f in orphans if f.units != taken.get(f.fact_id, 0)}
    for f in orphans:
        rules_units[(facts.account(f), f.bucket or "text")] += f.units - taken.get(f.fact_id, 0)
    for subject, fs in facts.credits.items():
        if subject not in known:
            subjects.add(subject)
            for f in fs:
                rules_money[(f.doctor_id, f.currency)] += f.amount_minor
    for subject, fs in facts.debits.items():
        if subject not in known:
            subjects.add(subject)
            for f in fs:
                rules_money[(f.doctor_id, f.currency)] -= f.amount_minor
    return sorted(subjects)
