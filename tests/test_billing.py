"""One named test per rule of billing-rules.md §3, §4, §5, §7 and §8, through `Ledger.ingest`
and `Ledger.tick` on POPO. Assertions read the event log and the money, not only derived state.

The `Desk` below stands in for the backend: it posts events with fresh event ids, and ticks
every session and pool it has seen (the live view's job in production).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from conftest import T0, FakeClock, make_ledger
from ledger import errors
from ledger.domain import Pool, Session, Wallet
from ledger.rules import Policy
from ledger.application import Ledger

S = timedelta(seconds=1)
MIN = timedelta(minutes=1)
MW_RATE = 350000  # 3500.00 MWK per unit, tariff 2026-01-12
USD_RATE = 300  # 3.00 USD per unit, tariff 2026-01-12


# ------------------------------------------------------------------------------------ helpers


def plan(text: int = 3, voice: int = 3, video: int = 3, seats: int = 1, days: int = 30,
         name: str = "Basic") -> dict:
    return {"name": name, "price_minor": 1_000_000, "currency": "MWK",
            "units": {"text": text, "voice": voice, "video": video},
            "seats": seats, "duration_days": days}


def log(ledger: Ledger) -> list:
    """Every domain event of the ledger, in notification order."""
    out, start = [], 1
    while True:
        batch = ledger.recorder.select_notifications(start, 1000)
        out.extend(ledger.mapper.to_domain_event(n) for n in batch)
        if len(batch) < 1000:
            return out
        start = batch[-1].id + 1


def name(event) -> str:
    """'Session.AutoDeducted', 'Pool.Charged', …"""
    return type(event).__qualname__


def named(events, *names: str) -> list:
    return [e for e in events if name(e) in names]


def of_session(events, session_id: str) -> list:
    sid = Session.create_id(session_id)
    return [e for e in events if e.originator_id == sid]


class Desk:
    """The backend's side: posts events with fresh ids and ticks what it has seen."""

    def __init__(self, clock: FakeClock | None = None, policy: Policy = Policy(),
                 ledger: Ledger | None = None) -> None:
        self.clock = clock or FakeClock()
        self.ledger = ledger or make_ledger(None, self.clock, policy)
        self.n = 0
        self.sessions: list[str] = []
        self.pools: list[str] = []

    # ---- posting
    def post(self, type_: str, at: datetime | None = None, *, event_id: str | None = None,
             **payload) -> dict:
        self.n += 1
        event_id = event_id or f"ev-{self.n}"
        at = self.clock() if at is None else at
        result = self.ledger.ingest(event_id, type_, at, payload).result
        if type_ == "session.requested":
            self.sessions.append(payload["session_id"])
        if type_ == "subscription.granted" and result["pool_id"] not in self.pools:
            self.pools.append(result["pool_id"])
        return result

    def at(self, moment: datetime) -> datetime:
        """Move the clock to `moment` (never backwards) and return it."""
        self.clock.set(max(self.clock(), moment))
        return moment

    def doctor(self, doctor_id: str = "d1", country: str = "MW") -> dict:
        return self.post("doctor.registered", doctor_id=doctor_id, country=country)

    def grant(self, ref: str = "pay-1", owner: str = "p1", starts_at: datetime | None = None,
              at: datetime | None = None, **plan_kw) -> str:
        starts_at = starts_at or self.clock()
        return self.post("subscription.granted", at, payment_reference=ref, owner_id=owner,
                         plan=plan(**plan_kw), starts_at=starts_at.isoformat())["pool_id"]

    def request(self, sid: str, kind: str = "voice", patient: str = "p1", doctor: str = "d1",
                at: datetime | None = None) -> dict:
        return self.post("session.requested", at, session_id=sid, kind=kind,
                         patient_id=patient, doctor_id=doctor)

    def connect(self, sid: str, at: datetime | None = None) -> dict:
        return self.post("call.connected", at, session_id=sid)

    def activate(self, sid: str, at: datetime | None = None) -> dict:
        return self.post("text.activated", at, session_id=sid)

    def message(self, sid: str, at: datetime | None = None) -> dict:
        return self.post("session.patient_message", at, session_id=sid)

    def ring(self, sid: str, at: datetime | None = None) -> dict:
        return self.post("call.ringing", at, session_id=sid)

    def activity(self, sid: str, at: datetime | None = None) -> dict:
        return self.post("session.activity", at, session_id=sid)

    def end(self, sid: str, at: datetime | None = None, by: str = "patient",
            reason: str = "completed") -> dict:
        return self.post("session.ended", at, session_id=sid, ended_by=by, reason=reason)

    def call(self, sid: str, start: datetime, patient: str = "p1", doctor: str = "d1",
             kind: str = "voice") -> None:
        """Request at `start`, connect at `start` (the clock is moved there)."""
        self.at(start)
        self.request(sid, kind, patient, doctor)
        self.connect(sid)

    def consult(self, sid: str, kind: str, start: datetime, minutes: int) -> None:
        """Request and start a `kind` session at `start`, ping it, and end it `minutes` later."""
        self.request(sid, kind)
        (self.activate if kind == "text" else self.connect)(sid)
        self.pings(sid, start, start + minutes * MIN)
        self.end(sid, self.at(start + minutes * MIN))

    def pings(self, sid: str, start: datetime, until: datetime, every: timedelta = 5 * MIN) -> None:
        """Activity reports every `every` from start (exclusive) to until (inclusive)."""
        t = start + every
        while t <= until:
            self.at(t)
            self.activity(sid)
            t += every

    # ---- ticking
    def tick(self, as_of: datetime | None = None):
        as_of = self.at(as_of) if as_of is not None else self.clock()
        return self.ledger.tick(as_of, self.sessions, self.pools)

    # ---- reading
    def session(self, sid: str) -> Session:
        return self.ledger.get_session(sid)

    def pool(self, ref: str = "pay-1") -> Pool:
        return self.ledger.repository.get(Pool.create_id(ref))

    def wallet(self, doctor: str = "d1", currency: str = "MWK") -> Wallet | None:
        return self.ledger.load(Wallet.create_id(doctor, currency))

    def events(self) -> list:
        return log(self.ledger)

    def session_events(self, sid: str) -> list:
        return of_session(self.events(), sid)

    def deducted(self, sid: str) -> list[int]:
        return [e.n for e in named(self.session_events(sid), "Session.AutoDeducted")]

    def settled(self, sid: str):
        found = named(self.session_events(sid), "Session.Settled")
        assert len(found) <= 1
        return found[0] if found else None

    def net_charged(self, sid: str) -> int:
        s = self.settled(sid)
        n = len(self.deducted(sid))
        return n + (len(s.charged) - len(s.reversed) if s else 0)


def refused(exc_type, fn, *args, **kwargs):
    """Run fn, expect the refusal, and check that nothing at all was recorded (§3, I8)."""
    desk = fn.__self__ if hasattr(fn, "__self__") else None
    before = len(desk.events()) if isinstance(desk, Desk) else None
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    if before is not None:
        assert len(desk.events()) == before, "a refused event recorded something"
    return info.value


@pytest.fixture
def desk(clock) -> Desk:
    d = Desk(clock)
    d.doctor("d1", "MW")
    return d


# ============================================================================================ §3


