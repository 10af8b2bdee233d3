"""Pure conversions of legacy rows into items (the fields of the `legacy.history` dataclasses).

A row is a dict of column → value as psycopg returns it; a column the source lacks (⚠ columns,
legacy-system.md §1) is present with the value None. A row that cannot be interpreted raises
`Rejected(reason)`; the importer writes it to the rejects report and goes on.

Normalisation (rules: legacy-system.md §1, §3.1; billing-rules.md preamble and §5):
- timestamps → aware UTC truncated to whole seconds; a naive value is taken as UTC (the Laravel
  app timezone is UTC; local appointment times are the B30 exception, see `appointment_start`);
- money decimal(10,2) → integer minor units, exactly (Decimal × 100, must be whole);
- a doctor's country "malawi" in any case → `MW` and MWK; anything else (null included) → USD,
  with the ISO code when known; the legacy string is kept;
- statuses kept verbatim (lower-cased), also outside the DB enums when the legacy code writes
  them (B31: `missed`, `answered`, `pending`, `scheduled`, …); a status legacy-system.md §1
  does not list at all is Rejected (`STATUSES`); appointment status ints → names; call type
  `audio` → `voice`.

A row that contradicts itself is Rejected too, so that it never reaches the reconciliation (its
facts, if any, are kept as legacy recorded them): an interval that runs backwards (ended before
its start, connected or activated before it started), a status `ended` with no `ended_at`, a
negative counter, a patient or doctor id naming a user of another type (`check_role`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

BUCKET_COLUMNS = {"text": ("total_text_sessions", "text_sessions_remaining"),
                  "voice": ("total_voice_calls", "voice_calls_remaining"),
                  "video": ("total_video_calls", "video_calls_remaining")}
APPOINTMENT_STATUS = {0: "pending", 1: "confirmed", 2: "cancelled", 3: "completed",
                      4: "reschedule_proposed", 5: "reschedule_accepted",
                      6: "reschedule_rejected", 7: "in_progress"}
CALL_KINDS = {"voice": "voice", "audio": "voice", "video": "video"}
APPOINTMENT_KINDS = {"text": "text", "audio": "voice", "voice": "voice", "video": "video"}
# Best-effort ISO 3166-1 alpha-2 codes for country names seen in an African telehealth user base;
# an unknown name keeps country None (its pay is USD either way, legacy-system.md §3.1).
COUNTRY_CODES = {"malawi": "MW", "zambia": "ZM", "kenya": "KE", "tanzania": "TZ",
                 "uganda": "UG", "zimbabwe": "ZW", "mozambique": "MZ", "south africa": "ZA",
                 "nigeria": "NG", "ghana": "GH", "rwanda": "RW", "botswana": "BW",
                 "ethiopia": "ET", "united kingdom": "GB", "united states": "US", "india": "IN"}


# Every status legacy-system.md §1 lists for a table: the DB enum and what the code writes
# beside it (B31). Anything else is no state legacy had: the row is rejected.
STATUSES = {
    "text_sessions": frozenset({"active", "ended", "expired", "waiting_for_doctor", "cancelled",
                                "pending", "scheduled"}),  # §1.4
    "call_sessions": frozenset({"active", "ended", "expired", "waiting_for_doctor", "connecting",
                                "missed", "answered", "pending", "declined", "failed",
                                "cancelled"}),  # §1.5
    "withdrawal_requests": frozenset({"pending", "approved", "rejected", "paid", "completed",
                                      "failed"}),  # §1.11, §7
    "subscription_members": frozenset({"active", "inactive", "pending"}),  # §1.3
    "payment_transactions": frozenset({"pending", "completed", "failed"}),  # §1.10
}


class Rejected(ValueError):
    """A legacy row that cannot be interpreted; `str(exc)` is the reason for the report."""


@dataclass
class Context:
    """What normalising a row needs from rows read before it (small tables, kept in memory)."""

    plan_days: dict[str, int] = field(default_factory=dict)  # plans.id → duration days
    doctor_currency: dict[str, str] = field(default_factory=dict)  # users.id → MWK | USD
    user_types: dict[str, str] = field(default_factory=dict)  # users.id → patient | doctor | …


# ---- scalar conversions ---------------------------------------------------------------------

def to_utc(value, column: str = "timestamp") -> datetime | None:
    """Aware UTC datetime truncated to seconds; naive = UTC (legacy app timezone, B30)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise Rejected(f"{column}: not a timestamp: {value!r}") from None
    if not isinstance(value, datetime):
        raise Rejected(f"{column}: not a timestamp: {value!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).replace(microsecond=0)


def to_minor(value, column: str = "amount") -> int:
    """Integer minor units of a 2-decimal amount (3500.00 → 350000); exact or Rejected."""
    if value is None:
        raise Rejected(f"{column}: missing")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise Rejected(f"{column}: not a number: {value!r}") from None
    if not amount.is_finite():
        raise Rejected(f"{column}: not a number: {value!r}")
    minor = amount * 100
    if minor != minor.to_integral_value():
        raise Rejected(f"{column}: more than 2 decimals: {value!r}")
    return int(minor)


def to_int(value, column: str, default: int | None = None) -> int | None:
    """An integer column; None → `default`; anything non-integral → Rejected."""
    if value is None:
        return default
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise Rejected(f"{column}: not an integer: {value!r}") from None
    if not number.is_finite() or number != number.to_integral_value():
        raise Rejected(f"{column}: not an integer: {value!r}")
    return int(number)


def id_of(value) -> str | None:
    """A legacy id as a string (the ledger's ids are strings), None stays None."""
    return None if value is None else str(value)


def required_id(row: dict, column: str) -> str:
    """The id in `column`, or Rejected("no <column>")."""
    value = id_of(row.get(column))
    if value is None or value == "":
        raise Rejected(f"no {column}")
    return value


def status_of(value) -> str:
    """A text status verbatim (stripped, lower-cased); None → "unknown"."""
    return "unknown" if value is None else str(value).strip().lower()


def documented_status(value, table: str) -> str:
    """`status_of(value)` if legacy-system.md §1 lists it for `table` (`STATUSES`), else
    Rejected: a state the legacy code never had cannot be interpreted."""
    status = status_of(value)
    if status not in STATUSES[table]:
        raise Rejected(f"status {value!r} is not a {table} status legacy-system.md §1 lists")
    return status


def check_role(ctx: Context, user_id: str, role: str, column: str) -> None:
    """Rejected when `user_id` is a known user of another type than `role` (a doctor id that
    names a patient); an id missing from `users` is kept (deleted rows, B29)."""
    user_type = ctx.user_types.get(user_id)
    if user_type is not None and user_type != role:
        raise Rejected(f"{column} {user_id} names a {user_type}, not a {role}")


def check_not_negative(value: int | None, column: str) -> None:
    if value is not None and value < 0:
        raise Rejected(f"{column} {value} is negative")


def check_ended(status: str, ended_at: datetime | None, what: str) -> None:
    """Rejected when a row says `ended` but has no `ended_at`."""
    if status == "ended" and ended_at is None:
        raise Rejected(f"{what}: status ended but no ended_at")


def country_code(country: str | None) -> str | None:
    """ISO 3166-1 alpha-2 for a legacy country string; "malawi" in any case → MW."""
    if country is None:
        return None
    name = country.strip().casefold()
    if len(name) == 2 and name.isalpha():
        return name.upper()
    return COUNTRY_CODES.get(name)


def currency_of(country: str | None) -> str:
    """MWK for a Malawi doctor, USD otherwise (legacy-system.md §3.1, null included)."""
    return "MWK" if country_code(country) == "MW" else "USD"


def appointment_status(value) -> str:
    """The name of a legacy appointment status int (§1.6); Rejected outside that table.

    A status stored as a name: "in_progress" (any case) → "confirmed", because the legacy
    normaliser maps that string to 1 (§1.6), so legacy treated such a row as confirmed; another
    name of the table is kept (lower-cased). The int 7 stays "in_progress"."""
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        name = value.strip().lower()
        if name == "in_progress":
            return APPOINTMENT_STATUS[1]
        if name in APPOINTMENT_STATUS.values():
            return name
        raise Rejected(f"status {value!r} is not an appointment status legacy-system.md §1.6 lists")
    number = to_int(value, "status")
    if number not in APPOINTMENT_STATUS:
        raise Rejected(f"status {value!r} is not an appointment status legacy-system.md §1.6 lists")
    return APPOINTMENT_STATUS[number]


def json_of(value) -> dict:
    """A json column as a dict ({} for null, a non-object, or unparsable text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def check_order(start: datetime | None, end: datetime | None, what: str,
                column: str = "ended_at") -> None:
    """Rejected when `end` (the `column`) is before `start`: an interval that cannot have
    happened (a session ended, connected or activated before it started)."""
    if start is not None and end is not None and end < start:
        raise Rejected(f"{what}: {column} {end.isoformat()} before {start.isoformat()}")


def appointment_start(row: dict) -> datetime | None:
    """appointment_datetime_utc, else date + time in `user_timezone` (null → UTC, the migration
    default; the legacy commands assumed Africa/Blantyre, B30)."""
    if row.get("appointment_datetime_utc") is not None:
        return to_utc(row["appointment_datetime_utc"], "appointment_datetime_utc")
    day, clock = row.get("appointment_date"), row.get("appointment_time")
    if not isinstance(day, date) or not isinstance(clock, time):
        return None
    try:
        zone = ZoneInfo(row.get("user_timezone") or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        zone = timezone.utc
    return to_utc(datetime.combine(day, clock).replace(tzinfo=zone))
