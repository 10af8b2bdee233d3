"""Invariants I1–I10 of billing-rules.md §6, checked over the EVENT LOG and the money.

* `check_I1_no_double_charge` … `check_I10_billing_only_from_session_events` take the decoded
  event log (and, where needed, the ledger or what the driver recorded) and raise AssertionError.
  They recompute everything from events; they never trust the aggregates' derived sets.
* `test_I1_…` … `test_I10_…` run each check on a small handcrafted scenario, and on a doctored
  copy of its log, so the check is shown to catch the violation it names.
* `LedgerMachine` (Hypothesis RuleBasedStateMachine, POPO) drives doctors, pools (stacked and
  family), members, every kind of session, ticks (also duplicated and racing), duplicate and
  late posts, and replays; after every step it runs the checks.
* `test_I9_…_hypothesis` runs generated scenarios under several tick schedules and compares money.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from eventsourcing.persistence import IntegrityError
from hypothesis import event as hevent
from hypothesis import given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from conftest import T0, FakeClock, make_ledger
from ledger import errors
from ledger.billing import Work, apply_step, next_step
from ledger.domain import Doctor, Patient, Pool, Session, Wallet
from ledger.rules import BUCKETS, block_end, units_owed
from ledger.application import Ledger
from test_billing import MIN, MW_RATE, S, Desk, log, name

# Event types of §8 that concern one session; everything else is not a billing trigger (I10).
SESSION_EVENT_TYPES = frozenset({
    "session.requested", "session.patient_message", "text.activated", "call.ringing",
    "call.connected", "call.declined", "session.activity", "session.ended",
    "call.participant_joined", "call.participant_left", "call.room_ended"})
CHARGE_EVENTS = frozenset({"Pool.Charged", "Pool.Reversed", "Session.AutoDeducted",
                           "Wallet.Credited"})


# ============================================================================ folds over the log


@dataclass
class PoolFold:
    granted: dict
    free: dict
    held: dict = field(default_factory=dict)  # "sid#block" -> bucket
    charged: dict = field(default_factory=dict)  # "sid#block" -> bucket (net of reversals)
    ever_charged: Counter = field(default_factory=Counter)
    reversed: Counter = field(default_factory=Counter)
    forfeited: Counter = field(default_factory=Counter)
    revoked: Counter = field(default_factory=Counter)
    expired: bool = False
    refunded: bool = False


@dataclass
class SessionFold:
    session_id: str
    kind: str
    patient_id: str
    doctor_id: str
    starts: list = field(default_factory=list)  # (position, at, rate)
    ends: list = field(default_factory=list)  # Ended events
    holds: dict = field(default_factory=dict)  # block -> pool_id (live holds)
    ever_held: set = field(default_factory=set)
    deducted: list = field(default_factory=list)  # AutoDeducted events
    settled: object = None
    reports: list = field(default_factory=list)  # provider reports: (at, action, role)
    stamped_rate: dict | None = None  # RateStamped: a start known only from provider reports

    @property
    def start(self) -> datetime | None:
        """The earliest reported start or the providers' connect (issue 4), recomputed here."""
        candidates = [at for _, at, _ in self.starts] + [provider_connect(self.reports)]
        return min((at for at in candidates if at is not None), default=None)

    @property
    def rate(self) -> dict | None:
        return self.starts[0][2] if self.starts else self.stamped_rate

    @property
    def ended_at(self) -> datetime | None:
        return min((e.ended_at for e in self.ends), default=None)

    def net_units(self) -> int:
        s = self.settled
        return len(self.deducted) + (len(s.charged) - len(s.reversed) if s else 0)


def provider_connect(reports: list) -> datetime | None:
    """The first instant both the patient and the doctor are in the room, before its end
    (independent of ledger/presence.py: a sweep over the reports in provider time)."""
    order = {"joined": 0, "left": 1, "room_ended": 2}
    inside = Counter()
    for at, action, role in sorted(reports, key=lambda r: (r[0], order[r[1]], r[2])):
        if action == "room_ended":
            return None
        inside[role] = max(0, inside[role] + (1 if action == "joined" else -1))
        if inside["patient"] > 0 and inside["doctor"] > 0:
            return at
    return None


@dataclass
class WalletFold:
    doctor_id: str
    currency: str
    credited: int = 0
    held: int = 0
    withdrawn: int = 0
    credits: Counter = field(default_factory=Counter)  # session_id -> amount
    earned: Counter = field(default_factory=Counter)  # consultation_id -> released share (§10)

    @property
    def available(self) -> int:
        return self.credited - self.held - self.withdrawn


@dataclass
class Folded:
    pools: dict[object, PoolFold]
    sessions: dict[object, SessionFold]
    wallets: dict[tuple, WalletFold]
    by_sid: dict[str, SessionFold]


def fold(events, on_step=None) -> Folded:
    """Replay the log in order with independent code; `on_step(i, folded)` sees every prefix."""
    pools: dict = {}
    sessions: dict = {}
    wallets: dict = {}
    wallet_keys: dict = {}
    by_sid: dict = {}
    out = Folded(pools, sessions, wallets, by_sid)
    for i, e in enumerate(events):
        n, oid = name(e), e.originator_id
        if n == "Pool.Granted":
            units = {b: int(e.plan["units"].get(b, 0)) for b in BUCKETS}
            pools[oid] = PoolFold(dict(units), dict(units))
        elif n.startswith("Pool."):
            p = pools[oid]
            if n == "Pool.Held":
                key = f"{e.session_id}#{e.block}"
                assert key not in p.held and key not in p.charged, f"{key} held twice in pool"
                p.free[e.bucket] -= 1
                p.held[key] = e.bucket
            elif n == "Pool.Charged":
                key = f"{e.session_id}#{e.block}"
                assert p.held.get(key) == e.bucket, f"I3: {key} charged without a held unit"
                del p.held[key]
                p.charged[key] = e.bucket
                p.ever_charged[key] += 1
            elif n in ("Pool.Released", "Pool.Reversed"):
                key = f"{e.session_id}#{e.block}"
                src = p.held if n == "Pool.Released" else p.charged
                assert src.get(key) == e.bucket, f"{n} of {key} that is not there"
                del src[key]
                if n == "Pool.Reversed":
                    p.reversed[e.bucket] += 1
                if e.forfeited:
                    p.forfeited[e.bucket] += 1
                elif e.revoked:
                    p.revoked[e.bucket] += 1
                else:
                    p.free[e.bucket] += 1
            elif n == "Pool.Expired":
                for b, k in e.forfeited.items():
                    assert k == p.free[b], "Expired must forfeit exactly the free units"
                    p.free[b] -= k
                    p.forfeited[b] += k
                p.expired = True
            elif n == "Pool.Revoked":
                for b, k in e.revoked.items():
                    assert k == p.free[b], "Revoked must revoke exactly the free units"
                    p.free[b] -= k
                    p.revoked[b] += k
                p.refunded = True
        elif n == "Session.Requested":
            s = SessionFold(e.session_id, e.kind, e.patient_id, e.doctor_id)
            s.holds[1] = e.pool_id
            s.ever_held.add(1)
            sessions[oid] = by_sid[e.session_id] = s
        elif n.startswith("Session."):
            s = sessions[oid]
            if n in ("Session.Activated", "Session.Connected"):
                s.starts.append((i, e.at, e.rate))
            elif n == "Session.PresenceRecorded":
                s.reports.append((e.at, e.action, e.role))
            elif n == "Session.RateStamped":
                s.stamped_rate = s.stamped_rate or e.rate
            elif n == "Session.BlockHeld":
                assert e.block not in s.holds, f"block {e.block} of {s.session_id} held twice"
                s.holds[e.block] = e.pool_id
                s.ever_held.add(e.block)
            elif n == "Session.AutoDeducted":
                assert s.holds.get(e.n) == e.pool_id, \
                    f"I3: block {e.n} of {s.session_id} deducted without a hold"
                del s.holds[e.n]
                s.deducted.append(e)
            elif n == "Session.Ended":
                s.ends.append(e)
            elif n == "Session.Settled":
                assert s.settled is None, f"{s.session_id} settled twice"
                for item in e.charged:
                    assert s.holds.pop(item["block"]) == item["pool_id"]
                for item in e.released:
                    assert s.holds.pop(item["block"]) == item["pool_id"]
                s.settled = e
        elif n == "Wallet.Opened":
            w = WalletFold(e.doctor_id, e.currency)
            wallet_keys[oid] = (e.doctor_id, e.currency)
            wallets[(e.doctor_id, e.currency)] = w
        elif n.startswith("Wallet."):
            w = wallets[wallet_keys[oid]]
            if n == "Wallet.Credited":
                w.credited += e.amount_minor
                w.credits[e.session_id] += e.amount_minor
            elif n == "Wallet.EarningCredited":  # a priced consultation's share (§10)
                w.credited += e.amount_minor
                w.earned[e.consultation_id] += e.amount_minor
            elif n == "Wallet.WithdrawalHeld":
                w.held += e.amount_minor
            elif n == "Wallet.WithdrawalCompleted":
                w.held -= e.amount_minor
                w.withdrawn += e.amount_minor
            elif n == "Wallet.WithdrawalReleased":
                w.held -= e.amount_minor
        if on_step is not None:
            on_step(i, e, out)
    return out


