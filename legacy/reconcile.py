"""Reconcile the legacy history against the ledger's rules, item by item, and classify every
difference by the legacy bug it matches.

What legacy did comes only from the imported facts (never recomputed, I10); what is owed comes
from `ledger.rules.units_owed` and `ledger.tariff.rate_at` applied to the same event times.
Rules: billing-rules.md §2 (units), §3 (end, exhaustion), §4 (pools), §5 (pay), §7 (withdrawals),
§8 (timeouts), §9 (appointments). Bugs: legacy-system.md §3 (formulas) and §5 (H1 … B34).

Sign conventions (every Difference): `units_*` are units taken from the patient (a grant counts
as negative units taken, B24); `paid_*_minor` is money put into the doctor's wallet (a
withdrawal counts as negative, B22). `units_over = legacy − rules` (> 0: the patient was
over-charged), `paid_over = legacy − rules` (> 0: the doctor was over-paid).

Units are judged per pool owner (balances fold per owner, §4); the rules draw block by block,
each block judged at its own start like `ledger.billing.try_hold`. Corrections
(`plan_adjustments`) are keyed by what they correct, never by the bug, and a changed correction is
recorded as a revision holding only the difference.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from ledger.rules import (BLOCK_SECONDS, BUCKETS, CALL_GRACE_SECONDS, Policy, billable_seconds,
                          block_end, units_owed, utc_seconds)
from ledger.tariff import TARIFFS, Rate, rate_at
from legacy.facts import NO_SECOND_DEBIT, RequestRef, match_second_debit
from legacy.history import (Adjustment, Appointment, CallSession, Fact, LegacyHistory, Subscription,
                            TextSession)

BUGS = ("H1", "H2", "B3", "B4", "B5", "B6", "B7", "B9", "B12", "B13", "B14", "B17", "B18",
        "B19", "B22", "B23", "B24", "B26", "unexplained")
# A withdrawal in these statuses was (or is being) paid out once under the rules (§7); rejected
# and failed ones release their hold and move no money.
MADE_WITHDRAWAL = frozenset({"pending", "approved", "paid", "completed"})
# The +1 hangup credit is written a moment after the first /end; an ended_at later than that by
# more than this is a re-end (B9), not clock noise.
END_EVIDENCE_TOLERANCE_SECONDS = 5
RESIDUAL = "balance_residual"
_OPEN_END = datetime.max.replace(tzinfo=timezone.utc)
_OPEN_START = datetime.min.replace(tzinfo=timezone.utc)
Key = tuple[str, str]


def format_money(minor: int, currency: str | None) -> str:
    """Minor units as major units with thousands separators: 700000, "MWK" → "7,000.00 MWK".

    MWK and USD both have 2 decimal places (billing-rules.md preamble).
    """
    sign = "-" if minor < 0 else ""
    major, cents = divmod(abs(minor), 100)
    return f"{sign}{major:,}.{cents:02d} {currency or ''}".rstrip()


@dataclass(frozen=True)
class Difference:
    """One difference between legacy and the rules for one subject (item key).

    `bucket` is None for money-only rows; `currency` None for units-only rows; `blocked_minor`
    is the B23 amount a doctor could not withdraw (no money difference); `account_id` is the
    owner of the pools the row's units belong to when it is not the patient (a family-plan
    member draws on the owner's pool, §4), so corrections land where the units were taken. An
    item whose units came from pools of several owners has one row per owner (units that
    owner's, the item's money on the first row only).
    """

    subject: str
    item_type: str
    bug: str
    patient_id: str | None
    doctor_id: str | None
    bucket: str | None
    units_legacy: int
    units_rules: int
    currency: str | None
    paid_legacy_minor: int
    paid_rules_minor: int
    explanation: str
    blocked_minor: int = 0
    account_id: str | None = None  # whose units these are (pool owner); None: patient_id

    @property
    def units_over(self) -> int:
        """Units legacy took beyond the rules (negative: under-charged)."""
        return self.units_legacy - self.units_rules

    @property
    def paid_over(self) -> int:
        """Minor units legacy put in the wallet beyond the rules (negative: under-paid)."""
        return self.paid_legacy_minor - self.paid_rules_minor

    def as_dict(self) -> dict:
        """Fields plus the two derived amounts (the CSV/JSON row shape)."""
        row = {name: getattr(self, name) for name in self.__dataclass_fields__}
        row.update(units_over=self.units_over, paid_over_minor=self.paid_over)
        return row

    @classmethod
    def from_dict(cls, row: dict) -> "Difference":
        """Inverse of `as_dict` (derived keys ignored)."""
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass
class Reconciliation:
    """Differences plus the rules' totals needed to state the corrected balances.

    `granted`: (patient, bucket) → units granted, one pool per payment reference (§4), owner's.
    `rules_units`: (pool owner, bucket) → units the rules take (items, per owner drawn on, +
    accepted unmatched charges).
    `rules_money`: (doctor, currency) → rules pay + accepted unmatched credits − debits −
    withdrawals made once (§5, §7). `accepted_unmatched`: subjects of facts with no item to
    judge them by (kept as legacy recorded them).
    """

    differences: list[Difference]
    items_checked: int
    accepted_unmatched: list[str] = field(default_factory=list)
    granted: dict[Key, int] = field(default_factory=dict)
    rules_units: dict[Key, int] = field(default_factory=dict)
    rules_money: dict[Key, int] = field(default_factory=dict)

    def rules_balances(self) -> tuple[dict[Key, int], dict[Key, int]]:
        """(patient units per (patient, bucket), doctor money per (doctor, currency)) by the rules."""
        units = defaultdict(int)
        for key, n in self.granted.items():
            units[key] += n
        for key, n in self.rules_units.items():
            units[key] -= n
        return dict(units), dict(self.rules_money)

    def by_bug(self) -> dict[str, dict]:
        """bug → {count, units_over, units_under, paid_over: {cur: n}, paid_under: {cur: n}, blocked}."""
        out: dict[str, dict] = {}
        for d in self.differences:
            t = out.setdefault(d.bug, {"count": 0, "units_over": 0, "units_under": 0,
                                       "paid_over": {}, "paid_under": {}, "blocked": {}})
            t["count"] += 1
            _split(t, "units_over", "units_under", d.units_over)
            if d.currency and d.paid_over:
                side = "paid_over" if d.paid_over > 0 else "paid_under"
                t[side][d.currency] = t[side].get(d.currency, 0) + abs(d.paid_over)
            if d.currency and d.blocked_minor:
                t["blocked"][d.currency] = t["blocked"].get(d.currency, 0) + d.blocked_minor
        return {bug: out[bug] for bug in BUGS if bug in out}

    def per_patient(self) -> dict[Key, dict]:
        """(patient, bucket) → {over, under}: units over- and under-charged (under as a positive)."""
        out: dict[Key, dict] = {}
        for d in self.differences:
            if d.patient_id and d.bucket and d.units_over:
                t = out.setdefault((d.patient_id, d.bucket), {"over": 0, "under": 0})
                _split(t, "over", "under", d.units_over)
        return dict(sorted(out.items()))

    def per_doctor(self) -> dict[Key, dict]:
        """(doctor, currency) → {over, under, withdrawal_over_debit, blocked} in minor units.

        Withdrawals double-debited (B22) are kept apart from pay: they are not earnings.
        """
        out: dict[Key, dict] = {}
        for d in self.differences:
            if not (d.doctor_id and d.currency) or not (d.paid_over or d.blocked_minor):
                continue
            t = out.setdefault((d.doctor_id, d.currency),
                               {"over": 0, "under": 0, "withdrawal_over_debit": 0, "blocked": 0})
            if d.item_type == "withdrawal":
                t["withdrawal_over_debit"] -= d.paid_over  # paid_over < 0 when debited twice
            else:
                _split(t, "over", "under", d.paid_over)
            t["blocked"] += d.blocked_minor
        return dict(sorted(out.items()))


def _split(totals: dict, over: str, under: str, amount: int) -> None:
    if amount > 0:
        totals[over] += amount
    elif amount < 0:
        totals[under] -= amount


# ------------------------------------------------------------------ legacy evidence


@dataclass
class _Facts:
    """Facts indexed by subject. Residual credits (balance moved with no row, B18) kept apart."""

    charges: dict[str, list[Fact]] = field(default_factory=lambda: defaultdict(list))
    credits: dict[str, list[Fact]] = field(default_factory=lambda: defaultdict(list))
    debits: dict[str, list[Fact]] = field(default_factory=lambda: defaultdict(list))
    residual: list[Fact] = field(default_factory=list)
    owners: dict[str, str] = field(default_factory=dict)  # subscription key → owner

    def account(self, charge: Fact) -> str | None:
        """Whose balance a charge came off: its subscription's owner, else its patient."""
        return self.owners.get(charge.subscription_key or "", charge.patient_id)


