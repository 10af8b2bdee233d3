"""Versioned doctor tariff. Source: billing-rules.md §5.

A version is never edited; a new one takes effect no earlier than it is recorded. The rate is
stamped on the session at its billable start.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone


@dataclass(frozen=True)
class Rate:
    """Per-unit rate: `amount_minor` in minor units of ISO 4217 `currency`; `commission_pct` 0–100."""

    tariff: str
    amount_minor: int
    currency: str
    commission_pct: int = 0

    @property
    def pay_minor(self) -> int:
        """Doctor's net pay per unit: rate − floor(rate × pct / 100) (§5)."""
        return self.amount_minor - (self.amount_minor * self.commission_pct) // 100


@dataclass(frozen=True)
class Tariff:
    """A tariff version: effective from `effective_from`; rates per (home-country?, bucket)."""

    version: str
    effective_from: datetime
    malawi: dict[str, int]  # bucket -> MWK minor units
    elsewhere: dict[str, int]  # bucket -> USD minor units
    commission_pct: int = 0

    def rate(self, country: str, bucket: str) -> Rate:
        """Rate for a doctor in ISO 3166-1 alpha-2 `country` and a bucket."""
        if country == "MW":
            return Rate(self.version, self.malawi[bucket], "MWK", self.commission_pct)
        return Rate(self.version, self.elsewhere[bucket], "USD", self.commission_pct)


TARIFFS: tuple[Tariff, ...] = (
    Tariff("legacy-2025", datetime(1970, 1, 1, tzinfo=timezone.utc),
           {"text": 400000, "voice": 500000, "video": 600000},
           {"text": 400, "voice": 500, "video": 600}),
    Tariff("2026-01-12", datetime(2026, 1, 12, tzinfo=timezone.utc),
           {"text": 350000, "voice": 350000, "video": 350000},
           {"text": 300, "voice": 300, "video": 300}),
)


def rate_at(country: str, bucket: str, at: datetime, tariffs: tuple[Tariff, ...] = TARIFFS) -> Rate:
    """The rate in force at instant `at` (the billable start) for `country` and `bucket` (§5)."""
    in_force = [t for t in tariffs if t.effective_from <= at]
    return max(in_force, key=lambda t: t.effective_from).rate(country, bucket)
