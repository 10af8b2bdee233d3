"""Match the legacy facts to the items they are about and build each item twice: what legacy
did (`_Legacy`, from the imported facts only, never recomputed, I10) and what the rules owe for
the same event times (`_Item`: billing-rules.md §2 units, §3 end, §8 timeouts, §9 appointments).

Also the tariff rate of an item (§5, `_rate`) and the T5 re-attribution of "unattributed" units
to the sessions whose doctor was paid for them (`_reattribute`). Pools and the draw on them are
`legacy.reconcile.pools`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from ledger.rules import BUCKETS, Policy, billable_seconds, units_owed, utc_seconds
from ledger.tariff import TARIFFS, Rate, rate_at
from legacy.history import Appointment, CallSession, Fact, LegacyHistory, TextSession
from legacy.reconcile.model import Key


# The +1 hangup credit is written a moment after the first /end; an ended_at later than that by
# more than this is a re-end (B9), not clock noise.
END_EVIDENCE_TOLERANCE_SECONDS = 5
RESIDUAL = "balance_residual"
_OPEN_END = datetime.max.replace(tzinfo=timezone.utc)
_OPEN_START = datetime.min.replace(tzinfo=timezone.utc)


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
    """An appointment has no billable start under the rules (§2: a start is a session's
    activation or connection; §9, I10: a booking is never a charge): it owes 0 whatever its
    status. A session that served it is billed as that session; legacy's own appointment
    charges are over-billing, classified by how legacy billed them (`_classify_appointment`).
    `rate_instant` (the appointment's time) prices what legacy paid."""
    at = _t(ap.starts_at or ap.completed_at or ap.actual_start_time)
    bucket = ap.kind if ap.kind in BUCKETS else "text"  # legacy: any other type → text counter
    return _Item(ap.key, "appointment", ap.patient_id, ap.doctor_id, bucket, None, None,
                 "linked" if linked else "none", 0, None, at)


def _rate(history: LegacyHistory, item: _Item, bucket: str | None = None) -> Rate:
    """The tariff rate at the billable start (§5), of the item's bucket or of `bucket`. A doctor missing from the history is taken
    as Malawian if their legacy wallet is in MWK; no known country gets the non-Malawi rate,
    as legacy did for any country but "malawi"."""
    doctor, wallet = history.doctors.get(item.doctor_id), history.wallets.get(item.doctor_id)
    country = doctor.country if doctor else ("MW" if wallet and wallet.currency == "MWK" else None)
    country = country or "ZZ"
    return rate_at(country, bucket or item.bucket, item.rate_instant or TARIFFS[-1].effective_from)


# ------------------------------------------------------------------ items of a history, unattributed units (T5)


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