def test_request_refused_with_insufficient_units_and_nothing_recorded(desk: Desk) -> None:
    err = refused(errors.InsufficientUnits, desk.request, "s1", "voice")
    assert (err.code, err.status) == ("insufficient_units", 409)
    assert desk.ledger.get_receipt(f"ev-{desk.n}") is None
    # A pool without voice units: voice is refused, text is not.
    desk.grant(voice=0, video=0, text=1)
    refused(errors.InsufficientUnits, desk.request, "s1", "voice")
    refused(errors.InsufficientUnits, desk.request, "s1", "video", doctor="d1")
    assert desk.pool().free == {"text": 1, "voice": 0, "video": 0}
    # Nothing was recorded for s1: the same session id can still be requested.
    desk.request("s1", "text")
    assert desk.pool().free["text"] == 0


def test_request_holds_one_unit_for_block_1(desk: Desk) -> None:
    pool_id = desk.grant()
    result = desk.request("s1", "voice")
    assert result["state"] == "requested" and result["paid_until"] is None
    pool = desk.pool()
    assert pool.free["voice"] == 2 and pool.held == {"s1#1": "voice"}
    assert desk.session("s1").holds == {1: pool_id}
    held = named(desk.events(), "Pool.Held")
    assert [(e.session_id, e.block, e.at) for e in held] == [("s1", 1, T0)]


def test_billable_start_holds_block_2_at_once(desk: Desk) -> None:
    desk.grant()
    desk.request("s1", "voice")
    start = desk.at(T0 + 10 * S)
    result = desk.connect("s1")
    assert result["state"] == "active"
    assert result["paid_until"] == (start + 2 * 10 * MIN).isoformat()
    assert desk.pool().free["voice"] == 1
    assert sorted(desk.session("s1").holds) == [1, 2]
    block_held = named(desk.session_events("s1"), "Session.BlockHeld")
    assert [(e.block, e.at) for e in block_held] == [(2, start + 10 * MIN)]


def test_billable_start_with_one_unit_holds_only_block_1(desk: Desk) -> None:
    desk.grant(voice=1)
    desk.request("s1", "voice")
    start = desk.at(T0 + 5 * S)
    assert desk.connect("s1")["paid_until"] == (start + 10 * MIN).isoformat()
    assert sorted(desk.session("s1").holds) == [1]


def test_text_activation_is_the_billable_start(desk: Desk) -> None:
    desk.grant()
    desk.request("s1", "text")
    desk.message("s1", desk.at(T0 + MIN))
    start = desk.at(T0 + 2 * MIN)
    assert desk.activate("s1")["paid_until"] == (start + 20 * MIN).isoformat()
    assert desk.session("s1").started_at == start
    assert named(desk.session_events("s1"), "Session.Activated")[0].at == start


def test_auto_deducted_at_block_end_plus_skew_holds_block_n_plus_2(desk: Desk) -> None:
    desk.grant(voice=5)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 20 * MIN)
    desk.tick(T0 + 10 * MIN + 59 * S)
    assert desk.deducted("s1") == []
    report = desk.tick(T0 + 11 * MIN)
    assert report.charged == ["s1: charged block 1"]
    assert desk.deducted("s1") == [1]
    session = desk.session("s1")
    assert sorted(session.holds) == [2, 3] and session.charges == {1: str(desk.pool().id)}
    assert session.paid_until() == T0 + 30 * MIN
    # A duplicate tick at the same instant changes nothing.
    n_events = len(desk.events())
    assert desk.tick(T0 + 11 * MIN).charged == []
    assert len(desk.events()) == n_events
    desk.tick(T0 + 21 * MIN)
    assert desk.deducted("s1") == [1, 2]
    assert sorted(desk.session("s1").holds) == [3, 4]
    assert desk.activity("s1")["paid_until"] == (T0 + 40 * MIN).isoformat()
    # The doctor's pay and the pool are on every AutoDeducted.
    e = named(desk.session_events("s1"), "Session.AutoDeducted")[0]
    assert (e.pay_minor, e.currency, e.bucket, e.patient_id, e.doctor_id) == (
        MW_RATE, "MWK", "voice", "p1", "d1")


def test_exhaustion_ends_at_boundary_with_balance_exhausted_owing_n(desk: Desk) -> None:
    desk.grant(voice=2)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 19 * MIN)
    desk.tick(T0 + 11 * MIN)
    assert desk.deducted("s1") == [1]
    assert desk.session("s1").paid_until() == T0 + 20 * MIN  # block 3 could not be held
    desk.tick(T0 + 21 * MIN)
    ended = named(desk.session_events("s1"), "Session.Ended")
    assert [(e.ended_at, e.by, e.reason) for e in ended] == [
        (T0 + 20 * MIN, "system", "balance_exhausted")]
    desk.tick(T0 + 40 * MIN)
    settled = desk.settled("s1")
    assert settled.units_owed == 2 and desk.net_charged("s1") == 2
    assert desk.deducted("s1") == [1, 2] and settled.charged == [] and settled.reversed == []
    pool = desk.pool()
    assert pool.free["voice"] == 0 and len(pool.charged) == 2 and pool.held == {}


def test_exhaustion_with_a_single_unit_owes_exactly_one(desk: Desk) -> None:
    desk.grant(voice=1)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 9 * MIN)
    desk.tick(T0 + 11 * MIN)
    s = desk.session("s1")
    assert (s.ended_at, s.end_reason) == (T0 + 10 * MIN, "balance_exhausted")
    # A later report from the backend (after paid_until) changes nothing and is not an error.
    desk.at(T0 + 12 * MIN)
    desk.end("s1")
    assert desk.session("s1").ended_at == T0 + 10 * MIN
    desk.tick(T0 + 30 * MIN)
    assert desk.settled("s1").units_owed == 1 and desk.net_charged("s1") == 1


def test_paid_until_in_every_session_result(desk: Desk) -> None:
    desk.grant(voice=5)
    r = desk.request("s1", "voice")
    assert "paid_until" in r and r["paid_until"] is None
    for result in (desk.ring("s1"), desk.connect("s1", desk.at(T0 + 5 * S)),
                   desk.activity("s1", desk.at(T0 + MIN)),
                   desk.end("s1", desk.at(T0 + 2 * MIN))):
        assert result["session_id"] == "s1"
        assert "paid_until" in result
    assert result["paid_until"] == (T0 + 5 * S + 20 * MIN).isoformat()
    assert result["ended_at"] == (T0 + 2 * MIN).isoformat()


def test_session_that_never_starts_releases_its_hold(desk: Desk) -> None:
    desk.grant(voice=3)
    desk.request("s1", "voice")
    desk.ring("s1", desk.at(T0 + 5 * S))
    desk.tick(T0 + 10 * MIN)
    s = desk.session("s1")
    assert s.end_reason == "missed"
    desk.tick(T0 + 30 * MIN)
    settled = desk.settled("s1")
    assert settled.units_owed == 0 and settled.released == [
        {"block": 1, "pool_id": str(desk.pool().id)}]
    assert desk.deducted("s1") == [] and named(desk.events(), "Pool.Charged") == []
    assert desk.pool().free["voice"] == 3 and desk.pool().held == {}
    assert desk.wallet() is None


