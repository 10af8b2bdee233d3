"""Classify one item's difference by the legacy bug it matches, most specific first
(legacy-system.md §3 formulas, §5 H1 … B34), and write the item's difference rows (`_judge`):
one per pool owner whose units differ, plus other buckets (B27) and currencies (B32) legacy used.

Rows that belong to no item (withdrawals, residuals, B23) are `legacy.reconcile.wallets`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ledger.rules import BLOCK_SECONDS, CALL_GRACE_SECONDS
from ledger.tariff import Rate
from legacy.history import CallSession, TextSession
from legacy.reconcile.matching import _Item, _Legacy
from legacy.reconcile.model import Difference, format_money


# ------------------------------------------------------------------ classification


@dataclass(frozen=True)
class _Case:
    """What classification looks at for one item: legacy units `c` in the item's bucket, money
    paid `paid` (all currencies), the rules' units and per-unit pay, patients holding a
    duplicate grant (B24), and the tariff's text rate for the same doctor and instant (B16)."""

    item: _Item
    lg: _Legacy
    c: int
    paid: int
    unit_pay: int
    dup_patients: frozenset[str]
    text_pay: int = 0  # the text rate at the same instant (B16: calls paid at it)

    @property
    def capped(self) -> bool:
        """The patient's pools could not pay every unit the times owe (§3 exhaustion)."""
        return self.item.rules_units < self.item.owed


def _common(case: _Case) -> tuple[str, str] | None:
    """Checks shared by text and calls, in order: forgiven (B6), paid with no charge (B5),
    run-out paid beyond the charge (B4), pools exhausted (B24 cascade or unexplained)."""
    item, lg, c = case.item, case.lg, case.c
    forgiven = (lg.recorded or 0) - c
    # sessions_used may sit 1 above the charges for a clean session (B34): only call it B6 when
    # the patient is under-charged or the doctor was paid for the forgiven units.
    if forgiven > 0 and (c < item.rules_units or case.paid > c * case.unit_pay):
        return "B6", f"sessions_used {lg.recorded} but only {c} deducted: {forgiven} forgiven"
    if c == 0 and case.paid > 0:
        return "B5", "the doctor was credited with no patient charge at all"
    if case.paid > c * case.unit_pay and case.capped:
        return "B4", f"the patient's units ran out after {item.rules_units}: the doctor was " \
                     f"also paid for units the patient never paid"
    if case.capped and c > item.rules_units:
        at = f", so the rules end it at {item.exhausted_at.isoformat()} (balance exhausted)" \
            if item.exhausted_at else ""
        if {item.patient_id, *item.drawn, *lg.owners(item.bucket)} & case.dup_patients:
            return "B24", f"the patient used units of a duplicate grant: one pool per payment " \
                          f"reference pays only {item.rules_units} of the {item.owed} owed{at}"
        return "unexplained", f"the patient's pools (one per payment reference, each block judged " \
                              f"at its start) pay only {item.rules_units} of the {item.owed} owed{at}"
    return None


def _classify_text(ts: TextSession, case: _Case) -> tuple[str, str]:
    """Text bugs, most specific first (legacy-system.md §3.2, §5)."""
    item, c, rules, s = case.item, case.c, case.item.rules_units, case.item.legacy_seconds
    if item.start is None:
        return "B13", "never activated (doctor never replied) yet charged m = 0 → floor(0/10) + 1"
    if item.end_cause in ("idle", "max_duration", "never_ended") and c > rules:
        last = ts.last_activity_at.isoformat() if ts.last_activity_at else "activation"
        return "B12", f"left running after its last activity ({last}); the rules end it at " \
                      f"{item.end.isoformat()} ({item.end_cause}), legacy kept deducting"
    m = s // 60 if s is not None else None
    n = ts.sessions_remaining_before_start
    if case.paid > c * case.unit_pay and n is not None and m is not None and m >= 10 * n + 1:
        return "B4", f"ran out: N = {n}, ended at m = {m} ≥ 10N + 1, and the forced end paid the " \
                     f"doctor for a unit the patient never paid"
    common = _common(case)
    if common or m is None:
        return common or ("unexplained", "no legacy end time to compare with")
    happy = m // 10 + 1
    if c > happy:
        return "B3", f"charged {c} > floor({m}/10) + 1 = {happy}: the end re-billed a bucket"
    if case.paid > happy * case.unit_pay:
        # T5 (check-response's end) pays first and records no sessions_used: concurrent polls
        # show as extra pay here and as "unattributed" units on the subscription.
        return "B3", f"the doctor was paid {case.paid // case.unit_pay} units > floor({m}/10) + 1 " \
                     f"= {happy}: the end was billed more than once"
    if c == happy == rules + 1 and s % BLOCK_SECONDS == 0:
        return "B14", f"ended exactly at {s} s: legacy floor + 1 = {happy}, the rules ceil = {rules}"
    p = ts.auto_deductions_processed
    if p > 0 and c == max(0, happy - p) and c < rules:
        return "H2", f"auto_deductions_processed = {p} advanced with no charge: only the end's " \
                     f"floor({m}/10) + 1 − P = {c} was billed"
    return _rate_only(case) or ("unexplained", "matches no known legacy pattern")