def _index(facts: list[Fact], alias: dict[str, str], owners: dict[str, str]) -> _Facts:
    """Charges, credits and debits by subject (`alias` maps a subject to the item it is about:
    a text_appointment_sessions row → its appointment, A6/A7). Money facts that do not move the
    balance (`affects_balance` False: total_earned/total_withdrawn residuals) are left out; a
    positive balance residual is B18 evidence, a negative one is kept as an unmatched credit."""
    out = _Facts(owners=owners)
    for fact in facts:
        if fact.subject in alias:
            fact = replace(fact, subject=alias[fact.subject])
        if fact.kind == "LegacyCharge":
            out.charges[fact.subject].append(fact)
        elif not fact.affects_balance:
            continue
        elif fact.kind == "LegacyCredit" and fact.source == RESIDUAL and fact.amount_minor > 0:
            out.residual.append(fact)
        elif fact.kind == "LegacyCredit":
            out.credits[fact.subject].append(fact)
        elif fact.kind == "LegacyDebit":
            out.debits[fact.subject].append(fact)
    return out


@dataclass(frozen=True)
class _Legacy:
    """What legacy did for one item: units per bucket and pool owner, sessions_used, money per
    currency. `by_owner[bucket][owner]` = units taken from pools owned by `owner` (a member's
    units come off the owner's pool, §4: balances fold per owner)."""

    by_owner: dict[str, dict[str, int]]
    recorded: int | None
    paid: dict[str, int]
    charge_rows: int
    credit_rows: int
    reattributed: int = 0  # unattributed units matched to this item (T5, see _reattribute)
    client_billed: bool = False  # billed by the legacy text-appointment endpoints (A6/A7, B19)

    @property
    def charged(self) -> dict[str, int]:
        """Units per bucket, all owners together."""
        return {bucket: sum(owners.values()) for bucket, owners in self.by_owner.items()}

    def units(self, bucket: str) -> int:
        return sum(self.by_owner.get(bucket, {}).values())

    def owners(self, bucket: str) -> dict[str, int]:
        """owner → units legacy took in `bucket` (owners with 0 left out)."""
        return {o: n for o, n in self.by_owner.get(bucket, {}).items() if n}


