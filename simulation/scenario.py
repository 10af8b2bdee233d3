"""A realistic simulated day of the telehealth platform, deterministic from a seed.

`build_scenario(seed, patients, doctors, sessions, day_start)` returns every backend event of
the day with the instant the backend delivers it to the ledger (`Delivery.at`), faults included:
duplicates (re-posts of the same event id and body), late deliveries, and the few deliberate
refusals a real backend produces (conflicts, a patient without units, an unknown doctor).

The day: registered doctors (about 60 % in MW), pools granted before the day (individual plans,
stacked purchases with different expiries, family plans, nearly empty plans, plans expiring
during the day, a premium plan), then consultations with a daytime load that peaks mid-morning
and in the evening (Malawi time, UTC+2), each following a script (completed, idle, declined,
missed, no doctor response, not started, very long, a call whose end is reported late …). Each
doctor has at most one live session at a time, except for the deliberate conflicts. At the end
of the day some doctors withdraw their pay.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

SKEW = 60  # the ledger's default skew allowance; scheduling margins only
TICK = 60  # the simulation's tick interval
OTHER_COUNTRIES = ("ZM", "KE", "TZ", "ZA", "UG", "ZW", "NG", "MZ")
# Relative load per local (UTC+2) hour: a mid-morning and an evening peak.
LOCAL_LOAD = (0.15, 0.1, 0.08, 0.08, 0.1, 0.2, 0.45, 0.8, 1.2, 1.6, 1.7, 1.4,
              1.1, 1.0, 1.0, 1.0, 1.1, 1.3, 1.6, 1.7, 1.5, 1.1, 0.7, 0.35)
UTC_OFFSET_HOURS = 2
TEXT_SCRIPTS = {"text_completed": 0.64, "text_short": 0.04, "text_idle_walkaway": 0.06,
                "text_idle_gap": 0.03, "text_no_response": 0.08, "text_patient_cancel": 0.03,
                "text_not_started": 0.05, "text_boundary": 0.02}
CALL_SCRIPTS = {"call_completed": 0.66, "call_short": 0.05, "call_declined": 0.08,
                "call_missed": 0.05, "call_idle": 0.05, "call_late_end": 0.03,
                "call_boundary": 0.03}
# Billable durations right at the edges of §2 (0 s, the call grace, block boundaries).
TEXT_BOUNDARIES = (0, 599, 600, 601, 1200, 1201)
CALL_BOUNDARIES = (59, 60, 599, 600, 601, 1200, 1201)
SCRIPT_MINIMUM = 2  # every script appears at least this often, so small runs exercise it
# How late a late delivery is, per event type (seconds): a billable start stays within the skew
# allowance, an end report within the settlement grace; other events a few minutes.
LATE_SECONDS = {"text.activated": (20, 50), "call.connected": (20, 50),
                "call.declined": (60, 120), "session.ended": (60, 300)}
MINIMUMS = {"text_boundary": len(TEXT_BOUNDARIES), "call_boundary": len(CALL_BOUNDARIES),
            "call_late_end": 4}


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Event:
    """One backend event. `withdraw_rule` events get their amount when delivered."""

    event_id: str
    type: str
    occurred_at: datetime
    payload: dict
    session_id: str | None = None
    withdraw_rule: str | None = None

    def body(self) -> dict:
        return {"event_id": self.event_id, "type": self.type,
                "occurred_at": iso(self.occurred_at), "payload": self.payload}


@dataclass(order=True)
class Delivery:
    """One post of an event: at `at`; a duplicate re-posts an event already delivered."""

    at: datetime
    seq: int
    event: Event = field(compare=False)
    duplicate: bool = field(default=False, compare=False)
    late_seconds: int = field(default=0, compare=False)
    single: bool = field(default=False, compare=False)


@dataclass
class SessionPlan:
    session_id: str
    kind: str
    patient_id: str
    doctor_id: str
    requested_at: datetime
    script: str
    expect: str = ""  # a deliberate refusal: "session_conflict", "unknown_doctor", …
    release: datetime | None = None  # when the ledger has surely ended it (scheduling)


@dataclass
class Scenario:
    seed: int
    tag: str
    day_start: datetime
    setup_at: datetime
    doctors: dict[str, str]
    patients: list[str]
    categories: dict[str, str]
    pools: list[dict]
    sessions: list[SessionPlan]
    deliveries: list[Delivery]
    marketplace: object = None  # simulation.marketplace.MarketPlan: priced consultations (§10)

    @property
    def last_delivery(self) -> datetime:
        return self.deliveries[-1].at

    def describe(self) -> dict:
        """Counts of what the scenario contains."""
        scripts = Counter(s.script for s in self.sessions)
        kinds = Counter(s.kind for s in self.sessions)
        return {
            "patients": len(self.patients), "doctors": len(self.doctors),
            "doctors_mw": sum(1 for c in self.doctors.values() if c == "MW"),
            "patient_categories": dict(sorted(Counter(self.categories.values()).items())),
            "pools": len(self.pools),
            "family_pools": sum(1 for p in self.pools if p["plan"]["seats"] > 1),
            "sessions": len(self.sessions), "sessions_by_kind": dict(sorted(kinds.items())),
            "scripts": dict(sorted(scripts.items())),
            "deliveries": len(self.deliveries),
            "events": sum(1 for d in self.deliveries if not d.duplicate),
            "duplicates": sum(1 for d in self.deliveries if d.duplicate),
            "late": sum(1 for d in self.deliveries if d.late_seconds),
            **(self.marketplace.describe() if self.marketplace is not None else {}),
        }


# ------------------------------------------------------------------------------ builder


class _Builder:
    def __init__(self, seed: int, n_patients: int, n_doctors: int, n_sessions: int,
                 day_start: datetime) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.day = day_start
        self.setup = day_start - timedelta(minutes=20)
        self.tag = f"sim{seed}-{day_start:%Y%m%d}"
        self.n_patients, self.n_doctors, self.n_sessions = n_patients, n_doctors, n_sessions
        self.events = 0
        self.seq = 0
        self.deliveries: list[Delivery] = []
        self.doctors: dict[str, str] = {}
        self.patients: list[str] = []
        self.categories: dict[str, str] = {}
        self.pools: list[dict] = []
        self.pools_of: dict[str, list[dict]] = {}
        self.families: list[dict] = []
        self.sessions: list[SessionPlan] = []
        self.boundary_uses = Counter()
        self.mover: str | None = None  # the doctor whose country changes at noon
        self.contended_people: set[str] = set()  # consult only in the contention episodes

    # ---- small helpers

    def at(self, hours: float) -> datetime:
        return self.day + timedelta(seconds=round(hours * 3600))

    def event(self, type_: str, occurred: datetime, payload: dict, session_id: str | None = None,
              rule: str | None = None) -> Event:
        self.events += 1
        return Event(f"{self.tag}-e{self.events:07d}", type_, occurred, payload, session_id, rule)

    def deliver(self, ev: Event, at: datetime, late: int = 0) -> Delivery:
        self.seq += 1
        d = Delivery(at, self.seq, ev, late_seconds=late)
        self.deliveries.append(d)
        return d

    def emit(self, type_: str, occurred: datetime, payload: dict) -> Event:
        """A non-session event, delivered promptly (in order with those of the same instant)."""
        ev = self.event(type_, occurred, payload)
        jitter = 0 if occurred <= self.setup + timedelta(minutes=5) else self.rng.randint(0, 5)
        self.deliver(ev, occurred + timedelta(seconds=jitter))
        return ev

    # ---- doctors

    def build_doctors(self) -> None:
        n_mw = round(self.n_doctors * 0.6)
        for i in range(self.n_doctors):
            country = "MW" if i < n_mw else self.rng.choice(OTHER_COUNTRIES)
            did = f"{self.tag}-d{i:04d}"
            self.doctors[did] = country
            self.emit("doctor.registered", self.setup, {"doctor_id": did, "country": country})
        # One doctor moves to Malawi at noon: later sessions are paid in MWK (§5).
        movers = [d for d, c in self.doctors.items() if c != "MW"]
        if movers:
            mover = self.rng.choice(movers)
            self.mover = mover
            self.emit("doctor.country_changed", self.at(12), {"doctor_id": mover, "country": "MW"})
            self.doctors[mover] = "MW"

    # ---- pools

    def plan(self, kind: str) -> dict:
        rng = self.rng
        currency = "MWK" if rng.random() < 0.7 else "USD"
        price = rng.choice((1_500_000, 2_500_000, 4_000_000)) if currency == "MWK" else \
            rng.choice((1_000, 1_500, 2_500))
        if kind == "family":
            units = {"text": rng.randint(8, 14), "voice": rng.randint(4, 8),
                     "video": rng.randint(2, 5)}
            return {"name": "Family", "price_minor": price * 3, "currency": currency,
                    "units": units, "seats": rng.randint(3, 6), "duration_days": 30}
        if kind == "contended":
            units = {"text": rng.randint(2, 4), "voice": rng.randint(2, 3), "video": 2}
            return {"name": "Family Lite", "price_minor": price * 2, "currency": currency,
                    "units": units, "seats": rng.randint(3, 6), "duration_days": 30}
        if kind == "low":
            units = {"text": rng.randint(1, 2), "voice": rng.randint(1, 2),
                     "video": rng.choice((0, 1))}
            return {"name": "Starter", "price_minor": price // 3, "currency": currency,
                    "units": units, "seats": 1, "duration_days": 14}
        if kind == "premium":
            return {"name": "Premium", "price_minor": price * 10, "currency": currency,
                    "units": {"text": 40, "voice": 40, "video": 40}, "seats": 1,
                    "duration_days": 30}
        units = {"text": rng.randint(5, 10), "voice": rng.randint(2, 7), "video": rng.randint(1, 4)}
        return {"name": "Individual", "price_minor": price, "currency": currency, "units": units,
                "seats": 1, "duration_days": rng.choice((14, 21, 30))}

    def grant(self, owner: str, plan: dict, starts_at: datetime, category: str,
              occurred: datetime | None = None) -> dict:
        ref = f"{self.tag}-pay{len(self.pools):05d}"
        days = plan["duration_days"] + (7 if plan["duration_days"] == 30 else 0)
        pool = {"payment_reference": ref, "owner_id": owner, "plan": plan, "starts_at": starts_at,
                "effective_end": starts_at + timedelta(days=days), "category": category,
                "members": []}
        self.pools.append(pool)
        self.pools_of.setdefault(owner, []).append(pool)
        ev = self.emit("subscription.granted", occurred or self.setup,
                       {"payment_reference": ref, "owner_id": owner, "plan": plan,
                        "starts_at": iso(starts_at)})
        pool["event"] = ev
        return pool

    def current_start(self, duration_days: int) -> datetime:
        """A start such that the pool is valid today and for at least two more days."""
        into = self.rng.randint(0, max(0, duration_days - 3))
        return self.day - timedelta(days=into, hours=self.rng.randint(0, 23))

    def build_patients(self) -> None:
        rng, n = self.rng, self.n_patients
        self.patients = [f"{self.tag}-p{i:05d}" for i in range(n)]
        order = list(self.patients)
        rng.shuffle(order)
        quotas = [("premium", max(2, round(n * 0.004))), ("none", max(1, round(n * 0.015))),
                  ("low", max(3, round(n * 0.06))), ("stacked", max(3, round(n * 0.08))),
                  ("expiring", max(2, round(n * 0.015)))]
        cursor = 0
        n_families = max(2, round(n * 0.03))
        for f in range(n_families):
            contended = f % 3 == 0  # few units, members who consult together (see episodes)
            plan = self.plan("contended" if contended else "family")
            seats = plan["seats"]
            size = seats if f % 4 != 1 else seats - 1  # some families keep a free seat
            people = order[cursor:cursor + size]
            cursor += size
            owner = people[0]
            self.categories[owner] = "family_owner"
            pool = self.grant(owner, plan, self.current_start(30), "family")
            pool["contended"] = contended
            if contended:
                self.contended_people.update(people)
            for member in people[1:]:
                self.categories[member] = "family_member"
                self.emit("member.added", self.setup,
                          {"payment_reference": pool["payment_reference"], "patient_id": member})
                pool["members"].append(member)
                self.pools_of.setdefault(member, []).append(pool)
                if not contended and rng.random() < 0.3:  # some also hold a plan of their own
                    plan_own = self.plan("individual")
                    self.grant(member, plan_own, self.current_start(plan_own["duration_days"]),
                               "individual")
            self.families.append(pool)
        for category, count in quotas:
            for patient in order[cursor:cursor + count]:
                self.categories[patient] = category
                self.patient_pools(patient, category)
            cursor += count
        for patient in order[cursor:]:
            self.categories[patient] = "single"
            self.patient_pools(patient, "single")
        self.pool_faults()

    def patient_pools(self, patient: str, category: str) -> None:
        rng = self.rng
        if category == "none":
            return
        if category in ("premium", "low"):
            plan = self.plan(category)
            self.grant(patient, plan, self.current_start(plan["duration_days"]), category)
        elif category == "stacked":
            older = self.plan("individual") | {"duration_days": 30}
            self.grant(patient, older, self.day - timedelta(days=rng.randint(18, 28)), "stacked")
            newer = self.plan("individual") | {"duration_days": rng.choice((14, 21))}
            if rng.random() < 0.25:  # a renewal that starts during the day
                start = self.at(rng.uniform(8, 14))
            else:
                start = self.day - timedelta(days=rng.randint(2, 10))
            self.grant(patient, newer, start, "stacked")
        elif category == "expiring":
            plan = self.plan("individual")
            days = plan["duration_days"] + (7 if plan["duration_days"] == 30 else 0)
            end = self.at(rng.uniform(5, 20))
            self.grant(patient, plan, end - timedelta(days=days), "expiring")
            if rng.random() < 0.5:
                second = self.plan("individual")
                self.grant(patient, second, self.current_start(second["duration_days"]),
                           "individual")
        else:
            plan = self.plan("individual")
            self.grant(patient, plan, self.current_start(plan["duration_days"]), "individual")

    def pool_faults(self) -> None:
        """Refunds, member removals and additions, top-ups, grant re-sends and conflicts."""
        rng = self.rng
        singles = [p for p in self.pools if p["category"] == "individual"]
        for pool in rng.sample(singles, min(len(singles), max(1, self.n_patients // 500))):
            self.emit("payment.refunded", self.at(rng.uniform(9, 17)),
                      {"payment_reference": pool["payment_reference"]})
            pool["refunded"] = True
        members = [(f, m) for f in self.families for m in f["members"]]
        removals = min(len(members), max(2, self.n_patients // 250))
        for family, member in rng.sample(members, removals):
            self.emit("member.removed", self.at(rng.uniform(8, 18)),
                      {"payment_reference": family["payment_reference"], "patient_id": member})
        singles_people = [p for p, c in self.categories.items() if c == "single"]
        full = next((f for f in self.families if len(f["members"]) + 1 == f["plan"]["seats"]), None)
        if full and singles_people:  # one seat too many: refused with seats_exhausted
            self.emit("member.added", self.setup + timedelta(minutes=2),
                      {"payment_reference": full["payment_reference"],
                       "patient_id": rng.choice(singles_people)})
        spare = next((f for f in self.families if len(f["members"]) + 1 < f["plan"]["seats"]), None)
        if spare and singles_people:  # a member joins during the day
            joiner = rng.choice(singles_people)
            self.emit("member.added", self.at(rng.uniform(9, 12)),
                      {"payment_reference": spare["payment_reference"], "patient_id": joiner})
            spare["members"].append(joiner)
            self.pools_of.setdefault(joiner, []).append(spare)
        low = [p for p, c in self.categories.items() if c == "low"]
        for patient in rng.sample(low, max(1, len(low) // 4)):  # top-ups after running out
            when = self.at(rng.uniform(11, 16))
            self.grant(patient, self.plan("individual"), when, "topup", occurred=when)
        first = self.pools[0]["event"]  # the payment provider re-sends a grant: a no-op
        self.emit("subscription.granted", self.setup + timedelta(minutes=1), first.payload)
        other = dict(first.payload, plan=dict(first.payload["plan"], price_minor=1))
        self.emit("subscription.granted", self.setup + timedelta(minutes=1), other)  # conflict

    # ---- sessions: when, who, which script

    def request_times(self, count: int) -> list[datetime]:
        weights = [LOCAL_LOAD[(h + UTC_OFFSET_HOURS) % 24] for h in range(24)]
        hours = self.rng.choices(range(24), weights=weights, k=count)
        return [self.day + timedelta(hours=h, seconds=self.rng.randint(0, 3599)) for h in hours]

    def script_list(self, table: dict[str, float], count: int) -> list[str]:
        names = []
        for name, share in table.items():
            names += [name] * max(MINIMUMS.get(name, SCRIPT_MINIMUM), round(share * count))
        self.rng.shuffle(names)
        main = next(iter(table))
        while len(names) < count:
            names.append(main)
        return names[:count] if len(names) > count else names

    def session_specs(self) -> list[dict]:
        rng = self.rng
        premium = [p for p, c in self.categories.items() if c == "premium"]
        specs: list[dict] = []
        n_long = max(2, self.n_sessions // 600)
        for i in range(n_long):
            kind = ("text", "voice", "video")[i % 3]
            specs.append({"t": self.at(rng.uniform(7, 14)), "kind": kind,
                          "script": "text_long" if kind == "text" else "call_long",
                          "patient": premium[i % len(premium)]})
        families = sorted(self.families, key=lambda f: not f["contended"])
        for family in families[: max(2, len(self.families) // 2)]:
            people = [family["owner_id"]] + family["members"]
            # Contended families consult early, before anything else drained their pool.
            t = self.at(rng.uniform(5, 8) if family["contended"] else rng.uniform(7, 20))
            kind = rng.choice(("text", "voice"))
            for person in rng.sample(people, min(len(people), rng.randint(2, 3))):
                specs.append({"t": t + timedelta(seconds=rng.randint(0, 90)), "kind": kind,
                              "script": "text_contended" if kind == "text" else "call_contended",
                              "patient": person})
        for _ in range(max(2, self.n_sessions // 500)):
            kind = rng.choice(("text", "voice"))
            specs.append({"t": self.at(rng.uniform(8, 20)), "kind": kind,
                          "script": f"{'text' if kind == 'text' else 'call'}_completed",
                          "expect": "doctor_conflict"})
        for _ in range(max(1, self.n_sessions // 1000)):
            specs.append({"t": self.at(rng.uniform(8, 20)), "kind": "text",
                          "script": "text_completed", "expect": "patient_conflict"})
        specs.append({"t": self.at(rng.uniform(9, 17)), "kind": "video",
                      "script": "call_completed", "expect": "unknown_doctor"})
        regular = max(0, self.n_sessions - len(specs))
        kinds = rng.choices(("text", "voice", "video"), weights=(0.5, 0.3, 0.2), k=regular)
        n_text = kinds.count("text")
        text_scripts = iter(self.script_list(TEXT_SCRIPTS, n_text))
        call_scripts = iter(self.script_list(CALL_SCRIPTS, regular - n_text))
        for t, kind in zip(self.request_times(regular), kinds):
            script = next(text_scripts) if kind == "text" else next(call_scripts)
            specs.append({"t": t, "kind": kind, "script": script})
        return specs

    def schedule(self) -> None:
        """Place sessions in time order: each doctor and each patient (per kind group) free."""
        rng = self.rng
        specs = self.session_specs()
        heap = [(s["t"], i, s) for i, s in enumerate(specs)]
        heapq.heapify(heap)
        doctor_free = dict.fromkeys(self.doctors, self.day)
        patient_free: dict[tuple[str, str], datetime] = {}
        live_plans: dict[str, SessionPlan] = {}  # doctor -> their current session
        doctor_ids = sorted(self.doctors)
        while heap:
            t, i, spec = heapq.heappop(heap)
            group = "text" if spec["kind"] == "text" else "call"
            patient = spec.get("patient")
            if spec.get("expect") == "patient_conflict":
                busy = [k[0] for k, free in patient_free.items() if k[1] == group and free > t]
                if busy:
                    self.add_session(spec, t, rng.choice(busy), rng.choice(doctor_ids),
                                     "session_conflict", patient_free, doctor_free, commit=False)
                continue
            if patient is not None and patient_free.get((patient, group), t) > t:
                later = patient_free[(patient, group)] + timedelta(seconds=30)
                heapq.heappush(heap, (later, i, spec))
                continue
            if patient is None:
                patient = self.free_patient(group, t, patient_free,
                                            with_units=spec["script"] == "call_late_end")
            if spec.get("expect") == "unknown_doctor":
                self.add_session(spec, t, patient, f"{self.tag}-dX", "unknown_doctor",
                                 patient_free, doctor_free, commit=False)
                continue
            if spec.get("expect") == "doctor_conflict":
                busy = [d for d, free in doctor_free.items() if free > t + timedelta(minutes=3)
                        and d in live_plans and live_plans[d].patient_id != patient
                        and live_plans[d].requested_at < t]
                if busy:
                    self.add_session(spec, t, patient, rng.choice(sorted(busy)), "session_conflict",
                                     patient_free, doctor_free, commit=False)
                continue
            free = [d for d in doctor_ids if doctor_free[d] <= t]
            if not free:
                later = min(doctor_free.values()) + timedelta(seconds=rng.randint(5, 60))
                heapq.heappush(heap, (later, i, spec))
                continue
            doctor = rng.choice(free)
            plan = self.add_session(spec, t, patient, doctor, "", patient_free, doctor_free)
            live_plans[doctor] = plan

    def free_patient(self, group: str, t: datetime, patient_free: dict,
                     with_units: bool = False) -> str:
        """A random patient without a live session of this group (with a plan, if asked)."""
        for _ in range(100):
            p = self.rng.choice(self.patients)
            if with_units and self.categories[p] not in ("single", "stacked", "premium"):
                continue
            if p in self.contended_people:
                continue
            if patient_free.get((p, group), t) <= t:
                return p
        return next(p for p in self.patients if patient_free.get((p, group), t) <= t)

    def add_session(self, spec: dict, t: datetime, patient: str, doctor: str, expect: str,
                    patient_free: dict, doctor_free: dict, commit: bool = True) -> SessionPlan:
        sid = f"{self.tag}-s{len(self.sessions):05d}"
        plan = SessionPlan(sid, spec["kind"], patient, doctor, t, spec["script"], expect)
        plan.release = Script(self, plan).run()
        self.sessions.append(plan)
        if commit:
            group = "text" if plan.kind == "text" else "call"
            patient_free[(patient, group)] = plan.release
            doctor_free[doctor] = plan.release
        return plan

    # ---- end of the day

    def withdrawals(self) -> None:
        rng = self.rng
        doctors = sorted(self.doctors)
        chosen = rng.sample(doctors, min(len(doctors), max(4, round(len(doctors) * 0.3))))
        mw = [d for d in chosen if self.doctors[d] == "MW" and d != self.mover]
        if mw:  # the first full withdrawal is in MWK: enough pay for the minimum in a small run
            chosen.remove(mw[0])
            chosen.insert(2, mw[0])
        for n, doctor in enumerate(chosen):
            currency = "MWK" if self.doctors[doctor] == "MW" else "USD"
            rule = "over" if n == 0 else "below_min" if n == 1 else "all" if n == 2 else \
                rng.choice(("all", "all", "half", "half", "third"))
            when = self.at(23.5) + timedelta(seconds=rng.randint(0, 1500))
            request = f"{self.tag}-w{n:04d}"
            ev = self.event("withdrawal.requested", when,
                            {"request_id": request, "doctor_id": doctor, "currency": currency,
                             "amount_minor": 0}, rule=rule)
            self.deliver(ev, when + timedelta(seconds=rng.randint(0, 5)))
            done = when + timedelta(seconds=rng.randint(300, 1200))
            if n == 2 or (n != 3 and rng.random() < 0.7):
                self.emit("withdrawal.completed", done,
                          {"request_id": request, "doctor_id": doctor, "currency": currency})
            else:
                self.emit("withdrawal.rejected", done,
                          {"request_id": request, "doctor_id": doctor, "currency": currency,
                           "reason": "bank account closed"})

    def duplicates(self) -> None:
        """About 3 % of events are posted again later, a third of them alone; a few re-posts
        reuse an event id with another body (a buggy backend), refused as a conflict (I8)."""
        rng = self.rng
        originals = [d for d in self.deliveries if d.event.withdraw_rule is None]
        for d in originals:
            if rng.random() < 0.03:
                self.seq += 1
                again = Delivery(d.at + timedelta(seconds=rng.randint(0, 400)), self.seq, d.event,
                                 duplicate=True, single=rng.random() < 0.35)
                self.deliveries.append(again)
        sessions = [d for d in originals if d.event.type == "session.activity"]
        for d in rng.sample(sessions, min(len(sessions), max(2, self.n_sessions // 1000))):
            ev = d.event
            other = Event(ev.event_id, ev.type, ev.occurred_at + timedelta(seconds=1), ev.payload,
                          ev.session_id)
            self.seq += 1
            self.deliveries.append(Delivery(d.at + timedelta(seconds=rng.randint(60, 300)),
                                            self.seq, other, duplicate=True, single=True))

    def out_of_range(self) -> None:
        """Events dated outside [clock − 35 days, clock + 5 minutes]: refused, never stored."""
        when = self.at(self.rng.uniform(9, 18))
        ev = self.event("session.activity", when - timedelta(days=40), {"session_id": "old"})
        self.deliver(ev, when)
        ev = self.event("session.activity", when + timedelta(minutes=20), {"session_id": "early"})
        self.deliver(ev, when)


# --------------------------------------------------------------------------- scripts


class Script:
    """The events of one session from its script; returns when the ledger has surely ended it."""

    def __init__(self, builder: _Builder, plan: SessionPlan) -> None:
        self.b, self.plan, self.rng = builder, plan, builder.rng
        self.t0 = plan.requested_at
        self.last_delivery = self.t0
        self.end_delivery: datetime | None = None

    def run(self) -> datetime:
        self.emit(0, "session.requested", {"kind": self.plan.kind,
                                           "patient_id": self.plan.patient_id,
                                           "doctor_id": self.plan.doctor_id}, late=False)
        timeout_at = getattr(self, self.plan.script)()
        ends = [x for x in (timeout_at, self.end_delivery) if x is not None]
        return min(ends) + timedelta(seconds=2 * TICK) if ends else self.t0 + timedelta(hours=4)

    def emit(self, offset: float, type_: str, extra: dict | None = None,
             late: bool = True) -> datetime:
        """An event `offset` seconds after the request; delivered in order, ~3 % late."""
        occurred = self.t0 + timedelta(seconds=round(offset))
        ev = self.b.event(type_, occurred, {"session_id": self.plan.session_id, **(extra or {})},
                          self.plan.session_id)
        delivery = max(occurred + timedelta(seconds=self.rng.randint(0, 8)), self.last_delivery)
        self.last_delivery = delivery
        delay = 0
        if late and self.rng.random() < 0.03:
            low, high = LATE_SECONDS.get(type_, (60, 240))
            delay = self.rng.randint(low, high)
        d = self.b.deliver(ev, delivery + timedelta(seconds=delay), late=delay)
        if type_ in ("session.ended", "call.declined") and self.end_delivery is None:
            self.end_delivery = d.at
        return occurred

    def deadline(self, offset: float) -> datetime:
        """When the tick has surely applied a timeout whose deadline is `offset`."""
        return self.t0 + timedelta(seconds=round(offset) + SKEW + TICK)

    def end(self, offset: float, by: str | None = None, reason: str = "completed",
            late: bool = True) -> None:
        self.emit(offset, "session.ended", {"ended_by": by or self.rng.choice(
            ("patient", "patient", "doctor")), "reason": reason}, late=late)
        if self.plan.kind != "text" and self.rng.random() < 0.05:
            # The provider's room-ended report: another source, a few seconds apart (§3).
            self.emit(max(1, offset + self.rng.randint(-20, 20)), "session.ended",
                      {"ended_by": "system", "reason": "room_ended"}, late=late)

    # ---- text

    def _text_length(self) -> int:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.randint(180, 900)
        if r < 0.85:
            return self.rng.randint(900, 1800)
        return self.rng.randint(1800, 2400)

    def _conversation(self, start: float, length: float, gap=(60, 480)) -> float:
        """Messages from either side every 1–8 minutes; returns the last message's offset."""
        t = start
        while True:
            step = self.rng.randint(*gap)
            if t + step > start + length:
                return t
            t += step
            self.emit(t, self.rng.choice(("session.patient_message", "session.activity")))

    def _open_text(self) -> float:
        first = self.rng.randint(3, 60)
        self.emit(first, "session.patient_message")
        activated = first + self.rng.randint(15, 200)
        self.emit(activated, "text.activated")
        return activated

    def text_completed(self) -> None:
        activated = self._open_text()
        length = self._text_length()
        self._conversation(activated, length)
        self.end(activated + length)

    def text_short(self) -> None:
        activated = self._open_text()
        self.end(activated + self.rng.randint(20, 170))

    def boundary(self, values: tuple[int, ...]) -> int:
        """The next edge duration, in turn, so that a small run still meets each one."""
        key = values
        self.b.boundary_uses[key] += 1
        return values[(self.b.boundary_uses[key] - 1) % len(values)]

    def text_boundary(self) -> None:
        activated = self._open_text()
        length = self.boundary(TEXT_BOUNDARIES)
        self._conversation(activated, length - 1)
        self.end(activated + length, late=False)

    def text_contended(self) -> None:
        """A family member's long conversation, started together with the others'."""
        activated = self._open_text()
        length = self.rng.randint(1500, 2400)
        self._conversation(activated, length, gap=(60, 300))
        self.end(activated + length)

    def text_idle_walkaway(self) -> datetime:
        activated = self._open_text()
        last = self._conversation(activated, self._text_length())
        if self.rng.random() < 0.5:  # the backend closes it much later
            self.end(last + 600 + self.rng.randint(120, 1500), by="system", reason="abandoned")
        return self.deadline(last + 600)

    def text_idle_gap(self) -> datetime:
        activated = self._open_text()
        last = self._conversation(activated, self.rng.randint(180, 900))
        resumed = last + self.rng.randint(660, 900)
        for k in range(self.rng.randint(1, 3)):  # too late: refused with session_ended
            self.emit(resumed + 60 * k, "session.patient_message")
        self.end(resumed + 200, by="patient")
        return self.deadline(last + 600)

    def text_no_response(self) -> datetime:
        first = self.rng.randint(3, 60)
        self.emit(first, "session.patient_message")
        if self.rng.random() < 0.5:
            self.emit(first + self.rng.randint(30, 200), "session.patient_message")
        if self.rng.random() < 0.5:  # the patient gives up after the doctor's deadline
            self.end(first + self.rng.randint(320, 600), by="patient", reason="cancelled")
        return self.deadline(first + 300)

    def text_patient_cancel(self) -> None:
        first = self.rng.randint(3, 60)
        self.emit(first, "session.patient_message")
        self.end(first + self.rng.randint(60, 280), by="patient", reason="cancelled")

    def text_not_started(self) -> datetime:
        if self.rng.random() < 0.4:
            self.end(self.rng.randint(905, 1200), by="system", reason="expired")
        return self.deadline(900)

    def text_long(self) -> datetime:
        activated = self._open_text()
        length = 3 * 3600 + self.rng.randint(300, 1500)
        self._conversation(activated, length, gap=(240, 420))
        self.end(activated + length, by="patient")
        return self.deadline(activated + 3 * 3600)

    # ---- calls

    def _duration(self) -> int:
        r = self.rng.random()
        if r < 0.25:
            return self.rng.randint(60, 600)
        if r < 0.65:
            return self.rng.randint(600, 1500)
        if r < 0.9:
            return self.rng.randint(1500, 2400)
        return self.rng.randint(2400, 3000)

    def _connect(self) -> float:
        ringing = self.rng.randint(0, 3)
        self.emit(ringing, "call.ringing", late=False)
        connected = ringing + self.rng.randint(4, 40)
        self.emit(connected, "call.connected")
        if self.rng.random() < 0.05:  # the video provider reports it too (its own clock)
            self.emit(max(ringing + 1, connected + self.rng.randint(-8, 8)), "call.connected")
        return connected

    def _pings(self, start: float, length: float, gap=(180, 300)) -> float:
        t = start
        while True:
            step = self.rng.randint(*gap)
            if t + step >= start + length:
                return t
            t += step
            self.emit(t, "session.activity")

    def call_completed(self) -> None:
        connected = self._connect()
        duration = self._duration()
        self._pings(connected, duration)
        self.end(connected + duration)

    def call_contended(self) -> None:
        connected = self._connect()
        duration = self.rng.randint(1500, 2700)
        self._pings(connected, duration)
        self.end(connected + duration)

    def call_short(self) -> None:
        connected = self._connect()
        self.end(connected + self.rng.randint(30, 59))

    def call_boundary(self) -> None:
        connected = self._connect()
        duration = self.boundary(CALL_BOUNDARIES)
        self._pings(connected, duration)
        self.end(connected + duration, late=False)

    def call_declined(self) -> None:
        ringing = self.rng.randint(0, 3)
        self.emit(ringing, "call.ringing", late=False)
        self.emit(ringing + self.rng.randint(5, 40), "call.declined")

    def call_missed(self) -> datetime:
        ringing = self.rng.randint(0, 3)
        self.emit(ringing, "call.ringing", late=False)
        if self.rng.random() < 0.4:
            self.end(ringing + self.rng.randint(95, 200), by="system", reason="no_answer")
        return self.deadline(ringing + 90)

    def call_idle(self) -> datetime:
        connected = self._connect()
        last = self._pings(connected, self.rng.randint(200, 1500))
        if self.rng.random() < 0.5:
            self.end(last + 900 + self.rng.randint(60, 900), by="system", reason="provider_timeout")
        return self.deadline(last + 900)

    def call_late_end(self) -> None:
        """The end is reported after the tick charged the next block: reversed at settlement."""
        connected = self._connect()
        n = self.rng.randint(1, 3)
        duration = n * 600 - self.rng.randint(15, 120)
        self._pings(connected, duration - 20)
        self.emit(connected + duration - self.rng.randint(0, 15), "session.activity", late=False)
        occurred = self.t0 + timedelta(seconds=round(connected + duration))
        after = (n + 1) * 600 + self.rng.randint(125, 240)  # past the tick charging block n+1
        report = self.t0 + timedelta(seconds=round(connected + after))
        ev = self.b.event("session.ended", occurred, {"session_id": self.plan.session_id,
                                                      "ended_by": "patient", "reason": "completed"},
                          self.plan.session_id)
        d = self.b.deliver(ev, report, late=int((report - occurred).total_seconds()))
        self.end_delivery = d.at

    def call_long(self) -> datetime:
        connected = self._connect()
        length = 3 * 3600 + self.rng.randint(300, 1500)
        self._pings(connected, length, gap=(200, 290))
        self.end(connected + length, by="patient")
        return self.deadline(connected + 3 * 3600)