def test_late_ended_reverses_excess_blocks_with_doctor_pay(desk: Desk) -> None:
    desk.grant(voice=6)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 30 * MIN)
    desk.tick(T0 + 31 * MIN)
    assert desk.deducted("s1") == [1, 2, 3]
    # The provider's end at 11:40 arrives late, after three blocks were auto-deducted.
    desk.end("s1", T0 + 11 * MIN + 40 * S, by="doctor")
    assert desk.session("s1").ended_at == T0 + 11 * MIN + 40 * S
    desk.tick(T0 + 60 * MIN)
    settled = desk.settled("s1")
    pool_id = str(desk.pool().id)
    assert settled.units_owed == 2
    assert settled.reversed == [{"block": 3, "pool_id": pool_id}] and settled.charged == []
    assert sorted(b["block"] for b in settled.released) == [4, 5]
    assert settled.pending_before_minor == 3 * MW_RATE
    assert settled.net_pay_minor == 2 * MW_RATE
    assert desk.net_charged("s1") == 2
    reversed_ = named(desk.events(), "Pool.Reversed")
    assert [(e.session_id, e.block, e.forfeited, e.revoked) for e in reversed_] == [
        ("s1", 3, False, False)]
    pool = desk.pool()
    assert pool.free["voice"] == 4 and len(pool.charged) == 2 and pool.reversed["voice"] == 1
    assert desk.wallet().credited_minor == 2 * MW_RATE


def test_late_ended_reversal_into_expired_pool_is_forfeited(desk: Desk) -> None:
    # A one-day pool that ends 20 minutes after T0.
    desk.grant(voice=6, days=1, starts_at=T0 - timedelta(days=1) + 20 * MIN,
               at=T0 - timedelta(days=1) + 20 * MIN)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 19 * MIN)
    desk.tick(T0 + 21 * MIN + 1 * S)
    # Block 3 starts at the pool's end, so it could not be held: exhausted at 20:00.
    s = desk.session("s1")
    assert desk.deducted("s1") == [1, 2] and s.end_reason == "balance_exhausted"
    assert desk.pool().expired
    desk.end("s1", T0 + 7 * MIN)
    desk.tick(T0 + 60 * MIN)
    settled = desk.settled("s1")
    assert settled.units_owed == 1 and [r["block"] for r in settled.reversed] == [2]
    [rev] = named(desk.events(), "Pool.Reversed")
    assert (rev.block, rev.forfeited) == (2, True)
    pool = desk.pool()
    assert pool.free["voice"] == 0 and pool.forfeited["voice"] == 6 - 2 + 1
    assert desk.wallet().credited_minor == MW_RATE


def test_settlement_after_grace_then_409_session_settled(desk: Desk) -> None:
    desk.grant()
    desk.call("s1", T0)
    end_at = desk.at(T0 + 4 * MIN)
    desk.end("s1")
    desk.tick(end_at + 10 * MIN - S)
    assert desk.settled("s1") is None
    # Before settlement a late report still counts (here: an earlier end).
    desk.end("s1", T0 + 3 * MIN)
    assert desk.session("s1").ended_at == T0 + 3 * MIN
    report = desk.tick(end_at + 10 * MIN)  # due: max(ended_at, first receipt) + grace
    assert report.settled == ["s1: settled 1 units"]
    assert desk.settled("s1").units_owed == 1
    for post in (lambda: desk.activity("s1", T0 + 2 * MIN), lambda: desk.end("s1", T0 + MIN),
                 lambda: desk.connect("s1", T0 - S)):
        err = refused(errors.SessionSettled, post)
        assert (err.code, err.status) == ("session_settled", 409)
    assert desk.tick(T0 + 2 * 60 * MIN).settled == []


def test_settlement_waits_for_grace_after_late_first_receipt(desk: Desk) -> None:
    """The first Ended received late: settlement is due at its receipt + grace, not ended_at."""
    desk.grant()
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 10 * MIN)
    received = desk.at(T0 + 12 * MIN)
    desk.end("s1", T0 + 11 * MIN)
    desk.tick(received + 10 * MIN - S)
    assert desk.settled("s1") is None
    desk.tick(received + 10 * MIN)
    assert desk.settled("s1").units_owed == 2


def test_earliest_end_stands(desk: Desk) -> None:
    desk.grant(voice=5)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 15 * MIN)
    desk.at(T0 + 16 * MIN)
    desk.end("s1", T0 + 15 * MIN, by="patient")
    r = desk.end("s1", T0 + 16 * MIN, by="doctor")  # later: no change, not an error
    assert r["ended_at"] == (T0 + 15 * MIN).isoformat()
    desk.post("session.ended", T0 + 14 * MIN, session_id="s1", ended_by="system",
              reason="completed")
    ended = named(desk.session_events("s1"), "Session.Ended")
    assert [e.ended_at for e in ended] == [T0 + 15 * MIN, T0 + 14 * MIN]
    assert ended[0].first and not ended[1].first
    desk.tick(T0 + 60 * MIN)
    assert desk.settled("s1").units_owed == 2  # 14 minutes


def test_who_ended_never_changes_who_pays(desk: Desk) -> None:
    desk.grant(voice=6)
    for i, by in enumerate(("patient", "doctor", "system")):
        sid = f"s-{by}"
        start = T0 + i * 60 * MIN
        desk.call(sid, start)
        desk.end(sid, desk.at(start + 11 * MIN), by=by)
        desk.tick(start + 40 * MIN)
        assert desk.settled(sid).units_owed == 2
    assert desk.wallet().credited_minor == 6 * MW_RATE
    assert desk.pool().free["voice"] == 0


def test_text_session_never_activated_owes_nothing_legacy_b13(desk: Desk) -> None:
    desk.grant(text=1)
    desk.request("s1", "text")
    desk.message("s1", desk.at(T0 + MIN))
    desk.end("s1", desk.at(T0 + 3 * MIN))
    desk.tick(T0 + 30 * MIN)
    assert desk.settled("s1").units_owed == 0 and desk.pool().free["text"] == 1


def test_call_under_a_minute_is_free(desk: Desk) -> None:
    desk.grant(voice=2)
    desk.call("s1", T0)
    desk.end("s1", desk.at(T0 + 59 * S))
    desk.tick(T0 + 30 * MIN)
    assert desk.settled("s1").units_owed == 0 and desk.net_charged("s1") == 0
    assert desk.pool().free["voice"] == 2 and desk.wallet() is None


def test_session_ending_exactly_on_boundary_owes_n_legacy_b14(desk: Desk) -> None:
    desk.grant(voice=5)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 20 * MIN)
    desk.end("s1", desk.at(T0 + 20 * MIN))
    desk.tick(T0 + 60 * MIN)
    assert desk.settled("s1").units_owed == 2 and desk.net_charged("s1") == 2
    assert desk.deducted("s1") == [1, 2]


def test_out_of_order_reports_bill_the_reported_times(desk: Desk) -> None:
    """An end reported before the (then known) billable start is kept as reported: when the
    earlier, true start arrives later, d = ended_at − earliest start (§1, §3), not the gap up to
    the start first reported. (The ledger used to clamp the end to the start known then.)"""
    desk.grant(text=5)
    desk.request("s1", "text")
    desk.activate("s1", desk.at(T0 + 14 * MIN))  # a late, wrong activation time
    desk.at(T0 + 14 * MIN + 30 * S)
    desk.end("s1", T0 + MIN)  # the patient's end, reported late
    desk.at(T0 + 14 * MIN + 40 * S)
    desk.activate("s1", T0 + 30 * S)  # the doctor's real first message, reported late
    s = desk.session("s1")
    assert (s.started_at, s.ended_at) == (T0 + 30 * S, T0 + MIN)
    desk.tick(T0 + 60 * MIN)
    assert desk.settled("s1").units_owed == 1 and desk.net_charged("s1") == 1


# ============================================================================================ §4


def test_payment_reference_same_content_is_a_no_op(desk: Desk) -> None:
    first = desk.grant("pay-1", voice=2)
    before = [name(e) for e in desk.events()]
    again = desk.grant("pay-1", voice=2)
    after = [name(e) for e in desk.events()]
    assert again == first
    assert after[len(before):] == ["Receipt.Recorded"]  # only the new event id's receipt
    assert desk.pool().granted == {"text": 3, "voice": 2, "video": 3}