def _legacy_of(subject: str, facts: _Facts, recorded: int | None) -> _Legacy:
    """Legacy's figures for `subject`: units per bucket and pool owner, `recorded`
    (sessions_used), money per currency (credits − debits), row counts, A6/A7 evidence."""
    charges, credits = facts.charges.get(subject, []), facts.credits.get(subject, [])
    by_owner: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    paid: dict[str, int] = defaultdict(int)
    for fact in charges:
        by_owner[fact.bucket or "text"][facts.account(fact)] += fact.units
    for fact in credits:
        paid[fact.currency] += fact.amount_minor
    for fact in facts.debits.get(subject, ()):
        paid[fact.currency] -= fact.amount_minor
    client = any((f.detail or {}).get("session_type") == "text_appointment" for f in credits) \
        or any(f.source.startswith("text_appointment_sessions:") for f in charges)
    return _Legacy({b: dict(o) for b, o in by_owner.items()}, recorded, dict(paid),
                   len(charges), len(credits), client_billed=client)


# ------------------------------------------------------------------ rules: event times


@dataclass
class _Item:
    """One billable item as the rules see it. `owed` is by time alone (§2); `rules_units` is
    after the patient's pools (§3 exhaustion, §4), `drawn` the same units per pool owner (in
    draw order) and `exhausted_at` the block start at which no pool was usable (the rules end
    the item there, balance_exhausted; None: every owed unit was paid). `end_cause`: ended |
    first_end | idle | max_duration | never_ended | none. `legacy_seconds`: start → legacy
    ended_at."""

    subject: str
    item_type: str
    patient_id: str
    doctor_id: str
    bucket: str
    start: datetime | None
    end: datetime | None
    end_cause: str
    owed: int
    legacy_seconds: int | None
    rate_instant: datetime | None
    rules_units: int = 0
    drawn: dict[str, int] = field(default_factory=dict)  # pool owner → units, draw order
    exhausted_at: datetime | None = None


def _t(moment: datetime | None) -> datetime | None:
    return utc_seconds(moment) if moment is not None else None


def _capped_end(start: datetime, ended_at: datetime | None, idle_from: datetime | None,
                idle: int, policy: Policy) -> tuple[datetime, str]:
    """Earliest of the reported end, the idle timeout and max_duration (§8), and which won.

    `idle_from` None means no activity evidence: the idle cap applies only to a session that
    never ended (then from its billable start).
    """
    caps = [(start + timedelta(seconds=policy.max_duration_seconds), "max_duration")]
    if idle_from is not None or ended_at is None:
        base = max(start, idle_from or start)
        caps.append((base + timedelta(seconds=idle), "idle"))
    if ended_at is not None:
        caps.append((max(ended_at, start), "ended"))
    end, cause = min(caps, key=lambda c: (c[0], c[1] != "ended"))
    return end, ("never_ended" if ended_at is None else cause)