def events_of(ledger: Ledger) -> list:
    return log(ledger)


# =================================================================================== the checks


def check_I1_no_double_charge(events) -> None:
    """Each (session, block) is charged at most once in the log, in the session and the pool."""
    per_session: dict = defaultdict(Counter)
    per_pool: Counter = Counter()
    settled: Counter = Counter()
    for e in events:
        n = name(e)
        if n == "Session.AutoDeducted":
            per_session[e.originator_id][e.n] += 1
        elif n == "Session.Settled":
            settled[e.originator_id] += 1
            for item in e.charged:
                per_session[e.originator_id][item["block"]] += 1
        elif n == "Pool.Charged":
            per_pool[(e.session_id, e.block)] += 1
    for sid, blocks in per_session.items():
        twice = sorted(b for b, k in blocks.items() if k > 1)
        assert not twice, f"I1: session {sid} charged blocks {twice} more than once"
    twice = sorted(k for k, c in per_pool.items() if c > 1)
    assert not twice, f"I1: pool charges repeated for {twice}"
    assert all(c == 1 for c in settled.values()), "I1: a session was settled twice"
    # Session-side and pool-side charges are the same set of (session, block).
    folded = fold(events)
    session_side = Counter()
    for s in folded.sessions.values():
        for d in s.deducted:
            session_side[(s.session_id, d.n)] += 1
        if s.settled:
            for item in s.settled.charged:
                session_side[(s.session_id, item["block"])] += 1
    assert session_side == per_pool, "I1: session charges and pool charges differ"


def check_I2_exact_total(events, reported_ends=None) -> None:
    """A settled session's net charged units == units_owed(kind, billable start, ended_at)
    recomputed from its events; the pools agree; no end later than an accepted report stands."""
    folded = fold(events)
    pool_net: Counter = Counter()
    for e in events:
        if name(e) == "Pool.Charged":
            pool_net[e.session_id] += 1
        elif name(e) == "Pool.Reversed":
            pool_net[e.session_id] -= 1
    for s in folded.sessions.values():
        if s.settled is None:
            continue
        assert s.ends, f"I2: {s.session_id} settled without an end"
        owed = units_owed(s.kind, s.start, s.ended_at)
        assert s.settled.units_owed == owed, \
            f"I2: {s.session_id} Settled.units_owed {s.settled.units_owed} != recomputed {owed}"
        assert s.net_units() == owed, f"I2: {s.session_id} charged {s.net_units()}, owes {owed}"
        assert pool_net[s.session_id] == owed, f"I2: pools charged {s.session_id} " \
                                               f"{pool_net[s.session_id]}, owes {owed}"
        assert not s.holds, f"I2: {s.session_id} settled with holds left {s.holds}"
    for sid, at in (reported_ends or {}).items():
        s = folded.by_sid.get(sid)
        if s is None or not s.ends:
            continue
        assert s.ended_at <= at, f"I2: {sid} ended at {s.ended_at}, reported {at}"


def check_I3_no_overdraft(events) -> None:
    """No pool's free units negative at any prefix; no block charged without a preceding hold
    (session and pool); no wallet's available money negative at any prefix; a settled session
    never owes a block it never held."""

    def every_prefix(i, e, folded: Folded) -> None:
        n = name(e)
        if n.startswith("Pool."):
            p = folded.pools[e.originator_id]
            assert all(v >= 0 for v in p.free.values()), f"I3: pool free negative at {i}: {p.free}"
        elif n.startswith("Wallet."):
            for w in folded.wallets.values():
                assert w.available >= 0 and w.held >= 0, f"I3: wallet overdrawn at {i}: {w}"

    folded = fold(events, on_step=every_prefix)  # the fold itself asserts hold-before-charge
    for s in folded.sessions.values():
        if s.settled is not None:
            owed = s.settled.units_owed
            assert set(range(1, owed + 1)) <= s.ever_held, \
                f"I3: {s.session_id} owes blocks 1..{owed} but held only {sorted(s.ever_held)}"


def check_I4_no_charge_without_billable_start(events) -> None:
    """AutoDeducted and settlement charges only after Activated or Connected in the session."""
    started: set = set()
    for e in events:
        n = name(e)
        if n in ("Session.Activated", "Session.Connected", "Session.RateStamped"):
            started.add(e.originator_id)
        elif n == "Session.AutoDeducted" or (n == "Session.Settled" and e.charged):
            assert e.originator_id in started, f"I4: {n} before any billable start"
        elif n == "Session.Settled":
            if e.originator_id not in started:
                assert e.units_owed == 0 and e.net_pay_minor == 0, "I4: unstarted session owes"


def check_I5_doctor_pay(events) -> None:
    """Pay per session == stamped pay per unit × net units, in the stamped currency, credited to
    the doctor's wallet for that currency once settled; never for a unit the patient did not pay."""
    folded = fold(events)
    for s in folded.sessions.values():
        rate = s.rate
        for d in s.deducted:
            assert (d.pay_minor, d.currency) == (rate["pay_minor"], rate["currency"]), \
                f"I5: {s.session_id} block {d.n} paid at {d.pay_minor} {d.currency}, stamped {rate}"
            assert d.doctor_id == s.doctor_id and d.patient_id == s.patient_id
        if s.settled is None:
            for w in folded.wallets.values():
                assert s.session_id not in w.credits, f"I5: {s.session_id} paid before settlement"
            continue
        pay = rate["pay_minor"] if rate else 0
        net = s.net_units()
        assert s.settled.pay_per_unit_minor == pay, f"I5: {s.session_id} pay/unit changed"
        assert s.settled.net_pay_minor == pay * net, \
            f"I5: {s.session_id} net pay {s.settled.net_pay_minor} != {pay} × {net}"
        credited = {k: w.credits[s.session_id] for k, w in folded.wallets.items()
                    if s.session_id in w.credits}
        if pay * net:
            assert credited == {(s.doctor_id, rate["currency"]): pay * net}, \
                f"I5: {s.session_id} credited {credited}, owes doctor {pay * net}"
        else:
            assert credited == {}, f"I5: {s.session_id} credited {credited} for no unit"
    for w in folded.wallets.values():
        assert all(v > 0 for v in w.credits.values())
        assert all(folded.by_sid[sid].settled is not None for sid in w.credits)


