"""Provider presence → Connected/Ended (issue 4 §3; billing-rules.md §8 rejoin rule).

Pure derivation (ledger/presence.py) first, then through `Ledger.ingest` and the tick on POPO:
the money of a call reported by a provider must not depend on duplicates, delivery order or
when the tick ran.
"""

from __future__ import annotations

import random
import threading
from datetime import timedelta

import pytest
from hypothesis import given, strategies as st

from conftest import T0, FakeClock, make_ledger
from ledger import errors
from ledger.presence import Signal, derive
from test_billing import MW_RATE, Desk, log, named, of_session

S = timedelta(seconds=1)
MIN = timedelta(minutes=1)


def sig(seconds: int, role: str, action: str) -> Signal:
    return Signal(at=T0 + seconds * S, role=role, action=action)


# ------------------------------------------------------------------------------ derivation


def test_connected_at_the_later_join() -> None:
    state = derive([sig(0, "patient", "joined"), sig(42, "doctor", "joined")])
    assert state.connected_at == T0 + 42 * S and state.both_present and state.ended_at is None


def test_rejoin_within_60_seconds_is_no_departure() -> None:
    state = derive([sig(0, "patient", "joined"), sig(0, "doctor", "joined"),
                    sig(300, "patient", "left"), sig(360, "patient", "joined")])
    assert state.ended_at is None and state.both_present


def test_rejoin_after_61_seconds_ends_at_the_departure() -> None:
    state = derive([sig(0, "patient", "joined"), sig(0, "doctor", "joined"),
                    sig(300, "patient", "left"), sig(361, "patient", "joined")])
    assert (state.ended_at, state.end_reason) == (T0 + 300 * S, "participant_left")


def test_a_departure_without_news_can_be_undone_for_60_seconds() -> None:
    state = derive([sig(0, "patient", "joined"), sig(0, "doctor", "joined"),
                    sig(300, "doctor", "left")])
    assert (state.ended_at, state.end_reason, state.decide_at) == (
        T0 + 300 * S, "participant_left", T0 + 360 * S)
    assert not state.both_present


def test_empty_room_timeout_bills_to_the_first_departure() -> None:
    state = derive([sig(0, "patient", "joined"), sig(10, "doctor", "joined"),
                    sig(1510, "patient", "left"), sig(1530, "doctor", "left"),
                    sig(1530 + 300, "", "room_ended")])
    assert (state.ended_at, state.end_reason) == (T0 + 1510 * S, "participant_left")


def test_the_first_leaver_who_comes_back_does_not_end_the_call() -> None:
    state = derive([sig(0, "patient", "joined"), sig(0, "doctor", "joined"),
                    sig(100, "patient", "left"), sig(120, "doctor", "left"),
                    sig(130, "patient", "joined"), sig(400, "", "room_ended")])
    assert (state.ended_at, state.end_reason) == (T0 + 120 * S, "participant_left")


def test_room_end_while_both_present() -> None:
    state = derive([sig(0, "patient", "joined"), sig(0, "doctor", "joined"),
                    sig(900, "", "room_ended")])
    assert (state.ended_at, state.end_reason, state.decide_at) == (
        T0 + 900 * S, "room_ended", T0 + 900 * S)


def test_one_participant_alone_never_connects() -> None:
    state = derive([sig(0, "patient", "joined"), sig(80, "patient", "left"),
                    sig(400, "", "room_ended")])
    assert state.connected_at is None and state.end_reason == "room_ended"


signals = st.lists(st.builds(sig, st.integers(0, 4000), st.sampled_from(["patient", "doctor"]),
                             st.sampled_from(["joined", "left"])), max_size=12)


@given(signals, st.randoms())
def test_derivation_ignores_delivery_order(items, rnd) -> None:
    assert derive(rnd.sample(items, k=len(items))) == derive(items)


# --------------------------------------------------------------------------- through the ledger


