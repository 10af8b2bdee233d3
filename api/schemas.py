"""Request bodies of the HTTP API: one pydantic model per event type, discriminated on `type`.

Every model forbids unknown members. Integers are strict (a JSON string or float is refused).
Ids, free text and instants follow the one rule of `ledger/input_rules.py` (the `Id`, `text()`
and `Timestamp` types below): an id is 1–200 characters of `A–Z a–z 0–9 . _ - : @ + = ~`, text
has no control character, and a timestamp is an RFC 3339 string with a zone (a naive time, a
date alone, or a number is refused) within [2000-01-01T00:00:00Z, 2100-01-01T00:00:00Z),
normalised to UTC whole seconds, so equal instants written differently hash equally for
idempotency (billing-rules.md I8). A batch is validated item by item (`EventBatch`, `parse_event`).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SkipValidation,
    StrictInt,
    StringConstraints,
    Tag,
    TypeAdapter,
    WithJsonSchema,
    create_model,
)
from pydantic_core import PydanticCustomError

from ledger.input_rules import (EARLIEST_INSTANT, ID_MAX_LENGTH, ID_PATTERN, LATEST_INSTANT,
                                TEXT_PATTERN, instant_problem, text_problem)

MAX_BATCH = 100  # hard ceiling in the schema; settings.batch_limit may lower it

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_NAIVE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?$")


def parse_timestamp(value: Any) -> datetime:
    """An RFC 3339 timestamp string with a zone → aware UTC datetime, whole seconds."""
    if not isinstance(value, str):
        raise PydanticCustomError("timestamp_type", "Input should be an RFC 3339 timestamp string")
    if _NAIVE.match(value):
        raise PydanticCustomError("timezone_aware",
                                  "Timestamp must include a zone offset (e.g. Z or +02:00)")
    if not _RFC3339.match(value):
        raise PydanticCustomError("timestamp_format",
                                  "Input should be an RFC 3339 timestamp like 2026-11-02T08:00:00Z")
    text = value.upper().replace(" ", "T").replace("Z", "+00:00")
    if "." in text:  # fractions are truncated on acceptance anyway; drop them before parsing
        head, _, rest = text.partition(".")
        text = head + rest.lstrip("0123456789")
    try:
        moment = datetime.fromisoformat(text).astimezone(timezone.utc)
    except ValueError as exc:
        raise PydanticCustomError("timestamp_value", "Invalid timestamp: {reason}",
                                  {"reason": str(exc)}) from None
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise PydanticCustomError("instant_window", _WINDOW_MESSAGE) from None
    if instant_problem(moment):
        raise PydanticCustomError("instant_window", _WINDOW_MESSAGE)
    return moment.replace(microsecond=0)


_WINDOW_MESSAGE = (f"Instants lie in [{EARLIEST_INSTANT.isoformat()}, "
                   f"{LATEST_INSTANT.isoformat()})")
_WINDOW_DOC = ("RFC 3339 timestamp with a zone offset, within "
               f"[{EARLIEST_INSTANT:%Y-%m-%dT%H:%M:%SZ}, {LATEST_INSTANT:%Y-%m-%dT%H:%M:%SZ})")


def timestamp(description: str = "") -> Any:
    """An RFC 3339 instant (`parse_timestamp`) documented with its window and `description`."""
    return Annotated[datetime, BeforeValidator(parse_timestamp), WithJsonSchema({
        "type": "string", "format": "date-time",
        "description": f"{_WINDOW_DOC}{'; ' + description if description else ''}"})]


Timestamp = timestamp()
PayloadInstant = timestamp("within 366 days of the event's `occurred_at` "
                           "(else 422 `instant_out_of_range`)")
OccurredAt = timestamp("when it happened, within [now − 35 days, now + 5 minutes] of the "
                       "ledger's clock (else 422 `occurred_at_out_of_range`)")


def _check_text(max_length: int):
    def check(value: str) -> str:
        problem = text_problem(value, max_length)
        if problem:
            raise PydanticCustomError("text_rule", problem)
        return value
    return check


Id = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN),
               Field(description="an identifier: 1–200 of A–Z a–z 0–9 . _ - : @ + = ~")]


def text(max_length: int, description: str = "") -> Any:
    """Free text of 1..max_length characters without control characters (ledger/input_rules)."""
    return Annotated[str, StringConstraints(min_length=1, max_length=max_length,
                                            pattern=TEXT_PATTERN),
                     AfterValidator(_check_text(max_length)),
                     Field(description=description or "text without control characters")]


Text = text(500)
Country = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$"),
                    Field(description="ISO 3166-1 alpha-2 country code", examples=["MW"])]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$"),
                     Field(description="ISO 4217 currency code", examples=["MWK"])]
MAX_MINOR = 10**15  # minor units; far above any real amount, well inside int64
Units = Annotated[StrictInt, Field(ge=0, le=1_000_000)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------ payloads


class DoctorPayload(Strict):
    doctor_id: Id
    country: Country


class PlanUnits(Strict):
    text: Units = 0
    voice: Units = 0
    video: Units = 0


class Plan(Strict):
    name: Text
    price_minor: Annotated[StrictInt, Field(ge=0, le=MAX_MINOR)]
    currency: Currency
    units: PlanUnits
    seats: Annotated[StrictInt, Field(ge=1, le=10_000)] = 1
    duration_days: Annotated[StrictInt, Field(ge=1, le=3660)]


class SubscriptionGrantedPayload(Strict):
    payment_reference: Id
    owner_id: Id
    plan: Plan
    starts_at: PayloadInstant


class PaymentPayload(Strict):
    payment_reference: Id


class MemberPayload(Strict):
    payment_reference: Id
    patient_id: Id


class SessionRequestedPayload(Strict):
    session_id: Id
    kind: Literal["text", "voice", "video"]
    patient_id: Id
    doctor_id: Id


class SessionPayload(Strict):
    session_id: Id


class SessionEndedPayload(Strict):
    session_id: Id
    ended_by: Literal["patient", "doctor", "system"]
    reason: text(100) = "completed"


Provider = Annotated[str, StringConstraints(min_length=1, max_length=50, pattern=ID_PATTERN),
                     Field(description="who reported it: livekit, twilio-video, backend, …")]


class PresencePayload(Strict):
    session_id: Id
    participant: Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX_LENGTH,
                                                  pattern=rf"^\*$|{ID_PATTERN}"), Field(
        description="provider identity: the patient or doctor id, or patient:<id> / doctor:<id> "
                    "(`*`: both, a two-party call reported as one, e.g. Twilio Voice)")]
    provider: Provider = "backend"


class RoomEndedPayload(Strict):
    session_id: Id
    provider: Provider = "backend"


class AppointmentBookedPayload(Strict):
    appointment_id: Id
    patient_id: Id
    doctor_id: Id
    kind: Literal["text", "voice", "video"]
    starts_at: PayloadInstant
    duration_minutes: Annotated[StrictInt, Field(ge=1, le=24 * 60)] = 30


class AppointmentPayload(Strict):
    appointment_id: Id


class AppointmentLinkedPayload(Strict):
    appointment_id: Id
    session_id: Id


class AppointmentCancelledPayload(Strict):
    appointment_id: Id
    cancelled_by: Literal["patient", "doctor", "system"]
    reason: text(200) = "cancelled"


class AppointmentNoShowPayload(Strict):
    appointment_id: Id
    absent: Literal["patient", "doctor", "both"]


class WithdrawalRequestedPayload(Strict):
    request_id: Id
    doctor_id: Id
    currency: Currency
    amount_minor: Annotated[StrictInt, Field(gt=0, le=MAX_MINOR)]


class WithdrawalCompletedPayload(Strict):
    request_id: Id
    doctor_id: Id
    currency: Currency


class WithdrawalRejectedPayload(Strict):
    request_id: Id
    doctor_id: Id
    currency: Currency
    reason: Text


from api.marketplace_schemas import marketplace_payloads  # noqa: E402 (uses the types above)

PAYLOADS: dict[str, type[BaseModel]] = {
    "doctor.registered": DoctorPayload,
    "doctor.country_changed": DoctorPayload,
    "subscription.granted": SubscriptionGrantedPayload,
    "payment.refunded": PaymentPayload,
    "member.added": MemberPayload,
    "member.removed": MemberPayload,
    "session.requested": SessionRequestedPayload,
    "session.patient_message": SessionPayload,
    "text.activated": SessionPayload,
    "call.ringing": SessionPayload,
    "call.connected": SessionPayload,
    "call.declined": SessionPayload,
    "call.participant_joined": PresencePayload,
    "call.participant_left": PresencePayload,
    "call.room_ended": RoomEndedPayload,
    "session.activity": SessionPayload,
    "session.ended": SessionEndedPayload,
    "appointment.booked": AppointmentBookedPayload,
    "appointment.confirmed": AppointmentPayload,
    "appointment.join_window_opened": AppointmentPayload,
    "appointment.linked": AppointmentLinkedPayload,
    "appointment.cancelled": AppointmentCancelledPayload,
    "appointment.expired": AppointmentPayload,
    "appointment.no_show": AppointmentNoShowPayload,
    "withdrawal.requested": WithdrawalRequestedPayload,
    "withdrawal.completed": WithdrawalCompletedPayload,
    "withdrawal.rejected": WithdrawalRejectedPayload,
    **marketplace_payloads(),  # priced consultations and money wallets (§10)
}
EVENT_TYPES = tuple(PAYLOADS)


# -------------------------------------------------------------------------------- events


class EventBase(Strict):
    event_id: Annotated[Id, Field(description="the backend's unique id of this event (the "
                                              "idempotency key): an identifier")]
    occurred_at: OccurredAt


def _model_name(event_type: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[._]", event_type)) + "Event"


EVENT_MODELS: dict[str, type[EventBase]] = {
    event_type: create_model(  # type: ignore[call-overload]
        _model_name(event_type), __base__=EventBase, __module__=__name__,
        type=(Literal[event_type], ...), payload=(payload, ...))
    for event_type, payload in PAYLOADS.items()
}

Event = Annotated[Union[tuple(EVENT_MODELS.values())], Field(discriminator="type")]


EVENT_ADAPTER: TypeAdapter = TypeAdapter(Event)
# Any JSON value: the schema of an item is the single-event body's; an item that breaks it is
# answered in `results` (422), so the batch itself accepts it.
BatchItem = Annotated[SkipValidation[Any], WithJsonSchema({
    "description": "one event, as the single-event body (`event_id`, `type`, `occurred_at`, "
                   "`payload`); validated on its own: a malformed item gets a 422 result at its "
                   "index and the other items apply"})]


class EventBatch(Strict):
    """Up to 100 events, applied in array order. The list is validated here; each item on its
    own by `parse_event`, so one malformed item gets its own 422 result and the others apply."""

    events: Annotated[list[BatchItem], Field(min_length=1, max_length=MAX_BATCH)]


def parse_event(item: Any) -> EventBase:
    """One event of a batch as its model; raises pydantic.ValidationError."""
    return EVENT_ADAPTER.validate_python(item)


def _body_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "batch" if "events" in value else "single"
    return "batch" if isinstance(value, EventBatch) else "single"


EventsBody = Annotated[
    Union[Annotated[Event, Tag("single")], Annotated[EventBatch, Tag("batch")]],
    Discriminator(_body_kind),
]
# The body of POST /v1/events validated from its bytes (the direct route, api/routes.py).
EVENTS_BODY: TypeAdapter = TypeAdapter(EventsBody)


# ------------------------------------------------------------------------ other commands


class TickRequest(Strict):
    as_of: Timestamp | None = Field(
        None, description="decide everything due by this instant (default: the service clock); "
                          "within [now − 35 days, now + 5 minutes] of the service clock "
                          "(else 422 `as_of_out_of_range`)")


class ClockRequest(Strict):
    now: Timestamp
