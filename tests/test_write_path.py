"""The write path's unit of work (issue 10): a batch, and a page of a tick, decided against one
shared set of aggregates and saved in one transaction, give exactly what event-by-event and
step-by-step give; concurrent batches on PostgreSQL charge nothing twice and lose nothing.

* `test_batches_equal_one_by_one_hypothesis` (SQLite and PostgreSQL): a generated history of
  events — refusals, duplicates inside a batch, re-posts of earlier events with the same or
  another body, unknown types, stale `occurred_at` — is posted to one ledger event by event
  (`ingest`, ticks step by step) and to another in batches (`ingest_batch`, ticks in units).
  Each event's outcome, each tick's steps and every aggregate's stored stream (topics and
  states, recorded times included) must be identical.
* Unit isolation: a decision that raises after changing an aggregate leaves nothing behind.
* The aggregate cache: a load sees what another Ledger (another process) wrote since.
* PostgreSQL: batches posted at once by several workers over the same patients and sessions.
"""

from __future__ import annotations

import tempfile
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import T0, FakeClock, make_ledger, postgres_required
from ledger import errors
from ledger.application import Accepted, Ledger
from ledger.billing import Unit, choose_pool, copy_aggregate
from ledger.domain import Doctor, Patient, Pool, Receipt, Session, Wallet
from storage import postgres_conninfo
from test_concurrency_pg import at_once
from test_invariants import check_all, events_of

DOCTORS, PATIENTS, POOLS, SESSIONS = 2, 3, 3, 5
KINDS = ("text", "voice", "video")


# --------------------------------------------------------------------------- stores


