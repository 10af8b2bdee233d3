"""Balances, wallets and statements as of a recorded instant (issue 12 §2).

The property: at every instant the clock showed, the as-of answer for that instant equals what
the live views answered then (read just before the clock moved on), for every patient and
doctor; statements between consecutive instants open and close on those balances, chain
(closing = next opening) and sum (opening + movements = closing). Checked on a handcrafted
scenario on SQLite and PostgreSQL, and for random histories (Hypothesis).
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timedelta

import psycopg
import pytest
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, initialize, precondition, rule)

from audit.service import AuditService
from conftest import PG_URL, T0, FakeClock, postgres_required
from ledger import errors
from ledger.application import Ledger
from ledger.rules import BUCKETS, Policy
from projections import Projector
from scheduler.tick import run_tick
from storage import persistence_env, postgres_conninfo
from test_projections import POLICY, World, rich_scenario

UNIT_FIELDS = ("available", "held", "charged")


class Witness:
    """Reads the live views just before the clock moves on: what the ledger showed then."""

    def __init__(self, ledger, projector: Projector, audit: AuditService) -> None:
        self.ledger, self.projector, self.audit = ledger, projector, audit
        self.patients: set[str] = set()
        self.doctors: set[str] = set()
        self.seen: list[tuple[datetime, dict, dict]] = []

    def observe(self, now: datetime) -> None:
        if self.seen and self.seen[-1][0] == now:
            self.seen.pop()  # read again: later commands at the same instant count
        self.projector.catch_up()
        balances = {p: self.projector.patient_balance(p, now) for p in sorted(self.patients)}
        wallets = {d: self.projector.doctor_wallet(d) for d in sorted(self.doctors)}
        self.seen.append((now, balances, wallets))

    def check(self) -> int:
        """as of every observed instant == the live answer then; statements chain and sum."""
        self.audit.catch_up()
        for now, balances, wallets in self.seen:
            for patient, live in balances.items():
                then = self.audit.patient_balance(patient, now)
                if not live["pools"]:
                    assert then is None, (patient, now)
                    continue
                assert {k: then[k] for k in live} == live, (patient, now)
            for doctor, live in wallets.items():
                then = self.audit.doctor_wallet(doctor, now)
                assert then is not None and then["wallets"] == live["wallets"], (doctor, now)
        self._check_statements()
        return len(self.seen)

    def _check_statements(self) -> None:
        instants = [T0 - timedelta(days=400)] + [now for now, _, _ in self.seen]
        for patient in sorted(self.patients):
            previous = None
            for start, end in zip(instants, instants[1:]):
                statement = self.audit.patient_statement(patient, start, end)
                if statement is None:
                    continue
                check_unit_statement(self.audit, statement, start, end, previous)
                previous = statement
        for doctor in sorted(self.doctors):
            previous = None
            for start, end in zip(instants, instants[1:]):
                statement = self.audit.doctor_statement(doctor, start, end)
                if statement is not None:
                    check_money_statement(self.audit, statement, end, previous)
                    previous = statement


def check_unit_statement(audit, statement: dict, start, end, previous: dict | None) -> None:
    """Opening = as of `start`, closing = as of `end`, opening + movements = closing, and the
    opening is the previous period's closing."""
    after = audit.patient_balance(statement["patient_id"], end)
    before = audit.patient_balance(statement["patient_id"], start)
    for bucket in BUCKETS:
        section = statement["buckets"][bucket]
        assert section["closing"] == {f: after["buckets"][bucket][f] for f in UNIT_FIELDS}
        opening = {f: before["buckets"][bucket][f] for f in UNIT_FIELDS} if before \
            else dict.fromkeys(UNIT_FIELDS, 0)
        assert section["opening"] == opening
        running = dict(opening)
        for move in (m for m in statement["movements"] if m["bucket"] == bucket):
            for f in UNIT_FIELDS:
                running[f] += move["change"][f]
            assert running == move["balance"]
        assert running == section["closing"]
        if previous is not None:
            assert previous["buckets"][bucket]["closing"] == section["opening"]
    positions = [m["position"] for m in statement["movements"]]
    assert positions == sorted(positions)