def test_payment_reference_with_other_content_is_409_payment_conflict(desk: Desk) -> None:
    desk.grant("pay-1", voice=2)
    err = refused(errors.PaymentConflict, desk.grant, "pay-1", voice=5)
    assert (err.code, err.status) == ("payment_conflict", 409)
    refused(errors.PaymentConflict, desk.grant, "pay-1", owner="p2", voice=2)
    refused(errors.PaymentConflict, desk.grant, "pay-1", starts_at=T0 + MIN, voice=2)
    assert desk.pool().granted["voice"] == 2


@pytest.mark.parametrize("days,extension", [(30, 7), (7, 0), (31, 0), (90, 0), (365, 0)])
def test_thirty_day_plan_gets_seven_extra_days_recorded(desk: Desk, days: int,
                                                        extension: int) -> None:
    desk.grant(days=days)
    pool = desk.pool()
    assert pool.effective_end == T0 + timedelta(days=days + extension)
    [granted] = named(desk.events(), "Pool.Granted")
    assert granted.extension_days == extension
    assert granted.effective_end == T0 + timedelta(days=days + extension)


def test_expiry_forfeits_free_units_by_an_explicit_event(desk: Desk) -> None:
    desk.grant(days=1, voice=4, text=2, video=0)
    end = T0 + timedelta(days=1)
    desk.call("s1", end - 15 * MIN)  # blocks 1 and 2 held (block 2 starts before the end)
    assert sorted(desk.session("s1").holds) == [1, 2]
    desk.tick(end + 59 * S)
    assert named(desk.events(), "Pool.Expired") == []
    # A request at the end finds no usable pool, even before the expiry is recorded.
    refused(errors.InsufficientUnits, desk.request, "s2", "text", patient="p1", at=end)
    report = desk.tick(end + 60 * S)
    assert report.expired
    [expired] = named(desk.events(), "Pool.Expired")
    assert expired.forfeited == {"text": 2, "voice": 2, "video": 0}  # 2 voice units held
    pool = desk.pool()
    assert pool.free == {"text": 0, "voice": 0, "video": 0} and pool.expired
    assert len(pool.held) + len(pool.charged) == 2  # held units stay held
    # The held units are charged or released as usual; a released one is forfeited then.
    desk.at(end + 2 * MIN)
    desk.end("s1", end - 10 * MIN)  # late report: 5 minutes, one unit owed
    desk.tick(end + 30 * MIN)
    assert desk.settled("s1").units_owed == 1
    pool = desk.pool()
    assert len(pool.charged) == 1 and pool.forfeited["voice"] == 3 and pool.free["voice"] == 0
    [released] = named(desk.events(), "Pool.Released")
    assert (released.block, released.forfeited) == (2, True)
    # Nothing was deleted: every pool event is still in the log, and a later tick is a no-op.
    assert len(named(desk.events(), "Pool.Granted")) == 1
    assert desk.tick(end + 60 * MIN).expired == []


def test_draw_order_earliest_expiry_first_each_charge_records_its_pool(desk: Desk) -> None:
    # The older pool expires later (90 days); the newer one expires first (7 days).
    old = desk.grant("pay-old", days=90, voice=5, starts_at=T0 - timedelta(days=10),
                     at=T0 - timedelta(days=10))
    soon = desk.grant("pay-soon", days=7, voice=5)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 20 * MIN)
    desk.tick(T0 + 21 * MIN)
    charges = named(desk.session_events("s1"), "Session.AutoDeducted")
    assert [(e.n, e.pool_id) for e in charges] == [(1, soon), (2, soon)]
    charged = named(desk.events(), "Pool.Charged")
    assert {e.originator_id for e in charged} == {Pool.create_id("pay-soon")}
    assert desk.pool("pay-old").free["voice"] == 5 and old != soon


def test_draw_order_ties_on_end_then_starts_at_then_pool_id(desk: Desk) -> None:
    a = desk.grant("pay-a", days=90, voice=1, starts_at=T0 - timedelta(days=1),
                   at=T0 - timedelta(days=1))
    b = desk.grant("pay-b", days=89, voice=1)  # same end as pay-a, starts later
    assert desk.pool("pay-a").effective_end == desk.pool("pay-b").effective_end
    desk.request("s1", "voice")
    assert desk.session("s1").holds[1] == a != b


def test_stacked_pools_spill_over_in_draw_order(desk: Desk) -> None:
    first = desk.grant("pay-1", days=7, voice=1)
    second = desk.grant("pay-2", days=30, voice=3)
    desk.call("s1", T0)
    assert desk.session("s1").holds == {1: first, 2: second}
    desk.pings("s1", T0, T0 + 25 * MIN)
    desk.end("s1", desk.at(T0 + 25 * MIN))
    desk.tick(T0 + 60 * MIN)
    per_block = {e.n: e.pool_id for e in named(desk.session_events("s1"), "Session.AutoDeducted")}
    settled = desk.settled("s1")
    per_block.update({c["block"]: c["pool_id"] for c in settled.charged})
    assert per_block == {1: first, 2: second, 3: second}
    assert desk.pool("pay-1").free["voice"] == 0 and desk.pool("pay-2").free["voice"] == 1
    assert settled.units_owed == 3


def test_family_members_up_to_seats_owner_included(desk: Desk) -> None:
    desk.doctor("d2", "MW")
    desk.grant("fam", owner="mum", seats=3, voice=4)
    desk.post("member.added", payment_reference="fam", patient_id="kid1")
    r = desk.post("member.added", payment_reference="fam", patient_id="kid2")
    assert r["seats_taken"] == 3
    err = refused(errors.SeatsExhausted, desk.post, "member.added", payment_reference="fam",
                  patient_id="kid3")
    assert err.code == "seats_exhausted"
    # Adding an active member again is a no-op.
    assert desk.post("member.added", payment_reference="fam", patient_id="kid1")["seats_taken"] == 3
    desk.request("s-kid", "voice", patient="kid1", doctor="d1")
    desk.request("s-mum", "voice", patient="mum", doctor="d2")
    assert desk.pool("fam").free["voice"] == 2
    desk.doctor("d3", "MW")
    refused(errors.InsufficientUnits, desk.request, "s-x", "voice", patient="kid3", doctor="d3")


def test_member_removal_takes_effect_at_its_occurred_at(desk: Desk) -> None:
    desk.grant("fam", owner="mum", seats=2, voice=6)
    desk.post("member.added", payment_reference="fam", patient_id="kid")
    desk.call("s1", T0, patient="kid")
    desk.pings("s1", T0, T0 + 5 * MIN)
    # Removed at 05:00 (posted a minute later): blocks 1 and 2 were held before, and stay held.
    desk.at(T0 + 6 * MIN)
    desk.post("member.removed", T0 + 5 * MIN, payment_reference="fam", patient_id="kid")
    assert sorted(desk.session("s1").holds) == [1, 2]
    desk.pings("s1", T0 + 5 * MIN, T0 + 20 * MIN)
    desk.tick(T0 + 21 * MIN)
    # No hold for block 3 drew on the pool: the session ended at the end of block 2.
    s = desk.session("s1")
    assert (s.ended_at, s.end_reason) == (T0 + 20 * MIN, "balance_exhausted")
    assert desk.deducted("s1") == [1, 2]
    desk.tick(T0 + 60 * MIN)
    refused(errors.InsufficientUnits, desk.request, "s2", "voice", patient="kid")
    assert desk.pool("fam").free["voice"] == 4
    # A seat is free again.
    desk.post("member.added", payment_reference="fam", patient_id="kid2")


