"""Pure rules: units owed (billing-rules.md §2), tariff and doctor pay (§5), Policy validation.

Every example of §2 is one parametrised case; nothing here touches storage.
"""

from __future__ import annotations

import dataclasses

from datetime import datetime, timedelta, timezone

import pytest

from ledger.rules import (
    BLOCK_SECONDS,
    CALL_GRACE_SECONDS,
    Policy,
    billable_seconds,
    block_end,
    bucket_for,
    presence_group,
    settlement_due,
    units_owed,
    utc_seconds,
)
from ledger.tariff import TARIFFS, Rate, Tariff, rate_at

START = datetime(2026, 11, 2, 8, 0, tzinfo=timezone.utc)


def _owed(kind: str, seconds: int) -> int:
    return units_owed(kind, START, START + timedelta(seconds=seconds))


# ---------------------------------------------------------------------------------------- §2

TEXT_EXAMPLES = [
    pytest.param(8 * 60, 1, id="text-8min-1"),
    pytest.param(12 * 60, 2, id="text-12min-2"),
    pytest.param(25 * 60, 3, id="text-25min-3"),
    pytest.param(20 * 60, 2, id="text-exactly-20:00-2"),
    pytest.param(20 * 60 + 1, 3, id="text-20:01-3"),
]

CALL_EXAMPLES = [
    pytest.param(59, 0, id="call-59s-0"),
    pytest.param(60, 1, id="call-60s-1"),
    pytest.param(599, 1, id="call-599s-1"),
    pytest.param(600, 1, id="call-600s-1"),
    pytest.param(601, 2, id="call-601s-2"),
    pytest.param(25 * 60, 3, id="call-25min-3"),
    pytest.param(60 * 60, 6, id="call-60min-6"),
]


@pytest.mark.parametrize("seconds,owed", TEXT_EXAMPLES)
def test_section2_text_examples(seconds: int, owed: int) -> None:
    assert _owed("text", seconds) == owed


@pytest.mark.parametrize("kind", ["voice", "video"])
@pytest.mark.parametrize("seconds,owed", CALL_EXAMPLES)
def test_section2_call_examples(kind: str, seconds: int, owed: int) -> None:
    assert _owed(kind, seconds) == owed


@pytest.mark.parametrize("kind", ["text", "voice", "video"])
def test_section2_never_started_owes_nothing(kind: str) -> None:
    """never activated / never connected / declined / missed / expired / not started → 0."""
    assert units_owed(kind, None, START + timedelta(hours=2)) == 0


def test_section2_text_activated_zero_seconds_owes_one() -> None:
    """Text, activated: max(1, ceil(d/600)) — an activated text session owes at least one unit."""
    assert _owed("text", 0) == 1
    assert _owed("text", 1) == 1


@pytest.mark.parametrize("kind", ["voice", "video"])
def test_section2_call_grace_boundary(kind: str) -> None:
    assert CALL_GRACE_SECONDS == 60
    assert _owed(kind, 0) == 0
    assert _owed(kind, CALL_GRACE_SECONDS - 1) == 0
    assert _owed(kind, CALL_GRACE_SECONDS) == 1


@pytest.mark.parametrize("kind", ["text", "voice", "video"])
def test_section2_end_before_start_is_zero_duration(kind: str) -> None:
    """d = max(0, ended_at − start)."""
    assert billable_seconds(START, START - timedelta(seconds=30)) == 0
    assert units_owed(kind, START, START - timedelta(seconds=30)) == (1 if kind == "text" else 0)


@pytest.mark.parametrize("kind", ["text", "voice", "video"])
@pytest.mark.parametrize("blocks", [1, 2, 3, 7, 18])
def test_section2_exact_boundary_is_not_floor_plus_one(kind: str, blocks: int) -> None:
    """Legacy B14 charged floor+1: a session ending exactly on a boundary owes n, not n+1."""
    assert _owed(kind, blocks * BLOCK_SECONDS) == blocks
    assert _owed(kind, blocks * BLOCK_SECONDS + 1) == blocks + 1


def test_block_end_and_block_length() -> None:
    assert BLOCK_SECONDS == 600
    assert block_end(START, 0) == START
    assert block_end(START, 3) == START + timedelta(seconds=1800)


def test_settlement_due_is_later_of_end_and_receipt_plus_grace() -> None:
    p = Policy()
    ended = START
    assert settlement_due(ended, ended - timedelta(seconds=5), p) == ended + timedelta(minutes=10)
    late = ended + timedelta(minutes=3)
    assert settlement_due(ended, late, p) == late + timedelta(minutes=10)


def test_buckets_and_presence_groups() -> None:
    assert [bucket_for(k) for k in ("text", "voice", "video")] == ["text", "voice", "video"]
    with pytest.raises(ValueError):
        bucket_for("appointment")
    assert presence_group("voice") == presence_group("video") == "call"
    assert presence_group("text") == "text"