def check_money_statement(audit, statement: dict, end, previous: dict | None) -> None:
    wallets = {w["currency"]: w for w in audit.doctor_wallet(statement["doctor_id"], end)["wallets"]}
    for currency, section in statement["currencies"].items():
        running = dict(section["opening"])
        for move in section["movements"]:
            for f in running:
                running[f] += move["change"][f]
            assert running == move["balance"]
        assert running == section["closing"]
        assert section["closing"]["available"] == wallets[currency]["available_minor"]
        assert section["closing"]["pending"] == wallets[currency]["pending_minor"]
        assert section["closing"]["withdrawn"] == wallets[currency]["withdrawn_minor"]
        if previous is not None and currency in previous["currencies"]:
            assert previous["currencies"][currency]["closing"] == section["opening"]


class WatchedClock(FakeClock):
    """A FakeClock that lets the witness read the live views before it moves forward."""

    def __init__(self, start: datetime = T0) -> None:
        super().__init__(start)
        self.before_moving = lambda now: None

    def set(self, moment: datetime) -> datetime:
        if moment > self.now:
            self.before_moving(self.now)
        return super().set(max(moment, self.now))

    def advance(self, seconds: float) -> datetime:
        return self.set(self.now + timedelta(seconds=seconds))


# --------------------------------------------------------------------------- handcrafted


def test_as_of_every_instant_equals_what_the_live_views_showed_then(store_url):
    """The rich scenario (family pool and member, calls and texts, a reversal, a refund and
    an expiry while held, withdrawals), observed at each of its instants."""
    clock = WatchedClock()
    world = World(store_url, clock)
    projector = world.projector()
    audit = AuditService(world.ledger, store_url)
    witness = Witness(world.ledger, projector, audit)
    witness.patients |= {"p1", "p2", "p3", "p4", "nobody"}
    witness.doctors |= {"d1", "d2"}
    clock.before_moving = witness.observe
    try:
        rich_scenario(world, projector)
        witness.observe(clock.now)
        assert witness.check() > 20
        # Reversals, a revocation and a forfeit are among the movements.
        events = {m["event"] for p in ("p1", "p2", "p3", "p4") for m in audit.patient_statement(
            p, T0 - timedelta(days=1), clock.now)["movements"]}
        assert {"Pool.Granted", "Pool.Held", "Pool.Charged", "Pool.Released", "Pool.Reversed",
                "Pool.Revoked", "Pool.Expired", "Pool.MemberAdded"} <= events
    finally:
        audit.close()
        world.close()


def test_as_of_covers_a_priced_consultations_share_in_the_practitioners_wallet():
    """§10 earnings move the §5 wallet: a capture (pending), the release after the grace
    (available), a withdrawal of it, and a second capture refunded while pending (reversed)."""
    from test_marketplace import END, START, Clinic

    clock = WatchedClock()
    clinic = Clinic(clock)
    projector = Projector(clinic.ledger, "sqlite:///:memory:", POLICY)
    audit = AuditService(clinic.ledger, "sqlite:///:memory:")
    witness = Witness(clinic.ledger, projector, audit)
    witness.doctors |= {"t1"}
    witness.patients |= {"p1"}
    clock.before_moving = witness.observe
    try:
        clinic.practitioner()
        clinic.top_up()
        clinic.in_progress("c1")
        clinic.finish("c1", at=clinic.at(START + 45 * 60 * timedelta(seconds=1)))
        clinic.tick_at(END + timedelta(minutes=30))  # the share becomes available
        clinic.post("withdrawal.requested", request_id="w1", doctor_id="t1", currency="INR",
                    amount_minor=20_000)
        clinic.book("c2", start=END + timedelta(hours=3))
        clinic.activate("c2")
        clinic.join("c2", "patient", clinic.at(END + timedelta(hours=3)))
        clinic.join("c2", "practitioner", clinic.at(END + timedelta(hours=3, minutes=1)))
        clinic.finish("c2", at=clinic.at(END + timedelta(hours=3, minutes=40)))
        clinic.refund("c2", at=clinic.at(END + timedelta(hours=3, minutes=42)))
        witness.observe(clock.now)
        assert witness.check() >= 8
        final = audit.doctor_wallet("t1", clock.now)["wallets"]
        assert final == [{"currency": "INR", "pending_minor": 0, "available_minor": 30_000,
                          "held_minor": 20_000, "withdrawn_minor": 0, "credited_minor": 100_000,
                          "reversed_minor": 50_000}]
        moves = audit.doctor_statement("t1", T0, clock.now)["currencies"]["INR"]["movements"]
        assert [m["event"] for m in moves] == ["Consultation.Closed", "Wallet.EarningCredited",
                                               "Wallet.WithdrawalHeld", "Consultation.Closed",
                                               "Consultation.Refunded"]
        # Every aggregate of the marketplace records the ledger's clock, not the wall clock.
        stamps = {e.timestamp for e in clinic.events()}
        assert all(t.microsecond == 0 and T0 <= t <= clock.now for t in stamps)
    finally:
        audit.close()
        projector.close()
        clinic.ledger.close()