def presence_call(desk: Desk, sid: str = "c1") -> list[tuple[str, timedelta, str]]:
    """A 25-minute LiveKit call: both join, both leave, the room ends 5 minutes after."""
    desk.doctor()
    desk.grant(voice=5)
    desk.request(sid, "voice")
    return [("call.participant_joined", 5 * S, "p1"), ("call.participant_joined", 20 * S, "doctor:d1"),
            ("call.participant_left", 20 * S + 25 * MIN, "patient:p1"),
            ("call.participant_left", 30 * S + 25 * MIN, "d1"),
            ("call.room_ended", 30 * S + 30 * MIN, "")]


def deliver(desk: Desk, sid: str, reports, order: list[int], repeat: int = 1) -> None:
    for i in order:
        type_, offset, who = reports[i]
        for _ in range(repeat):
            desk.ledger.ingest(f"lk-{sid}-{i}", type_, T0 + offset,
                               {"session_id": sid, "participant": who, "provider": "livekit"})


def money(desk: Desk, sid: str) -> tuple:
    session = desk.ledger.get_session(sid)
    events = of_session(log(desk.ledger), sid)
    return (session.started_at, session.ended_at, session.end_reason,
            session.settlement and session.settlement["units_owed"],
            session.settlement and session.settlement["net_pay_minor"],
            len(named(events, "Session.AutoDeducted")))


def settle_all(desk: Desk) -> None:
    """Tick once to record the provider-derived end, then again past the settlement grace."""
    for hours in (2, 3):
        desk.clock.set(T0 + hours * 60 * MIN)
        desk.ledger.tick(desk.clock(), desk.sessions, desk.pools)


def test_clean_delivery_bills_the_call_from_later_join_to_first_departure() -> None:
    desk = Desk()
    reports = presence_call(desk)
    desk.clock.set(T0 + 40 * MIN)
    deliver(desk, "c1", reports, [0, 1, 2, 3, 4])
    settle_all(desk)
    session = desk.ledger.get_session("c1")
    assert session.started_at == T0 + 20 * S
    assert session.ended_at == T0 + 20 * S + 25 * MIN  # the departure, not the room's end
    assert session.end_reason == "participant_left"
    assert session.settlement["units_owed"] == 3
    assert session.settlement["net_pay_minor"] == 3 * MW_RATE


@pytest.mark.parametrize("seed", range(6))
def test_duplicated_and_reordered_delivery_gives_the_same_money(seed) -> None:
    clean = Desk()
    reports = presence_call(clean)
    clean.clock.set(T0 + 40 * MIN)
    deliver(clean, "c1", reports, [0, 1, 2, 3, 4])
    settle_all(clean)

    messy = Desk()
    presence_call(messy)
    messy.clock.set(T0 + 40 * MIN)
    order = list(range(5))
    random.Random(seed).shuffle(order)
    deliver(messy, "c1", reports, order, repeat=2)
    settle_all(messy)
    assert money(messy, "c1") == money(clean, "c1")