def check_I6_conservation(events) -> None:
    """Per pool and bucket: granted = free + held + (charged − reversed) + forfeited + revoked,
    with every term recomputed from events. Per (doctor, currency): credited − reversed =
    pending + available + held + withdrawn."""
    folded = fold(events)
    for pid, p in folded.pools.items():
        for b in BUCKETS:
            held = sum(1 for v in p.held.values() if v == b)
            charged_net = sum(1 for v in p.charged.values() if v == b)
            total = p.free[b] + held + charged_net + p.forfeited[b] + p.revoked[b]
            assert p.granted[b] == total, \
                f"I6: pool {pid} {b}: granted {p.granted[b]} != {p.free[b]} free + {held} held " \
                f"+ {charged_net} charged + {p.forfeited[b]} forfeited + {p.revoked[b]} revoked"
        assert not (p.expired and any(p.free.values())), f"I6: expired pool {pid} has free units"
    # Across aggregates: the units a pool holds and charges are exactly those the sessions
    # record against it (each hold and charge names its pool).
    session_side: Counter = Counter()
    for s in folded.sessions.values():
        for pool_id in s.holds.values():
            session_side[(pool_id, s.kind, "held")] += 1
        charges = {d.n: d.pool_id for d in s.deducted}
        if s.settled is not None:
            charges.update({c["block"]: c["pool_id"] for c in s.settled.charged})
            for r in s.settled.reversed:
                assert charges.pop(r["block"]) == r["pool_id"], "I6: reversal to another pool"
        for pool_id in charges.values():
            session_side[(pool_id, s.kind, "charged")] += 1
    pool_side: Counter = Counter()
    for pid, p in folded.pools.items():
        for what, units in (("held", p.held), ("charged", p.charged)):
            for bucket in units.values():
                pool_side[(str(pid), bucket, what)] += 1
    assert pool_side == session_side, \
        f"I6: pools {dict(pool_side - session_side)} vs sessions {dict(session_side - pool_side)}"
    money: dict = defaultdict(lambda: Counter())
    for s in folded.sessions.values():
        if s.rate is None:
            continue
        key, pay = (s.doctor_id, s.rate["currency"]), s.rate["pay_minor"]
        accrued = pay * len(s.deducted)
        if s.settled is None:
            money[key]["pending"] += accrued
        else:
            accrued += pay * len(s.settled.charged)
            money[key]["reversed"] += pay * len(s.settled.reversed)
        money[key]["credited"] += accrued
    for key, amounts in consultation_shares(events).items():
        money[key].update(amounts)
    for key in set(money) | set(folded.wallets):
        m = money[key]
        w = folded.wallets.get(key) or WalletFold(*key)
        lhs = m["credited"] - m["reversed"]
        rhs = m["pending"] + w.available + w.held + w.withdrawn
        assert lhs == rhs, f"I6: wallet {key}: credited {m['credited']} − reversed " \
                           f"{m['reversed']} != pending {m['pending']} + available {w.available}" \
                           f" + held {w.held} + withdrawn {w.withdrawn}"


def consultation_shares(events) -> dict[tuple, Counter]:
    """Per (practitioner, currency): the shares of priced consultations (§10) as the §5 wallet
    counts them: credited at capture, pending until released, reversed by a pending refund."""
    money: dict = defaultdict(Counter)
    for e in events:
        n = name(e)
        if n == "Consultation.Closed" and e.capture is not None:
            key = (e.practitioner_id, e.currency)
            money[key]["credited"] += e.capture["share_minor"]
            money[key]["pending"] += e.capture["share_minor"]
        elif n == "Consultation.EarningReleased":
            money[(e.practitioner_id, e.currency)]["pending"] -= e.amount_minor
        elif n == "Consultation.Refunded":
            money[(e.practitioner_id, e.currency)]["reversed"] += e.share_reversed_minor
            money[(e.practitioner_id, e.currency)]["pending"] -= e.share_reversed_minor
    return money


def check_I7_replay_equals_live(events, ledger: Ledger) -> None:
    """Rebuilding every aggregate from the log (repository.get replays the stored events) gives
    the same balances as an independent recomputation from the decoded events."""
    folded = fold(events)
    for pid, p in folded.pools.items():
        agg: Pool = ledger.repository.get(pid)
        assert agg.free == p.free, f"I7: pool {pid} free {agg.free} != {p.free}"
        assert agg.held == p.held and agg.charged == p.charged
        for b in BUCKETS:
            assert (agg.forfeited[b], agg.revoked[b], agg.reversed[b]) == (
                p.forfeited[b], p.revoked[b], p.reversed[b]), f"I7: pool {pid} {b} counters"
        assert (agg.expired, agg.refunded) == (p.expired, p.refunded)
        assert agg.granted == p.granted
    for oid, s in folded.sessions.items():
        agg: Session = ledger.repository.get(oid)
        charges = {d.n: d.pool_id for d in s.deducted}
        if s.settled is not None:
            charges.update({c["block"]: c["pool_id"] for c in s.settled.charged})
            for r in s.settled.reversed:
                charges.pop(r["block"])
        assert agg.charges == charges, f"I7: {s.session_id} charges {agg.charges} != {charges}"
        assert agg.holds == s.holds, f"I7: {s.session_id} holds {agg.holds} != {s.holds}"
        assert (agg.started_at, agg.ended_at, agg.settled) == (
            s.start, s.ended_at, s.settled is not None), f"I7: {s.session_id} times"
    for (doctor, currency), w in folded.wallets.items():
        agg: Wallet = ledger.repository.get(Wallet.create_id(doctor, currency))
        assert (agg.credited_minor, agg.held_minor, agg.withdrawn_minor, agg.available_minor) == (
            w.credited, w.held, w.withdrawn, w.available), f"I7: wallet {doctor} {currency}"
    # Presence: a session is live from its request until its first Ended.
    for oid, s in folded.sessions.items():
        patient = ledger.repository.get(Patient.create_id(s.patient_id))
        doctor = ledger.repository.get(Doctor.create_id(s.doctor_id))
        live = not s.ends
        group = "text" if s.kind == "text" else "call"
        assert (patient.live.get(group) == s.session_id) == live, f"I7: presence {s.session_id}"
        assert (s.session_id in doctor.live) == live, f"I7: doctor presence {s.session_id}"


def check_I8_idempotent_ingestion(events, accepted_ids=None) -> None:
    """Each event id has exactly one receipt, recorded once; refused events left no receipt."""
    receipts = Counter(e.event_id for e in events if name(e) == "Receipt.Recorded")
    repeated = [k for k, c in receipts.items() if c > 1]
    assert not repeated, f"I8: event ids recorded twice: {repeated}"
    versions = [e.originator_version for e in events if name(e) == "Receipt.Recorded"]
    assert all(v == 1 for v in versions)
    if accepted_ids is not None:
        assert set(receipts) == set(accepted_ids), \
            f"I8: receipts {sorted(set(receipts) ^ set(accepted_ids))} differ from accepted posts"


def check_I9_deterministic(reference: dict, other: dict, label: str = "") -> None:
    """Two runs of the same external events under different tick schedules (summaries made by
    `run_schedule` from each run's event log): the same charges per session (units owed, net
    units, ended_at and reason, block → pool, doctor's pay) and the same pool and wallet
    balances."""
    for part in ("sessions", "pools", "wallets"):
        diff = {k: (reference[part].get(k), other[part].get(k))
                for k in set(reference[part]) | set(other[part])
                if reference[part].get(k) != other[part].get(k)}
        assert not diff, f"I9 {label}: {part} differ (reference, other): {diff}"


