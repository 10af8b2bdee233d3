"""The ledger's cheaper event path (ledger/recording.py `fast_commands`, `fast_creation`, `fold`;
issue 10) is the library's, byte for byte: one scenario touching every command method of the
tick's and the write path's aggregates, and creating each of them, is run twice, with the fast
path and with the library's decorators and constructors, and
every stored event (id, version, topic, state bytes, recorded time included) must be the same;
every aggregate folded by `fold` must equal the one the library's `mutate` builds.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

from conftest import T0, FakeClock
from ledger.application import Ledger, project_events
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.domain import Doctor, Patient, Pool, Receipt, Session, Wallet
from ledger.recording import _CREATIONS, _FastCommand, fast_creation, fold, recording_at

CLASSES = (Pool, Session, Patient, Doctor, Wallet)
CREATED = (Pool, Session, Patient, Doctor, Wallet, Receipt)


@contextmanager
def library_commands() -> Iterator[None]:
    """The library's CommandMethodDecorators back in place of the fast commands, and its
    constructor in place of the fast creation, meanwhile."""
    swapped = [(cls, name, command) for cls in CLASSES for name, command in vars(cls).items()
               if isinstance(command, _FastCommand)]
    creations = dict(_CREATIONS)
    for cls, name, command in swapped:
        setattr(cls, name, command.decorator)
    _CREATIONS.clear()
    try:
        yield
    finally:
        for cls, name, command in swapped:
            setattr(cls, name, command)
        _CREATIONS.update(creations)


def _scenario() -> Ledger:
    """A POPO ledger after a day touching every command method of CLASSES' aggregates."""
    clock = FakeClock()
    ledger = Ledger(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=clock,
                    withdrawal_minimum_minor={"MWK": 0})
    n = iter(range(10_000))

    def post(minutes: float, event_type: str, late: float = 0, **payload) -> None:
        at = clock.set(T0 + timedelta(minutes=minutes))
        ledger.ingest(f"e{next(n)}", event_type, at - timedelta(minutes=late), payload)

    def tick(minutes: float) -> None:
        at = clock.set(T0 + timedelta(minutes=minutes))
        ledger.tick(at, [f"s{i}" for i in range(1, 5)], [str(Pool.create_id("short"))])

    plan = {"name": "P", "price_minor": 1000, "currency": "MWK", "seats": 2,
            "units": {"text": 20, "voice": 20, "video": 0}, "duration_days": 30}
    post(0, "doctor.registered", doctor_id="d1", country="MW")
    post(0, "doctor.registered", doctor_id="d2", country="MW")
    post(0, "doctor.country_changed", doctor_id="d2", country="KE")
    post(0, "subscription.granted", payment_reference="pay1", owner_id="p1", plan=plan,
         starts_at=T0.isoformat())
    post(0, "subscription.granted", payment_reference="short", owner_id="p3",
         plan={**plan, "duration_days": 1}, starts_at=T0.isoformat())
    post(1, "member.added", payment_reference="pay1", patient_id="p2")
    # s1: text, a message, activity, charges by the tick, ended, settled (wallet credit).
    post(2, "session.requested", session_id="s1", kind="text", patient_id="p1", doctor_id="d1")
    post(2.5, "session.patient_message", session_id="s1")
    post(3, "text.activated", session_id="s1")
    post(10, "session.activity", session_id="s1")
    # s2: a voice call with provider reports, ringing, connected, room ended.
    post(3, "session.requested", session_id="s2", kind="voice", patient_id="p2", doctor_id="d2")
    post(3.2, "call.ringing", session_id="s2")
    post(3.5, "call.participant_joined", session_id="s2", participant="p2", provider="twilio")
    post(3.6, "call.participant_joined", session_id="s2", participant="d2", provider="twilio")
    post(4, "call.connected", session_id="s2")
    post(14, "call.participant_left", session_id="s2", participant="p2", provider="twilio")
    post(14.5, "call.room_ended", session_id="s2", provider="twilio")
    tick(16)
    # s2's end reported late, within its first minute: the charged block 1 is reversed.
    post(16.2, "session.ended", late=12.2, session_id="s2", ended_by="doctor", reason="completed")
    post(16.5, "session.ended", late=9, session_id="s1", ended_by="patient", reason="completed")
    tick(30)
    # s3: a text session of the short pool's owner, timed out, released at settlement.
    post(31, "session.requested", session_id="s3", kind="text", patient_id="p3", doctor_id="d1")
    tick(60)
    tick(90)
    post(91, "member.removed", payment_reference="pay1", patient_id="p2")
    post(92, "withdrawal.requested", request_id="w1", doctor_id="d1", currency="MWK",
         amount_minor=1)
    post(93, "withdrawal.completed", request_id="w1", doctor_id="d1", currency="MWK")
    post(94, "withdrawal.requested", request_id="w2", doctor_id="d1", currency="MWK",
         amount_minor=1)
    post(95, "withdrawal.rejected", request_id="w2", doctor_id="d1", currency="MWK",
         reason="bank")
    post(96, "payment.refunded", payment_reference="pay1")
    tick(60 * 25)  # the short pool expires
    return ledger


def _stored(ledger: Ledger) -> list[tuple]:
    return [(n.originator_id, n.originator_version, n.topic, n.state)
            for n in ledger.recorder.select_notifications(start=1, limit=100_000)]


