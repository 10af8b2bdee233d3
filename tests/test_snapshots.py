"""Snapshots of the long-lived aggregates (issue 10; docs/design.md, Write path).

* Every SNAPSHOTTED class's state reads back equal through the stored format (datetimes in lists
  and nested dicts, id-keyed dicts, plans, price list versions), and a state that would not
  (an id-keyed dict whose keys are exactly `_type_` and `_data_`) is not snapshotted.
* On every store: after a history several intervals long, a cold load (a new Ledger, or no
  cache) of each long-lived aggregate equals its whole stream folded, and starts from a
  snapshot; a snapshot that is behind (another writer recorded events after it without taking
  one) is topped up by those events.
* Snapshots are outside the notification log: the log holds exactly the events.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator
from uuid import UUID

import pytest

from conftest import T0, FakeClock
from ledger.application import SNAPSHOTTED, Ledger, project_events
from ledger.consultations import MoneyWallet, PriceList
from ledger.domain import Doctor, Patient, Pool, Wallet
from storage import persistence_env
from test_billing import MIN, Desk

INTERVAL = 3  # small, so a short history crosses it many times


def ledger_on(url: str | None, clock: FakeClock, **kwargs: Any) -> Ledger:
    env = {"PERSISTENCE_MODULE": "eventsourcing.popo"} if url is None else persistence_env(url)
    kwargs.setdefault("snapshot_interval", INTERVAL)
    return Ledger(env=env, clock=clock, **kwargs)


@contextmanager
def opened(url: str, clock: FakeClock, **kwargs: Any) -> Iterator[Ledger]:
    ledger = ledger_on(url, clock, **kwargs)
    try:
        yield ledger
    finally:
        ledger.close()


def state(aggregate: Any) -> dict:
    """An aggregate's attributes, pending events aside (a Doctor's consultations are created
    on first read: present or not, they are the same state)."""
    if isinstance(aggregate, Doctor):
        aggregate.consultations  # noqa: B018 - materialise the lazy attribute
    return {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}


def folded(ledger: Ledger, aggregate_id: UUID) -> Any:
    """The aggregate rebuilt from its whole stream, without cache or snapshot."""
    records = ledger.recorder.select_events(aggregate_id)
    return project_events(None, map(ledger.mapper.to_domain_event, records))


def latest_snapshot_version(ledger: Ledger, aggregate_id: UUID) -> int | None:
    found = ledger.snapshots.recorder.select_events(aggregate_id, desc=True, limit=1)
    return found[0].originator_version if found else None


def history(desk: Desk, first: int, sessions: int) -> None:
    """Text sessions of p1 with d1, one an hour from hour `first`, each settled by a tick."""
    for n in range(first, first + sessions):
        start = desk.at(T0 + n * timedelta(hours=1))
        desk.request(f"s{n}", "text")
        desk.activate(f"s{n}")
        desk.activity(f"s{n}", desk.at(start + 4 * MIN))
        desk.end(f"s{n}", desk.at(start + 8 * MIN))
        desk.tick(start + 30 * MIN)


def long_lived_ids() -> list[UUID]:
    return [Patient.create_id("p1"), Doctor.create_id("d1"), Pool.create_id("pay-1"),
            Wallet.create_id("d1", "MWK")]


def start(desk: Desk) -> None:
    desk.doctor("d1", "MW")
    desk.grant("pay-1", owner="p1", text=40, seats=3)
    desk.post("member.added", payment_reference="pay-1", patient_id="p2")


def started(ledger: Ledger, clock: FakeClock, sessions: int) -> Ledger:
    """`ledger` after `start` and `history` of this many sessions."""
    desk = Desk(clock, ledger=ledger)
    start(desk)
    history(desk, 1, sessions)
    return ledger


# ------------------------------------------------------------------------- the format


def each_snapshotted() -> list[Any]:
    """One aggregate of every SNAPSHOTTED class, with the kinds of values its state holds."""
    at = T0 + timedelta(days=1)
    pool = Pool(payment_reference="pay-1", owner_id="p1",
                plan={"name": "Basic", "units": {"text": 3, "voice": 1, "video": 0}, "seats": 2},
                starts_at=T0, effective_end=T0 + timedelta(days=30), extension_days=0,
                content_hash="h")
    pool.add_member("p2", at)
    pool.remove_member("p2", at + MIN)
    pool.hold("s1", 1, "text", "p1", at)
    pool.charge("s1", 1, "text", "p1")
    pool.hold("s1", 2, "text", "p1", at)
    patient = Patient(patient_id="p1")
    patient.link_pool(str(pool.id))
    patient.open_session("text", "s1")
    doctor = Doctor(doctor_id="d1", country="MW", at=T0)
    doctor.open_session("s1", "p1")
    doctor.consultation_in_progress("c1", "video", at + 50 * MIN, True)
    wallet = Wallet(doctor_id="d1", currency="MWK")
    wallet.credit("s1", 700_000)
    wallet.request_withdrawal("w1", 100_000, at)
    money = MoneyWallet(patient_id="p1", currency="USD")
    money.top_up("top-1", "stripe", 10_000, at)
    money.hold("c1", 4_000, at)
    prices = PriceList(practitioner_id="pr1")
    prices.publish({"version": "v1", "currency": "USD", "tax_bps": 1_600, "share_bps": 8_000,
                    "effective_from": T0, "fees": {"individual:50": 4_000}})
    return [pool, patient, doctor, wallet, money, prices]


def test_every_snapshotted_state_reads_back_equal() -> None:
    ledger = ledger_on(None, FakeClock())
    aggregates = each_snapshotted()
    assert {type(a) for a in aggregates} == set(SNAPSHOTTED)
    for aggregate in aggregates:
        record = ledger._stored_snapshot(aggregate)
        assert record is not None, type(aggregate).__name__
        assert record.topic == "ledger.recording:LedgerAggregate.Snapshot"
        back = ledger.mapper.to_domain_event(record).mutate(None)
        assert type(back) is type(aggregate) and back.version == aggregate.version
        assert state(back) == state(aggregate)
        assert ledger.mapper.to_domain_event(record).timestamp == aggregate.modified_on


def test_a_state_that_reads_back_otherwise_is_not_snapshotted(clock) -> None:
    """Withdrawal ids are chosen by the caller: `_type_` and `_data_` make the wallet's
    `withdrawals` dict look like a custom-type marker in JSON. No snapshot; loads still right."""
    ledger = ledger_on(None, clock, cache_size=0, withdrawal_minimum_minor={"MWK": 1})
    desk = Desk(clock, ledger=ledger)
    start(desk)
    history(desk, 1, 2)
    wallet_id = Wallet.create_id("d1", "MWK")
    wallet = ledger.load(wallet_id)
    for request_id in ("_type_", "_data_"):
        desk.post("withdrawal.requested", doctor_id="d1", request_id=request_id,
                  currency="MWK", amount_minor=1)
    wallet = ledger.load(wallet_id)
    assert set(wallet.withdrawals) == {"_type_", "_data_"}
    assert ledger._stored_snapshot(wallet) is None
    history(desk, 3, 4)  # credits cross the interval: nothing is written for the wallet
    assert latest_snapshot_version(ledger, wallet_id) < wallet.version
    assert state(ledger.load(wallet_id)) == state(folded(ledger, wallet_id))


# ------------------------------------------------------------------------- the stores


def test_cold_load_from_a_snapshot_equals_the_whole_stream_popo(clock) -> None:
    ledger = started(ledger_on(None, clock, cache_size=0), clock, 7)  # every load is cold
    for aggregate_id in long_lived_ids():
        snapshot_version = latest_snapshot_version(ledger, aggregate_id)
        assert snapshot_version is not None and snapshot_version >= 2 * INTERVAL
        assert ledger._read_streams({aggregate_id: 0})[aggregate_id][0].originator_version \
            == snapshot_version
        assert state(ledger.load(aggregate_id)) == state(folded(ledger, aggregate_id))


def test_cold_load_from_a_snapshot_equals_the_whole_stream(store_url: str) -> None:
    clock = FakeClock()
    with opened(store_url, clock) as writer:
        warm = started(writer, clock, 7).load_many(long_lived_ids())
    with opened(store_url, clock) as cold:
        ids = long_lived_ids()
        streams = cold._read_streams(dict.fromkeys(ids, 0))  # one query for all four
        loaded = cold.load_many(ids)
        for aggregate_id in ids:
            snapshot_version = latest_snapshot_version(cold, aggregate_id)
            assert snapshot_version is not None and snapshot_version >= 2 * INTERVAL
            assert streams[aggregate_id][0].topic.endswith("LedgerAggregate.Snapshot")
            assert streams[aggregate_id][0].originator_version == snapshot_version
            assert state(loaded[aggregate_id]) == state(folded(cold, aggregate_id)) \
                == state(warm[aggregate_id])
            assert cold.load(aggregate_id).version == loaded[aggregate_id].version  # cached
        # The snapshots are not in the notification log: it holds exactly the events.
        notifications = cold.recorder.select_notifications(1, 1_000_000)
        assert not [n for n in notifications if "Snapshot" in n.topic]
        assert len(notifications) == cold.recorder.max_notification_id()


def test_a_snapshot_behind_is_topped_up_by_another_writers_events(store_url: str) -> None:
    clock = FakeClock()
    with opened(store_url, clock) as first:
        started(first, clock, 4)
    with opened(store_url, clock, snapshot_interval=0) as other:  # writes (and reads) none
        desk = Desk(clock, ledger=other)
        desk.n = 1_000
        history(desk, 5, 4)
    with opened(store_url, clock) as cold:
        for aggregate_id in long_lived_ids():
            aggregate = cold.load(aggregate_id)
            assert latest_snapshot_version(cold, aggregate_id) + INTERVAL < aggregate.version
            assert state(aggregate) == state(folded(cold, aggregate_id))
        # and it goes on from there: a session decided on the topped-up aggregates
        desk = Desk(clock, ledger=cold)
        desk.n = 2_000
        history(desk, 9, 1)
        for aggregate_id in long_lived_ids():
            assert state(cold.load(aggregate_id)) == state(folded(cold, aggregate_id))


def test_no_snapshots_when_the_interval_is_zero(store_url: str) -> None:
    clock = FakeClock()
    with opened(store_url, clock, snapshot_interval=0) as ledger:
        started(ledger, clock, 3)
        assert ledger.snapshots is None
        for aggregate_id in long_lived_ids():
            assert state(ledger.load(aggregate_id)) == state(folded(ledger, aggregate_id))