def test_refund_revokes_free_units_held_and_charged_stand(desk: Desk) -> None:
    desk.grant(voice=5, text=2, video=1)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 10 * MIN)
    desk.tick(T0 + 11 * MIN)  # block 1 charged, blocks 2 and 3 held
    desk.post("payment.refunded", payment_reference="pay-1")
    [revoked] = named(desk.events(), "Pool.Revoked")
    assert revoked.revoked == {"text": 2, "voice": 2, "video": 1}
    assert desk.pool().free == {"text": 0, "voice": 0, "video": 0}
    refused(errors.InsufficientUnits, desk.request, "s2", "text")
    desk.end("s1", desk.at(T0 + 12 * MIN))
    desk.tick(T0 + 60 * MIN)
    assert desk.settled("s1").units_owed == 2
    pool = desk.pool()
    assert len(pool.charged) == 2 and pool.revoked["voice"] == 3 and pool.free["voice"] == 0
    assert desk.wallet().credited_minor == 2 * MW_RATE  # the doctor's pay stands


def test_usable_now_pool_not_yet_started_is_not_drawn(desk: Desk) -> None:
    desk.grant("later", starts_at=T0 + timedelta(days=1))
    refused(errors.InsufficientUnits, desk.request, "s1", "voice")
    assert desk.pool("later").free["voice"] == 3


# ============================================================================================ §5


@pytest.mark.parametrize("country,currency,rate", [("MW", "MWK", MW_RATE), ("KE", "USD", USD_RATE),
                                                   ("ZM", "USD", USD_RATE)])
@pytest.mark.parametrize("kind", ["text", "voice", "video"])
def test_doctor_pay_per_unit_at_rate_stamped_at_billable_start(
        clock, kind: str, country: str, currency: str, rate: int) -> None:
    desk = Desk(clock)
    desk.doctor("d1", country)
    desk.grant(voice=5, text=5, video=5)
    desk.consult("s1", kind, T0, 25)
    desk.tick(T0 + 60 * MIN)
    stamped = desk.session("s1").rate
    assert (stamped["tariff"], stamped["pay_minor"], stamped["currency"]) == (
        "2026-01-12", rate, currency)
    assert all(e.pay_minor == rate for e in named(desk.session_events("s1"),
                                                  "Session.AutoDeducted"))
    assert desk.settled("s1").net_pay_minor == 3 * rate
    assert desk.wallet("d1", currency).credited_minor == 3 * rate


@pytest.mark.parametrize("country,kind,currency,rate", [
    ("MW", "text", "MWK", 400000), ("MW", "voice", "MWK", 500000), ("MW", "video", "MWK", 600000),
    ("KE", "text", "USD", 400), ("KE", "voice", "USD", 500), ("ZM", "video", "USD", 600)])
def test_doctor_pay_legacy_2025_stamped_before_the_switch(country, kind, currency, rate) -> None:
    """A session that starts before 2026-01-12T00:00Z keeps the legacy rate after the switch."""
    t0 = datetime(2026, 1, 11, 23, 40, tzinfo=timezone.utc)
    desk = Desk(FakeClock(t0))
    desk.doctor("d1", country)
    desk.grant(voice=5, text=5, video=5)
    desk.consult("s1", kind, t0, 25)
    desk.tick(t0 + 60 * MIN)
    s1 = desk.session("s1")
    assert (s1.rate["tariff"], s1.rate["pay_minor"]) == ("legacy-2025", rate)
    assert desk.wallet("d1", currency).credited_minor == 3 * rate
    # The next session, after the switch, is paid at the 2026-01-12 tariff.
    desk.call("s2", t0 + 2 * 60 * MIN, kind="voice")
    desk.end("s2", desk.at(t0 + 2 * 60 * MIN + 5 * MIN))
    desk.tick(t0 + 4 * 60 * MIN)
    assert desk.session("s2").rate["tariff"] == "2026-01-12"
    new_rate = MW_RATE if country == "MW" else USD_RATE
    assert desk.wallet("d1", currency).credited_minor == 3 * rate + new_rate


def test_pay_is_pending_until_settled_then_available(desk: Desk) -> None:
    desk.grant(voice=5)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 20 * MIN)
    desk.tick(T0 + 21 * MIN)
    assert desk.deducted("s1") == [1, 2]
    assert desk.wallet() is None  # pending: nothing available, nothing withdrawable
    refused(errors.InsufficientFunds, desk.post, "withdrawal.requested", doctor_id="d1",
            request_id="w1", currency="MWK", amount_minor=5_000_000)
    desk.end("s1", desk.at(T0 + 22 * MIN))
    desk.tick(T0 + 32 * MIN - S)
    assert desk.wallet() is None
    desk.tick(T0 + 32 * MIN)
    wallet = desk.wallet()
    assert wallet.credited_minor == wallet.available_minor == 3 * MW_RATE
    [credited] = named(desk.events(), "Wallet.Credited")
    assert (credited.session_id, credited.amount_minor) == ("s1", 3 * MW_RATE)


def test_wallet_per_doctor_per_currency(desk: Desk) -> None:
    desk.grant(voice=10)
    desk.call("s1", T0)
    desk.end("s1", desk.at(T0 + 5 * MIN))
    desk.post("doctor.country_changed", doctor_id="d1", country="KE")
    desk.call("s2", T0 + 10 * MIN)
    desk.end("s2", desk.at(T0 + 15 * MIN))
    desk.tick(T0 + 60 * MIN)
    assert desk.session("s1").rate["currency"] == "MWK"
    assert desk.session("s2").rate["currency"] == "USD"
    assert desk.wallet("d1", "MWK").credited_minor == MW_RATE
    assert desk.wallet("d1", "USD").credited_minor == USD_RATE
    assert Wallet.create_id("d1", "MWK") != Wallet.create_id("d1", "USD")


def test_country_change_mid_session_keeps_the_stamped_rate(desk: Desk) -> None:
    desk.grant(voice=10)
    desk.call("s1", T0)
    desk.post("doctor.country_changed", desk.at(T0 + MIN), doctor_id="d1", country="KE")
    desk.end("s1", desk.at(T0 + 15 * MIN))
    desk.tick(T0 + 60 * MIN)
    assert desk.wallet("d1", "MWK").credited_minor == 2 * MW_RATE
    assert desk.wallet("d1", "USD") is None


def test_unknown_doctor_is_422(desk: Desk) -> None:
    desk.grant()
    err = refused(errors.UnknownDoctor, desk.request, "s1", "voice", doctor="nobody")
    assert (err.code, err.status) == ("unknown_doctor", 422)
    refused(errors.UnknownDoctor, desk.post, "doctor.country_changed", doctor_id="nobody",
            country="MW")
    assert desk.pool().free["voice"] == 3


# ============================================================================================ §7


@pytest.fixture
def paid_desk(clock) -> Desk:
    """A doctor with 6 settled units (2,100,000 MWK minor) available; minimum 500,000 MWK."""
    ledger = Ledger(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=clock,
                    withdrawal_minimum_minor={"MWK": 500_000, "USD": 7_000})
    desk = Desk(clock, ledger=ledger)
    desk.doctor("d1", "MW")
    desk.grant(voice=10)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 55 * MIN)
    desk.end("s1", desk.at(T0 + 55 * MIN))
    desk.tick(T0 + 90 * MIN)
    assert desk.wallet().available_minor == 6 * MW_RATE
    return desk