def check_I10_billing_only_from_session_events(events, causes=None) -> None:
    """No charge is ever caused by a non-session event: every pool charge/hold matches a session
    of the log; and (when the driver recorded what caused each stretch of the log) charges,
    holds and credits only come from session events or the tick."""
    kinds: dict[str, str] = {}  # session id -> kind, for sessions requested so far
    for e in events:
        n = name(e)
        if n == "Session.Requested":
            kinds[e.session_id] = e.kind
        elif n in ("Pool.Held", "Pool.Charged", "Pool.Reversed", "Pool.Released"):
            kind = kinds.get(e.session_id)
            assert kind is not None, f"I10: {n} for {e.session_id}, which is not a session"
            assert e.bucket == kind, f"I10: {n} in bucket {e.bucket} for a {kind} session"
        elif n == "Wallet.Credited":
            assert e.session_id in kinds, "I10: a credit that is not a session's pay"
    for (lo, hi), cause in (causes or {}).items():
        if cause in SESSION_EVENT_TYPES or cause == "tick":
            continue
        bad = [name(e) for e in events[lo:hi]
               if name(e) in CHARGE_EVENTS | {"Pool.Held", "Session.BlockHeld", "Session.Settled"}]
        assert not bad, f"I10: {cause} caused {bad}"


FINAL_REASONS = frozenset({"not_started", "doctor_no_response", "missed", "idle_timeout",
                           "max_duration", "balance_exhausted", "declined"})


def check_recorded_timeouts_are_final(events) -> None:
    """§8: once a timeout (or exhaustion, or decline) is recorded, no later billable start or
    activity is recorded for that session, even if an earlier end report replaced it."""
    final: set = set()
    for e in events:
        n = name(e)
        if n == "Session.Ended" and e.reason in FINAL_REASONS:
            final.add(e.originator_id)
        elif n in ("Session.Activated", "Session.Connected", "Session.ActivityRecorded",
                   "Session.PatientMessaged", "Session.Ringing", "Session.PresenceRecorded",
                   "Session.RateStamped"):
            assert e.originator_id not in final, f"§8: {n} after a recorded timeout"


def check_all(events, ledger: Ledger | None = None, **kw) -> None:
    check_recorded_timeouts_are_final(events)
    check_I1_no_double_charge(events)
    check_I2_exact_total(events, kw.get("reported_ends"))
    check_I3_no_overdraft(events)
    check_I4_no_charge_without_billable_start(events)
    check_I5_doctor_pay(events)
    check_I6_conservation(events)
    if ledger is not None:
        check_I7_replay_equals_live(events, ledger)
    check_I8_idempotent_ingestion(events, kw.get("accepted_ids"))
    check_I10_billing_only_from_session_events(events, kw.get("causes"))


# ========================================================================= handcrafted scenarios


def scenario() -> Desk:
    """Two stacked pools, a family member, a settled call with a late earlier end (a reversal),
    an exhausted text session, a missed call, and a withdrawal."""
    clock = FakeClock()
    ledger = Ledger(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=clock,
                    withdrawal_minimum_minor={"MWK": 1, "USD": 1})
    desk = Desk(clock, ledger=ledger)
    desk.doctor("d1", "MW")
    desk.doctor("d2", "KE")
    desk.grant("pay-1", owner="p1", days=7, voice=2, text=1, video=0, seats=2)
    desk.grant("pay-2", owner="p1", days=30, voice=4, text=1, video=1)
    desk.post("member.added", payment_reference="pay-1", patient_id="kid")
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 30 * MIN)
    desk.tick(T0 + 31 * MIN)
    desk.end("s1", T0 + 12 * MIN)  # late: one block too many was deducted
    desk.request("s2", "text", patient="kid", doctor="d2")
    desk.activate("s2", desk.at(T0 + 32 * MIN))
    desk.message("s2", desk.at(T0 + 40 * MIN))
    desk.request("s3", "video", patient="p1", doctor="d1", at=desk.at(T0 + 45 * MIN))
    desk.tick(T0 + 90 * MIN)
    desk.tick(T0 + 2 * 60 * MIN)
    desk.post("withdrawal.requested", doctor_id="d1", request_id="w1", currency="MWK",
              amount_minor=MW_RATE)
    desk.post("withdrawal.completed", doctor_id="d1", request_id="w1", currency="MWK")
    return desk


@pytest.fixture(scope="module")
def scenario_events():
    desk = scenario()
    events = desk.events()
    folded = fold(events)
    assert {s.session_id: (s.settled is not None) for s in folded.sessions.values()} == {
        "s1": True, "s2": True, "s3": True}
    assert [r["block"] for r in folded.by_sid["s1"].settled.reversed] == [3]
    return desk, events


def doctored(events, pick, **changes) -> list:
    """A copy of the log where the first event matching `pick` has `changes`."""
    out = list(events)
    i = next(i for i, e in enumerate(out) if pick(e))
    out[i] = dataclasses.replace(out[i], **changes)
    return out


def test_I1_no_double_charge(scenario_events) -> None:
    desk, events = scenario_events
    check_I1_no_double_charge(events)
    ad = next(i for i, e in enumerate(events) if name(e) == "Session.AutoDeducted")
    with pytest.raises(AssertionError, match="I1"):
        check_I1_no_double_charge(events[:ad + 1] + [events[ad]] + events[ad + 1:])


def test_I2_exact_total(scenario_events) -> None:
    desk, events = scenario_events
    check_I2_exact_total(events, {"s1": T0 + 12 * MIN})
    with pytest.raises(AssertionError, match="I2"):
        check_I2_exact_total(doctored(events, lambda e: name(e) == "Session.Ended",
                                      ended_at=T0 + 29 * MIN))
    with pytest.raises(AssertionError, match="I2"):
        check_I2_exact_total(events, {"s1": T0 + 11 * MIN})


def test_I3_no_overdraft(scenario_events) -> None:
    desk, events = scenario_events
    check_I3_no_overdraft(events)
    granted = next(e for e in events if name(e) == "Pool.Granted")
    with pytest.raises(AssertionError, match="I3"):
        check_I3_no_overdraft(doctored(events, lambda e: e is granted, plan={
            **granted.plan, "units": {"text": 0, "voice": 0, "video": 0}}))
    without_hold = [e for e in events if not (name(e) == "Pool.Held" and e.session_id == "s1"
                                              and e.block == 3)]
    with pytest.raises(AssertionError, match="I3"):
        check_I3_no_overdraft(without_hold)
    with pytest.raises(AssertionError, match="I3"):
        check_I3_no_overdraft(doctored(events, lambda e: name(e) == "Wallet.WithdrawalHeld",
                                       amount_minor=10 ** 9))


def test_I4_no_charge_without_billable_start(scenario_events) -> None:
    desk, events = scenario_events
    check_I4_no_charge_without_billable_start(events)
    s1 = Session.create_id("s1")
    unstarted = [e for e in events
                 if not (name(e) == "Session.Connected" and e.originator_id == s1)]
    with pytest.raises(AssertionError, match="I4"):
        check_I4_no_charge_without_billable_start(unstarted)


def test_I5_doctor_pay(scenario_events) -> None:
    desk, events = scenario_events
    check_I5_doctor_pay(events)
    s2 = desk.session("s2")
    assert s2.rate["currency"] == "USD" and desk.wallet("d2", "USD").credited_minor == \
        s2.settlement["net_pay_minor"] > 0
    with pytest.raises(AssertionError, match="I5"):
        check_I5_doctor_pay(doctored(events, lambda e: name(e) == "Wallet.Credited",
                                     amount_minor=4 * MW_RATE))
    with pytest.raises(AssertionError, match="I5"):
        check_I5_doctor_pay(doctored(events, lambda e: name(e) == "Session.AutoDeducted",
                                     pay_minor=1))