def test_a_late_end_is_named_with_both_times(store_url, clock):
    """A call whose end (event time 08:05:10) is reported at 08:30: as of 08:25 the ledger
    still showed two charged blocks (they were reversed at settlement); the answer names the
    end with its event time and its recorded time."""
    w = World(store_url, clock)
    projector = w.projector()
    audit = AuditService(w.ledger, store_url)
    try:
        w.post("doctor.registered", w.at(), doctor_id="d1", country="MW")
        w.grant("pay-1", "p1", w.at())
        w.post("session.requested", w.at(), session_id="c1", kind="voice", patient_id="p1",
               doctor_id="d1")
        w.post("call.connected", w.at(seconds=10), session_id="c1")
        for minute in (5, 10, 15, 20):
            w.post("session.activity", w.at(minutes=minute, seconds=10), session_id="c1")
            w.tick(projector, w.at(minutes=minute, seconds=10))
        w.tick(projector, w.at(minutes=22))
        recorded_end = clock.set(w.at(minutes=30))
        w.ledger.ingest("late-end", "session.ended", w.at(minutes=5, seconds=10),
                        {"session_id": "c1", "ended_by": "patient"})
        w.tick(projector, w.at(minutes=60))
        at_25 = audit.patient_balance("p1", w.at(minutes=25))
        assert at_25["buckets"]["voice"]["charged"] == 2
        assert at_25["ended_later"] == [{"session_id": "c1",
                                         "ended_at": w.at(minutes=5, seconds=10).isoformat(),
                                         "recorded_at": recorded_end.isoformat(),
                                         "position": at_25["ended_later"][0]["position"]}]
        assert audit.doctor_wallet("d1", w.at(minutes=25))["ended_later"]
        now = audit.patient_balance("p1", w.clock.now)
        assert now["buckets"]["voice"]["charged"] == 1 and now["ended_later"] == []
        reversed_ = [m for m in audit.patient_statement("p1", w.at(minutes=30), w.clock.now)
                     ["movements"] if m["event"] == "Pool.Reversed"]
        assert [m["block"] for m in reversed_] == [2]
    finally:
        audit.close()
        w.close()


def test_before_a_patient_or_doctor_existed_there_is_no_account(store_url, clock):
    w = World(store_url, clock)
    audit = AuditService(w.ledger, store_url)
    try:
        w.post("doctor.registered", w.at(minutes=1), doctor_id="d1", country="MW")
        w.grant("pay-1", "p1", w.at(minutes=2))
        assert audit.patient_balance("p1", w.at(minutes=1)) is None
        assert audit.patient_balance("p1", w.at(minutes=2))["buckets"]["voice"]["available"] == 6
        assert audit.doctor_wallet("d1", w.at()) is None
        assert audit.doctor_wallet("d1", w.at(minutes=1))["wallets"] == []
        assert audit.patient_statement("p1", w.at(), w.at(minutes=1)) is None
    finally:
        audit.close()
        w.close()


def test_every_event_carries_the_recorded_time_of_its_command(store_url, clock):
    """Recorded time is the ledger's clock when the command was decided (ledger/recording.py),
    for events of ingestion and of the tick alike, whatever their own event times."""
    w = World(store_url, clock)
    projector = w.projector()
    try:
        w.post("doctor.registered", w.at(), doctor_id="d1", country="MW")
        w.grant("pay-1", "p1", w.at())
        w.post("session.requested", w.at(minutes=1), session_id="t1", kind="text",
               patient_id="p1", doctor_id="d1")
        clock.set(w.at(minutes=9))  # received 8 minutes after it happened
        w.ledger.ingest("late", "session.patient_message", w.at(minutes=1, seconds=30),
                        {"session_id": "t1"})
        w.tick(projector, w.at(minutes=40))  # the not_started timeout (none: messaged) …
        stamps = {}
        for n in w.ledger.recorder.select_notifications(1, 1000):
            event = w.ledger.mapper.to_domain_event(n)
            stamps.setdefault(type(event).__qualname__, set()).add(event.timestamp)
        assert stamps["Session.PatientMessaged"] == {w.at(minutes=9)}
        assert stamps["Session.Ended"] == {w.at(minutes=40)}  # decided by the tick at 08:40
        assert all(t.microsecond == 0 and t.utcoffset() == timedelta(0)
                   for ts in stamps.values() for t in ts)
    finally:
        w.close()