def test_fast_commands_store_the_same_bytes_as_the_library():
    fast = _stored(_scenario())
    with library_commands():
        library = _stored(_scenario())
    assert fast == library
    topics = {topic.rsplit(".", 1)[-1] for _, _, topic, _ in fast}
    # The scenario reaches the command methods the tick and the write path use most.
    assert {"Held", "Charged", "AutoDeducted", "BlockHeld", "Ended", "Settled", "Released",
            "Reversed", "Expired", "Revoked", "MemberAdded", "MemberRemoved", "PoolLinked",
            "SessionOpened", "SessionClosed", "Credited", "WithdrawalHeld",
            "WithdrawalCompleted", "WithdrawalReleased", "PresenceRecorded", "Ringing",
            "Connected", "Activated", "PatientMessaged", "ActivityRecorded",
            "CountryChanged"} <= topics


def test_fold_builds_what_mutate_builds():
    ledger = _scenario()
    streams: dict = {}
    for record in ledger.recorder.select_notifications(start=1, limit=100_000):
        streams.setdefault(record.originator_id, []).append(ledger.mapper.to_domain_event(record))
    assert len(streams) > 10
    for events in streams.values():
        library = None
        for domain_event in events:
            library = domain_event.mutate(library)
        folded = project_events(None, events)
        assert type(folded) is type(library) and folded.__dict__ == library.__dict__


def test_fold_refuses_what_mutate_refuses():
    ledger = _scenario()
    records = [r for r in ledger.recorder.select_notifications(start=1, limit=100_000)
               if r.topic.endswith("Pool.Held")]
    first = ledger.mapper.to_domain_event(records[0])
    pool = ledger.load(first.originator_id)
    try:
        fold(pool, first)  # an old version: the library's OriginatorVersionError
    except Exception as exc:  # noqa: BLE001 - compared with the library's own
        assert type(exc).__name__ == "OriginatorVersionError"
    else:
        raise AssertionError("fold applied an event out of sequence")


def test_every_hot_aggregate_is_created_the_fast_way():
    assert set(CREATED) <= set(_CREATIONS)


def test_fast_creation_builds_what_the_library_builds():
    arguments = {
        Receipt: {"event_id": "e1", "body_hash": "h", "event_type": "t", "result": {"a": [1]}},
        Patient: {"patient_id": "p1"},
        Doctor: {"doctor_id": "d1", "country": "MW", "at": T0},
        Wallet: {"doctor_id": "d1", "currency": "MWK"},
        Session: {"session_id": "s1", "kind": "text", "patient_id": "p1", "doctor_id": "d1",
                  "requested_at": T0, "pool_id": None},
    }
    for cls, kwargs in arguments.items():
        with recording_at(T0):
            fast = cls(**kwargs)
            with library_commands():
                library = cls(**kwargs)
        fast_event, library_event = fast.pending_events[0], library.pending_events[0]
        assert type(fast_event) is type(library_event)
        assert list(fast_event.__dict__.items()) == list(library_event.__dict__.items())
        fast_state = {k: v for k, v in fast.__dict__.items() if k != "_pending_events"}
        assert fast_state == {k: v for k, v in library.__dict__.items() if k != "_pending_events"}
        assert list(fast.__dict__) == list(library.__dict__)


def test_fast_creation_leaves_other_calls_to_the_library():
    with pytest.raises(TypeError):  # a missing argument: the library's own error
        Receipt(event_id="e1", body_hash="h", event_type="t")
    with recording_at(T0):
        positional = Patient("p1")  # positional: the library's path, the same aggregate
    assert positional.id == Patient.create_id("p1") and positional.version == 1


def test_fast_creation_refuses_a_class_it_cannot_mirror():
    with pytest.raises(TypeError):
        fast_creation(int)


@given(st.text())
def test_ledger_ids_are_the_uuid5_of_their_names(name):
    from uuid import uuid5

    from ledger.domain import NS, ledger_id

    made, expected = ledger_id(name), uuid5(NS, name)
    assert made == expected and hash(made) == hash(expected) and str(made) == str(expected)
    assert made.version == 5 and made.variant == expected.variant
    assert made.is_safe == expected.is_safe


def test_recording_at_refuses_a_naive_time_and_restores_the_outer_one():
    from datetime import datetime

    from ledger.recording import recorded_now

    with pytest.raises(ValueError):
        with recording_at(datetime(2026, 1, 1)):
            pass
    with recording_at(T0):
        with recording_at(T0 + timedelta(hours=1)):
            assert recorded_now() == T0 + timedelta(hours=1)
        assert recorded_now() == T0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text() | st.sampled_from(["\x7f", "\x00\x1f\n\t\"\\/", "é", "\u2028", "ok"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                               max_size=4),
    max_leaves=12)


@given(st.text(max_size=20), st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6))
def test_body_hash_is_the_hash_of_the_standard_librarys_canonical_json(event_type, payload):
    """The digest every receipt stores (I8) stays the standard library's, whatever the payload
    (a changed digest would refuse every re-post of an event accepted before the change)."""
    import hashlib
    import json

    from ledger.application import body_hash

    canonical = json.dumps({"type": event_type, "occurred_at": T0.isoformat(), "payload": payload},
                           sort_keys=True, separators=(",", ":"))
    assert body_hash(event_type, T0, payload) == hashlib.sha256(canonical.encode()).hexdigest()