def test_utc_seconds_truncates_and_rejects_naive() -> None:
    aware = datetime(2026, 1, 1, 10, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=2)))
    assert utc_seconds(aware) == datetime(2026, 1, 1, 8, 0, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        utc_seconds(datetime(2026, 1, 1, 8, 0))


# ---------------------------------------------------------------------------------------- §5

NEW_TARIFF_AT = datetime(2026, 1, 12, tzinfo=timezone.utc)
JUST_BEFORE = NEW_TARIFF_AT - timedelta(seconds=1)


@pytest.mark.parametrize("bucket,mwk,usd", [
    ("text", 400000, 400), ("voice", 500000, 500), ("video", 600000, 600)])
def test_tariff_legacy_2025(bucket: str, mwk: int, usd: int) -> None:
    """legacy-2025: 4000/5000/6000.00 MWK for MW, 4/5/6.00 USD otherwise."""
    mw = rate_at("MW", bucket, JUST_BEFORE)
    assert (mw.tariff, mw.amount_minor, mw.currency, mw.pay_minor) == (
        "legacy-2025", mwk, "MWK", mwk)
    for country in ("ZM", "KE", "US"):
        other = rate_at(country, bucket, JUST_BEFORE)
        assert (other.tariff, other.amount_minor, other.currency) == ("legacy-2025", usd, "USD")


@pytest.mark.parametrize("bucket", ["text", "voice", "video"])
@pytest.mark.parametrize("at", [NEW_TARIFF_AT, NEW_TARIFF_AT + timedelta(days=300)])
def test_tariff_2026_01_12(bucket: str, at: datetime) -> None:
    """2026-01-12 from 2026-01-12T00:00:00Z: MW 3500.00 MWK, other 3.00 USD, every bucket."""
    mw = rate_at("MW", bucket, at)
    assert (mw.tariff, mw.amount_minor, mw.currency, mw.pay_minor) == (
        "2026-01-12", 350000, "MWK", 350000)
    ke = rate_at("KE", bucket, at)
    assert (ke.tariff, ke.amount_minor, ke.currency, ke.pay_minor) == (
        "2026-01-12", 300, "USD", 300)


def test_tariff_versions_are_ordered_and_frozen() -> None:
    assert [t.version for t in TARIFFS] == ["legacy-2025", "2026-01-12"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TARIFFS[0].version = "edited"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rate_at("MW", "text", NEW_TARIFF_AT).amount_minor = 1  # type: ignore[misc]


def test_no_commission_by_default() -> None:
    assert all(t.commission_pct == 0 for t in TARIFFS)


@pytest.mark.parametrize("amount,pct,pay", [
    (350000, 0, 350000),
    (350000, 10, 315000),
    (300, 15, 255),
    (333, 10, 300),  # floor(33.3) = 33 withheld
    (999, 33, 670),  # floor(329.67) = 329 withheld
    (1, 50, 1),  # floor(0.5) = 0 withheld: the doctor keeps the odd minor unit
    (500, 100, 0),
])
def test_commission_formula(amount: int, pct: int, pay: int) -> None:
    """The doctor gets rate − floor(rate × pct / 100) per unit (§5), integers only."""
    rate = Rate("t", amount, "MWK", pct)
    assert rate.pay_minor == pay
    assert rate.pay_minor == amount - (amount * pct) // 100


def test_tariff_with_commission_applies_to_rate() -> None:
    t = Tariff("2027-test", datetime(2027, 1, 1, tzinfo=timezone.utc),
               {"text": 350000, "voice": 350000, "video": 350000},
               {"text": 300, "voice": 300, "video": 300}, commission_pct=20)
    tariffs = TARIFFS + (t,)
    r = rate_at("MW", "voice", datetime(2027, 6, 1, tzinfo=timezone.utc), tariffs)
    assert (r.tariff, r.amount_minor, r.pay_minor) == ("2027-test", 350000, 280000)
    # A new version does not apply before its effective instant.
    r = rate_at("MW", "voice", datetime(2026, 12, 31, 23, 59, 59, tzinfo=timezone.utc), tariffs)
    assert (r.tariff, r.pay_minor) == ("2026-01-12", 350000)


# ---------------------------------------------------------------------------------- Policy


def test_policy_defaults_match_rules() -> None:
    p = Policy()
    assert p.skew_seconds == 60
    assert p.settlement_grace_seconds == 600
    assert p.text_not_started_seconds == 15 * 60
    assert p.doctor_reply_seconds == 300
    assert p.ring_timeout_seconds == 90
    assert p.idle_seconds("text") == 600
    assert p.idle_seconds("voice") == p.idle_seconds("video") == 900
    assert p.max_duration_seconds == 3 * 3600
    assert p.max_blocks == 18


@pytest.mark.parametrize("kwargs", [
    {"skew_seconds": -1},
    {"skew_seconds": 700, "settlement_grace_seconds": 600},
    {"max_duration_seconds": 599},
])
def test_policy_rejects_invalid(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Policy(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"skew_seconds": 0},
    {"skew_seconds": 600, "settlement_grace_seconds": 600},
    {"max_duration_seconds": 600},
    {"max_duration_seconds": 601},
])
def test_policy_accepts_edges(kwargs: dict) -> None:
    p = Policy(**kwargs)
    assert p.max_blocks == -(-p.max_duration_seconds // 600)


def test_policy_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Policy().skew_seconds = 5  # type: ignore[misc]