def test_I6_conservation(scenario_events) -> None:
    desk, events = scenario_events
    check_I6_conservation(events)
    with pytest.raises(AssertionError, match="I6"):
        check_I6_conservation(doctored(events, lambda e: name(e) == "Wallet.Credited",
                                       amount_minor=MW_RATE + 1))
    released = next(e for e in events if name(e) == "Pool.Released")
    with pytest.raises(AssertionError, match="I6"):
        check_I6_conservation([e for e in events if e is not released])


def test_I7_replay_equals_live(scenario_events) -> None:
    desk, events = scenario_events
    check_I7_replay_equals_live(events, desk.ledger)
    # A replay into a second application, from position zero, gives the same aggregates.
    copy = make_ledger(None, desk.clock)
    copy.recorder.insert_events(desk.ledger.recorder.select_notifications(1, 10_000))
    check_I7_replay_equals_live(events_of(copy), copy)
    with pytest.raises(AssertionError, match="I7"):
        check_I7_replay_equals_live(doctored(events, lambda e: name(e) == "Pool.Released",
                                             forfeited=True), desk.ledger)


def test_I8_idempotent_ingestion(scenario_events) -> None:
    desk, events = scenario_events
    check_I8_idempotent_ingestion(events, [f"ev-{k}" for k in range(1, desk.n + 1)])
    receipt = next(e for e in events if name(e) == "Receipt.Recorded")
    with pytest.raises(AssertionError, match="I8"):
        check_I8_idempotent_ingestion(events + [receipt])
    # Re-posting every accepted event changes nothing and returns the stored results.
    fresh = scenario()
    before = fresh.events()
    receipts = [e for e in before if name(e) == "Receipt.Recorded"]
    for r in receipts:
        stored = fresh.ledger.get_receipt(r.event_id)
        assert stored.result == r.result
    desk2 = Desk(FakeClock())
    desk2.doctor()
    desk2.grant()
    accepted = desk2.ledger.ingest("x", "session.requested", T0, {
        "session_id": "s", "kind": "text", "patient_id": "p1", "doctor_id": "d1"})
    n = len(desk2.events())
    again = desk2.ledger.ingest("x", "session.requested", T0, {
        "session_id": "s", "kind": "text", "patient_id": "p1", "doctor_id": "d1"})
    assert again.replayed and again.result == accepted.result and len(desk2.events()) == n
    check_I8_idempotent_ingestion(desk2.events(), ["ev-1", "ev-2", "x"])


def test_I10_billing_only_from_session_events(scenario_events) -> None:
    desk, events = scenario_events
    check_I10_billing_only_from_session_events(events)
    # A pool grant that would charge for a booking: caught.
    grant_pos = next(i for i, e in enumerate(events) if name(e) == "Pool.Granted")
    hold = next(e for e in events if name(e) == "Pool.Held")
    charge = next(e for e in events if name(e) == "Pool.Charged")
    fake = [dataclasses.replace(hold, session_id="appointment-1"),
            dataclasses.replace(charge, session_id="appointment-1")]
    with pytest.raises(AssertionError, match="I10"):
        check_I10_billing_only_from_session_events(events + fake)
    with pytest.raises(AssertionError, match="I10"):
        check_I10_billing_only_from_session_events(
            events, {(0, len(events)): "subscription.granted"})
    # Non-session event types never produce a hold, charge or credit.
    d = Desk(FakeClock())
    causes = {}
    for type_, payload in [
        ("doctor.registered", {"doctor_id": "d1", "country": "MW"}),
        ("subscription.granted", {"payment_reference": "r", "owner_id": "p1",
                                  "plan": {"name": "x", "price_minor": 1, "currency": "MWK",
                                           "units": {"text": 1, "voice": 1, "video": 1},
                                           "seats": 2, "duration_days": 30},
                                  "starts_at": T0.isoformat()}),
        ("member.added", {"payment_reference": "r", "patient_id": "kid"}),
        ("member.removed", {"payment_reference": "r", "patient_id": "kid"}),
        ("payment.refunded", {"payment_reference": "r"}),
    ]:
        lo = len(d.events())
        d.post(type_, **payload)
        causes[(lo, len(d.events()))] = type_
    check_I10_billing_only_from_session_events(d.events(), causes)
    assert grant_pos >= 0


# ======================================================================= the state machine

PATIENTS = ("p1", "p2", "p3", "p4")
DOCTORS = {"d1": "MW", "d2": "KE", "d3": "MW", "d4": "ZM"}
KINDS = ("text", "voice", "video")
LAGS = st.sampled_from([0, 0, 0, 0, 15, 59, 300, 1000])


