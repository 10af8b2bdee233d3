"""Difference rows of doctors' wallets rather than billable items: withdrawals debited twice or
failed and never refunded (B22, billing-rules.md §7: made once), debits naming no withdrawal
matched again to their request (or reported when ambiguous), balance residuals (B18) and
earnings that could not be withdrawn (B23).
"""

from __future__ import annotations

from collections import defaultdict

from legacy.facts import NO_SECOND_DEBIT, REJECTED_ROWS, RequestRef, match_second_debit
from legacy.history import Fact, LegacyHistory
from legacy.reconcile.matching import _OPEN_START, _Facts, _t
from legacy.reconcile.model import Difference, Key, format_money


# A withdrawal in these statuses was (or is being) paid out once under the rules (§7); rejected
# and failed ones release their hold and move no money.
MADE_WITHDRAWAL = frozenset({"pending", "approved", "paid", "completed"})


def _withdrawal_rows(history: LegacyHistory, facts: _Facts) -> tuple[list[Difference], dict[Key, int]]:
    """B22: a request debited at request and again at completion; failed never refunded.
    Returns rows and the rules' withdrawals per (doctor, currency) (§7: made once)."""
    rows, made = [], defaultdict(int)
    for w in sorted(history.withdrawals.values(), key=lambda w: w.key):
        rules = -w.amount_minor if w.status in MADE_WITHDRAWAL else 0
        made[(w.doctor_id, w.currency)] -= rules
        debits = facts.debits.get(w.key, [])
        refunds = sum(f.amount_minor for f in facts.credits.get(w.key, ()))
        legacy = refunds - sum(f.amount_minor for f in debits)
        if legacy == rules:
            continue
        bug = "B22" if len(debits) >= 2 or w.status == "failed" else "unexplained"
        rows.append(Difference(
            w.key, "withdrawal", bug, None, w.doctor_id, None, 0, 0, w.currency, legacy, rules,
            f"{w.key}: a {w.status} request for {format_money(w.amount_minor, w.currency)} moved "
            f"{format_money(legacy, w.currency)} through {len(debits)} debit(s); the rules move "
            f"{format_money(rules, w.currency)} ({bug})."))
    return rows, dict(made)


def _second_debits(history: LegacyHistory) -> tuple[dict[str, str], list[Difference]]:
    """Debits left naming no withdrawal (imported before the time rule, or tied) matched again
    by `legacy.facts.match_second_debit`, in (created_at, fact id) order, with the requests the
    import already matched taken out. Returns (debit subject → withdrawal key) for `_index` and
    one "unexplained" row per debit that stays ambiguous: kept as recorded (accepted, no
    adjustment) and reported so that a person decides, never silently accepted (B22)."""
    refs: dict[tuple, list[RequestRef]] = defaultdict(list)
    for w in sorted(history.withdrawals.values(), key=lambda w: w.key):
        if w.status not in NO_SECOND_DEBIT:
            at = _t(w.paid_at or w.requested_at)
            refs[(w.doctor_id, w.amount_minor)].append(RequestRef(w.key, at))
    debits = [f for f in history.facts if f.kind == "LegacyDebit" and f.affects_balance]
    taken, alias, rows = _second_debited(history, debits), {}, []
    for f in sorted(debits, key=lambda f: (_t(f.at) or _OPEN_START, f.fact_id)):
        if not f.subject.startswith("wallet_transactions:") or (f.detail or {}).get("session_table"):
            continue  # named by its row (session, metadata, or the import's match)
        candidates = refs.get((f.doctor_id, f.amount_minor), [])
        matched, tied = match_second_debit(_t(f.at), candidates, taken)
        if matched:
            alias[f.subject] = matched
            taken.add(matched)
        elif tied:
            rows.append(_ambiguous_debit_row(f, tied))
    return alias, rows


def _second_debited(history: LegacyHistory, debits: list[Fact]) -> set[str]:
    """Requests that already have their second debit: the import matched one to it (detail
    `withdrawal_match`), or it shows two debits (request + completion)."""
    count: dict[str, int] = defaultdict(int)
    for f in debits:
        count[f.subject] += 1
    return {f.subject for f in debits if (f.detail or {}).get("withdrawal_match")
            or (f.subject in history.withdrawals and count[f.subject] >= 2)}


def _ambiguous_debit_row(f: Fact, tied: tuple[str, ...]) -> Difference:
    """The report row of a debit that fits `tied` requests equally well: no money difference."""
    money = format_money(f.amount_minor, f.currency)
    return Difference(f.subject, "withdrawal", "unexplained", None, f.doctor_id, None, 0, 0,
                      f.currency, -f.amount_minor, -f.amount_minor,
                      f"{f.subject}: a debit of {money} naming no withdrawal matches "
                      f"{len(tied)} requests of doctor {f.doctor_id} equally well by amount and "
                      f"time ({', '.join(tied)}): possibly the admin panel's second debit (B22); "
                      f"kept as recorded, decide by hand.")