def _classify_call(cs: CallSession, case: _Case) -> tuple[str, str]:
    """Call bugs, most specific first (legacy-system.md §3.3, §5)."""
    item, c, rules, s = case.item, case.c, case.item.rules_units, case.item.legacy_seconds
    if item.start is None:
        return "unexplained", "never connected (or declined/missed) yet charged or paid"
    if item.end_cause == "first_end" and c > rules:
        return "B9", f"a repeated /end moved ended_at to {cs.ended_at.isoformat()}; the first end " \
                     f"was {item.end.isoformat()} and the later one re-billed"
    if item.end_cause == "never_ended":
        return "unexplained", "call never ended (legacy-system.md B10): billed until exhaustion"
    common = _common(case)
    if common or s is None:
        return common or ("unexplained", "no legacy end time to compare with")
    end_units = (s // 60) // 10 + 1
    if c == s // BLOCK_SECONDS + end_units and c > rules:
        return "H1", f"the end charged floor(floor({s}/60)/10) + 1 = {end_units} on top of " \
                     f"{s // BLOCK_SECONDS} auto bucket(s) already billed"
    if s and s % BLOCK_SECONDS == 0 and c == s // BLOCK_SECONDS + 1 == rules + 1:
        return "B14", f"ended exactly at {s} s: legacy floor + 1 = {c}, the rules ceil = {rules}"
    if s >= CALL_GRACE_SECONDS and c == s // BLOCK_SECONDS and rules == c + 1:
        return "B7", "the +1 hangup unit was skipped (ended by the doctor, who has no subscription)"
    return _rate_only(case) or ("unexplained", "matches no known legacy pattern")


def _classify_appointment(case: _Case, linked: bool) -> tuple[str, str]:
    """Appointment billing (legacy-system.md §3.4, A1–A7, B17, B19). An appointment owes 0 under
    the rules (§9, I10: only sessions bill), so whatever legacy charged or paid for it is
    over-billing, named by how legacy billed it."""
    lg = case.lg
    if lg.client_billed:
        return "B19", f"the chat screen billed it through the legacy text-appointment endpoints " \
                      f"(processDeduction and endSession, {lg.credit_rows} credit(s)), trusted as sent"
    if lg.charge_rows > 1 or lg.credit_rows > 1:
        return "B17", f"{lg.charge_rows} charge(s) and {lg.credit_rows} credit(s): the " \
                      f"sessions_deducted/earnings_awarded guards never persisted"
    if linked:
        return "unexplained", "billed as an appointment although a session serves it " \
                              "(legacy-system.md A4/B19)"
    if sum(lg.charged.values()) == 0 and case.paid > 0:
        return "B5", "the doctor was credited with no patient charge at all"
    return "A2", "legacy billed the appointment itself (path A2: one unit and one credit when " \
                 "it ended, §3.4); the rules bill only sessions: with no session evidence it " \
                 "has no billable start and owes 0 (billing-rules §2, §9, I10)"


def _rate_only(case: _Case) -> tuple[str, str] | None:
    """Units agree, money does not. A call paid exactly the text rate where the tariff pays
    more (legacy-2025: voice 5000, video 6000 MWK) is B16: legacy passed the rate key `voice`,
    which fell back to the text rate. Otherwise the per-unit amount is named, unexplained."""
    if case.c != case.item.rules_units or not case.c or case.paid % case.c:
        return None
    per_unit = case.paid // case.c
    if case.item.bucket != "text" and per_unit == case.text_pay < case.unit_pay:
        return "B16", f"each {case.item.bucket} unit was paid {per_unit} minor units, the text " \
                      f"rate: legacy's rate key `voice` fell back to text; the tariff pays " \
                      f"{case.unit_pay}"
    return "unexplained", f"units agree but legacy paid {per_unit} minor units per unit against " \
                          f"the tariff's {case.unit_pay}"


_B26 = ("legacy took the units from other owners' pools than the rules: it drew the oldest " +
        "start_date first, the rules the usable pool that expires first (§4)")


def _judge(item: _Item, row, lg: _Legacy, rate: Rate, linked: bool,
           dup_patients: frozenset[str], text_pay: int = 0) -> list[Difference]:
    """The difference rows of one item (none when legacy charged and paid what the rules owe)."""
    rules_pay = item.rules_units * rate.pay_minor
    charged = {b: n for b, n in lg.charged.items() if n}
    paid = {c: n for c, n in lg.paid.items() if n}
    if charged == ({item.bucket: item.rules_units} if item.rules_units else {}) \
            and paid == ({rate.currency: rules_pay} if rules_pay else {}):
        if lg.owners(item.bucket) == {o: n for o, n in item.drawn.items() if n}:
            return []  # the common case: no difference, nothing to classify
        return _item_rows(item, lg, rate, "B26", _B26)  # same totals, other owners' pools
    case = _Case(item, lg, lg.units(item.bucket), sum(lg.paid.values()), rate.pay_minor,
                 dup_patients, text_pay)
    if isinstance(row, TextSession):
        bug, why = _classify_text(row, case)
    elif isinstance(row, CallSession):
        bug, why = _classify_call(row, case)
    else:
        bug, why = _classify_appointment(case, linked)
    return _item_rows(item, lg, rate, bug, why)


# ------------------------------------------------------------------ rows


def _item_rows(item: _Item, lg: _Legacy, rate: Rate, bug: str, why: str) -> list[Difference]:
    """Rows for one item: its bucket's units, one row per pool owner whose units differ (a
    session paid partly by the patient's own pool and partly by a family pool, §4), the money in
    the rules' currency on the first row; then other buckets legacy charged (units only, B27)
    and other currencies it paid in (money only, B32). Rows without a difference are dropped."""
    rules_pay = item.rules_units * rate.pay_minor
    split = _owner_split(item, lg)
    text = _item_text(item, lg, rate, bug, why, split)
    rows = []
    for i, (owner, legacy_n, rules_n) in enumerate(split):
        money = (rate.currency, lg.paid.get(rate.currency, 0), rules_pay) if i == 0 \
            else (None, 0, 0)
        rows.append(Difference(item.subject, item.item_type, bug, item.patient_id, item.doctor_id,
                               item.bucket, legacy_n, rules_n, *money, text,
                               account_id=_account_id(owner, item)))
    for bucket, owners in sorted(lg.by_owner.items()):
        for owner, n in sorted(owners.items()) if bucket != item.bucket else ():
            rows.append(Difference(item.subject, item.item_type, "unexplained", item.patient_id,
                                   item.doctor_id, bucket, n, 0, None, 0, 0,
                                   f"{item.subject}: {n} unit(s) taken from the {bucket} bucket of a "
                                   f"{item.bucket} item (client-supplied type, legacy-system.md B27).",
                                   account_id=_account_id(owner, item)))
    for currency, amount in sorted(lg.paid.items()):
        if currency != rate.currency and amount:
            rows.append(Difference(item.subject, item.item_type, "unexplained", item.patient_id,
                                   item.doctor_id, None, 0, 0, currency, amount, 0,
                                   f"{item.subject}: paid {format_money(amount, currency)} although the "
                                   f"rate is in {rate.currency} (currency mixing, legacy-system.md B32)."))
    return [r for r in rows if r.units_over or r.paid_over]


def _owner_split(item: _Item, lg: _Legacy) -> list[tuple[str | None, int, int]]:
    """(pool owner, legacy units, rules units) in the item's bucket, one per owner either side
    took from; owners whose units differ first, then the patient, then by id (the first row
    carries the money). [(None, 0, 0)] when neither side took a unit."""
    legacy, rules = lg.owners(item.bucket), {o: n for o, n in item.drawn.items() if n}
    owners = sorted(set(legacy) | set(rules),
                    key=lambda o: (legacy.get(o, 0) == rules.get(o, 0), o != item.patient_id, str(o)))
    return [(o, legacy.get(o, 0), rules.get(o, 0)) for o in owners] or [(None, 0, 0)]


def _account_id(owner: str | None, item: _Item) -> str | None:
    """`Difference.account_id`: the pool owner when it is not the item's patient, else None."""
    return None if owner in (None, item.patient_id) else owner


def _item_text(item: _Item, lg: _Legacy, rate: Rate, bug: str, why: str,
               split: list[tuple[str | None, int, int]]) -> str:
    """The explanation shared by an item's rows (totals over all owners, then per owner)."""
    rules_pay = item.rules_units * rate.pay_minor
    legacy_money = format_money(lg.paid.get(rate.currency, 0), rate.currency)
    matched = f" (incl. {lg.reattributed} unattributed)" if lg.reattributed else ""
    text = (f"{item.subject}: legacy charged {lg.units(item.bucket)}{matched} {item.bucket} unit(s) "
            f"and paid {legacy_money}; the rules owe {item.rules_units} unit(s) and "
            f"{format_money(rules_pay, rate.currency)} ({bug}: {why}).")
    if len(split) > 1:
        text += " Per pool owner (legacy/rules): " + ", ".join(
            f"{owner} {legacy_n}/{rules_n}" for owner, legacy_n, rules_n in sorted(split, key=str)) + "."
    return text
