"""Domain errors, each with a stable code and an HTTP status (RFC 9457 `code` extension), and
the one registry of every code the service can return (`ERROR_CODES`).

One hierarchy; api/ maps it to problem+json. Every refusal changes nothing.

The registry fills itself: every `LedgerError` subclass that defines `code` (the `error_type`
helper below, the API's own in api/problems.py, anyone's later) is registered when its class is
created, with its status, title and `when` (what the client did or must do). A code returned
without being registered is logged as an error by api/problems.py, and the test suite fails on
such a log line (tests/conftest.py); tests/test_error_codes.py checks that README and the
OpenAPI document list exactly the registered codes. To add a code: define its error type with a
`when=` text, raise it, and add its row to README's table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorCode:
    """One registered code: the HTTP `statuses` it comes with (usually one), a `title`, and
    `when` it is returned (one sentence for README and the OpenAPI document)."""

    code: str
    statuses: tuple[int, ...]
    title: str
    when: str


ERROR_CODES: dict[str, ErrorCode] = {}


def register_code(code: str, status: int, title: str, when: str = "") -> ErrorCode:
    """Add `code` with `status` to the registry (idempotent). A code registered again with
    another status keeps both (e.g. `unknown_doctor`: 422 on an event, 404 on a read)."""
    known = ERROR_CODES.get(code)
    if known is None:
        ERROR_CODES[code] = ErrorCode(code, (status,), title, when or title)
    elif status not in known.statuses:
        ERROR_CODES[code] = ErrorCode(code, tuple(sorted((*known.statuses, status))),
                                      known.title, f"{known.when}; {when or title}")
    return ERROR_CODES[code]


class LedgerError(Exception):
    """Base of every refusal. `code` is stable and documented; `status` is the HTTP status;
    `extra` are problem extension members (JSON-safe values)."""

    code = "ledger_error"
    status = 400
    title = "Request refused"
    when = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:  # a concrete error type: its code is part of the contract
            register_code(cls.code, cls.status, cls.title, cls.__dict__.get("when", ""))

    def __init__(self, detail: str = "", **extra: object) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra


def error_type(name: str, code: str, status: int, title: str,
               base: type[LedgerError] = LedgerError, when: str = "") -> type[LedgerError]:
    """A LedgerError subclass with a stable `code`, HTTP `status`, `title` and `when` (the
    sentence documenting when it is returned); registered in ERROR_CODES."""
    return type(name, (base,), {"code": code, "status": status, "title": title,
                                "when": when or title,
                                "__doc__": f"{title} ({status} `{code}`)."})


InsufficientUnits = error_type(
    "InsufficientUnits", "insufficient_units", 409, "No unit can be held",
    when="no unit can be held for block 1 of a requested session (billing-rules §3)")
SessionConflict = error_type(
    "SessionConflict", "session_conflict", 409, "A live session conflicts",
    when="the patient has a live session of that kind, or the doctor one with another patient; "
         "names that session (`session_id`, `state`, `ended_at`, `paid_until`)")
SessionExists = error_type(
    "SessionExists", "session_exists", 409, "Session id already requested",
    when="a `session.requested` names a session id already requested (with another event "
         "id); carries that session's `session_id`, `state`, `ended_at`, `paid_until`")
UnknownSession = error_type("UnknownSession", "unknown_session", 404, "Unknown session",
                            when="no request was accepted for this session id")
UnknownDoctor = error_type(
    "UnknownDoctor", "unknown_doctor", 422, "Doctor has no recorded country",
    when="422 on an event naming a doctor with no recorded country (billing-rules §5)")
DoctorNotFound = error_type("DoctorNotFound", "unknown_doctor", 404, "Unknown doctor",
                            when="404 on a read of a doctor never registered")
UnknownPatient = error_type("UnknownPatient", "unknown_patient", 404, "Unknown patient",
                            when="a read of a patient who holds no pool (never granted or "
                                 "added as a member)")
SessionEnded = error_type(
    "SessionEnded", "session_ended", 409, "Session has ended",
    when="the session has ended (a timeout, exhaustion or decline is final); carries "
         "`session_id`, `state`, `ended_at`, `paid_until`")
SessionSettled = error_type(
    "SessionSettled", "session_settled", 409, "Session is settled",
    when="the session is settled: nothing about it changes any more; carries `session_id`, "
         "`state`, `ended_at`, `paid_until`")
InvalidTransition = error_type("InvalidTransition", "invalid_transition", 409,
                               "Event does not apply to the session's state",
                               when="the event does not apply to the session or appointment "
                                    "as it stands (e.g. `call.connected` on a text session)")
PaymentConflict = error_type("PaymentConflict", "payment_conflict", 409,
                             "Payment reference already granted with other content",
                             when="the payment reference was granted or topped up with other "
                                  "content (one reference, one payment), or a chargeback or "
                                  "refund to source conflicts with the one recorded")
UnknownSubscription = error_type("UnknownSubscription", "unknown_subscription", 404,
                                 "Unknown payment reference",
                                 when="no grant was accepted for this payment reference")
SeatsExhausted = error_type("SeatsExhausted", "seats_exhausted", 409,
                            "All seats of the plan are taken",
                            when="every seat of the plan is taken (owner included)")
UnknownMember = error_type("UnknownMember", "unknown_member", 404, "Not an active member",
                           when="`member.removed` names a patient who is not an active member")
IdempotencyConflict = error_type("IdempotencyConflict", "idempotency_conflict", 409,
                                 "Event id already used with a different body",
                                 when="the event id was accepted earlier with another body")
OccurredAtOutOfRange = error_type(
    "OccurredAtOutOfRange", "occurred_at_out_of_range", 422,
    "occurred_at too far in the future or the past",
    when="`occurred_at` is outside [now − 35 days, now + 5 minutes] of the ledger's clock")
InstantOutOfRange = error_type(
    "InstantOutOfRange", "instant_out_of_range", 422, "A payload instant is outside its window",
    when="a payload instant (`starts_at`, `start`, `effective_from`) is more than 366 days "
         "from the event's `occurred_at`")
InvalidEvent = error_type("InvalidEvent", "invalid_event", 422, "Event payload is invalid",
                          when="the payload names something the ledger does not know "
                               "(an event type or kind outside its lists)")
InsufficientFunds = error_type("InsufficientFunds", "insufficient_funds", 409,
                               "Amount exceeds the available balance",
                               when="a withdrawal exceeds the doctor's available money, or a "
                                    "booking or refund to source the patient wallet's "
                                    "(`available_minor` says how much is)")
BelowMinimum = error_type("BelowMinimum", "withdrawal_below_minimum", 422,
                          "Amount is below the withdrawal minimum",
                          when="a withdrawal is below its currency's minimum "
                               "(`LEDGER_WITHDRAWAL_MINIMUMS`; `minimum_minor` says which)")
WithdrawalConflict = error_type("WithdrawalConflict", "withdrawal_conflict", 409,
                                "Withdrawal request id already used or not pending",
                                when="the withdrawal request id exists, or is no longer held")
UnknownWithdrawal = error_type("UnknownWithdrawal", "unknown_withdrawal", 404,
                               "Unknown withdrawal request",
                               when="no withdrawal request was accepted with this id")
RetryLater = error_type("RetryLater", "retry_later", 503, "Too many concurrent writers; retry",
                        when="too many concurrent writers, the database unreachable, or too many "
                             "open connections: retry the same request, same event ids "
                             "(`Retry-After`)")
UnknownAppointment = error_type("UnknownAppointment", "unknown_appointment", 404,
                                "Unknown appointment",
                                when="no booking was accepted for this appointment id")
AppointmentExists = error_type("AppointmentExists", "appointment_exists", 409,
                               "Appointment id already booked with other content",
                               when="the appointment id was booked with other content")
AppointmentClosed = error_type("AppointmentClosed", "appointment_closed", 409,
                               "Appointment is completed, cancelled, expired or a no-show",
                               when="the appointment is completed, cancelled, expired or a "
                                    "no-show")

# Priced consultations and patient money wallets (billing-rules.md §10).
WalletInDebt = error_type(
    "WalletInDebt", "wallet_in_debt", 409, "The wallet owes money from a reversed payment",
    when="a booking while the patient's wallet in that currency has debt from a chargeback "
         "(`debt_minor` says how much); a top-up repays it first")
UnknownPayment = error_type(
    "UnknownPayment", "unknown_payment", 404, "Unknown top-up payment",
    when="a refund to source or chargeback names a payment reference no top-up used")
InvalidPriceList = error_type(
    "InvalidPriceList", "invalid_price_list", 422, "Price list version is invalid",
    when="a price list version takes effect before it is recorded, or names a fee twice")
PriceListConflict = error_type(
    "PriceListConflict", "price_list_conflict", 409,
    "Price list version already published with other content",
    when="the practitioner's price list version was published with other content")
InvalidBooking = error_type(
    "InvalidBooking", "invalid_booking", 422,
    "Booking is too soon or not in the price list in force",
    when="a booking starts within 5 minutes of `occurred_at`, or its (type, duration) is not in "
         "the practitioner's price list in force")
UnknownConsultation = error_type(
    "UnknownConsultation", "unknown_consultation", 404, "Unknown consultation",
    when="no booking was accepted for this consultation id")
ConsultationExists = error_type(
    "ConsultationExists", "consultation_exists", 409,
    "Consultation id already booked with other content",
    when="the consultation id was booked with other content (a booking never changes)")
ConsultationNotScheduled = error_type(
    "ConsultationNotScheduled", "consultation_not_scheduled", 409,
    "Consultation is not awaiting activation",
    when="an activation of a consultation already activated")
ActivationTooLate = error_type(
    "ActivationTooLate", "activation_too_late", 409,
    "Activation at or after the consultation's start",
    when="an activation whose `occurred_at` is at or after the consultation's start")
ConsultationNotActivated = error_type(
    "ConsultationNotActivated", "consultation_not_activated", 409,
    "Consultation has not been activated",
    when="a join of a consultation an admin has not activated")
JoinWindowNotOpen = error_type(
    "JoinWindowNotOpen", "join_window_not_open", 409,
    "The join window opens 5 minutes before the start",
    when="a join dated more than 5 minutes before the consultation's start")
JoinWindowClosed = error_type(
    "JoinWindowClosed", "join_window_closed", 409,
    "The join window closed at the consultation's scheduled end",
    when="a join dated at or after the consultation's start + duration")
ConsultationNotStarted = error_type(
    "ConsultationNotStarted", "consultation_not_started", 409,
    "Both participants have not joined",
    when="an end before both participants joined (joins count up to start + 600 s)")
CancellationWindowClosed = error_type(
    "CancellationWindowClosed", "cancellation_window_closed", 409,
    "A patient cancels at least 2 hours before the start",
    when="a patient's cancellation dated less than 2 hours before the start")
ConsultationInProgress = error_type(
    "ConsultationInProgress", "consultation_in_progress", 409, "Consultation is in progress",
    when="a cancellation or decline of a consultation somebody has joined")
ConsultationClosed = error_type(
    "ConsultationClosed", "consultation_closed", 409,
    "Consultation is completed, a no-show, cancelled or expired",
    when="any event but a refund for a consultation that is closed, or is due to be closed by "
         "its own times (expiry, no-show, completion) at the event's `occurred_at`")
NotRefundable = error_type(
    "NotRefundable", "not_refundable", 409,
    "Only a completed consultation or a patient no-show is refunded, once",
    when="a refund of a consultation that is not completed or a patient no-show, or a second "
         "refund")
ConsultationNotUnitBilled = error_type(
    "ConsultationNotUnitBilled", "consultation_not_unit_billed", 409,
    "A priced consultation is not a unit-billed session",
    when="a session event, or an appointment link, names a priced consultation's id")