def _residual_rows(facts: _Facts) -> list[Difference]:
    """B18: balance credited with no transaction row (A5's hard-coded +3500): owed nothing."""
    return [Difference(f.subject, "balance_residual", "B18", f.patient_id, f.doctor_id, None, 0, 0,
                       f.currency, f.amount_minor, 0,
                       f"{f.subject}: {format_money(f.amount_minor, f.currency)} added to doctor "
                       f"{f.doctor_id}'s balance with no transaction row and no patient charge (B18).")
            for f in facts.residual if f.amount_minor]


def _b23_rows(history: LegacyHistory, facts: _Facts) -> list[Difference]:
    """B23: withdrawable = Σ credits with payment_transaction_id − Σ debits, below the balance.
    Reported per doctor as the blocked amount, and per request legacy refused for it (a
    `rejected` request whose amount the balance covered but the verified earnings did not, at
    the time it was made), named with its id, amount and currency; no money difference (§7:
    every settled credit counts). Balance here is over transaction rows only: a B18 residual is
    reported (and undone) as B18, the rows the import rejected are kept apart."""
    money = [f for fs in (*facts.credits.values(), *facts.debits.values()) for f in fs
             if f.source != REJECTED_ROWS]
    balance, verified, unverified = defaultdict(int), defaultdict(int), set()
    for fact in money:
        key, amount = (fact.doctor_id, fact.currency), _signed(fact)
        balance[key] += amount
        if fact.kind == "LegacyDebit" or (fact.detail or {}).get("payment_transaction_id"):
            verified[key] += amount
        else:
            unverified.add(key)
    rows = []
    for key in sorted(unverified, key=lambda k: (k[0] or "", k[1] or "")):
        blocked = balance[key] - max(0, min(balance[key], verified[key]))
        if blocked > 0:
            refused = _refused_requests(history, money, key)
            rows.append(_b23_row(history, key, balance[key], verified[key], blocked, refused))
            rows.extend(refused)
    return rows


def _signed(fact: Fact) -> int:
    return fact.amount_minor if fact.kind == "LegacyCredit" else -fact.amount_minor


def _refused_requests(history: LegacyHistory, money: list[Fact], key: Key) -> list[Difference]:
    """The doctor's `rejected` requests that B23 explains: at their `requested_at`, the balance
    (Σ the doctor's money facts before it) covered the amount and the verified earnings did not."""
    doctor, currency = key
    rows = []
    for w in sorted(history.withdrawals.values(), key=lambda w: w.key):
        if (w.doctor_id, w.currency, w.status) != (doctor, currency, "rejected") \
                or w.requested_at is None:
            continue
        before = [f for f in money if (f.doctor_id, f.currency) == key
                  and f.at is not None and _t(f.at) < _t(w.requested_at)]
        balance = sum(map(_signed, before))
        verified = sum(_signed(f) for f in before if f.kind == "LegacyDebit"
                       or (f.detail or {}).get("payment_transaction_id"))
        if verified < w.amount_minor <= balance:
            rows.append(_refused_row(w, balance, verified))
    return rows


def _refused_row(w, balance: int, verified: int) -> Difference:
    money = format_money(w.amount_minor, w.currency)
    reason = f" (\"{w.reason}\")" if w.reason else ""
    return Difference(w.key, "withdrawal", "B23", None, w.doctor_id, None, 0, 0, w.currency, 0, 0,
                      f"{w.key}: the withdrawal request for {money} was refused{reason}: the "
                      f"balance held {format_money(balance, w.currency)} but legacy's 'verified "
                      f"earnings' were {format_money(verified, w.currency)} (B23); the rules let "
                      f"every settled credit count (§7).", refused_minor=w.amount_minor)


def _b23_row(history: LegacyHistory, key: Key, balance: int, verified: int, blocked: int,
             refused: list[Difference]) -> Difference:
    doctor, currency = key
    wallet = history.wallets.get(doctor)
    subject = wallet.key if wallet and wallet.key else f"users:{doctor}"
    named = "; refused: " + ", ".join(f"{r.subject} ({format_money(r.refused_minor, currency)})"
                                      for r in refused) if refused else ""
    return Difference(subject, "doctor", "B23", None, doctor, None, 0, 0, currency, 0, 0,
                      f"doctor {doctor}: balance {format_money(balance, currency)} but legacy "
                      f"'verified earnings' {format_money(verified, currency)}: "
                      f"{format_money(blocked, currency)} could not be withdrawn (B23){named}.",
                      blocked)