def _text_item(ts: TextSession, policy: Policy) -> _Item:
    """Text: start = activated_at; end = ended_at capped by idle/max (§2, §8); B12 if never ended."""
    start, ended_at = _t(ts.activated_at), _t(ts.ended_at)
    item = _Item(ts.key, "text_session", ts.patient_id, ts.doctor_id, "text", start, None, "none",
                 0, None, start)
    if start is None:
        return item
    item.end, item.end_cause = _capped_end(start, ended_at, _t(ts.last_activity_at),
                                           policy.text_idle_seconds, policy)
    item.owed = units_owed("text", start, item.end)
    item.legacy_seconds = billable_seconds(start, ended_at) if ended_at else None
    return item


def _first_end(credits: list[Fact]) -> datetime | None:
    """The first /end as the legacy rows show it: the +1 hangup credit's time (B9 evidence)."""
    times = [_t(f.at) for f in credits
             if f.at is not None and (f.detail or {}).get("session_table") == "call_sessions_manual"]
    return min(times) if times else None


def _call_item(cs: CallSession, facts: _Facts, policy: Policy) -> _Item:
    """Call: start = connected_at (fallback answered_at); declined/missed → 0; end = the
    earliest end shown (ended_at or the first /end's credit, §3), capped by max_duration."""
    bucket = "voice" if cs.call_type in ("voice", "audio") else "video"
    start = _t(cs.connected_at or cs.answered_at)
    if cs.declined_at is not None or cs.status in ("declined", "missed"):
        start = None
    item = _Item(cs.key, "call_session", cs.patient_id, cs.doctor_id, bucket, start, None,
                 "none", 0, None, start)
    if start is None:
        return item
    ended_at = _t(cs.ended_at)
    # Legacy calls had no activity pings, so last_activity_at only dates a call that never ended.
    idle_from = _t(cs.last_activity_at) if ended_at is None else None
    item.end, item.end_cause = _capped_end(start, ended_at, idle_from, policy.call_idle_seconds, policy)
    first = _first_end(facts.credits.get(cs.key, []))
    if ended_at and first and item.end > first + timedelta(seconds=END_EVIDENCE_TOLERANCE_SECONDS):
        item.end, item.end_cause = max(first, start), "first_end"
    item.owed = units_owed(bucket, start, item.end)
    item.legacy_seconds = billable_seconds(start, ended_at) if ended_at else None
    return item


def _linked_appointments(history: LegacyHistory) -> set[str]:
    """Appointments served by a session: billed only through that session (§9, I10)."""
    linked = {a.key for a in history.appointments.values() if a.session_key}
    sessions = list(history.text_sessions.values()) + list(history.call_sessions.values())
    linked.update(s.appointment_key for s in sessions if s.appointment_key)
    return linked


def _appointment_item(ap: Appointment, legacy: _Legacy, linked: bool) -> _Item:
    """Unlinked completed appointment: its one legacy unit is accepted (§9: legacy charges are
    imported, not recomputed); linked or not completed: 0."""
    at = _t(ap.starts_at or ap.completed_at or ap.actual_start_time)
    bucket = ap.kind if ap.kind in BUCKETS else "text"  # legacy: any other type → text counter
    accepted = 0 if linked or ap.status != "completed" else min(legacy.units(bucket), 1)
    return _Item(ap.key, "appointment", ap.patient_id, ap.doctor_id, bucket, at if accepted else None,
                 None, "linked" if linked else "none", accepted, None, at)


# ------------------------------------------------------------------ rules: pools (§4)


@dataclass
class _Pool:
    key: str
    owner: str
    holders: set[str]
    starts: datetime
    ends: datetime
    granted: dict[str, int]
    free: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.free = dict(self.granted)  # what is left as the rules draw on it


def _effective_end(sub: Subscription) -> datetime:
    """starts_at + duration (+7 days for a 30-day plan, §4); legacy end_date if unknown."""
    if sub.starts_at is not None and sub.plan_duration_days:
        extra = 7 if sub.plan_duration_days == 30 else 0
        return _t(sub.starts_at) + timedelta(days=sub.plan_duration_days + extra)
    return _t(sub.ends_at) or _OPEN_END


def _pools(history: LegacyHistory, facts: _Facts) -> tuple[list[_Pool], list[Difference]]:
    """One pool per payment reference (the first grant; later ones are B24 rows), with its
    active members; plus a pool per unknown subscription a charge names (deleted rows, B25),
    holding exactly the units legacy took from it."""
    groups: dict[str, list[Subscription]] = defaultdict(list)
    for sub in history.subscriptions.values():
        groups[sub.payment_reference or sub.key].append(sub)
    pools, dups, by_sub = [], [], {}
    for ref, subs in sorted(groups.items()):
        first, *rest = sorted(subs, key=lambda s: (_t(s.starts_at) or _OPEN_START, s.key))
        pool = _Pool(first.key, first.owner_id, {s.owner_id for s in subs},
                     _t(first.starts_at) or _OPEN_START, _effective_end(first), dict(first.granted))
        pools.append(pool)
        by_sub.update((s.key, pool) for s in subs)
        dups.extend(_b24_rows(ref, first, rest))
    for member in history.members.values():
        if member.status == "active" and member.subscription_key in by_sub:
            by_sub[member.subscription_key].holders.add(member.patient_id)
    pools.extend(_unknown_pools(history, facts))
    return pools, dups