@pytest.fixture(params=["sqlite", "postgres"])
def two_urls(request):
    """Two empty stores of one kind: (url of the one-by-one ledger, url of the batch ledger)."""
    if request.param == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/one.db", f"sqlite:///{tmp}/batch.db"
        return
    import psycopg

    from conftest import PG_URL
    schemas = [f"wp_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    try:
        conn = psycopg.connect(postgres_conninfo(PG_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if postgres_required():
            pytest.fail(f"PostgreSQL is required here but unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    with conn:
        for schema in schemas:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield tuple(f"{PG_URL}?schema={schema}" for schema in schemas)
        finally:
            for schema in schemas:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


# ------------------------------------------------------------------- generated history

session_step = st.tuples(
    st.sampled_from(["text.activated", "call.connected", "session.activity",
                     "session.patient_message", "session.ended", "call.ringing"]),
    st.integers(0, SESSIONS - 1))
request_step = st.tuples(st.just("request"), st.integers(0, SESSIONS - 1),
                         st.integers(0, PATIENTS - 1), st.integers(0, DOCTORS - 1),
                         st.sampled_from(KINDS), st.booleans())
step = st.one_of(
    request_step, session_step, request_step, session_step, session_step,
    st.tuples(st.just("doctor"), st.integers(0, DOCTORS - 1), st.sampled_from(["MW", "KE"])),
    st.tuples(st.just("grant"), st.integers(0, POOLS - 1), st.integers(0, PATIENTS - 1),
              st.integers(0, 3)),
    st.tuples(st.just("member"), st.integers(0, POOLS - 1), st.integers(0, PATIENTS - 1)),
    st.tuples(st.just("withdraw"), st.integers(0, DOCTORS - 1), st.integers(1, 3)),
    st.tuples(st.just("repost"), st.integers(0, 40), st.booleans()),
    st.tuples(st.just("odd"), st.sampled_from(["unknown_type", "too_old"])),
)
history = st.lists(st.tuples(step, st.integers(0, 700), st.booleans(), st.booleans()),
                   min_size=1, max_size=50)


def prologue(token: str, units: int) -> list:
    """Every doctor registered and every patient granted a pool of `units` per bucket."""
    items = [(f"{token}-d{i}-reg", "doctor.registered", T0,
              {"doctor_id": f"{token}-d{i}", "country": ("MW", "KE")[i % 2]})
             for i in range(DOCTORS)]
    return items + [_item(token, f"own{i}", ("grant", POOLS + i, i, units), T0, [])
                    for i in range(PATIENTS)]


def build(token: str, plan: list, units: int = 2) -> list[list]:
    """Batches of (event_id, type, occurred_at, payload) plus a tick flag per batch, from the
    generated steps: (step, seconds after the previous event, ends a batch, tick after it)."""
    batches, batch, posted, at = [], prologue(token, units), [], T0
    for k, (spec, gap, cut, tick) in enumerate(plan):
        at += timedelta(seconds=gap)
        for item in _items(token, k, spec, at, posted):
            batch.append(item)
            posted.append(item)
        if cut or k == len(plan) - 1:
            if batch:
                batches.append((batch, tick))
            batch = []
    return batches


def _items(token: str, k: int, spec: tuple, at, posted: list) -> list:
    """The events of one generated step: one, none (a re-post before any post), or a request
    followed by its start (text.activated or call.connected, by kind)."""
    item = _item(token, k, spec, at, posted)
    if item is None:
        return []
    if spec[0] != "request" or not spec[5]:
        return [item]
    start = "text.activated" if spec[4] == "text" else "call.connected"
    return [item, (f"{token}-e{k}-start", start, at, {"session_id": f"{token}-s{spec[1]}"})]


def _item(token: str, k, spec: tuple, at, posted: list):
    kind, args = spec[0], spec[1:]
    sid = lambda i: f"{token}-s{i}"  # noqa: E731
    if kind == "doctor":
        return (f"{token}-e{k}", "doctor.registered", at,
                {"doctor_id": f"{token}-d{args[0]}", "country": args[1]})
    if kind == "grant":
        units = args[2]
        return (f"{token}-e{k}", "subscription.granted", at, {
            "payment_reference": f"{token}-pay{args[0]}", "owner_id": f"{token}-p{args[1]}",
            "starts_at": (T0 - timedelta(hours=1)).isoformat(),
            "plan": {"name": "Plan", "price_minor": 1000, "currency": "MWK", "seats": 2,
                     "duration_days": 30, "units": {"text": units, "voice": units,
                                                    "video": units}}})
    if kind == "member":
        return (f"{token}-e{k}", "member.added", at, {
            "payment_reference": f"{token}-pay{args[0]}", "patient_id": f"{token}-p{args[1]}"})
    if kind == "request":
        return (f"{token}-e{k}", "session.requested", at, {
            "session_id": sid(args[0]), "kind": args[3], "patient_id": f"{token}-p{args[1]}",
            "doctor_id": f"{token}-d{args[2]}"})
    if kind == "withdraw":
        return (f"{token}-e{k}", "withdrawal.requested", at, {
            "doctor_id": f"{token}-d{args[0]}", "currency": "MWK", "request_id": f"{token}-w{k}",
            "amount_minor": 5_000_000 * args[1]})
    if kind == "repost":
        if not posted:
            return None
        event_id, type_, occurred_at, payload = posted[args[0] % len(posted)]
        return (event_id, type_, occurred_at, payload if args[1] else {**payload, "x": 1})
    if kind == "odd":
        if args[0] == "unknown_type":
            return (f"{token}-e{k}", "session.nope", at, {"session_id": sid(0)})
        return (f"{token}-e{k}", "session.activity", at - timedelta(days=40),
                {"session_id": sid(0)})
    payload = {"session_id": sid(args[0])}
    if kind == "session.ended":
        payload |= {"ended_by": "patient", "reason": "completed"}
    return (f"{token}-e{k}", kind, at, payload)


def outcome(o) -> tuple:
    """What an ingestion answered, comparable across ledgers (positions differ by store)."""
    if isinstance(o, Accepted):
        return ("accepted", o.result, o.replayed, o.position is None)
    return (type(o).__name__, getattr(o, "code", None), str(o))


def ingest_one(ledger: Ledger, item):
    try:
        return ledger.ingest_alone(*item)
    except errors.LedgerError as exc:
        return exc


def streams(ledger: Ledger, token: str, batches) -> dict:
    """Every aggregate the history can touch: its stored (version, topic, state) in order."""
    ids = [Doctor.create_id(f"{token}-d{i}") for i in range(DOCTORS)]
    ids += [Patient.create_id(f"{token}-p{i}") for i in range(PATIENTS)]
    ids += [Pool.create_id(f"{token}-pay{i}") for i in range(POOLS + PATIENTS)]
    ids += [Session.create_id(f"{token}-s{i}") for i in range(SESSIONS)]
    ids += [Wallet.create_id(f"{token}-d{i}", "MWK") for i in range(DOCTORS)]
    ids += [Receipt.create_id(item[0]) for batch, _ in batches for item in batch]
    return {i: [(r.originator_version, r.topic, r.state)
                for r in ledger.recorder.select_events(i)] for i in dict.fromkeys(ids)}


def tick_args(token: str) -> tuple[list[str], list[str]]:
    return ([f"{token}-s{i}" for i in range(SESSIONS)],
            [str(Pool.create_id(f"{token}-pay{i}")) for i in range(POOLS + PATIENTS)])


# ------------------------------------------------------------------------------ the property


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])
@given(plan=history)
def test_batches_equal_one_by_one_hypothesis(two_urls, plan) -> None:
    """Batches (one unit each) and ticks in units give what one-by-one and step-by-step give:
    the same outcome per event, the same tick steps, the same stored streams."""
    token = uuid.uuid4().hex[:8]  # each example its own ids, so the stores are reused
    batches = build(token, plan)
    clock = FakeClock()
    one, many = (make_ledger(url, clock) for url in two_urls)
    try:
        sessions, pools = tick_args(token)
        for batch, tick in batches:
            clock.set(max(item[2] for item in batch) + timedelta(seconds=30))
            expected = [outcome(ingest_one(one, item)) for item in batch]
            assert [outcome(o) for o in many.ingest_batch(batch)] == expected
            if tick:
                clock.advance(900)
                step_by_step = one._tick_each(clock(), sessions, pools, 20_000)
                in_units = many.tick(clock(), sessions, pools)
                assert (in_units.steps, in_units.pools) == (step_by_step.steps, step_by_step.pools)
        assert streams(many, token, batches) == streams(one, token, batches)
    finally:
        one.close()
        many.close()


# ---------------------------------------------------------------------- handcrafted cases


def grant(event_id: str, ref: str, owner: str, units: int = 2) -> tuple:
    return (event_id, "subscription.granted", T0, {
        "payment_reference": ref, "owner_id": owner, "starts_at": T0.isoformat(),
        "plan": {"name": "Plan", "price_minor": 1000, "currency": "MWK", "seats": 2,
                 "duration_days": 30, "units": {"text": units, "voice": units, "video": units}}})


def test_a_batch_answers_like_one_by_one_and_reports_positions() -> None:
    clock = FakeClock(T0 + timedelta(minutes=1))
    ledger = make_ledger(None, clock)
    items = [("e1", "doctor.registered", T0, {"doctor_id": "d1", "country": "MW"}),
             grant("e2", "pay1", "p1"),
             ("e3", "session.requested", T0, {"session_id": "s1", "kind": "text",
                                               "patient_id": "p1", "doctor_id": "d1"}),
             ("e4", "session.requested", T0, {"session_id": "s2", "kind": "text",
                                               "patient_id": "p1", "doctor_id": "d1"}),
             ("e1", "doctor.registered", T0, {"doctor_id": "d1", "country": "MW"}),
             ("e1", "doctor.registered", T0, {"doctor_id": "d1", "country": "KE"})]
    out = ledger.ingest_batch(items)
    assert [type(o).__name__ for o in out] == ["Accepted", "Accepted", "Accepted",
                                              "SessionConflict", "Accepted",
                                              "IdempotencyConflict"]
    assert out[4].replayed and out[4].result == out[0].result and out[4].position is None
    positions = [o.position for o in out[:3]]
    assert positions == sorted(positions) and None not in positions
    assert positions[-1] == ledger.recorder.max_notification_id()
    assert ledger.get_receipt("e4") is None  # the refused event wrote nothing


def test_a_decision_that_raises_after_changing_an_aggregate_leaves_nothing_in_the_unit() -> None:
    clock = FakeClock(T0 + timedelta(minutes=1))
    ledger = make_ledger(None, clock)
    ledger.ingest(*grant("e1", "pay1", "p1"))
    unit = Unit(ledger.load, ledger.load_many)
    pool_id = Pool.create_id("pay1")
    work = unit.work()
    pool = work.get(pool_id)
    pool.hold(session_id="s1", block=1, bucket="text", patient_id="p1", at=T0)
    work.add(pool)  # the decision then fails: it is never adopted
    assert unit.peek(pool_id).free["text"] == 2 and not unit.peek(pool_id).pending_events
    assert unit.work().get(pool_id).free["text"] == 2 and unit.events == []


def test_a_failing_handler_mid_batch_falls_back_to_one_by_one(monkeypatch) -> None:
    """A handler raising something other than a refusal after changing aggregates: the batch
    is redone event by event, so the other events apply and that one answers its error."""
    clock = FakeClock(T0 + timedelta(minutes=1))
    ledger = make_ledger(None, clock)
    real = ledger._handlers["member.added"]

    def broken(work, at, p, now):
        real(work, at, p, now)
        raise RuntimeError("bug after the change")

    monkeypatch.setitem(ledger._handlers, "member.added", broken)
    out = ledger.ingest_batch(
        [grant("e1", "pay1", "p1"),
         ("e2", "member.added", T0, {"payment_reference": "pay1", "patient_id": "p2"}),
         ("e3", "doctor.registered", T0, {"doctor_id": "d1", "country": "MW"})],
        fatal=lambda exc: False)
    assert isinstance(out[1], RuntimeError)
    assert isinstance(out[0], Accepted) and isinstance(out[2], Accepted)
    assert "p2" not in ledger.load(Pool.create_id("pay1")).members
    assert ledger.get_receipt("e2") is None


def test_the_cache_sees_what_another_process_wrote(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    clock = FakeClock(T0 + timedelta(minutes=1))
    first, second = make_ledger(url, clock), make_ledger(url, clock)
    try:
        first.ingest(*grant("e1", "pay1", "p1", units=3))
        assert first.load(Pool.create_id("pay1")).free["text"] == 3  # now cached in `first`
        second.ingest("e2", "doctor.registered", T0, {"doctor_id": "d1", "country": "MW"})
        second.ingest("e3", "session.requested", T0, {"session_id": "s1", "kind": "text",
                                                       "patient_id": "p1", "doctor_id": "d1"})
        pool = first.load(Pool.create_id("pay1"))
        assert pool.free["text"] == 2 and pool.version == 2
        pool.free["text"] = 99  # a caller's change never reaches the cache
        assert first.load(Pool.create_id("pay1")).free["text"] == 2
        assert first.load_many([Pool.create_id("pay1"), Session.create_id("s1")],
                               shared=True)[Session.create_id("s1")].state == "requested"
    finally:
        first.close()
        second.close()


def test_the_cache_keeps_the_aggregates_and_not_the_receipts() -> None:
    """After a batch, its aggregates are cached as saved and its receipts are not: one per
    event, read again only for a duplicate, they would push the long-lived aggregates out."""
    clock = FakeClock(T0 + timedelta(minutes=1))
    ledger = make_ledger(None, clock)
    items = [("e1", "doctor.registered", T0, {"doctor_id": "d1", "country": "MW"}),
             grant("e2", "pay1", "p1"),
             ("e3", "session.requested", T0, {"session_id": "s1", "kind": "text",
                                               "patient_id": "p1", "doctor_id": "d1"})]
    assert all(isinstance(o, Accepted) for o in ledger.ingest_batch(items))
    for kept in (Doctor.create_id("d1"), Pool.create_id("pay1"), Patient.create_id("p1"),
                 Session.create_id("s1")):
        assert ledger._cached(kept) is not None, kept
    assert [ledger._cached(Receipt.create_id(e)) for e, *_ in items] == [None, None, None]
    assert ledger.get_receipt("e2").result["type"] == "subscription.granted"  # from the store
    assert ledger.ingest_batch(items[1:2])[0].replayed  # a duplicate replays
    assert ledger._cached(Receipt.create_id("e2")) is None  # its receipt, read, is not kept


def test_a_decision_copies_only_the_pool_it_changes() -> None:
    """Copy-on-write (Work.look): the pools a hold only reads stay the unit's own objects,
    unchanged; the chosen one is changed on a copy, which the unit adopts."""
    clock = FakeClock(T0 + timedelta(minutes=1))
    ledger = make_ledger(None, clock)
    ledger.ingest_batch([("e0", "doctor.registered", T0, {"doctor_id": "d1", "country": "MW"}),
                         grant("e1", "pay1", "p1"), grant("e2", "pay2", "p1", units=3)])
    unit = Unit(ledger.load, ledger.load_many)
    first, second = unit.peek(Pool.create_id("pay1")), unit.peek(Pool.create_id("pay2"))
    work = unit.work()
    chosen = choose_pool(work, "p1", "text", T0 + timedelta(minutes=1))
    assert chosen is not None and chosen is not first and chosen is not second
    chosen.hold(session_id="s1", block=1, bucket="text", patient_id="p1", at=T0)
    work.add(chosen)
    assert (first.free["text"], second.free["text"]) == (2, 3)  # untouched before adopt
    unit.adopt(work)
    others = [p for p in (first, second) if p.id != chosen.id]
    assert unit.peek(chosen.id) is chosen and unit.peek(others[0].id) is others[0]
    assert sum(unit.peek(p.id).free["text"] for p in (first, second)) == 4
    assert len(unit.events) == 1 and unit.events[0].originator_id == chosen.id


def test_copy_aggregate_is_deep() -> None:
    clock = FakeClock(T0 + timedelta(minutes=1))
    ledger = make_ledger(None, clock)
    ledger.ingest(*grant("e1", "pay1", "p1"))
    pool = ledger.load(Pool.create_id("pay1"))
    copy = copy_aggregate(pool)
    copy.free["text"] -= 1
    copy.plan["units"]["text"] = 0
    assert copy == copy and pool.free["text"] == 2 and pool.plan["units"]["text"] == 2


# ------------------------------------------------------------------------------ PostgreSQL


@pytest.mark.postgres
def test_concurrent_batches_charge_nothing_twice_and_lose_nothing(pg_url) -> None:
    """Four workers (each its own Ledger, like separate processes) post overlapping batches
    at once: the same sessions, the same patients' pools, and some of the same event ids.
    Every acknowledged event is stored exactly once with the answered result, no unit is
    held or charged twice (I1–I10 over the log), and every batch answers every item."""
    clock = FakeClock(T0 + timedelta(minutes=1))
    main = make_ledger(pg_url, clock)
    workers = [make_ledger(pg_url, clock) for _ in range(4)]
    try:
        setup = [("d", "doctor.registered", T0, {"doctor_id": "d1", "country": "MW"})]
        setup += [grant(f"g{p}", f"pay{p}", f"p{p}", units=3) for p in range(3)]
        assert all(isinstance(o, Accepted) for o in main.ingest_batch(setup))

        def batch(w: int, rnd: int) -> list:
            items = []
            for s in range(4):
                sid, patient = f"s{rnd}-{s}", f"p{s % 3}"
                items.append((f"req-{rnd}-{s}", "session.requested", T0 + timedelta(seconds=rnd),
                              {"session_id": sid, "kind": KINDS[s % 3], "patient_id": patient,
                               "doctor_id": "d1"}))
                start = "text.activated" if s % 3 == 0 else "call.connected"
                items.append((f"start-{rnd}-{s}-{w % 2}", start,
                              T0 + timedelta(seconds=rnd + 1 + w % 2), {"session_id": sid}))
                items.append((f"end-{rnd}-{s}-{w}", "session.ended",
                              T0 + timedelta(seconds=rnd + 20 + w),
                              {"session_id": sid, "ended_by": "patient", "reason": "completed"}))
            return items

        answered: list[tuple[str, object]] = []
        for rnd in range(3):
            results = at_once([lambda w=w: (w, workers[w].ingest_batch(batch(w, rnd)))
                               for w in range(len(workers))])
            for result in results:
                assert not isinstance(result, BaseException), repr(result)
                w, outcomes = result
                items = batch(w, rnd)
                assert len(outcomes) == len(items)
                for item, o in zip(items, outcomes):
                    assert isinstance(o, (Accepted, errors.LedgerError)), repr(o)
                    answered.append((item[0], o))
        clock.set(T0 + timedelta(hours=4))
        sessions = [f"s{rnd}-{s}" for rnd in range(3) for s in range(4)]
        main.tick(clock(), sessions, [str(Pool.create_id(f"pay{p}")) for p in range(3)])
        for event_id, o in answered:  # acknowledged: stored once (the receipt's key), as answered
            if isinstance(o, Accepted):
                stored = main.get_receipt(event_id)
                assert stored is not None and stored.result == o.result, event_id
        fresh = Counter(event_id for event_id, o in answered
                        if isinstance(o, Accepted) and not o.replayed)
        assert fresh and max(fresh.values()) == 1  # one worker recorded it, the others replayed
        check_all(events_of(main), main)
    finally:
        for ledger in (main, *workers):
            ledger.close()


def test_a_batch_about_sessions_the_cache_knows_reads_the_store_once(tmp_path) -> None:
    """The parties of the sessions a batch names (patient, pools, doctor) are read in the same
    query as the sessions when this process's cache knows them, not in two more queries after
    them; a guess the cache got wrong (another process linked a new pool) costs the second
    read, never a wrong decision."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    clock = FakeClock(T0 + timedelta(minutes=1))
    first, second = make_ledger(url, clock), make_ledger(url, clock)
    reads = []
    real = first._read_streams
    first._read_streams = lambda after: reads.append(set(after)) or real(after)

    def request(event_id: str, sid: str, kind: str) -> tuple:
        return (event_id, "session.requested", T0, {"session_id": sid, "kind": kind,
                                                     "patient_id": "p1", "doctor_id": "d1"})

    def only(ref: str, bucket: str) -> tuple:
        event_id, kind, at, payload = grant("g-" + ref, ref, "p1", units=0)
        payload["plan"]["units"][bucket] = 1
        return event_id, kind, at, payload

    try:
        assert all(isinstance(o, Accepted) for o in first.ingest_batch(
            [("e1", "doctor.registered", T0, {"doctor_id": "d1", "country": "MW"}),
             only("pay1", "text"), request("e2", "s1", "text")]))
        reads.clear()
        out = first.ingest_batch([("e3", "text.activated", T0 + timedelta(seconds=5),
                                   {"session_id": "s1"})])
        assert isinstance(out[0], Accepted) and len(reads) == 1
        assert {Patient.create_id("p1"), Pool.create_id("pay1"), Doctor.create_id("d1"),
                Session.create_id("s1")} <= reads[0]

        second.ingest(*only("pay2", "voice"))  # p1's cached copy in `first` lacks pay2
        reads.clear()
        out = first.ingest_batch([request("e4", "s2", "voice")])
        assert isinstance(out[0], Accepted) and len(reads) == 2
        assert Pool.create_id("pay2") not in reads[0] and Pool.create_id("pay2") in reads[1]
        assert first.load(Session.create_id("s2")).holds[1] == str(Pool.create_id("pay2"))
    finally:
        first.close()
        second.close()
