"""Price arithmetic of priced consultations: tax, total, practitioner share, platform share.

Source: billing-rules.md §10 "Price". Every amount is an integer number of minor units of one
ISO 4217 currency; rates are integer basis points (1 bp = 0.01 %, GST 18 % = 1800 bp).
Pure functions only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

BPS = 10_000  # basis points in a whole
DEFAULT_SHARE_BPS = 5_000  # the practitioner's share when a price list names none (§10)
LEGACY_SHARE_BPS = 5_000  # the legacy platform paid 50 % of the tax-inclusive total (§10)


@dataclass(frozen=True)
class Breakdown:
    """One consultation's price in minor units: `total = fee + tax`, `fee = share + platform`,
    and `tax_payable` is the tax (billing-rules.md §10, I14)."""

    fee_minor: int
    tax_minor: int
    total_minor: int
    share_minor: int
    platform_minor: int
    tax_payable_minor: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def tax_minor(fee_minor: int, tax_bps: int) -> int:
    """`(fee × tax_bps + 5000) div 10000`: the tax rounded half up to a minor unit (§10)."""
    return (fee_minor * tax_bps + BPS // 2) // BPS


def share_minor(fee_minor: int, share_bps: int) -> int:
    """`fee × share_bps div 10000`: the practitioner's share rounded down; the odd minor unit
    goes to the platform (§10, deliberately unlike §5)."""
    return fee_minor * share_bps // BPS


def breakdown(fee_minor: int, tax_bps: int, share_bps: int = DEFAULT_SHARE_BPS) -> Breakdown:
    """The price of one consultation from its fee (minor units) and the price list's rates (bp).

    Raises ValueError for a negative fee or a rate outside [0, 10000] bp. Example (§10):
    fee 100000 INR minor, GST 1800 bp, share 5000 bp → tax 18000, total 118000, share 50000,
    platform 50000, tax payable 18000.
    """
    if fee_minor < 0 or not 0 <= tax_bps <= BPS or not 0 <= share_bps <= BPS:
        raise ValueError("fee must be >= 0 and rates within 0..10000 basis points")
    tax = tax_minor(fee_minor, tax_bps)
    share = share_minor(fee_minor, share_bps)
    return Breakdown(fee_minor=fee_minor, tax_minor=tax, total_minor=fee_minor + tax,
                     share_minor=share, platform_minor=fee_minor - share, tax_payable_minor=tax)


def legacy_share_minor(total_minor: int) -> int:
    """What the legacy platform paid the therapist: 50 % of the tax-inclusive total
    (billing-rules.md §10, the deliberate difference: 1180.00 → 590.00 instead of 500.00)."""
    return total_minor * LEGACY_SHARE_BPS // BPS
