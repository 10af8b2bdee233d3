"""Request bodies of the HTTP API: one pydantic model per event type, discriminated on `type`.

Every model forbids unknown members. Integers are strict (a JSON string or float is refused),
strings have bounded lengths, timestamps must be RFC 3339 strings with a zone (a naive time,
a date alone, or a number is refused), and are normalised to UTC whole seconds, so equal
instants written differently hash equally for idempotency (billing-rules.md I8).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    StringConstraints,
    Tag,
    WithJsonSchema,
    create_model,
)
from pydantic_core import PydanticCustomError

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
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise PydanticCustomError("timestamp_value", "Invalid timestamp: {reason}",
                                  {"reason": str(exc)}) from None
    return moment.astimezone(timezone.utc).replace(microsecond=0)


Timestamp = Annotated[
    datetime,
    BeforeValidator(parse_timestamp),
    WithJsonSchema({"type": "string", "format": "date-time",
                    "description": "RFC 3339 timestamp with a zone offset"}),
]

Id = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=500)]
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
    starts_at: Timestamp


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
    reason: Annotated[str, StringConstraints(min_length=1, max_length=100)] = "completed"


Provider = Annotated[str, StringConstraints(min_length=1, max_length=50),
                     Field(description="who reported it: livekit, twilio-video, backend, …")]


class PresencePayload(Strict):
    session_id: Id
    participant: Annotated[str, StringConstraints(min_length=1, max_length=200), Field(
        description="provider identity: the patient or doctor id, or patient:<id> / doctor:<id>")]
    provider: Provider = "backend"


class RoomEndedPayload(Strict):
    session_id: Id
    provider: Provider = "backend"


class AppointmentBookedPayload(Strict):
    appointment_id: Id
    patient_id: Id
    doctor_id: Id
    kind: Literal["text", "voice", "video"]
    starts_at: Timestamp
    duration_minutes: Annotated[StrictInt, Field(ge=1, le=24 * 60)] = 30


class AppointmentPayload(Strict):
    appointment_id: Id


class AppointmentLinkedPayload(Strict):
    appointment_id: Id
    session_id: Id


class AppointmentCancelledPayload(Strict):
    appointment_id: Id
    cancelled_by: Literal["patient", "doctor", "system"]
    reason: Annotated[str, StringConstraints(min_length=1, max_length=200)] = "cancelled"


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
    event_id: Annotated[str, StringConstraints(min_length=1, max_length=200),
                        Field(description="the backend's unique id of this event (idempotency key)")]
    occurred_at: Timestamp


def _model_name(event_type: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[._]", event_type)) + "Event"


EVENT_MODELS: dict[str, type[EventBase]] = {
    event_type: create_model(  # type: ignore[call-overload]
        _model_name(event_type), __base__=EventBase, __module__=__name__,
        type=(Literal[event_type], ...), payload=(payload, ...))
    for event_type, payload in PAYLOADS.items()
}

Event = Annotated[Union[tuple(EVENT_MODELS.values())], Field(discriminator="type")]


class EventBatch(Strict):
    events: Annotated[list[Event], Field(min_length=1, max_length=MAX_BATCH)]


def _body_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "batch" if "events" in value else "single"
    return "batch" if isinstance(value, EventBatch) else "single"


EventsBody = Annotated[
    Union[Annotated[Event, Tag("single")], Annotated[EventBatch, Tag("batch")]],
    Discriminator(_body_kind),
]


# ------------------------------------------------------------------------ other commands


class TickRequest(Strict):
    as_of: Timestamp | None = Field(
        None, description="decide everything due by this instant (default: the service clock)")


class ClockRequest(Strict):
    now: Timestamp
