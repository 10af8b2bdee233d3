"""The therapy marketplace's part of the simulated day (billing-rules.md §10), and its checks.

`build_marketplace(builder, practitioners, consultations, seed)` adds to the day's deliveries:
practitioners (doctors of the ledger) with versioned price lists (INR with 18 % GST, one in USD,
a price change at noon), patients of the unit platform who also top up a money wallet, and
booked consultations along every path of §10's table — completed by either party or by time,
no-shows of either side, patient cancellations in and out of the 2-hour window, declines,
admin cancellations, bookings never activated or activated too late, refunds while the share is
pending and after its release, joins from the backend and from provider webhooks, too early,
late-delivered, and a double-booked practitioner refused — plus money faults (a chargeback
leaving debt, refunds to source, re-sent and conflicting top-ups) and the refusals a backend
meets (insufficient funds, off-list bookings, a unit session requested during a consultation).
It draws from its own random stream, so the unit-billed day is the same with or without it.

`compare_marketplace(driver, client)` reads every consultation, money wallet, the platform
accounts and the practitioners' wallets over HTTP and compares them with the MarketOracle.
Nothing here imports the service.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from simulation.scenario import Delivery, Event, iso

TOTAL_INR = 118_000  # 1180.00 INR: fee 1000.00 + 18 % GST
STORIES = {"completed": 0.36, "by_time": 0.12, "practitioner_absent": 0.05,
           "patient_absent": 0.05, "patient_cancel": 0.05, "late_cancel": 0.03, "declined": 0.04,
           "admin_cancel": 0.03, "never_activated": 0.04, "activation_too_late": 0.02,
           "refund_pending": 0.05, "refund_available": 0.05, "refund_no_show": 0.02,
           "early_join": 0.03, "end_too_soon": 0.03, "overrun": 0.03}
STORY_MINIMUM = 1
KINDS = (("individual", 50, 0.7), ("couple", 80, 0.2), ("family", 80, 0.1))
FEES_INR = {"individual:50": 100_000, "couple:80": 150_000, "family:80": 180_000}
PROVIDER_IDENTITY = ("{id}", "patient:{id}", "doctor:{id}", "practitioner:{id}")


@dataclass
class ConsultationPlan:
    consultation_id: str
    patient_id: str
    practitioner_id: str
    story: str
    start: datetime
    minutes: int
    consultation_type: str
    mode: str


@dataclass
class MarketPlan:
    """What the marketplace part of the day contains."""

    practitioners: dict[str, str] = field(default_factory=dict)  # id -> currency
    patients: list[str] = field(default_factory=list)
    consultations: list[ConsultationPlan] = field(default_factory=list)

    def describe(self) -> dict:
        return {"practitioners": len(self.practitioners), "money_patients": len(self.patients),
                "consultations": len(self.consultations),
                "stories": dict(sorted(Counter(c.story for c in self.consultations).items()))}


class MarketBuilder:
    """Builds the marketplace's deliveries into a scenario builder (simulation/scenario.py)."""

    def __init__(self, b, n_practitioners: int, n_consultations: int, seed: int) -> None:
        self.b = b
        self.rng = random.Random(seed * 104_729 + 14)
        self.n_practitioners, self.n_consultations = n_practitioners, n_consultations
        self.plan = MarketPlan()
        self.calendar: dict[str, list[tuple[datetime, datetime]]] = {}
        self.spend: Counter = Counter()  # (patient, currency) -> planned totals
        self.money_deliveries: list[Delivery] = []
        self.count = 0

    # ---- posting

    def post(self, type_: str, occurred: datetime, payload: dict, late: int = 0,
             session_id: str | None = None, rule: str | None = None) -> Delivery:
        """An event delivered a few seconds after it occurred (`late` seconds more)."""
        ev = self.b.event(type_, occurred, payload, session_id, rule)
        at = occurred + timedelta(seconds=self.rng.randint(0, 4) + late)
        d = self.b.deliver(ev, at, late=late)
        self.money_deliveries.append(d)
        return d

    def hours(self, h: float) -> datetime:
        return self.b.at(h)

    # ---- the day

    def build(self) -> MarketPlan:
        if self.n_practitioners <= 0 or self.n_consultations <= 0:
            return self.plan
        self.practitioners()
        self.consultations()
        self.wallets()
        self.money_faults()
        self.unit_conflicts()
        self.withdrawals()
        self.duplicates()
        return self.plan

    def practitioners(self) -> None:
        setup = self.b.setup
        for i in range(self.n_practitioners):
            pid = f"{self.b.tag}-t{i:03d}"
            usd = i == 2  # one practitioner sells in USD, without tax
            currency = "USD" if usd else "INR"
            self.plan.practitioners[pid] = currency
            self.calendar[pid] = []
            self.post("doctor.registered", setup, {"doctor_id": pid,
                                                   "country": "US" if usd else "IN"})
            self.post("price_list.published", setup + timedelta(minutes=1),
                      self.price_list(pid, "v1", usd, i))
            if i % 2 and not usd:  # a price change from noon; booked ones keep theirs
                self.post("price_list.published", self.hours(11.5),
                          {**self.price_list(pid, "v2", usd, i, raise_pct=10),
                           "effective_from": iso(self.hours(12))})
        first = next(iter(self.plan.practitioners))
        # Re-sent unchanged (a no-op), then v1 again with another fee (price_list_conflict).
        self.post("price_list.published", self.hours(10), self.price_list(first, "v1", False, 0))
        self.post("price_list.published", self.hours(10) + timedelta(minutes=1),
                  self.price_list(first, "v1", False, 0, raise_pct=5))

    @staticmethod
    def price_list(pid: str, version: str, usd: bool, i: int, raise_pct: int = 0) -> dict:
        if usd:
            fees = [{"consultation_type": "individual", "duration_minutes": 50, "fee_minor": 2_500},
                    {"consultation_type": "couple", "duration_minutes": 80, "fee_minor": 3_999}]
            return {"practitioner_id": pid, "version": version, "currency": "USD", "tax_bps": 0,
                    "share_bps": 7_000, "fees": fees}
        fees = []
        for key, fee in FEES_INR.items():
            kind, minutes = key.split(":")
            fee = fee - (1 if i % 3 == 1 else 0)  # 999.99: tax rounds half up, odd unit to platform
            fees.append({"consultation_type": kind, "duration_minutes": int(minutes),
                         "fee_minor": fee * (100 + raise_pct) // 100})
        return {"practitioner_id": pid, "version": version, "currency": "INR", "tax_bps": 1_800,
                "share_bps": 6_000 if i % 4 == 3 else 5_000, "fees": fees}

    # ---- consultations

    def story_list(self) -> list[str]:
        names = []
        for name, share in STORIES.items():
            names += [name] * max(STORY_MINIMUM, round(share * self.n_consultations))
        self.rng.shuffle(names)
        while len(names) < self.n_consultations:
            names.append("completed")
        return names

    def consultations(self) -> None:
        rng = self.rng
        pool = rng.sample(self.b.patients, min(len(self.b.patients),
                                               max(6, self.n_consultations // 3)))
        self.plan.patients = pool
        for n, story in enumerate(self.story_list()):
            kind, minutes = rng.choices([(k, m) for k, m, _ in KINDS],
                                        weights=[w for *_, w in KINDS])[0]
            placed = self.place(minutes)
            if placed is None:
                continue
            practitioner, start = placed
            currency = self.plan.practitioners[practitioner]
            if currency == "USD":
                kind, minutes = "individual", 50
            cid = f"{self.b.tag}-c{n:04d}"
            patient = rng.choice(pool)
            mode = rng.choices(("video", "audio", "chat"), weights=(0.6, 0.25, 0.15))[0]
            c = ConsultationPlan(cid, patient, practitioner, story, start, minutes, kind, mode)
            self.plan.consultations.append(c)
            # Each half of the day's top-ups covers the bookings (most patients, see wallets()).
            self.spend[(patient, currency)] += 2 * (TOTAL_INR if currency == "INR" else 2_500)
            Story(self, c).run()
        self.double_booking(pool)

    def place(self, minutes: int) -> tuple[str, datetime] | None:
        """A practitioner free for [start − 6 min, end] on a 15-minute grid, 06:00–21:00 UTC."""
        rng = self.rng
        for _ in range(50):
            practitioner = rng.choice(sorted(self.plan.practitioners))
            start = self.hours(6) + timedelta(minutes=15 * rng.randint(0, 60))
            span = (start - timedelta(minutes=6), start + timedelta(minutes=minutes))
            if all(span[1] <= a or span[0] >= b for a, b in self.calendar[practitioner]):
                self.calendar[practitioner].append(span)
                return practitioner, start
        return None

    def double_booking(self, pool: list[str]) -> None:
        """Two overlapping video consultations of one practitioner: the second one's
        practitioner join is refused (session_conflict) and ends as a practitioner no-show."""
        inr = [p for p, c in self.plan.practitioners.items() if c == "INR"]
        practitioner, start = inr[0], self.hours(23)  # after every other booking has ended
        for k, story in enumerate(("completed", "double_booked")):
            cid = f"{self.b.tag}-c9{k:03d}"
            c = ConsultationPlan(cid, pool[k % len(pool)], practitioner, story,
                                 start + timedelta(minutes=20 * k), 50, "individual", "video")
            self.plan.consultations.append(c)
            self.top_up(c.patient_id, "INR", TOTAL_INR, self.b.setup + timedelta(minutes=5))
            Story(self, c).run()

    # ---- money

    def wallets(self) -> None:
        """Each patient tops up what their bookings need (some less): before the day, and
        again in the afternoon."""
        rng = self.rng
        for (patient, currency), need in sorted(self.spend.items()):
            factor = rng.choice((1.0, 1.2, 1.5, 0.5)) if currency == "INR" else 1.0
            amount = max(1_000, int(need * factor) // 2)
            for half, when in ((0, self.b.setup + timedelta(minutes=3)),
                               (1, self.hours(rng.uniform(13, 15)))):
                self.top_up(patient, currency, amount, when)

    def top_up(self, patient: str, currency: str, amount: int, when: datetime,
               ref: str | None = None) -> Delivery:
        self.count += 1
        ref = ref or f"{self.b.tag}-rzp{self.count:05d}"
        return self.post("wallet.topped_up", when, {
            "patient_id": patient, "currency": currency, "amount_minor": amount,
            "payment_reference": ref, "provider": self.rng.choice(("razorpay", "stripe"))})

    def money_faults(self) -> None:
        rng, pool = self.rng, self.plan.patients
        first = self.top_up(pool[0], "INR", 50_000, self.hours(7))
        again = first.event.payload
        self.post("wallet.topped_up", self.hours(7.5), dict(again))  # re-sent: a no-op
        self.post("wallet.topped_up", self.hours(7.6), {**again, "amount_minor": 60_000})
        if self.b.pools:  # a subscription's payment reference cannot top up a wallet
            self.top_up(pool[1], "INR", 1_000, self.hours(7.7),
                        ref=self.b.pools[0]["payment_reference"])
        # A chargeback that leaves debt: bookings refused until a top-up repays it.
        debtor = f"{self.b.tag}-debtor"
        self.plan.patients.append(debtor)
        paid = self.top_up(debtor, "INR", 3 * TOTAL_INR, self.b.setup + timedelta(minutes=4))
        inr = [p for p, c in self.plan.practitioners.items() if c == "INR"]
        practitioner = inr[0]
        # Consultations before the chargeback (captured: it leaves debt) and after the top-up.
        for k, (first, booked) in enumerate(((6.0, 5.5), (19.5, 13.5))):
            slot = next(((p, self.hours(first + q / 4)) for q in range(16) for p in inr
                         if self.fits(p, self.hours(first + q / 4), 50)), None)
            if slot is None:
                continue
            c = ConsultationPlan(f"{self.b.tag}-cd{k}", debtor, slot[0], "completed", slot[1],
                                 50, "individual", "video")
            self.plan.consultations.append(c)
            Story(self, c, booked=self.hours(booked)).run()
        self.post("wallet.payment_reversed", self.hours(12), {
            "payment_reference": paid.event.payload["payment_reference"],
            "amount_minor": 3 * TOTAL_INR, "reason": "chargeback"})
        self.post("consultation.booked", self.hours(12.5), self.booking(
            f"{self.b.tag}-cd9", debtor, inr[0], self.hours(19), 50))  # wallet_in_debt
        self.top_up(debtor, "INR", 250_000, self.hours(13))
        # Refunds to source of part of what is left; one more than the top-up.
        paid_by = {}
        for d in self.money_deliveries:
            if d.event.type == "wallet.topped_up" and d.event.payload["patient_id"] != debtor:
                paid_by.setdefault(d.event.payload["patient_id"], d.event.payload)
        for k, patient in enumerate(rng.sample(sorted(paid_by), min(3, len(paid_by)))):
            ref = paid_by[patient]["payment_reference"]
            amount = 10_000 if k else 10_000_000
            self.post("wallet.refunded_to_source", self.hours(21 + k / 10), {
                "refund_id": f"{self.b.tag}-rf{k}", "payment_reference": ref,
                "amount_minor": amount, "admin_id": "admin-ops", "reason": "patient asked"})

    def fits(self, practitioner: str, start: datetime, minutes: int) -> bool:
        span = (start - timedelta(minutes=6), start + timedelta(minutes=minutes))
        if any(not (span[1] <= a or span[0] >= b) for a, b in self.calendar[practitioner]):
            return False
        self.calendar[practitioner].append(span)
        return True

    def booking(self, cid: str, patient: str, practitioner: str, start: datetime, minutes: int,
                kind: str = "individual", mode: str = "video") -> dict:
        return {"consultation_id": cid, "patient_id": patient, "practitioner_id": practitioner,
                "consultation_type": kind, "mode": mode, "start": iso(start),
                "duration_minutes": minutes}

    def unit_conflicts(self) -> None:
        """A unit session requested from a practitioner in a consultation (session_conflict), a
        session event naming a consultation (consultation_not_unit_billed), bookings off the
        price list or too soon (invalid_booking)."""
        rng = self.rng
        debtor_first = [c for c in self.plan.consultations
                        if c.consultation_id == f"{self.b.tag}-cd0"]  # funded: surely ongoing
        ongoing = debtor_first + [c for c in self.plan.consultations if c.story == "by_time"]
        for k, c in enumerate(ongoing[:2]):
            sid = f"{self.b.tag}-sx{k}"
            self.post("session.requested", c.start + timedelta(minutes=20), {
                "session_id": sid, "kind": "voice", "patient_id": rng.choice(self.b.patients),
                "doctor_id": c.practitioner_id}, session_id=sid)
            self.post("session.ended", c.start + timedelta(minutes=25), {
                "session_id": c.consultation_id, "ended_by": "patient", "reason": "completed"})
        c = self.plan.consultations[0]
        self.post("consultation.booked", self.hours(9), self.booking(
            f"{self.b.tag}-cx1", c.patient_id, c.practitioner_id, self.hours(16), 45))
        self.post("consultation.booked", self.hours(9), self.booking(
            f"{self.b.tag}-cx2", c.patient_id, c.practitioner_id, self.hours(9.05), 50))

    def withdrawals(self) -> None:
        """Practitioners withdraw their available shares at the end of the day (§7)."""
        for n, (practitioner, currency) in enumerate(sorted(self.plan.practitioners.items())):
            if n % 2:
                continue
            when = self.hours(23.6) + timedelta(seconds=self.rng.randint(0, 900))
            request = f"{self.b.tag}-tw{n:03d}"
            self.post("withdrawal.requested", when, {
                "request_id": request, "doctor_id": practitioner, "currency": currency,
                "amount_minor": 0}, rule="all" if n % 4 == 0 else "half")
            self.post("withdrawal.completed", when + timedelta(minutes=10), {
                "request_id": request, "doctor_id": practitioner, "currency": currency})

    def duplicates(self) -> None:
        """About 3 % of the marketplace's events are posted again later (a third alone)."""
        rng = self.rng
        for d in list(self.money_deliveries):
            if d.event.withdraw_rule is None and rng.random() < 0.03:
                self.b.seq += 1
                self.b.deliveries.append(Delivery(
                    d.at + timedelta(seconds=rng.randint(0, 400)), self.b.seq, d.event,
                    duplicate=True, single=rng.random() < 0.35))


class Story:
    """The events of one consultation along its story."""

    def __init__(self, m: MarketBuilder, c: ConsultationPlan,
                 booked: datetime | None = None) -> None:
        self.m, self.c, self.rng = m, c, m.rng
        self.booked = booked or max(m.b.setup + timedelta(minutes=6),
                                    c.start - timedelta(hours=self.rng.uniform(2.6, 7)))

    def at(self, seconds: float) -> datetime:
        return self.c.start + timedelta(seconds=round(seconds))

    def post(self, type_: str, occurred: datetime, **payload) -> None:
        late = self.rng.randint(20, 45) if type_.endswith("joined") and \
            self.rng.random() < 0.04 else 0
        self.m.post(type_, occurred, {"consultation_id": self.c.consultation_id, **payload}, late,
                    session_id=self.c.consultation_id)

    def join(self, role: str, seconds: float) -> None:
        when = self.at(seconds)
        if self.rng.random() < 0.3:  # from the provider's signed webhook (room call_<id>)
            who = self.c.patient_id if role == "patient" else self.c.practitioner_id
            form = self.rng.choice(PROVIDER_IDENTITY[:2] if role == "patient"
                                   else PROVIDER_IDENTITY[2:] + ("{id}",))
            self.m.post("call.participant_joined", when, {
                "session_id": self.c.consultation_id, "participant": form.format(id=who),
                "provider": "livekit"}, session_id=self.c.consultation_id)
        else:
            self.post("consultation.joined", when, participant=role)

    def run(self) -> None:
        c, rng, story = self.c, self.rng, self.c.story
        self.m.post("consultation.booked", self.booked, self.m.booking(
            c.consultation_id, c.patient_id, c.practitioner_id, c.start, c.minutes,
            c.consultation_type, c.mode), session_id=c.consultation_id)
        if story == "activation_too_late":
            self.post("consultation.activated", self.at(rng.randint(5, 40)), admin_id="admin-ops")
            return
        if story in ("patient_cancel", "late_cancel") or story == "never_activated":
            before = rng.randint(7200, 8000) if story == "patient_cancel" else \
                rng.randint(900, 7100)
            if story != "never_activated":
                self.post("consultation.cancelled", self.at(-before), reason="rescheduling")
            if story != "late_cancel":
                return
        activated = min(self.booked + timedelta(minutes=rng.randint(5, 90)),
                        self.at(-rng.randint(400, 900)))
        self.post("consultation.activated", max(activated, self.booked + timedelta(seconds=30)),
                  admin_id=rng.choice(("admin-ops", "admin-7")))
        if story == "declined":
            self.post("consultation.declined", self.at(-rng.randint(60, 350)), reason="unwell")
            return
        if story == "admin_cancel":
            self.post("consultation.admin_cancelled", self.at(-rng.randint(60, 350)),
                      admin_id="admin-ops", reason="practitioner unavailable")
            return
        self.session(story)

    def session(self, story: str) -> None:
        rng, minutes = self.rng, self.c.minutes
        practitioner_at = rng.randint(-240, 150)
        patient_at = rng.randint(-200, 420)
        if story == "early_join":
            self.post("consultation.joined", self.at(-rng.randint(330, 900)),
                      participant="patient")  # join_window_not_open
        if story in ("practitioner_absent", "double_booked"):
            self.join("patient", patient_at)
            if story == "double_booked" or rng.random() < 0.3:  # too late to count, or refused
                self.join("practitioner", 625 if story != "double_booked" else 90)
            return
        if story in ("patient_absent", "refund_no_show"):
            self.join("practitioner", practitioner_at)
            if story == "refund_no_show":
                self.refund(self.at(600 + rng.randint(700, 2400)))
            return
        first, second = sorted((("practitioner", practitioner_at), ("patient", patient_at)),
                               key=lambda x: x[1])
        self.join(*first)
        if story == "end_too_soon":  # before the other joined: consultation_not_started
            self.post("consultation.ended", self.at(first[1] + 1), ended_by=first[0])
            second = (second[0], max(second[1], first[1] + 30))
        self.join(*second)
        if story == "by_time":
            return
        if story == "overrun":
            end = minutes * 60 + rng.randint(1, 50)
        else:
            end = minutes * 60 - rng.randint(0, 420)
        self.post("consultation.ended", self.at(end),
                  ended_by=rng.choice(("patient", "practitioner")))
        if story == "refund_pending":
            self.refund(self.at(end + rng.randint(60, 480)))
        elif story == "refund_available":
            self.refund(self.at(end + rng.randint(900, 5400)))

    def refund(self, when: datetime) -> None:
        self.post("consultation.refunded", when, admin_id="admin-ops", reason="complaint upheld")


def build_marketplace(builder, practitioners: int, consultations: int, seed: int) -> MarketPlan:
    """Add the marketplace's deliveries to `builder` (a simulation.scenario._Builder)."""
    return MarketBuilder(builder, practitioners, consultations, seed).build()


# ---------------------------------------------------------------------------- comparing


def compare_marketplace(driver, client) -> dict:
    """Compare every consultation, money wallet, platform account and practitioner wallet
    with the MarketOracle; returns the totals for the summary."""
    plan, market = driver.sc.marketplace, driver.market
    if plan is None or not plan.consultations:
        return {}
    for c in plan.consultations:
        compare_consultation(driver, c.consultation_id,
                             client.get(f"/v1/consultations/{c.consultation_id}"))
    for patient in plan.patients:
        response = client.get(f"/v1/patients/{patient}/wallet")
        have = {w["currency"]: w for w in response.json().get("wallets", [])} \
            if response.status_code == 200 else {}
        for (p, currency), w in market.money.items():
            if p != patient:
                continue
            got = {k: v for k, v in have.get(currency, {}).items() if k != "currency"}
            if got != w.numbers():
                driver.differ(f"money wallet {patient} {currency}: ledger {got}, "
                              f"oracle {w.numbers()}")
    response = client.get("/v1/platform/accounts")
    accounts = {a["currency"]: {k: v for k, v in a.items() if k != "currency"}
                for a in response.json().get("accounts", [])}
    if accounts != market.accounts:
        driver.differ(f"platform accounts: ledger {accounts}, oracle {market.accounts}")
    from simulation.driver import compare_doctor  # the §5 wallets, as for unit pay

    for practitioner in plan.practitioners:
        compare_doctor(driver, practitioner, client.get(f"/v1/doctors/{practitioner}/wallet"))
    return accounts


def compare_consultation(driver, cid: str, response) -> None:
    market = driver.market
    if cid not in market.consultations:
        if response.status_code != 404:
            driver.differ(f"consultation {cid}: ledger {response.status_code}, oracle refused it")
        return
    if response.status_code != 200:
        driver.differ(f"consultation {cid}: ledger {response.status_code}, oracle has it")
        return
    got = response.json()
    refund = got.get("refund")
    have = {"status": got["status"], "price": got["price"], "joins": got["joins"],
            "completed_at": got["completed_at"], "activated_by": got["activated_by"],
            "hold": got["hold"]["status"], "close_reason": (got.get("close") or {}).get("reason"),
            "earning": (got.get("earning") or {}).get("status"),
            "refund": None if refund is None else {k: refund[k] for k in (
                "earning", "share_reversed_minor", "platform_reversed_minor")}}
    for key, value in market.consultation_facts(cid).items():
        if have.get(key) != value:
            driver.differ(f"consultation {cid}: {key} ledger {have.get(key)!r}, oracle {value!r}")


def market_summary(driver, accounts: dict) -> dict:
    """Consultations by outcome, refunds and the accounts, for the simulation's report."""
    market = driver.market
    outcomes = Counter(f"{c.status} ({c.close_reason})" if c.close_reason else c.status
                       for c in market.consultations.values())
    planned = {c.consultation_id for c in driver.sc.marketplace.consultations} \
        if driver.sc.marketplace else set()
    return {"consultations_by_outcome": dict(sorted(outcomes.items())),
            "consultations_refused": len(planned - set(market.consultations)),
            "refunds": dict(Counter(c.refund["earning"] for c in market.consultations.values()
                                    if c.refund)),
            "wallets_in_debt_ever": sum(1 for t in market.top_ups.values() if t.reversal),
            "accounts": accounts}