def withdraw(desk: Desk, request_id: str, amount: int, currency: str = "MWK") -> dict:
    return desk.post("withdrawal.requested", doctor_id="d1", request_id=request_id,
                     currency=currency, amount_minor=amount)


def finish(desk: Desk, request_id: str, completed: bool, currency: str = "MWK") -> dict:
    return desk.post("withdrawal.completed" if completed else "withdrawal.rejected",
                     doctor_id="d1", request_id=request_id, currency=currency, reason="bank")


def test_withdrawal_request_holds_then_completion_posts(paid_desk: Desk) -> None:
    r = withdraw(paid_desk, "w1", 1_000_000)
    assert (r["status"], r["available_minor"]) == ("held", 6 * MW_RATE - 1_000_000)
    w = paid_desk.wallet()
    assert (w.held_minor, w.withdrawn_minor) == (1_000_000, 0)
    r = finish(paid_desk, "w1", completed=True)
    assert r["status"] == "completed"
    w = paid_desk.wallet()
    assert (w.held_minor, w.withdrawn_minor, w.available_minor) == (
        0, 1_000_000, 6 * MW_RATE - 1_000_000)
    refused(errors.WithdrawalConflict, finish, paid_desk, "w1", completed=False)


def test_withdrawal_rejected_releases_the_hold(paid_desk: Desk) -> None:
    withdraw(paid_desk, "w1", 2_000_000)
    r = finish(paid_desk, "w1", completed=False)
    assert (r["status"], r["available_minor"]) == ("rejected", 6 * MW_RATE)
    w = paid_desk.wallet()
    assert (w.held_minor, w.withdrawn_minor) == (0, 0)
    [released] = named(paid_desk.events(), "Wallet.WithdrawalReleased")
    assert (released.request_id, released.amount_minor) == ("w1", 2_000_000)
    refused(errors.WithdrawalConflict, finish, paid_desk, "w1", completed=True)


def test_withdrawal_above_available_is_409_insufficient_funds(paid_desk: Desk) -> None:
    withdraw(paid_desk, "w1", 1_000_000)
    err = refused(errors.InsufficientFunds, withdraw, paid_desk, "w2", 6 * MW_RATE - 1_000_000 + 1)
    assert (err.code, err.status) == ("insufficient_funds", 409)
    assert err.extra["available_minor"] == 6 * MW_RATE - 1_000_000
    withdraw(paid_desk, "w3", 6 * MW_RATE - 1_000_000)  # exactly what is available
    assert paid_desk.wallet().available_minor == 0
    refused(errors.InsufficientFunds, withdraw, paid_desk, "w4", 500_000)
    refused(errors.InsufficientFunds, withdraw, paid_desk, "w5", 7_000, currency="USD")


def test_withdrawal_request_id_is_unique(paid_desk: Desk) -> None:
    withdraw(paid_desk, "w1", 500_000)
    err = refused(errors.WithdrawalConflict, withdraw, paid_desk, "w1", 600_000)
    assert err.code == "withdrawal_conflict"
    refused(errors.UnknownWithdrawal, finish, paid_desk, "nope", completed=True)


@pytest.mark.parametrize("currency,minimum", [("MWK", 5_000_000), ("USD", 7_000)])
def test_withdrawal_minimums_default_to_legacy(desk: Desk, currency: str, minimum: int) -> None:
    """Legacy minimums: 50,000.00 MWK and 70.00 USD; below is refused before any balance check."""
    err = refused(errors.BelowMinimum, desk.post, "withdrawal.requested", doctor_id="d1",
                  request_id="w1", currency=currency, amount_minor=minimum - 1)
    assert (err.code, err.status) == ("withdrawal_below_minimum", 422)
    refused(errors.InsufficientFunds, desk.post, "withdrawal.requested", doctor_id="d1",
            request_id="w1", currency=currency, amount_minor=minimum)


def test_withdrawal_minimum_is_configuration(paid_desk: Desk) -> None:
    refused(errors.BelowMinimum, withdraw, paid_desk, "w1", 499_999)
    withdraw(paid_desk, "w1", 500_000)


# ============================================================================================ §8


def test_timeout_text_not_started_after_15_minutes(desk: Desk) -> None:
    desk.grant(text=1)
    desk.request("s1", "text")
    desk.tick(T0 + 15 * MIN + 59 * S)
    assert desk.session("s1").state == "requested"
    desk.tick(T0 + 16 * MIN)
    s = desk.session("s1")
    assert (s.ended_at, s.end_by, s.end_reason) == (T0 + 15 * MIN, "system", "not_started")
    refused(errors.SessionEnded, desk.message, "s1", T0 + 14 * MIN)
    desk.tick(T0 + 40 * MIN)
    assert desk.settled("s1").units_owed == 0 and desk.pool().free["text"] == 1


def test_timeout_doctor_no_response_300_seconds(desk: Desk) -> None:
    desk.grant(text=1)
    desk.request("s1", "text")
    desk.message("s1", desk.at(T0 + 2 * MIN))
    desk.tick(T0 + 7 * MIN + 59 * S)
    assert desk.session("s1").state == "requested"
    desk.tick(T0 + 8 * MIN)
    s = desk.session("s1")
    assert (s.ended_at, s.end_reason) == (T0 + 7 * MIN, "doctor_no_response")
    err = refused(errors.SessionEnded, desk.activate, "s1", T0 + 6 * MIN)
    assert (err.code, err.status) == ("session_ended", 409)


def test_timeout_call_missed_after_90_seconds_of_ringing(desk: Desk) -> None:
    desk.grant(voice=1)
    desk.request("s1", "voice")
    desk.ring("s1", desk.at(T0 + 10 * S))
    desk.tick(T0 + 10 * S + 90 * S + 59 * S)
    assert desk.session("s1").state == "ringing"
    desk.tick(T0 + 10 * S + 150 * S)
    s = desk.session("s1")
    assert (s.ended_at, s.end_reason) == (T0 + 100 * S, "missed")
    refused(errors.SessionEnded, desk.connect, "s1", T0 + 99 * S)


def test_timeout_idle_text_10_minutes_billed_to_last_activity_plus_idle(desk: Desk) -> None:
    desk.grant(text=5)
    desk.request("s1", "text")
    desk.activate("s1", desk.at(T0 + MIN))
    desk.message("s1", desk.at(T0 + 3 * MIN))
    desk.tick(T0 + 13 * MIN + 59 * S)
    assert desk.session("s1").state == "active"
    desk.tick(T0 + 14 * MIN)
    s = desk.session("s1")
    assert (s.ended_at, s.end_reason) == (T0 + 13 * MIN, "idle_timeout")
    desk.tick(T0 + 60 * MIN)
    assert desk.settled("s1").units_owed == 2  # 12 minutes from activation
    assert desk.net_charged("s1") == 2


def test_timeout_idle_call_15_minutes(desk: Desk) -> None:
    desk.grant(voice=5)
    desk.call("s1", T0)
    desk.activity("s1", desk.at(T0 + 4 * MIN))
    desk.tick(T0 + 20 * MIN)
    s = desk.session("s1")
    assert (s.ended_at, s.end_reason) == (T0 + 19 * MIN, "idle_timeout")
    desk.tick(T0 + 60 * MIN)
    assert desk.settled("s1").units_owed == 2 and desk.net_charged("s1") == 2


