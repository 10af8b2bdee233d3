"""What the ledger accepts at its door: identifiers, free text and instants (issue 9 §1, §2).

One rule in one place. `api/schemas.py` builds every event type's fields from it, `api/routes.py`
its path parameters, and the provider webhooks (`api/webhooks.py`) validate the events they
translate through those same schemas. A value that breaks it is refused with 422 before
anything is read or stored: no store can hold it (PostgreSQL text cannot contain U+0000) or no
backend means it (a control character in an id), and an instant outside its window cannot be
billed (year 1 or 9999 overflows the arithmetic of §3).

- **Identifier** (`event_id`, `session_id`, `patient_id`, `doctor_id`, `owner_id`,
  `payment_reference`, `appointment_id`, `request_id`, `participant`, `provider`, and every
  `{id}` of a path): 1–200 characters, each an ASCII letter or digit or one of `. _ - : @ + = ~`
  (`ID_ALPHABET`); case-sensitive, compared as written. No space, `/`, `#`, `%`, `?` or control
  character, so every accepted id can be read back at `/v1/…/{id}`.
- **Text** (a plan's `name`, an end, cancellation or rejection `reason`): 1–N characters (N per
  field), no control character (Unicode category Cc: U+0000–U+001F, U+007F–U+009F, which
  includes tab and newline) and no lone surrogate.
- **Instant**: RFC 3339 with a zone, normalised to UTC whole seconds, within
  [`EARLIEST_INSTANT`, `LATEST_INSTANT`) (2000-01-01T00:00:00Z to 2100-01-01T00:00:00Z), and
  then within its field's window:
  `occurred_at` within [now − 35 days, now + 5 minutes] (`OCCURRED_AT_PAST`,
  `OCCURRED_AT_FUTURE`; 422 `occurred_at_out_of_range`); a payload instant (`starts_at` of a
  grant or a booking) within `PAYLOAD_INSTANT_WINDOW` (366 days) of its event's `occurred_at`
  (422 `instant_out_of_range`); a tick's `as_of` within the `occurred_at` window of the clock
  (422 `as_of_out_of_range`).

Pure functions of their arguments; nothing here reads a clock.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

ID_MAX_LENGTH = 200
ID_ALPHABET = "A-Za-z0-9._:@+=~-"  # a regex character class body; '-' last
ID_PATTERN = rf"^[{ID_ALPHABET}]{{1,{ID_MAX_LENGTH}}}$"
# Unicode category Cc (C0, DEL, C1) and the surrogate range (a lone surrogate cannot be encoded).
_FORBIDDEN_IN_TEXT = "\\x00-\\x1F\\x7F-\\x9F"
TEXT_PATTERN = rf"^[^{_FORBIDDEN_IN_TEXT}]+$"
_ID = re.compile(ID_PATTERN)
_BAD_TEXT = re.compile(f"[{_FORBIDDEN_IN_TEXT}\\ud800-\\udfff]")

EARLIEST_INSTANT = datetime(2000, 1, 1, tzinfo=timezone.utc)
LATEST_INSTANT = datetime(2100, 1, 1, tzinfo=timezone.utc)  # exclusive
OCCURRED_AT_PAST = timedelta(days=35)
OCCURRED_AT_FUTURE = timedelta(minutes=5)
PAYLOAD_INSTANT_WINDOW = timedelta(days=366)


def id_problem(value: str) -> str | None:
    """Why `value` is not an identifier, or None if it is one."""
    if _ID.match(value):
        return None
    if not value or len(value) > ID_MAX_LENGTH:
        return f"an identifier has 1 to {ID_MAX_LENGTH} characters"
    return "an identifier uses only letters, digits and . _ - : @ + = ~"


def text_problem(value: str, max_length: int) -> str | None:
    """Why `value` is not acceptable free text of at most `max_length` characters, or None."""
    if not value or len(value) > max_length:
        return f"text has 1 to {max_length} characters"
    if _BAD_TEXT.search(value):
        return "text may not contain control characters (U+0000–U+001F, U+007F–U+009F)"
    return None


def instant_problem(moment: datetime) -> str | None:
    """Why an aware `moment` lies outside [EARLIEST_INSTANT, LATEST_INSTANT), or None."""
    if EARLIEST_INSTANT <= moment < LATEST_INSTANT:
        return None
    return (f"an instant lies in [{EARLIEST_INSTANT.isoformat()}, "
            f"{LATEST_INSTANT.isoformat()})")


def occurred_at_window(now: datetime) -> tuple[datetime, datetime]:
    """[earliest, latest] accepted for an event's `occurred_at` (and a tick's `as_of`) at `now`."""
    return now - OCCURRED_AT_PAST, now + OCCURRED_AT_FUTURE


def payload_instant_window(occurred_at: datetime) -> tuple[datetime, datetime]:
    """[earliest, latest] accepted for an instant in the payload of an event at `occurred_at`."""
    return occurred_at - PAYLOAD_INSTANT_WINDOW, occurred_at + PAYLOAD_INSTANT_WINDOW


def within(moment: datetime, window: tuple[datetime, datetime]) -> bool:
    """Whether `moment` lies in the closed `window`."""
    return window[0] <= moment <= window[1]