def next_midnight(after: datetime, margin: timedelta = timedelta(hours=1)) -> datetime:
    """The first UTC midnight at least `margin` after `after`."""
    t = (after + margin).astimezone(timezone.utc)
    return datetime(t.year, t.month, t.day, tzinfo=timezone.utc) + timedelta(days=1)


def build_scenario(seed: int = 7, patients: int = 1000, doctors: int = 100, sessions: int = 3000,
                   day_start: datetime | None = None, practitioners: int = 0,
                   consultations: int = 0) -> Scenario:
    """The whole day, deterministic from (seed, sizes, day_start). `practitioners` and
    `consultations` size the therapy marketplace's part (simulation/marketplace.py; none by
    default); it draws from its own random stream, so the unit-billed part is the same."""
    from simulation.marketplace import build_marketplace

    day_start = day_start or next_midnight(datetime.now(timezone.utc))
    b = _Builder(seed, patients, doctors, sessions, day_start)
    b.build_doctors()
    b.build_patients()
    b.schedule()
    b.withdrawals()
    b.out_of_range()
    b.duplicates()
    market = build_marketplace(b, practitioners, consultations, seed)
    b.deliveries.sort()
    return Scenario(seed=seed, tag=b.tag, day_start=day_start, setup_at=b.setup,
                    doctors=b.doctors, patients=b.patients, categories=b.categories,
                    pools=b.pools, sessions=b.sessions, deliveries=b.deliveries,
                    marketplace=market)