# ---------------------------------------------------------------------------- Hypothesis

PATIENTS = ("p1", "p2", "p3")
DOCTORS = {"d1": "MW", "d2": "KE"}


class AsOfMachine(RuleBasedStateMachine):
    """Random histories of grants, members, sessions, late ends, refunds, withdrawals and ticks
    at random times; the witness reads the live views before every clock move."""

    store = "memory"
    sessions = Bundle("sessions")

    @initialize()
    def setup(self) -> None:
        self.clock = WatchedClock()
        self.url, env = self._store()
        self.ledger = Ledger(env=env, clock=self.clock, policy=POLICY,
                             withdrawal_minimum_minor={"MWK": 0, "USD": 0})
        view_url = "sqlite:///:memory:" if self.url is None else self.url
        self.projector = Projector(self.ledger, view_url, POLICY)
        self.audit = AuditService(self.ledger, view_url)
        self.witness = Witness(self.ledger, self.projector, self.audit)
        self.witness.patients |= set(PATIENTS)
        self.witness.doctors |= set(DOCTORS)
        self.clock.before_moving = self.witness.observe
        self.n, self.refs, self.requests = 0, [], []
        for doctor, country in DOCTORS.items():
            self.post("doctor.registered", doctor_id=doctor, country=country)

    def _store(self) -> tuple[str | None, dict]:
        if self.store == "memory":
            return None, {"PERSISTENCE_MODULE": "eventsourcing.popo"}
        schema = "h_" + uuid.uuid4().hex[:10]
        url = f"{PG_URL}?schema={schema}"
        self.schema = schema
        return url, persistence_env(url)

    def post(self, type_: str, lag: int = 0, **payload) -> dict | None:
        self.n += 1
        try:
            return self.ledger.ingest(f"e{self.n}", type_, self.clock() - timedelta(seconds=lag),
                                      payload).result
        except errors.LedgerError as refusal:
            note(f"refused {type_}: {refusal.code}")
            return None

    @rule(owner=st.sampled_from(PATIENTS), units=st.integers(0, 3), seats=st.integers(1, 3),
          days=st.sampled_from([1, 30]), starts=st.sampled_from([0, -86_000, 300]))
    def grant(self, owner, units, seats, days, starts) -> None:
        ref = f"pay-{len(self.refs) + 1}"
        if self.post("subscription.granted", payment_reference=ref, owner_id=owner,
                     starts_at=(self.clock() + timedelta(seconds=starts)).isoformat(),
                     plan={"name": "p", "price_minor": 1, "currency": "MWK", "seats": seats,
                           "duration_days": days,
                           "units": {"text": units, "voice": units + 1, "video": 1}}):
            self.refs.append(ref)

    @precondition(lambda self: self.refs)
    @rule(i=st.integers(0, 9), patient=st.sampled_from(PATIENTS), add=st.booleans(),
          refund=st.booleans())
    def pool_change(self, i, patient, add, refund) -> None:
        ref = self.refs[i % len(self.refs)]
        if refund and not add:
            self.post("payment.refunded", payment_reference=ref)
        else:
            self.post("member.added" if add else "member.removed", payment_reference=ref,
                      patient_id=patient)

    @rule(target=sessions, patient=st.sampled_from(PATIENTS), doctor=st.sampled_from(sorted(DOCTORS)),
          kind=st.sampled_from(["text", "voice"]))
    def request(self, patient, doctor, kind):
        self.n += 1
        sid = f"s{self.n}"
        self.post("session.requested", session_id=sid, kind=kind, patient_id=patient,
                  doctor_id=doctor)
        return (sid, kind)

    @rule(session=sessions)
    def start(self, session) -> None:
        sid, kind = session
        if kind == "text":
            self.post("session.patient_message", session_id=sid)
            self.post("text.activated", session_id=sid)
        else:
            self.post("call.connected", session_id=sid)

    @rule(session=sessions, lag=st.sampled_from([0, 0, 200, 700, 1300]))
    def end(self, session, lag) -> None:
        """An end report, possibly for an instant well before it is received (a late end)."""
        self.post("session.ended", lag, session_id=session[0], ended_by="patient")

    @rule(session=sessions)
    def activity(self, session) -> None:
        self.post("session.activity", session_id=session[0])

    @rule(patient=st.sampled_from(PATIENTS), doctor=st.sampled_from(sorted(DOCTORS)),
          minutes=st.integers(1, 35), late=st.booleans())
    def whole_call(self, patient, doctor, minutes, late) -> None:
        """A call from request to settlement, its end reported on time or after the tick
        has charged past it (a reversal at settlement)."""
        sid = self.request(patient, doctor, "voice")[0]
        self.post("call.connected", session_id=sid)
        ended = self.clock() + timedelta(minutes=minutes)
        if late:
            self.advance_and_tick(minutes * 60 + 1300)
            self.post("session.ended", int((self.clock() - ended).total_seconds()),
                      session_id=sid, ended_by="doctor")
        else:
            self.advance_and_tick(minutes * 60)
            self.post("session.ended", session_id=sid, ended_by="doctor")
        self.advance_and_tick(1300)

    @rule(doctor=st.sampled_from(sorted(DOCTORS)), share=st.sampled_from([0.1, 0.5, 1.0, 2.0]),
          finish=st.sampled_from(["completed", "rejected", None]))
    def withdraw(self, doctor, share, finish) -> None:
        """A withdrawal of a share of what is available (over 1.0: refused)."""
        self.n += 1
        currency = "MWK" if DOCTORS[doctor] == "MW" else "USD"
        self.projector.catch_up()
        wallets = {w["currency"]: w for w in self.projector.doctor_wallet(doctor)["wallets"]}
        amount = max(1, int(wallets.get(currency, {}).get("available_minor", 0) * share))
        request = {"doctor_id": doctor, "currency": currency, "request_id": f"w{self.n}"}
        if self.post("withdrawal.requested", amount_minor=amount, **request) and finish:
            self.post(f"withdrawal.{finish}", **request)

    @rule(seconds=st.sampled_from([1, 59, 300, 601, 1200, 3600, 86_400]))
    def advance_and_tick(self, seconds) -> None:
        self.clock.advance(seconds)
        run_tick(self.ledger, self.projector, self.clock())

    def teardown(self) -> None:
        try:
            if hasattr(self, "witness"):
                self.witness.observe(self.clock.now)
                self.witness.check()
        finally:
            for name in ("audit", "projector", "ledger"):
                if hasattr(self, name):
                    getattr(self, name).close()
            if getattr(self, "schema", None):
                with psycopg.connect(postgres_conninfo(PG_URL), autocommit=True) as conn:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


