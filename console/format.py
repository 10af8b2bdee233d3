"""How the console writes money, units and times (Jinja filters; pure functions).

Money is integer minor units of an ISO 4217 currency (billing-rules.md); a person reads major
units with the code: 350000 MWK minor → "3,500.00 MWK". The exponent is ISO 4217's minor unit
(`MINOR_DIGITS`; 2 for any code not listed, as for MWK, USD, KES, INR, ZAR). Times are shown in
UTC; the page's script puts the reader's local time in each `<time>`'s title (hover).
"""

from __future__ import annotations

from datetime import datetime, timezone

from markupsafe import Markup, escape

# ISO 4217 minor-unit exponents that differ from 2 (the default).
MINOR_DIGITS = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0, "PYG": 0,
    "RWF": 0, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
    "CLF": 4, "UYW": 4,
}


def minor_digits(currency: str) -> int:
    """The ISO 4217 minor-unit exponent of `currency` (2 unless listed in MINOR_DIGITS)."""
    return MINOR_DIGITS.get(currency.upper(), 2)


def major(amount_minor: int, currency: str) -> str:
    """Integer minor units as major units with the code, exact (no floats):
    `major(350000, "MWK") == "3,500.00 MWK"`, `major(-5, "USD") == "-0.05 USD"`,
    `major(1200, "UGX") == "1,200 UGX"`."""
    digits = minor_digits(currency)
    sign = "-" if amount_minor < 0 else ""
    whole, fraction = divmod(abs(int(amount_minor)), 10 ** digits)
    text = f"{whole:,}" + (f".{fraction:0{digits}d}" if digits else "")
    return f"{sign}{text} {currency.upper()}"


def major_number(amount_minor: int, currency: str) -> float:
    """Minor units as a float of major units: for plot axes only, never for the figures."""
    return int(amount_minor) / 10 ** minor_digits(currency)


def parse_instant(value: str | datetime | None) -> datetime | None:
    """An ISO 8601 instant (aware, or naive meaning UTC) as an aware UTC datetime."""
    if not value:  # None, "" or a template's undefined value
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(
        str(value).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def utc_text(value: str | datetime | None) -> str:
    """`2026-11-02 08:10:00 UTC`, or an empty string."""
    moment = parse_instant(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


def time_tag(value: str | datetime | None) -> Markup:
    """`<time datetime="…Z">2026-11-02 08:10:00 UTC</time>` (console.js adds the reader's local
    time as its title); an em dash for no time."""
    moment = parse_instant(value)
    if moment is None:
        return Markup("<span aria-label=\"none\">—</span>")
    iso = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        iso, utc_text(moment), utc_text(moment))


def input_value(value: str | datetime | None) -> str:
    """The value of a `datetime-local` input holding a UTC instant: `2026-11-02T08:10:00`."""
    moment = parse_instant(value)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") if moment else ""


def register(env) -> None:
    """Add the filters to a Jinja environment."""
    env.filters["major"] = major
    env.filters["utc"] = utc_text
    env.filters["time"] = time_tag
    env.filters["input_value"] = input_value
    env.globals["escape"] = escape