def test_concurrent_deliveries_give_the_same_money(tmp_path) -> None:
    clock = FakeClock(T0)
    url = f"sqlite:///{tmp_path / 'l.db'}"
    desk = Desk(clock=clock, ledger=make_ledger(url, clock))
    reports = presence_call(desk)
    clock.set(T0 + 40 * MIN)
    threads = [threading.Thread(target=deliver, args=(desk, "c1", reports, order))
               for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    settle_all(desk)
    session = desk.ledger.get_session("c1")
    assert (session.ended_at, session.settlement["units_owed"]) == (T0 + 20 * S + 25 * MIN, 3)
    assert len(named(of_session(log(desk.ledger), "c1"), "Session.PresenceRecorded")) == 5


def test_a_pending_departure_is_decided_by_the_tick_after_the_rejoin_window() -> None:
    desk = Desk()
    reports = presence_call(desk)
    desk.clock.set(T0 + 26 * MIN)
    deliver(desk, "c1", reports, [0, 1, 2])
    left = T0 + 20 * S + 25 * MIN
    desk.ledger.tick(left + 60 * S + 59 * S, desk.sessions)  # window + skew not yet passed
    assert desk.ledger.get_session("c1").ended_at is None
    desk.clock.set(left + 2 * MIN)
    desk.ledger.tick(desk.clock(), desk.sessions)
    session = desk.ledger.get_session("c1")
    assert (session.ended_at, session.end_reason) == (left, "participant_left")


def test_a_rejoin_within_60_seconds_keeps_the_call_going() -> None:
    desk = Desk()
    reports = presence_call(desk)
    desk.clock.set(T0 + 40 * MIN)
    deliver(desk, "c1", reports, [0, 1])
    desk.ledger.ingest("out", "call.participant_left", T0 + 10 * MIN,
                       {"session_id": "c1", "participant": "p1", "provider": "livekit"})
    desk.ledger.ingest("back", "call.participant_joined", T0 + 10 * MIN + 60 * S,
                       {"session_id": "c1", "participant": "p1", "provider": "livekit"})
    deliver(desk, "c1", reports, [2, 3, 4])
    settle_all(desk)
    assert desk.ledger.get_session("c1").ended_at == T0 + 20 * S + 25 * MIN


def test_a_join_reported_after_the_room_ended_still_counts_within_the_grace() -> None:
    desk = Desk()
    reports = presence_call(desk)
    desk.clock.set(T0 + 31 * MIN)
    deliver(desk, "c1", reports, [0, 2, 3, 4])  # the doctor's join is late
    assert desk.ledger.get_session("c1").started_at is None
    desk.clock.set(T0 + 35 * MIN)
    deliver(desk, "c1", reports, [1])
    settle_all(desk)
    session = desk.ledger.get_session("c1")
    assert session.started_at == T0 + 20 * S and session.settlement["units_owed"] == 3


def test_a_call_with_both_present_is_not_idle_without_pings() -> None:
    desk = Desk()
    reports = presence_call(desk)
    desk.clock.set(T0 + 21 * MIN)
    deliver(desk, "c1", reports, [0, 1])
    desk.ledger.tick(T0 + 20 * MIN, desk.sessions)  # past the 15-minute call idle timeout
    assert desk.ledger.get_session("c1").ended_at is None


def test_an_unknown_identity_is_acknowledged_and_ignored() -> None:
    desk = Desk()
    presence_call(desk)
    result = desk.ledger.ingest("x", "call.participant_joined", T0 + 5 * S,
                                {"session_id": "c1", "participant": "recorder-bot"}).result
    assert "ignored" in result
    assert not named(of_session(log(desk.ledger), "c1"), "Session.PresenceRecorded")


def test_a_two_party_report_stands_for_both_participants() -> None:
    """`participant: "*"` (Twilio Voice: both legs up) connects at once; room end ends it."""
    desk = Desk()
    presence_call(desk)
    desk.clock.set(T0 + 30 * MIN)
    desk.ledger.ingest("up", "call.participant_joined", T0 + MIN, {"session_id": "c1", "participant": "*"})
    desk.ledger.ingest("down", "call.room_ended", T0 + 26 * MIN, {"session_id": "c1"})
    settle_all(desk)
    session = desk.ledger.get_session("c1")
    assert (session.started_at, session.ended_at) == (T0 + MIN, T0 + 26 * MIN)
    assert session.settlement["units_owed"] == 3


def test_presence_after_settlement_is_refused() -> None:
    desk = Desk()
    reports = presence_call(desk)
    desk.clock.set(T0 + 40 * MIN)
    deliver(desk, "c1", reports, [0, 1, 2, 3, 4])
    settle_all(desk)
    with pytest.raises(errors.SessionSettled):
        desk.ledger.ingest("late", "call.participant_left", T0 + 26 * MIN,
                           {"session_id": "c1", "participant": "p1"})


def test_presence_is_for_calls() -> None:
    desk = Desk()
    desk.doctor()
    desk.grant()
    desk.request("t1", "text")
    with pytest.raises(errors.InvalidTransition):
        desk.ledger.ingest("x", "call.room_ended", T0, {"session_id": "t1"})


# ------------------------------------------------------ review regressions: order and timing


def outcome_of(order: list[int], reports, sid: str = "c1") -> tuple:
    desk = Desk()
    desk.doctor()
    desk.grant(voice=5)
    desk.request(sid, "voice")
    desk.clock.set(T0 + 40 * MIN)
    deliver(desk, sid, reports, order)
    settle_all(desk)
    return money(desk, sid)


def test_a_rejoin_delivered_after_the_room_end_still_undoes_the_departure() -> None:
    reports = [("call.participant_joined", 5 * S, "p1"), ("call.participant_joined", 20 * S, "d1"),
               ("call.participant_left", 10 * MIN, "p1"),
               ("call.participant_joined", 10 * MIN + 40 * S, "p1"),
               ("call.room_ended", 25 * MIN, "")]
    in_order = outcome_of([0, 1, 2, 3, 4], reports)
    assert in_order == outcome_of([0, 1, 2, 4, 3], reports)
    assert in_order[1:4] == (T0 + 25 * MIN, "room_ended", 3)


def test_a_leave_delivered_late_moves_the_connect_later() -> None:
    """The patient left at 0:30 before the doctor joined at 1:00: they overlap from 6:00."""
    reports = [("call.participant_joined", 0 * S, "p1"), ("call.participant_left", 30 * S, "p1"),
               ("call.participant_joined", 1 * MIN, "d1"), ("call.participant_joined", 6 * MIN, "p1"),
               ("call.room_ended", 15 * MIN + 30 * S, "")]
    in_order = outcome_of([0, 1, 2, 3, 4], reports)
    assert in_order == outcome_of([0, 2, 3, 1, 4], reports)
    assert in_order[0] == T0 + 6 * MIN and in_order[3] == 1


@pytest.mark.parametrize("tick_on_time", [True, False])
def test_a_report_after_the_idle_deadline_does_not_revive_the_call(tick_on_time) -> None:
    """Connected by the backend at 0 with no pings: idle at 15:00 whenever the tick runs."""
    desk = Desk()
    desk.doctor()
    desk.grant(voice=10)
    desk.request("c1", "voice")
    desk.connect("c1", T0)
    if tick_on_time:
        desk.tick(T0 + 16 * MIN)
    desk.clock.set(T0 + 16 * MIN + 30 * S)
    result = desk.ledger.ingest("lk-1", "call.participant_joined", desk.clock(),
                                {"session_id": "c1", "participant": "p1"}).result
    assert "ignored" in result
    desk.clock.set(T0 + 40 * MIN)
    desk.ledger.ingest("lk-2", "call.room_ended", desk.clock(), {"session_id": "c1"})
    settle_all(desk)
    session = desk.ledger.get_session("c1")
    assert (session.ended_at, session.end_reason, session.settlement["units_owed"]) == (
        T0 + 15 * MIN, "idle_timeout", 2)


def test_a_backend_connect_after_a_provider_connect_still_counts_if_that_moves_later() -> None:
    """The earliest *reported* start stands (§1): the backend's connect at 3:00 is kept even
    though the providers' reports said 1:00 when it arrived; they later say 6:00."""
    reports = [("call.participant_joined", 0 * S, "p1"), ("call.participant_joined", 1 * MIN, "d1"),
               ("call.participant_joined", 6 * MIN, "p1"), ("call.room_ended", 15 * MIN, "")]
    desk = Desk()
    desk.doctor()
    desk.grant(voice=5)
    desk.request("c1", "voice")
    desk.clock.set(T0 + 16 * MIN)
    deliver(desk, "c1", reports, [0, 1, 2, 3])
    desk.connect("c1", T0 + 3 * MIN)
    desk.ledger.ingest("late-left", "call.participant_left", T0 + 30 * S,
                       {"session_id": "c1", "participant": "p1"})
    settle_all(desk)
    session = desk.ledger.get_session("c1")
    assert (session.started_at, session.settlement["units_owed"]) == (T0 + 3 * MIN, 2)