class LedgerMachine(RuleBasedStateMachine):
    """Random sequences of backend events and ticks on one POPO ledger."""

    @initialize(opening=st.lists(st.tuples(st.sampled_from(KINDS), st.booleans()),
                                 min_size=1, max_size=3))
    def setup(self, opening) -> None:
        self.clock = FakeClock()
        self.ledger = Ledger(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=self.clock,
                             withdrawal_minimum_minor={"MWK": 1, "USD": 1})
        self.policy = self.ledger.policy
        self.n = 0
        self.events: list = []
        self.position = 0
        self.causes: dict = {}
        self.accepted: list[tuple] = []  # (event_id, type, at, payload, result)
        self.sessions: list[str] = []
        self.pools: list[tuple[str, str]] = []  # (payment_reference, pool_id)
        self.reported_ends: dict[str, datetime] = {}
        self.withdrawals: list[tuple] = []
        for doctor, country in DOCTORS.items():
            self.post("doctor.registered", 0, doctor_id=doctor, country=country)
        # A family pool, a stacked pool expiring within the hour and a single pool, to start
        # from (more are granted by the `grant` rule).
        self.grant("p1", 2, 3, 1, 30, 3, 0)
        self.post("member.added", payment_reference="pay-1", patient_id="p2")
        self.grant("p1", 1, 2, 1, 1, 1, -23 * 3600)
        self.grant("p3", 2, 4, 2, 30, 1, 0)
        # Sessions that exist in every example (rules may be switched off by swarm testing).
        for (kind, start), patient, doctor in zip(opening, ("p1", "p2", "p3"), ("d1", "d2", "d3")):
            sid = f"s{len(self.sessions) + 1}"
            if self.post("session.requested", session_id=sid, kind=kind, patient_id=patient,
                         doctor_id=doctor) is not None:
                self.sessions.append(sid)
                if start:
                    self.clock.advance(20)
                    self.post("text.activated" if kind == "text" else "call.connected",
                              session_id=sid)

    # ---- plumbing
    def sync(self) -> int:
        batch = self.ledger.recorder.select_notifications(self.position + 1, 100_000)
        self.events.extend(self.ledger.mapper.to_domain_event(n) for n in batch)
        if batch:
            self.position = batch[-1].id
        return len(self.events)

    def post(self, type_: str, lag: int = 0, **payload) -> dict | None:
        self.n += 1
        event_id = f"ev-{self.n}"
        at = self.clock() - timedelta(seconds=lag)
        lo = self.sync()
        try:
            result = self.ledger.ingest(event_id, type_, at, payload).result
        except errors.LedgerError as refusal:
            assert refusal.code != "retry_later", "a single writer never loses a race"
            assert self.sync() == lo, f"refused {type_} ({refusal.code}) recorded events"
            note(f"refused {type_} {payload}: {refusal.code}")
            hevent(f"refused {type_}: {refusal.code}")
            return None
        self.causes[(lo, self.sync())] = type_
        hevent(f"accepted {type_}")
        self.accepted.append((event_id, type_, at, payload, result))
        if type_ == "session.ended":
            sid = payload["session_id"]
            self.reported_ends[sid] = min(at, self.reported_ends.get(sid, at))
        return result

    def tick(self, as_of: datetime | None = None):
        lo = self.sync()
        report = self.ledger.tick(as_of or self.clock(), self.sessions,
                                  [pid for _, pid in self.pools])
        assert report.conflicts == 0
        self.causes[(lo, self.sync())] = "tick"
        return report

    def pick(self, seq, i):
        return seq[i % len(seq)]

    # ---- pools and members
    @rule(owner=st.sampled_from(PATIENTS), text=st.integers(0, 3), voice=st.integers(0, 4),
          video=st.integers(0, 2), days=st.sampled_from([1, 7, 30]), seats=st.integers(1, 3),
          starts=st.sampled_from([0, 0, -23 * 3600, -23 * 3600 - 1800, 600]))
    def grant(self, owner, text, voice, video, days, seats, starts) -> None:
        """Stacked pools (several per patient) and family pools (seats > 1)."""
        ref = f"pay-{len(self.pools) + 1}"
        starts_at = (self.clock() + timedelta(seconds=starts)).isoformat()
        result = self.post("subscription.granted", payment_reference=ref, owner_id=owner,
                           starts_at=starts_at,
                           plan={"name": "p", "price_minor": 100, "currency": "MWK",
                                 "units": {"text": text, "voice": voice, "video": video},
                                 "seats": seats, "duration_days": days})
        if result is not None:
            self.pools.append((ref, result["pool_id"]))

    @precondition(lambda self: self.pools)
    @rule(i=st.integers(0, 20), patient=st.sampled_from(PATIENTS),
          action=st.sampled_from(["add", "add", "remove", "remove_late"]))
    def membership(self, i, patient, action) -> None:
        ref = self.pick(self.pools, i)[0]
        if action == "add":
            self.post("member.added", payment_reference=ref, patient_id=patient)
        else:
            self.post("member.removed", 30 if action == "remove_late" else 0,
                      payment_reference=ref, patient_id=patient)

    @precondition(lambda self: self.pools)
    @rule(i=st.integers(0, 20), action=st.sampled_from(
        ["regrant_same", "regrant_other", "country", "unknown_session", "appointment",
         "regrant_same", "country", "refund"]),
          doctor=st.sampled_from(sorted(DOCTORS)), country=st.sampled_from(["MW", "KE"]))
    def admin(self, i, action, doctor, country) -> None:
        """Payment-reference reuse, refunds, country changes, unknown sessions, bookings."""
        ref, _ = self.pick(self.pools, i)
        if action == "refund":
            self.post("payment.refunded", payment_reference=ref)
        elif action == "country":
            self.post("doctor.country_changed", doctor_id=doctor, country=country)
        elif action == "unknown_session":
            assert self.post("session.activity", session_id=f"nope-{i}") is None
        elif action == "appointment":  # a booking, never a charge (I10)
            start = (self.clock() + timedelta(minutes=5)).isoformat()
            aid, lo = f"a{self.n}", self.sync()
            for type_, extra in (("appointment.booked", {"patient_id": "p1", "doctor_id": doctor,
                                                          "kind": "voice", "starts_at": start}),
                                 ("appointment.confirmed", {}),
                                 ("appointment.join_window_opened", {}),
                                 ("appointment.no_show", {"absent": "patient"})):
                self.post(type_, appointment_id=aid, **extra)
            assert not [e for e in self.events[lo:self.sync()]
                        if name(e).split(".")[0] in ("Pool", "Wallet", "Session")]
        else:
            pool: Pool = self.ledger.repository.get(Pool.create_id(ref))
            plan = dict(pool.plan)
            same = action == "regrant_same"
            if not same:
                plan["seats"] = int(plan["seats"]) + 1
            result = self.post("subscription.granted", payment_reference=ref,
                               owner_id=pool.owner_id, plan=plan,
                               starts_at=pool.starts_at.isoformat())
            assert (result is not None) == same
            if same:
                last = self.causes[max(self.causes)]
                lo, hi = max(self.causes)
                assert [name(e) for e in self.events[lo:hi]] == ["Receipt.Recorded"], last

    # ---- sessions
    @rule(patient=st.sampled_from(("p1", "p1", "p2") + PATIENTS),
          doctor=st.sampled_from(sorted(DOCTORS) * 2 + ["dx"]),
          kind=st.sampled_from(KINDS), lag=st.sampled_from([0, 0, 20]))
    def request(self, patient, doctor, kind, lag) -> None:
        sid = f"s{len(self.sessions) + 1}"
        if self.post("session.requested", lag, session_id=sid, kind=kind, patient_id=patient,
                     doctor_id=doctor) is not None:
            self.sessions.append(sid)

    @precondition(lambda self: self.sessions)
    @rule(i=st.integers(0, 30), lag=LAGS, by=st.sampled_from(["patient", "doctor", "system"]),
          what=st.sampled_from(["start", "start", "ring", "message", "activity", "activity",
                                "end", "end", "decline", "start_wrong_type"]))
    def session_event(self, i, lag, by, what) -> None:
        """A backend report about a session, possibly late (occurred_at up to 1000 s ago)."""
        sid = self.pick(self.sessions, i)
        is_text = self.ledger.get_session(sid).kind == "text"
        if what in ("start", "start_wrong_type"):
            type_ = "text.activated" if is_text == (what == "start") else "call.connected"
            self.post(type_, lag, session_id=sid)
        elif what == "ring":
            self.post("call.ringing", lag, session_id=sid)
        elif what == "message":
            self.post("session.patient_message", lag, session_id=sid)
        elif what == "activity":
            self.post("session.activity", lag, session_id=sid)
        elif what == "end":
            self.post("session.ended", lag, session_id=sid, ended_by=by)
        else:
            self.post("call.declined", session_id=sid)

    @precondition(lambda self: self.sessions)
    @rule(i=st.integers(0, 30), lag=LAGS, who=st.sampled_from(["p", "d", "both", "other", "room"]),
          action=st.sampled_from(["joined", "joined", "left"]))
    def provider_report(self, i, lag, who, action) -> None:
        """A provider's presence report (issue 4), possibly late or out of order."""
        session = self.ledger.get_session(self.pick(self.sessions, i))
        identity = {"p": session.patient_id, "d": f"doctor:{session.doctor_id}", "both": "*",
                    "other": "recorder"}.get(who)
        if who == "room":
            self.post("call.room_ended", lag, session_id=session.session_id)
        else:
            self.post(f"call.participant_{action}", lag, session_id=session.session_id,
                      participant=identity)

    @precondition(lambda self: self.sessions)
    @rule(i=st.integers(0, 30), into_block=st.integers(0, 599), blocks_back=st.integers(1, 3))
    def late_earlier_end(self, i, into_block, blocks_back) -> None:
        """A provider's end report arriving after later blocks were auto-deducted (a reversal)."""
        session = self.ledger.get_session(self.pick(self.sessions, i))
        if session.started_at is None or session.settled:
            return
        block = max(1, session.charged_through + 1 - blocks_back)
        at = block_end(session.started_at, block - 1) + timedelta(seconds=into_block)
        lag = int((self.clock() - at).total_seconds())
        if lag >= 0:
            self.post("session.ended", lag, session_id=session.session_id, ended_by="doctor")

    @precondition(lambda self: self.sessions)
    @rule(i=st.integers(0, 30), pings=st.integers(1, 8), gap=st.sampled_from([60, 290, 300, 599]),
          tick=st.booleans())
    def conversation(self, i, pings, gap, tick) -> None:
        """A live session talks for a while: activity every `gap` s, ticking (or not) each time."""
        sid = self.pick(self.sessions, i)
        for _ in range(pings):
            self.clock.advance(gap)
            if self.post("session.activity", session_id=sid) is None:
                break
            if tick:
                self.tick()

    # ---- wallets
    @rule(doctor=st.sampled_from(sorted(DOCTORS)), currency=st.sampled_from(["MWK", "USD"]),
          share=st.integers(1, 100), finish=st.sampled_from([None, True, False]),
          i=st.integers(0, 20))
    def wallet(self, doctor, currency, share, finish, i) -> None:
        """Withdrawals: a request holds (refused above available), then complete or reject."""
        if finish is not None and self.withdrawals:
            doctor, currency, rid = self.pick(self.withdrawals, i)
            self.post("withdrawal.completed" if finish else "withdrawal.rejected",
                      doctor_id=doctor, request_id=rid, currency=currency)
            return
        wallet = self.ledger.load(Wallet.create_id(doctor, currency))
        available = wallet.available_minor if wallet else 0
        amount = max(1, available * share // 100 if share < 100 else available + 1)
        rid = f"w{self.n}"
        if self.post("withdrawal.requested", doctor_id=doctor, request_id=rid,
                     currency=currency, amount_minor=amount) is not None:
            assert amount <= available
            self.withdrawals.append((doctor, currency, rid))
        else:
            assert amount > available

    # ---- time and ticks
    @rule(seconds=st.sampled_from([1, 30, 59, 60, 61, 90, 300, 599, 600, 601, 660, 900, 1200,
                                   3600]))
    def advance(self, seconds) -> None:
        self.clock.advance(seconds)

    @rule(duplicate=st.booleans())
    def tick_now(self, duplicate) -> None:
        """The tick at the clock's time; a duplicate tick at the same as_of changes nothing."""
        self.tick()
        if duplicate:
            before = self.sync()
            report = self.tick()
            assert self.sync() == before, "a duplicate tick at the same as_of wrote events"
            assert not (report.charged or report.ended or report.settled or report.expired)

    @precondition(lambda self: self.sessions)
    @rule(i=st.integers(0, 30))
    def racing_ticks(self, i) -> None:
        """Two workers decide the same step on copies of one session: the second save loses."""
        sid = Session.create_id(self.pick(self.sessions, i))
        as_of = self.clock()
        w1, w2 = Work(self.ledger.load), Work(self.ledger.load)
        s1, s2 = w1.get(sid), w2.get(sid)
        step = next_step(s1, self.policy)
        if step is None or step.due > as_of:
            return
        apply_step(w1, s1, step, as_of, self.policy)
        apply_step(w2, s2, next_step(s2, self.policy), as_of, self.policy)
        lo = self.sync()
        self.ledger.save(*w1.to_save())
        self.causes[(lo, self.sync())] = "tick"
        hevent(f"racing ticks: {step.action}")
        before = self.sync()
        with pytest.raises(IntegrityError):
            self.ledger.save(*w2.to_save())
        assert self.sync() == before, "the losing save wrote something"

    # ---- duplicates and replays
    @precondition(lambda self: self.accepted)
    @rule(i=st.integers(0, 200), same=st.booleans())
    def repost(self, i, same) -> None:
        """Re-post an accepted event: the same body returns the stored result and changes
        nothing (even when it is by now late or stale); another body is a 409."""
        event_id, type_, at, payload, result = self.pick(self.accepted, i)
        if at is None:
            return
        before = self.sync()
        if same:
            again = self.ledger.ingest(event_id, type_, at, payload)
            assert again.replayed and again.result == result
        else:
            with pytest.raises(errors.IdempotencyConflict):
                self.ledger.ingest(event_id, type_, at + S, payload)
        assert self.sync() == before, "a re-post changed the log"

    @rule()
    def replay(self) -> None:
        self.sync()
        check_I7_replay_equals_live(self.events, self.ledger)

    # ---- invariants after every step
    @invariant()
    def invariants(self) -> None:
        if not hasattr(self, "ledger"):
            return
        self.steps = getattr(self, "steps", 0) + 1
        self.sync()
        check_all(self.events, None, reported_ends=self.reported_ends, causes=self.causes,
                  accepted_ids=[a[0] for a in self.accepted])

    def teardown(self) -> None:
        if not hasattr(self, "ledger"):
            return
        # Let everything end and settle, then check the whole log once more, replay included.
        later = self.clock() + timedelta(hours=4)
        self.clock.set(later)
        self.tick(later)
        self.tick(later + timedelta(minutes=11))
        # Doctors withdraw part of what is available (completed or rejected, alternately).
        for k, ((doctor, currency), w) in enumerate(sorted(fold(self.events[:self.sync()])
                                                           .wallets.items())):
            if w.available > 1:
                rid = f"final-w{k}"
                self.post("withdrawal.requested", doctor_id=doctor, request_id=rid,
                          currency=currency, amount_minor=w.available // 2)
                self.post("withdrawal.completed" if k % 2 else "withdrawal.rejected",
                          doctor_id=doctor, request_id=rid, currency=currency)
        self.sync()
        folded = fold(self.events)
        unsettled = [s.session_id for s in folded.sessions.values() if s.settled is None]
        assert not unsettled, f"sessions never settled: {unsettled}"
        # What this example covered (shown by --hypothesis-show-statistics).
        for s in folded.sessions.values():
            hevent(f"session {s.kind} ended {min(s.ends, key=lambda e: e.ended_at).reason}")
            if s.deducted:
                hevent("session with AutoDeducted")
            if s.settled.reversed:
                hevent("settlement reversed units")
            if s.settled.charged:
                hevent("settlement charged units")
        names = Counter(name(e) for e in self.events)
        for n in ("Pool.Expired", "Pool.Revoked", "Pool.MemberRemoved", "Wallet.WithdrawalHeld"):
            if names[n]:
                hevent(n)
        hevent(f"sessions: {min(len(folded.sessions), 5)}+")
        hevent(f"log events: {len(self.events) // 100 * 100}+")
        hevent(f"steps: {getattr(self, 'steps', 0) // 10 * 10}+")
        check_all(self.events, self.ledger, reported_ends=self.reported_ends, causes=self.causes,
                  accepted_ids=[a[0] for a in self.accepted])


LedgerMachine.TestCase.settings = settings(stateful_step_count=80)
TestLedgerMachine = LedgerMachine.TestCase


# ================================================================================ I9: determinism


@dataclass
class Script:
    """External events of one scenario in posting order: (post_at, type, lag, payload)."""

    posts: list


@st.composite
def scripts(draw) -> Script:
    """Independent sessions (own patient, own pool, own doctor): no competition for units."""
    posts = []
    n_sessions = draw(st.integers(1, 4))
    for k in range(n_sessions):
        posts.append((T0, "doctor.registered", 0,
                      {"doctor_id": f"d{k}", "country": draw(st.sampled_from(["MW", "KE"]))}))
        units = draw(st.integers(1, 6))
        days = draw(st.sampled_from([1, 30]))
        starts = T0 - timedelta(hours=23, minutes=draw(st.sampled_from([0, 30, 50]))) \
            if days == 1 else T0
        posts.append((T0, "subscription.granted", 0, {
            "payment_reference": f"pay-{k}", "owner_id": f"p{k}",
            "starts_at": starts.isoformat(),
            "plan": {"name": "x", "price_minor": 1, "currency": "MWK",
                     "units": {"text": units, "voice": units, "video": units},
                     "seats": 1, "duration_days": days}}))
    for k in range(n_sessions):
        sid = f"s{k}"
        kind = draw(st.sampled_from(KINDS))
        t = T0 + timedelta(seconds=draw(st.integers(0, 1800)))
        posts.append((t, "session.requested", 0, {"session_id": sid, "kind": kind,
                                                  "patient_id": f"p{k}", "doctor_id": f"d{k}"}))
        if kind == "text" and draw(st.booleans()):
            t += timedelta(seconds=draw(st.integers(1, 1000)))
            posts.append((t, "session.patient_message", draw(st.integers(0, 59)),
                          {"session_id": sid}))
        elif kind != "text" and draw(st.booleans()):
            t += timedelta(seconds=draw(st.integers(1, 30)))
            posts.append((t, "call.ringing", 0, {"session_id": sid}))
        if draw(st.integers(0, 4)):  # most sessions start
            t += timedelta(seconds=draw(st.sampled_from([1, 20, 60, 85, 120, 400])))
            posts.append((t, "text.activated" if kind == "text" else "call.connected",
                          draw(st.integers(0, 59)), {"session_id": sid}))
        for _ in range(draw(st.integers(0, 8))):
            t += timedelta(seconds=draw(st.sampled_from([60, 300, 500, 590, 610, 800, 1000])))
            posts.append((t, draw(st.sampled_from(["session.activity", "session.patient_message"])
                                  if kind == "text" else st.just("session.activity")),
                          draw(st.integers(0, 59)), {"session_id": sid}))
        if draw(st.booleans()):
            t += timedelta(seconds=draw(st.integers(1, 1300)))
            posts.append((t, "session.ended", draw(st.integers(0, 59)),
                          {"session_id": sid, "ended_by": "patient"}))
        if draw(st.booleans()):  # a second end report (provider), possibly earlier
            posts.append((t + timedelta(seconds=draw(st.integers(0, 40))), "session.ended",
                          draw(st.integers(0, 59)), {"session_id": sid, "ended_by": "doctor"}))
    posts.sort(key=lambda p: p[0])
    return Script(posts)


def run_schedule(script: Script, schedule: str, extra: list[int]) -> dict:
    """Post every event at its time; tick per the schedule; settle everything; sum the money."""
    clock = FakeClock()
    ledger = make_ledger(None, clock)
    sessions = [p[3]["session_id"] for p in script.posts if p[1] == "session.requested"]
    pools = [str(Pool.create_id(p[3]["payment_reference"])) for p in script.posts
             if p[1] == "subscription.granted"]
    outcomes = []
    for k, (post_at, type_, lag, payload) in enumerate(script.posts):
        clock.set(max(clock(), post_at))
        if schedule in ("every", "duplicated"):
            ledger.tick(clock(), sessions, pools)
            if schedule == "duplicated":
                ledger.tick(clock(), sessions, pools)
        elif schedule == "sparse" and k in extra:
            ledger.tick(clock(), sessions, pools)
        try:
            ledger.ingest(f"e{k}", type_, post_at - timedelta(seconds=lag), payload)
            outcomes.append("ok")
        except errors.LedgerError as refusal:
            outcomes.append(refusal.code)
        if schedule == "duplicated" and k in extra and outcomes[-1] == "ok":  # a retried post
            assert ledger.ingest(f"e{k}", type_, post_at - timedelta(seconds=lag),
                                 payload).replayed
    end = clock() + timedelta(hours=5)
    for minutes in ((0, 11, 22) if schedule != "sparse" else (0, 11)):
        ledger.tick(end + timedelta(minutes=minutes), sessions, pools)
    events = events_of(ledger)
    check_all(events, ledger)
    folded = fold(events)
    money = {}
    for s in folded.sessions.values():
        charges = {d.n: d.pool_id for d in s.deducted}
        charges.update({c["block"]: c["pool_id"] for c in s.settled.charged})
        for r in s.settled.reversed:
            charges.pop(r["block"])
        money[s.session_id] = (s.settled.units_owed, s.net_units(), s.ended_at,
                               min(s.ends, key=lambda e: e.ended_at).reason,
                               sorted(charges.items()), s.settled.net_pay_minor)
    pools_state = {pid: (p.free, sorted(p.charged), dict(p.forfeited), dict(p.revoked))
                   for pid, p in folded.pools.items()}
    wallets = {k: (w.credited, w.available) for k, w in folded.wallets.items()}
    return {"sessions": money, "pools": pools_state, "wallets": wallets, "outcomes": outcomes}


@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(script=scripts(), data=st.data())
def test_I9_deterministic_whatever_the_tick_schedule_hypothesis(script: Script, data) -> None:
    """I9: the same external events under one tick per event, sparse ticks, and duplicated
    ticks (plus retried posts) give the same charges per session and the same balances."""
    n = len(script.posts)
    sparse = data.draw(st.sets(st.integers(0, n - 1), max_size=max(1, n // 3)), label="sparse")
    dups = data.draw(st.sets(st.integers(0, n - 1), max_size=n), label="dups")
    every = run_schedule(script, "every", [])
    for units, net, ended_at, reason, charges, pay in every["sessions"].values():
        hevent(f"I9 session ended {reason}, {'charged' if net else 'free'}")
    few = run_schedule(script, "sparse", sorted(sparse))
    many = run_schedule(script, "duplicated", sorted(dups))
    check_I9_deterministic(every, few, "sparse ticks")
    check_I9_deterministic(every, many, "duplicated ticks and retried posts")


def test_I9_deterministic_handcrafted() -> None:
    """A small fixed scenario: exhaustion, idle timeout, late earlier end, under three schedules."""
    t = T0
    posts = [
        (t, "doctor.registered", 0, {"doctor_id": "d0", "country": "MW"}),
        (t, "doctor.registered", 0, {"doctor_id": "d1", "country": "KE"}),
        (t, "subscription.granted", 0, {"payment_reference": "pay-0", "owner_id": "p0",
                                        "starts_at": t.isoformat(), "plan": {
                                            "name": "x", "price_minor": 1, "currency": "MWK",
                                            "units": {"text": 2, "voice": 2, "video": 2},
                                            "seats": 1, "duration_days": 30}}),
        (t, "subscription.granted", 0, {"payment_reference": "pay-1", "owner_id": "p1",
                                        "starts_at": t.isoformat(), "plan": {
                                            "name": "x", "price_minor": 1, "currency": "MWK",
                                            "units": {"text": 5, "voice": 5, "video": 5},
                                            "seats": 1, "duration_days": 30}}),
        (t, "session.requested", 0, {"session_id": "s0", "kind": "voice", "patient_id": "p0",
                                     "doctor_id": "d0"}),
        (t + 5 * S, "call.connected", 0, {"session_id": "s0"}),
        (t + MIN, "session.requested", 0, {"session_id": "s1", "kind": "text",
                                           "patient_id": "p1", "doctor_id": "d1"}),
        (t + 2 * MIN, "text.activated", 30, {"session_id": "s1"}),
        (t + 9 * MIN, "session.activity", 0, {"session_id": "s0"}),
        (t + 11 * MIN, "session.patient_message", 59, {"session_id": "s1"}),
        (t + 18 * MIN, "session.activity", 0, {"session_id": "s0"}),
        (t + 25 * MIN, "session.ended", 0, {"session_id": "s0"}),
        (t + 25 * MIN + 30 * S, "session.ended", 50, {"session_id": "s0", "ended_by": "doctor"}),
    ]
    script = Script(posts)
    every = run_schedule(script, "every", [])
    assert every["sessions"]["s0"][:4] == (2, 2, t + 5 * S + 20 * MIN, "balance_exhausted")
    assert every["sessions"]["s1"][:4] == (2, 2, t + 10 * MIN + S + 10 * MIN, "idle_timeout")
    for schedule, extra in (("sparse", [5, 9]), ("sparse", []), ("duplicated", list(range(13)))):
        check_I9_deterministic(every, run_schedule(script, schedule, extra), schedule)
    # The check has teeth: a run that charged one block more is caught.
    bad = {**every, "sessions": {**every["sessions"],
                                 "s0": (3,) + every["sessions"]["s0"][1:]}}
    with pytest.raises(AssertionError, match="I9"):
        check_I9_deterministic(every, bad)