@pytest.mark.parametrize("report_end_first", [False, True])
def test_idle_timeout_on_a_block_boundary_is_not_balance_exhausted(desk: Desk,
                                                                   report_end_first) -> None:
    """Text idle (600 s) ends exactly on block 1's boundary; with one unit, block 2 is not
    needed, so the end is idle_timeout whether the tick or a late end report comes first (I9)."""
    desk.grant(text=1)
    desk.request("s1", "text")
    desk.activate("s1", desk.at(T0 + MIN))
    if report_end_first:
        desk.end("s1", desk.at(T0 + 12 * MIN))  # after the deadline: replaced by the timeout
    desk.tick(T0 + 12 * MIN)
    desk.tick(T0 + 40 * MIN)
    s = desk.session("s1")
    assert (s.ended_at, s.end_by, s.end_reason) == (T0 + 11 * MIN, "system", "idle_timeout")
    assert desk.settled("s1").units_owed == 1 and desk.deducted("s1") == [1]


def test_timeout_max_duration_3_hours(desk: Desk) -> None:
    desk.grant(voice=25)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 3 * 60 * MIN)
    desk.tick(T0 + 5 * 60 * MIN)
    s = desk.session("s1")
    assert (s.ended_at, s.end_reason) == (T0 + 3 * 60 * MIN, "max_duration")
    # The tick's own Ended is "received" when the tick records it: settled a grace later.
    assert desk.settled("s1") is None
    desk.tick(T0 + 5 * 60 * MIN + 10 * MIN)
    assert desk.settled("s1").units_owed == 18 and desk.net_charged("s1") == 18
    assert desk.deducted("s1") == list(range(1, 19))
    assert desk.pool().free["voice"] == 25 - 18


def test_pings_after_max_duration_are_refused(desk: Desk) -> None:
    desk.grant(voice=25)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 3 * 60 * MIN)
    refused(errors.SessionEnded, desk.activity, "s1", desk.at(T0 + 3 * 60 * MIN + S))


def test_timeout_applied_only_at_deadline_plus_skew(desk: Desk) -> None:
    """An activity from before the deadline, received within the skew, keeps the session."""
    desk.grant(voice=5)
    desk.call("s1", T0)
    deadline = T0 + 15 * MIN
    desk.tick(deadline + 30 * S)
    assert desk.session("s1").state == "active"
    desk.activity("s1", deadline - 10 * S)  # arrives 40 s late, still before the decision
    desk.tick(deadline + 60 * S)
    assert desk.session("s1").state == "active"
    desk.tick(deadline - 10 * S + 15 * MIN + 60 * S)
    s = desk.session("s1")
    assert (s.ended_at, s.end_reason) == (deadline - 10 * S + 15 * MIN, "idle_timeout")


def test_timeout_final_once_recorded_later_start_or_activity_409(desk: Desk) -> None:
    desk.grant(voice=5, text=5)
    desk.call("s1", T0)
    desk.tick(T0 + 16 * MIN)
    assert desk.session("s1").end_reason == "idle_timeout"
    # Reports stamped before the deadline, received after the decision: refused.
    err = refused(errors.SessionEnded, desk.activity, "s1", T0 + 14 * MIN)
    assert (err.code, err.status) == ("session_ended", 409)
    refused(errors.SessionEnded, desk.connect, "s1", T0 - S)
    # Text: not_started recorded, then a late activation is refused.
    desk.request("s2", "text", at=desk.at(T0 + 20 * MIN))
    desk.tick(T0 + 36 * MIN)
    assert desk.session("s2").end_reason == "not_started"
    refused(errors.SessionEnded, desk.activate, "s2", T0 + 21 * MIN)
    refused(errors.SessionEnded, desk.message, "s2", T0 + 21 * MIN)


def test_recorded_timeout_stays_final_after_an_earlier_end_report(desk: Desk) -> None:
    """not_started recorded; then the backend's (earlier) end replaces the end's time and
    reason; a late activation from before both is still refused: no unit is owed (§8)."""
    desk.grant(text=2)
    desk.request("s1", "text")
    desk.tick(T0 + 16 * MIN)
    assert desk.session("s1").end_reason == "not_started"
    desk.end("s1", T0 + 10 * MIN)  # earlier: it stands, with its reason
    s = desk.session("s1")
    assert (s.ended_at, s.end_reason) == (T0 + 10 * MIN, "completed")
    refused(errors.SessionEnded, desk.activate, "s1", T0 + 9 * MIN)
    refused(errors.SessionEnded, desk.message, "s1", T0 + 9 * MIN)
    desk.tick(T0 + 60 * MIN)
    assert desk.settled("s1").units_owed == 0 and desk.pool().free["text"] == 2


def test_session_conflict_patient_same_kind_voice_and_video_are_one(desk: Desk) -> None:
    desk.doctor("d2", "MW")
    desk.grant(voice=5, video=5, text=5)
    desk.request("s1", "voice")
    err = refused(errors.SessionConflict, desk.request, "s2", "video", doctor="d1")
    assert (err.code, err.status) == ("session_conflict", 409)
    refused(errors.SessionConflict, desk.request, "s2", "voice", doctor="d2")
    desk.request("s3", "text", doctor="d1")  # text is another kind; same patient, same doctor
    refused(errors.SessionConflict, desk.request, "s4", "text", doctor="d2")
    # Live until the first accepted Ended.
    desk.end("s1", desk.at(T0 + MIN))
    desk.request("s2", "video", doctor="d2")


def test_session_conflict_doctor_busy_with_another_patient(desk: Desk) -> None:
    desk.grant("pay-a", owner="pa")
    desk.grant("pay-b", owner="pb")
    desk.request("s1", "voice", patient="pa")
    err = refused(errors.SessionConflict, desk.request, "s2", "text", patient="pb")
    assert err.code == "session_conflict"
    desk.end("s1", desk.at(T0 + MIN))
    desk.request("s2", "text", patient="pb")


def test_unknown_session_is_404(desk: Desk) -> None:
    for post in (desk.activity, desk.connect, desk.activate, desk.ring, desk.message, desk.end):
        err = refused(errors.UnknownSession, post, "nope")
        assert (err.code, err.status) == ("unknown_session", 404)
    assert desk.ledger.tick(T0 + 60 * MIN, ["nope"]).as_dict()["steps"] == []


def test_idempotent_reingest_returns_original_result_and_changes_nothing(desk: Desk) -> None:
    desk.grant()
    first = desk.ledger.ingest("req-1", "session.requested", T0,
                               {"session_id": "s1", "kind": "voice", "patient_id": "p1",
                                "doctor_id": "d1"})
    desk.sessions.append("s1")
    desk.connect("s1", desk.at(T0 + MIN))
    n_events = len(desk.events())
    # Re-posted much later (past the 35-day age limit): the stored result, nothing changes.
    desk.at(T0 + timedelta(days=40))
    again = desk.ledger.ingest("req-1", "session.requested", T0,
                               {"session_id": "s1", "kind": "voice", "patient_id": "p1",
                                "doctor_id": "d1"})
    assert again.replayed and not first.replayed
    assert again.result == first.result and again.result["paid_until"] is None
    assert len(desk.events()) == n_events
    # A re-posted end is a no-op too, and a duplicate with sub-second noise is the same event.
    desk.clock.set(T0 + 5 * MIN)
    r1 = desk.ledger.ingest("end-1", "session.ended", T0 + 4 * MIN, {"session_id": "s1"})
    n_events = len(desk.events())
    r2 = desk.ledger.ingest("end-1", "session.ended", T0 + 4 * MIN + timedelta(microseconds=5),
                            {"session_id": "s1"})
    assert r2.replayed and r2.result == r1.result and len(desk.events()) == n_events