def _unknown_pools(history: LegacyHistory, facts: _Facts) -> list[_Pool]:
    free: dict[Key, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for charges in facts.charges.values():
        for f in charges:
            if f.subscription_key not in history.subscriptions and f.patient_id:
                free[(f.subscription_key or "none", f.patient_id)][f.bucket or "text"] += f.units
    return [_Pool(f"unknown:{sub}:{patient}", patient, {patient}, _OPEN_START, _OPEN_END, dict(units))
            for (sub, patient), units in sorted(free.items())]


def _b24_rows(ref: str, first: Subscription, rest: list[Subscription]) -> list[Difference]:
    """B24: every later grant under one payment reference is over-granted (§4: one pool)."""
    rows = []
    for sub in rest:
        for bucket, n in sorted(sub.granted.items()):
            if n:
                rows.append(Difference(
                    sub.key, "subscription", "B24", sub.owner_id, None, bucket, -n, 0, None, 0, 0,
                    f"{sub.key}: payment {ref} was granted twice ({first.key} and {sub.key}); "
                    f"the second grant's {n} {bucket} unit(s) are over-granted (B24)."))
    return rows


def _draw_one(pools: list[_Pool], bucket: str, instant: datetime) -> str | None:
    """Take one unit of `bucket` for a block starting at `instant` from the first of `pools`
    (sorted soonest-expiring first, §4) usable then (starts ≤ instant < effective end, a free
    unit left); returns the pool's owner, or None when no pool is usable (exhaustion)."""
    for pool in pools:  # bounded: the holder's pools
        if pool.starts <= instant < pool.ends and pool.free.get(bucket, 0) > 0:
            pool.free[bucket] -= 1
            return pool.owner
    return None


def _allocate(items: list[_Item], pools: list[_Pool]) -> None:
    """Give each item the units its patient's pools pay, block by block as the ledger holds
    them (`ledger.billing.try_hold`): block k (k ≥ 0) is judged at its own start
    `block_end(start, k)`, from the usable pool that expires first (§4). The first block with
    no usable pool ends the item there (§3 exhaustion): `exhausted_at`, no later block drawn.

    Blocks of all items are drawn in the order of their start instants (ties: billable start,
    subject), so overlapping sessions of one pool share it as they would have live. Unmatched
    charges (e.g. the importer's "unattributed" consumption, dated at the pool's start) do not
    draw: they are kept as legacy recorded them and must not cut sessions short.
    """
    by_holder: dict[str, list[_Pool]] = defaultdict(list)
    for pool in sorted(pools, key=lambda p: (p.ends, p.starts, p.key)):
        for holder in sorted(pool.holders):
            by_holder[holder].append(pool)
    work = {i.subject: i for i in items if i.start is not None and i.owed > 0}
    queue = [(i.start, i.start, i.subject) for i in work.values()]
    heapq.heapify(queue)
    while queue:  # bounded: each item pushes at most `owed` entries, one per block
        instant, start, subject = heapq.heappop(queue)
        item = work[subject]
        owner = _draw_one(by_holder.get(item.patient_id, []), item.bucket, instant)
        if owner is None:
            item.exhausted_at = instant
            continue
        item.drawn[owner] = item.drawn.get(owner, 0) + 1
        item.rules_units += 1
        if item.rules_units < item.owed:
            heapq.heappush(queue, (block_end(start, item.rules_units), start, subject))


# ------------------------------------------------------------------ classification


def _rate(history: LegacyHistory, item: _Item) -> Rate:
    """The tariff rate at the billable start (§5). A doctor missing from the history is taken
    as Malawian if their legacy wallet is in MWK; no known country gets the non-Malawi rate,
    as legacy did for any country but "malawi"."""
    doctor, wallet = history.doctors.get(item.doctor_id), history.wallets.get(item.doctor_id)
    country = doctor.country if doctor else ("MW" if wallet and wallet.currency == "MWK" else None)
    country = country or "ZZ"
    return rate_at(country, item.bucket, item.rate_instant or TARIFFS[-1].effective_from)


@dataclass(frozen=True)
class _Case:
    """What classification looks at for one item: legacy units `c` in the item's bucket, money
    paid `paid` (all currencies), the rules' units and per-unit pay, and patients holding a
    duplicate grant (B24)."""

    item: _Item
    lg: _Legacy
    c: int
    paid: int
    unit_pay: int
    dup_patients: frozenset[str]

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
    """Appointment bugs (legacy-system.md §3.4, A1–A7, B17, B19): billed only through its
    session; an unlinked completed one keeps one unit at the tariff rate."""
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
    return _rate_only(case) or ("unexplained", "appointment billing differs from one unit at "
                                               "the tariff rate")


def _rate_only(case: _Case) -> tuple[str, str] | None:
    """Units agree, money does not: name the per-unit amount legacy paid (B16 hint for calls
    paid at the text rate under legacy-2025)."""
    if case.c != case.item.rules_units or not case.c or case.paid % case.c:
        return None
    per_unit = case.paid // case.c
    hint = " (legacy's rate key fell back to the text rate, legacy-system.md B16)" \
        if case.item.bucket != "text" and per_unit < case.unit_pay else ""
    return "unexplained", f"units agree but legacy paid {per_unit} minor units per unit against " \
                          f"the tariff's {case.unit_pay}{hint}"


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
    Reported as the blocked amount; no money difference (§7: every settled credit counts).
    Balance here is over transaction rows only: a B18 residual is reported (and undone) as B18."""
    balance, verified, unverified = defaultdict(int), defaultdict(int), set()
    for fact in (f for fs in facts.credits.values() for f in fs):
        key = (fact.doctor_id, fact.currency)
        balance[key] += fact.amount_minor
        if (fact.detail or {}).get("payment_transaction_id"):
            verified[key] += fact.amount_minor
        else:
            unverified.add(key)
    for fact in (f for fs in facts.debits.values() for f in fs):
        balance[(fact.doctor_id, fact.currency)] -= fact.amount_minor
        verified[(fact.doctor_id, fact.currency)] -= fact.amount_minor
    rows = []
    for key in sorted(unverified, key=lambda k: (k[0] or "", k[1] or "")):
        blocked = balance[key] - max(0, min(balance[key], verified[key]))
        if blocked > 0:
            rows.append(_b23_row(history, key, balance[key], verified[key], blocked))
    return rows


def _b23_row(history: LegacyHistory, key: Key, balance: int, verified: int, blocked: int) -> Difference:
    doctor, currency = key
    wallet = history.wallets.get(doctor)
    subject = wallet.key if wallet and wallet.key else f"users:{doctor}"
    return Difference(subject, "doctor", "B23", None, doctor, None, 0, 0, currency, 0, 0,
                      f"doctor {doctor}: balance {format_money(balance, currency)} but legacy "
                      f"'verified earnings' {format_money(verified, currency)}: "
                      f"{format_money(blocked, currency)} could not be withdrawn (B23).", blocked)


# ------------------------------------------------------------------ entry points


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
        rows.extend(_judge(item, row, lg, rate, item.subject in linked, dups))
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


def _items(history: LegacyHistory, facts: _Facts, policy: Policy,
           linked: set[str]) -> list[tuple[_Item, object, _Legacy]]:
    """(rules view, legacy row, legacy figures) of every session and appointment."""
    out = []
    for ts in history.text_sessions.values():
        out.append((_text_item(ts, policy), ts, _legacy_of(ts.key, facts, ts.sessions_used)))
    for cs in history.call_sessions.values():
        out.append((_call_item(cs, facts, policy), cs, _legacy_of(cs.key, facts, cs.sessions_used)))
    for ap in history.appointments.values():
        lg = _legacy_of(ap.key, facts, None)
        out.append((_appointment_item(ap, lg, ap.key in linked), ap, lg))
    return out


def _reattribute(history: LegacyHistory, facts: _Facts, items: list,
                 orphans: list[Fact]) -> tuple[list, dict]:
    """Match "unattributed" units to the sessions whose doctor was paid for more units than
    the session's charges show, same bucket, from the pools of the owners the session could draw
    on (`_owners_for`), in billable-start order.

    Why: T5 (check-response's end, legacy-system.md §3.2) pays first and never records
    sessions_used, so the importer can only charge its units to the subscription
    ("unattributed"). Left there they would be accepted on top of the rules' units for the same
    session. Returns the items with their legacy figures updated and units taken per fact_id.
    """
    spare: dict[Key, list[list]] = defaultdict(list)  # (owner, bucket) → [[fact_id, units left]]
    for f in sorted(orphans, key=lambda f: (_t(f.at) or _OPEN_START, f.fact_id)):
        if f.source == "unattributed" and f.units > 0 and f.patient_id:
            spare[(facts.account(f), f.bucket or "text")].append([f.fact_id, f.units])
    taken: dict[str, int] = defaultdict(int)
    out = []
    for item, row, lg in sorted(items, key=lambda t: (t[0].start or _OPEN_START, t[0].subject)):
        want = _extra_paid_units(history, item, lg)
        got: dict[str, int] = {}
        for owner in _owners_for(item, lg) if want else ():
            n = _take_spare(spare.get((owner, item.bucket), []), want - sum(got.values()), taken)
            got[owner] = n
        if sum(got.values()):
            owners = lg.owners(item.bucket)
            for owner, n in got.items():
                owners[owner] = owners.get(owner, 0) + n
            lg = replace(lg, by_owner={**lg.by_owner, item.bucket: owners},
                         reattributed=sum(got.values()))
        out.append((item, row, lg))
    return out, dict(taken)


def _owners_for(item: _Item, lg: _Legacy) -> list[str]:
    """Pool owners whose spare units an item may take, most likely first: those the rules drew
    on (draw order), those legacy charged, then the patient."""
    return list(dict.fromkeys([*item.drawn, *lg.owners(item.bucket), item.patient_id]))


def _take_spare(slots: list[list], want: int, taken: dict[str, int]) -> int:
    """Take up to `want` units from `slots` ([fact_id, units left], in order), noting per fact
    in `taken`; returns the units taken."""
    got = 0
    for slot in slots:  # bounded: the unattributed facts of one (owner, bucket)
        if got >= want:
            break
        n = min(want - got, slot[1])
        slot[1], got, taken[slot[0]] = slot[1] - n, got + n, taken[slot[0]] + n
    return got


def _extra_paid_units(history: LegacyHistory, item: _Item, lg: _Legacy) -> int:
    """Whole units paid (at the tariff rate) beyond the units charged; 0 for appointments."""
    if item.item_type == "appointment":
        return 0
    rate = _rate(history, item)
    paid = lg.paid.get(rate.currency, 0)
    return max(0, paid // rate.pay_minor - lg.units(item.bucket)) if rate.pay_minor else 0


_B26 = ("legacy took the units from other owners' pools than the rules: it drew the oldest " +
        "start_date first, the rules the usable pool that expires first (§4)")


def _judge(item: _Item, row, lg: _Legacy, rate: Rate, linked: bool,
           dup_patients: frozenset[str]) -> list[Difference]:
    """The difference rows of one item (none when legacy charged and paid what the rules owe)."""
    rules_pay = item.rules_units * rate.pay_minor
    charged = {b: n for b, n in lg.charged.items() if n}
    paid = {c: n for c, n in lg.paid.items() if n}
    if charged == ({item.bucket: item.rules_units} if item.rules_units else {}) \
            and paid == ({rate.currency: rules_pay} if rules_pay else {}):
        if lg.owners(item.bucket) == {o: n for o, n in item.drawn.items() if n}:
            return []  # the common case: no difference, nothing to classify
        return _item_rows(item, lg, rate, "B26", _B26)  # same totals, other owners' pools
    case = _Case(item, lg, lg.units(item.bucket), sum(lg.paid.values()), rate.pay_minor, dup_patients)
    if isinstance(row, TextSession):
        bug, why = _classify_text(row, case)
    elif isinstance(row, CallSession):
        bug, why = _classify_call(row, case)
    else:
        bug, why = _classify_appointment(case, linked)
    return _item_rows(item, lg, rate, bug, why)


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


def _granted(pools: list[_Pool]) -> dict[Key, int]:
    """Units granted per (owner, bucket), one pool per payment reference; unknown pools excluded
    (their units are the legacy charges themselves, not a grant the history shows)."""
    out = defaultdict(int)
    for pool in pools:
        if not pool.key.startswith("unknown:"):
            for bucket, n in pool.granted.items():
                out[(pool.owner, bucket)] += n
    return dict(out)


# ------------------------------------------------------------------ apply


AdjustmentKey = tuple[str, str, str | None, str | None]
REVISION = "#r"  # adjustment_id suffix of a revision: "<base id>#r<n>", n ≥ 1


def plan_adjustments(rec: Reconciliation, history: LegacyHistory | None = None) -> list[Adjustment]:
    """The corrections that make every balance what the rules give, sorted by id.

    Without `history`: the target of every correction, one per (subject, what), ids
    f"{subject}:units-{bucket}" (+ f"-{account_id}" when the units are a pool owner's other
    than the patient) and f"{subject}:pay-{currency}", deterministic and free of the bug name,
    so that a relabelled item (B3 → B12 after a policy change) keeps its ids. Units:
    +units_over back to `account_id or patient_id`; money: −paid_over to the doctor (rows
    sharing an id are summed). B23 rows carry none.

    With `history`: only what is still missing beside the adjustments it holds, matched by
    what they correct (`_target_key`: subject, units/pay, bucket/currency, owner/doctor), not
    by id or bug. Nothing recorded → the target itself; recorded with another total (facts,
    rules or classification changed) → the difference alone, as a revision
    f"{base}{REVISION}{n}" carrying the current bug ("reversed" when no correction is owed
    any more). Folding facts + every adjustment then gives `rec.rules_balances()`.
    """
    targets = _targets(rec)
    if history is None:
        return sorted(targets.values(), key=lambda a: a.adjustment_id)
    recorded, ids = _recorded(history), {a.adjustment_id for a in history.adjustments}
    out = []
    for key in sorted(set(targets) | set(recorded), key=lambda k: tuple(map(str, k))):
        target, before = targets.get(key), recorded.get(key, [])
        delta = _amount(target) - sum(map(_amount, before))
        if delta and not before:
            out.append(target)
        elif delta:
            out.append(_revision(target, before, delta, ids))
    return sorted(out, key=lambda a: a.adjustment_id)


def _targets(rec: Reconciliation) -> dict[AdjustmentKey, Adjustment]:
    """Target adjustment per key from the difference rows (rows sharing a key summed)."""
    out: dict[AdjustmentKey, Adjustment] = {}
    for d in rec.differences:
        if d.units_over and d.bucket:
            owner = f"-{d.account_id}" if d.account_id else ""
            _add(out, Adjustment(f"{d.subject}:units-{d.bucket}{owner}", d.subject, d.bug,
                                 patient_id=d.account_id or d.patient_id, bucket=d.bucket,
                                 units=d.units_over))
        if d.paid_over and d.currency:
            _add(out, Adjustment(f"{d.subject}:pay-{d.currency}", d.subject, d.bug,
                                 doctor_id=d.doctor_id, amount_minor=-d.paid_over,
                                 currency=d.currency))
    return {key: a for key, a in out.items() if _amount(a)}


def _add(out: dict[AdjustmentKey, Adjustment], adjustment: Adjustment) -> None:
    key = _target_key(adjustment)
    same = out.get(key)
    if same is not None:
        adjustment = replace(same, units=same.units + adjustment.units,
                             amount_minor=same.amount_minor + adjustment.amount_minor)
    out[key] = adjustment


def _target_key(a: Adjustment) -> AdjustmentKey:
    """What an adjustment corrects, whatever its id or bug: (subject, "pay", currency, doctor)
    for money, (subject, "units", bucket, owner) for units."""
    if a.currency is not None:
        return (a.subject, "pay", a.currency, a.doctor_id)
    return (a.subject, "units", a.bucket, a.patient_id)


def _amount(a: Adjustment | None) -> int:
    """The signed amount an adjustment moves (units or minor units); 0 for None."""
    if a is None:
        return 0
    return a.amount_minor if a.currency is not None else a.units


def _recorded(history: LegacyHistory) -> dict[AdjustmentKey, list[Adjustment]]:
    """The recorded adjustments by key, in log order."""
    out: dict[AdjustmentKey, list[Adjustment]] = defaultdict(list)
    for a in history.adjustments:
        out[_target_key(a)].append(a)
    return dict(out)


def _revision(target: Adjustment | None, before: list[Adjustment], delta: int,
              ids: set[str]) -> Adjustment:
    """The difference `delta` as a new adjustment: id f"{base}#r{n}" with the first n ≥ 1 not
    recorded (base: the target's id, else the first recorded id without its suffix)."""
    template = target or replace(before[0], bug="reversed")
    base = target.adjustment_id if target else before[0].adjustment_id.split(REVISION)[0]
    n = next(n for n in range(1, len(ids) + 2) if f"{base}{REVISION}{n}" not in ids)
    amounts = {"amount_minor": delta} if template.currency is not None else {"units": delta}
    return replace(template, adjustment_id=f"{base}{REVISION}{n}", **amounts)


def changed_adjustments(planned: list[Adjustment], history: LegacyHistory) -> list[str]:
    """Ids of targets (`plan_adjustments(rec)`, without history) whose key the history already
    holds with another total, plus the first id of keys recorded but no longer owed: the facts,
    the rules or the classification changed since. `plan_adjustments(rec, history)` records the
    difference as a revision; these are what the command warns about."""
    recorded, targets = _recorded(history), {_target_key(a): a for a in planned}
    changed = [a.adjustment_id for key, a in targets.items()
               if key in recorded and _amount(a) != sum(map(_amount, recorded[key]))]
    changed += [before[0].adjustment_id for key, before in recorded.items()
                if key not in targets and sum(map(_amount, before))]
    return sorted(changed)


def apply_adjustments(app, adjustments: list[Adjustment]) -> int:
    """Record each adjustment as its own ReconciliationAdjustment in the legacy log; returns how
    many were new (0 on a second run: ids are uuid5 of adjustment_id)."""
    from legacy.adjustments import ReconciliationAdjustment

    return app.save_new([ReconciliationAdjustment.of(a) for a in adjustments])