_default = settings.default
AsOfMachine.TestCase.settings = settings(
    max_examples=max(10, _default.max_examples // 4), stateful_step_count=40)
TestAsOfMachine = AsOfMachine.TestCase


class AsOfMachinePostgres(AsOfMachine):
    store = "postgres"


AsOfMachinePostgres.TestCase.settings = settings(
    max_examples=max(3, _default.max_examples // 40), stateful_step_count=30)


@pytest.mark.postgres
def test_as_of_property_on_postgres():
    try:
        psycopg.connect(postgres_conninfo(PG_URL), connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        if postgres_required():
            pytest.fail(f"PostgreSQL is required here but unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    AsOfMachinePostgres.TestCase().runTest()


def test_two_audit_followers_taking_turns_keep_the_history_exact(pg_url):
    """Two processes' audit followers fold the same log in turns. Each keeps account values
    between its batches only while the history's tracking row is where it left it
    (History.begin), so after the other one folded, or after a commit of its own was undone
    (asynchronous commits), it reads them again: the as-of answers still equal what the live
    views showed at every instant."""
    clock = WatchedClock()
    world = World(pg_url, clock)
    projector = world.projector()
    audit, other = AuditService(world.ledger, pg_url), AuditService(world.ledger, pg_url)
    witness = Witness(world.ledger, projector, audit)
    witness.patients |= {"p1", "p2", "p3", "p4"}
    witness.doctors |= {"d1", "d2"}
    turns = [0]

    def observe_then_fold(now) -> None:
        witness.observe(now)
        (audit if turns[0] % 2 else other).catch_up()
        turns[0] += 1

    clock.before_moving = observe_then_fold
    try:
        rich_scenario(world, projector)
        observe_then_fold(clock.now)
        assert witness.check() > 20
    finally:
        other.close()
        audit.close()
        world.close()