def test_same_event_id_with_other_body_is_409_idempotency_conflict(desk: Desk) -> None:
    desk.grant()
    desk.ledger.ingest("x-1", "session.requested", T0,
                       {"session_id": "s1", "kind": "voice", "patient_id": "p1", "doctor_id": "d1"})
    n_events = len(desk.events())
    for type_, at, payload in [
        ("session.requested", T0, {"session_id": "s1", "kind": "video", "patient_id": "p1",
                                   "doctor_id": "d1"}),
        ("session.requested", T0 + S, {"session_id": "s1", "kind": "voice", "patient_id": "p1",
                                       "doctor_id": "d1"}),
        ("session.activity", T0, {"session_id": "s1"}),
    ]:
        with pytest.raises(errors.IdempotencyConflict) as info:
            desk.ledger.ingest("x-1", type_, at, payload)
        assert (info.value.code, info.value.status) == ("idempotency_conflict", 409)
    assert len(desk.events()) == n_events


def test_refused_event_is_not_stored_and_can_be_retried(desk: Desk) -> None:
    refused(errors.InsufficientUnits, desk.request, "s1", "voice")
    event_id = f"ev-{desk.n}"
    assert desk.ledger.get_receipt(event_id) is None
    desk.grant()
    r = desk.ledger.ingest(event_id, "session.requested", T0,
                           {"session_id": "s1", "kind": "voice", "patient_id": "p1",
                            "doctor_id": "d1"})
    assert not r.replayed and r.result["state"] == "requested"


def test_tick_after_downtime_catches_up_every_due_block_in_order(desk: Desk) -> None:
    desk.grant(voice=8)
    desk.call("s1", T0)
    desk.pings("s1", T0, T0 + 100 * MIN)  # the backend keeps posting; no tick runs
    report = desk.tick(T0 + 5 * 60 * MIN)
    assert report.charged == [f"s1: charged block {n}" for n in range(1, 9)]
    charges = named(desk.session_events("s1"), "Session.AutoDeducted")
    assert [e.n for e in charges] == list(range(1, len(charges) + 1))  # in order, none twice
    s = desk.session("s1")
    # 8 units: the session was exhausted at the end of block 8 (80 minutes), not 100.
    assert (s.ended_at, s.end_reason) == (T0 + 80 * MIN, "balance_exhausted")
    assert desk.settled("s1") is None  # due a grace after the tick recorded the end
    desk.tick(T0 + 5 * 60 * MIN + 10 * MIN)
    assert desk.settled("s1").units_owed == 8 and desk.net_charged("s1") == 8
    assert desk.pool().free["voice"] == 0
    # Catching up is the same as ticking on time.
    on_time = Desk(FakeClock())
    on_time.doctor("d1", "MW")
    on_time.grant(voice=8)
    on_time.call("s1", T0)
    t = T0
    for k in range(1, 21):
        on_time.at(T0 + 5 * k * MIN)
        if T0 + 5 * k * MIN <= T0 + 100 * MIN:
            try:
                on_time.activity("s1")
            except (errors.SessionEnded, errors.SessionSettled):
                pass
        on_time.tick(T0 + 5 * k * MIN)
        t = T0 + 5 * k * MIN
    on_time.tick(t + 5 * 60 * MIN)
    assert on_time.settled("s1").units_owed == 8
    assert on_time.deducted("s1") == desk.deducted("s1")


def test_event_types_outside_sessions_are_not_billing(desk: Desk) -> None:
    """No event type charges for an appointment or a payment: a completion is the session's
    settlement (tests/test_appointments.py), never an event the backend can post."""
    desk.grant()
    for type_ in ("appointment.completed", "appointment.charged", "payment.completed"):
        err = refused(errors.InvalidEvent, desk.post, type_, appointment_id="a1")
        assert err.code == "invalid_event"
    assert named(desk.events(), "Pool.Held", "Pool.Charged") == []


def test_occurred_at_out_of_range_is_refused(desk: Desk) -> None:
    desk.grant()
    err = refused(errors.OccurredAtOutOfRange, desk.request, "s1", "voice",
                  at=T0 + 5 * MIN + S)
    assert err.status == 422
    refused(errors.OccurredAtOutOfRange, desk.request, "s1", "voice",
            at=T0 - timedelta(days=35) - S)


def test_late_start_within_skew_counts_after_an_end_report(desk: Desk) -> None:
    """The doctor's first reply (280 s) arrives after the patient's end report (320 s) but
    before the no-reply deadline (310 s) + skew: same outcome as on-time delivery (§3, I9)."""
    desk.grant(text=2)
    desk.request("s1", "text")
    desk.message("s1", desk.at(T0 + 10 * S))
    desk.end("s1", desk.at(T0 + 320 * S))
    desk.at(T0 + 330 * S)  # the reply is delivered now, 50 s late
    desk.activate("s1", T0 + 280 * S)
    desk.tick(T0 + 30 * MIN)
    s = desk.session("s1")
    assert (s.started_at, s.ended_at, s.end_reason) == (T0 + 280 * S, T0 + 320 * S, "completed")
    assert desk.settled("s1").units_owed == 1 and desk.net_charged("s1") == 1


def test_end_report_after_a_timeout_deadline_ends_at_the_deadline(desk: Desk) -> None:
    """No reply by 310 s; the patient's end at 400 s is recorded, then the tick applies the
    earlier doctor_no_response deadline (earliest end stands, §3), and it is final (§8)."""
    desk.grant(text=2)
    desk.request("s1", "text")
    desk.message("s1", desk.at(T0 + 10 * S))
    desk.end("s1", desk.at(T0 + 400 * S))
    refused(errors.SessionEnded, desk.activate, "s1", T0 + 390 * S)  # past the deadline
    desk.tick(T0 + 310 * S + MIN)
    s = desk.session("s1")
    assert (s.ended_at, s.end_reason) == (T0 + 310 * S, "doctor_no_response")
    refused(errors.SessionEnded, desk.activate, "s1", T0 + 300 * S)  # final once recorded
    desk.tick(T0 + 30 * MIN)
    assert desk.settled("s1").units_owed == 0 and desk.pool().free["text"] == 2


def test_one_failing_session_does_not_stop_the_tick(desk: Desk, monkeypatch) -> None:
    """A session whose step raises is reported in `failed`; every other session is billed."""
    import ledger.application as service

    desk.grant(voice=5)
    desk.grant("pay-2", owner="p2", voice=5)
    desk.doctor("d2")
    desk.call("s1", T0)
    desk.call("s2", T0, patient="p2", doctor="d2")
    real = service.apply_step

    def broken(work, session, step, as_of, policy):
        if session.session_id == "s1":
            raise RuntimeError("poisoned")
        return real(work, session, step, as_of, policy)

    monkeypatch.setattr(service, "apply_step", broken)
    report = desk.tick(T0 + 11 * MIN)
    assert [line.split(":")[0] for line in report.failed] == ["s1"]
    assert desk.deducted("s2") == [1] and desk.deducted("s1") == []


def test_session_events_before_the_request_are_refused(desk: Desk) -> None:
    """A billable start or activity stamped before the request would bill unrequested time."""
    desk.grant(voice=2)
    desk.request("s1", "voice", at=desk.at(T0 + MIN))
    refused(errors.InvalidTransition, desk.connect, "s1", T0)
    refused(errors.InvalidTransition, desk.activity, "s1", T0 + 30 * S)
    assert desk.connect("s1", T0 + MIN)["state"] == "active"
