"""storage/transcoder.py: the orjson-decoding transcoder keeps eventsourcing's stored format.

* for any value the default transcoder can encode, the new one writes the same bytes and both
  decode them to equal values (custom types nested anywhere, strings that look like markers,
  input only the standard library parses: NaN, integers beyond 64 bits);
* on both stores, events written by a Ledger with the default transcoder read back equal with
  the new one, and vice versa, and the two stores hold byte-identical event states.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from uuid import UUID

import pytest
from eventsourcing.persistence import JSONTranscoder, TranscodingNotRegisteredError
from hypothesis import given, strategies as st

from conftest import FakeClock
from ledger.application import Ledger
from storage import persistence_env
from storage.transcoder import FastJSONTranscoder
from test_storage import small_scenario, summary
from test_billing import Desk


def registered(transcoder: JSONTranscoder) -> JSONTranscoder:
    """`transcoder` with the transcodings every eventsourcing Application registers."""
    Ledger.register_transcodings(None, transcoder)  # type: ignore[arg-type]  # uses no state
    return transcoder


OLD, NEW = registered(JSONTranscoder()), registered(FastJSONTranscoder())

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.integers(2**63 - 2, 2**64 + 2),
    st.floats(allow_nan=False), st.text(), st.sampled_from(["_type_", "_data_", "uuid_hex"]),
    st.uuids(), st.decimals(allow_nan=False, allow_infinity=False),
    st.datetimes(timezones=st.just(timezone.utc)), st.datetimes())
keys = st.one_of(st.text(max_size=8), st.sampled_from(["_type_", "_data_"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=20)


@given(values)
def test_same_bytes_and_equal_values_both_ways(value) -> None:
    data = OLD.encode(value)
    assert NEW.encode(value) == data
    try:
        expected = OLD.decode(data)
    except Exception:  # noqa: BLE001 - a dict of exactly the two marker keys, not a real type:
        with pytest.raises(Exception):  # the new transcoder refuses it too
            NEW.decode(data)
    else:
        assert NEW.decode(data) == expected


@pytest.mark.parametrize("text", [
    b'{"a":NaN,"b":[Infinity,-Infinity]}',  # json writes these for float nan/inf
    b'{"big":123456789012345678901234567890}',  # beyond orjson's 64-bit integers
    b'{"edge":[9223372036854775807,-9223372036854775808,18446744073709551616]}',
    b'{"f":0.1234567890123456789012,"g":1e400,"h":[1.5,{"i":-0.0}]}',
    b'1.5', b'"_type_"', b'[]',
    b'{"_type_":"uuid_hex","_data_":"' + UUID(int=7).hex.encode() + b'","x":1}',  # 3 keys
    b'[{"_type_":"decimal_str","_data_":"1.50"},{"_type_":"x"}]',
    b'{"k":{"_type_":"datetime_iso","_data_":"2026-11-02T08:00:00+00:00"}}',
])
def test_what_the_standard_library_reads_reads_the_same(text: bytes) -> None:
    old, new = OLD.decode(text), NEW.decode(text)
    if isinstance(old, dict) and isinstance(old.get("a"), float):
        assert math.isnan(new["a"]) and new["b"] == old["b"]
    else:
        assert new == old


def test_unknown_type_is_refused_like_the_default() -> None:
    data = b'{"_type_":"no_such","_data_":1}'
    for transcoder in (OLD, NEW):
        with pytest.raises(TranscodingNotRegisteredError):
            transcoder.decode(data)


def test_every_stored_value_type_decodes_to_its_type() -> None:
    value = {"id": UUID(int=1), "at": datetime(2026, 11, 2, tzinfo=timezone.utc),
             "rate": Decimal("0.125"), "list": [UUID(int=2), {"deep": Decimal("1")}],
             "span": 5}
    decoded = NEW.decode(OLD.encode(value))
    assert decoded == value
    assert type(decoded["id"]) is UUID and type(decoded["rate"]) is Decimal
    assert type(decoded["list"][1]["deep"]) is Decimal


def old_env(url: str) -> dict[str, str]:
    """The store's environment with eventsourcing's default transcoder."""
    return {k: v for k, v in persistence_env(url).items() if k != "TRANSCODER_TOPIC"}


@contextmanager
def ledger_on(env: dict[str, str], clock: FakeClock):
    ledger = Ledger(env=env, clock=clock)
    try:
        yield ledger
    finally:
        ledger.close()


def stored(ledger: Ledger) -> list:
    """Every stored event of the ledger, in notification order (at most 10,000)."""
    return ledger.recorder.select_notifications(start=1, limit=10_000)


def write_scenario(env: dict[str, str]) -> tuple[dict, list]:
    clock = FakeClock()
    with ledger_on(env, clock) as ledger:
        small_scenario(Desk(clock, ledger=ledger))
        return summary(ledger), [(n.originator_id, n.originator_version, n.topic, n.state)
                                 for n in stored(ledger)]


@pytest.mark.parametrize("writer", ["default", "fast"])
def test_a_store_written_by_either_transcoder_reads_back_equal(store_url: str, tmp_path,
                                                               writer: str) -> None:
    envs = {"default": old_env(store_url), "fast": persistence_env(store_url)}
    assert "TRANSCODER_TOPIC" in envs["fast"]
    written_summary, _ = write_scenario(envs[writer])
    with ledger_on(envs["default"], FakeClock()) as old, \
            ledger_on(envs["fast"], FakeClock()) as new:
        assert isinstance(new.mapper.transcoder, FastJSONTranscoder)
        assert type(old.mapper.transcoder) is JSONTranscoder
        notifications = stored(new)
        assert len(notifications) > 10
        for notification in notifications:
            assert new.mapper.to_domain_event(notification) == \
                old.mapper.to_domain_event(notification)
        assert summary(new) == summary(old) == written_summary


def test_both_transcoders_write_identical_states(tmp_path) -> None:
    """The same scenario through each transcoder stores the same bytes (SQLite files)."""
    _, by_old = write_scenario(old_env(f"sqlite:///{tmp_path / 'old.db'}"))
    _, by_new = write_scenario(persistence_env(f"sqlite:///{tmp_path / 'new.db'}"))
    assert by_new == by_old and by_old


class _Label(str):
    pass


@pytest.mark.parametrize("value", [
    {"s": _Label("x"), "n": True, "t": (1, [2, (3,)])},  # a str subclass, tuples
    {"f": 1e16, "g": 0.1, "nan": float("nan")},  # floats: the standard library's repr
    {1: "int key", "b": {None: 2}},  # keys json converts
    {"big": 2**64, "neg": -(2**63) - 1},  # beyond orjson's integers
    {"ctl": "\x00\x1f\x7f\u2028\u2029\"\\/\n\t\r\b\f é ✓"},  # escapes and raw characters
])
def test_encoding_what_orjson_writes_differently_still_gives_the_same_bytes(value) -> None:
    assert NEW.encode(value) == OLD.encode(value)


@pytest.mark.parametrize("value", [{"lone": "\ud800"}, {"obj": object()}, {"set": {1}}])
def test_what_the_default_refuses_to_encode_is_refused_alike(value) -> None:
    with pytest.raises(Exception) as old:
        OLD.encode(value)
    with pytest.raises(type(old.value)):
        NEW.encode(value)
