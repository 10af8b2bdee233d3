"""Domain errors, each with a stable code and an HTTP status (RFC 9457 `code` extension).

One hierarchy; api/ maps it to problem+json. Every refusal changes nothing.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every refusal. `code` is stable and documented; `status` is the HTTP status."""

    code = "ledger_error"
    status = 400
    title = "Request refused"

    def __init__(self, detail: str = "", **extra: object) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra


def error_type(name: str, code: str, status: int, title: str,
               base: type[LedgerError] = LedgerError) -> type[LedgerError]:
    """A LedgerError subclass with a stable `code`, HTTP `status` and `title`."""
    return type(name, (base,), {"code": code, "status": status, "title": title,
                                "__doc__": f"{title} ({status} `{code}`)."})


InsufficientUnits = error_type("InsufficientUnits", "insufficient_units", 409,
                               "No unit can be held")
SessionConflict = error_type("SessionConflict", "session_conflict", 409, "A live session conflicts")
SessionExists = error_type("SessionExists", "session_exists", 409, "Session id already requested")
UnknownSession = error_type("UnknownSession", "unknown_session", 404, "Unknown session")
UnknownDoctor = error_type("UnknownDoctor", "unknown_doctor", 422, "Doctor has no recorded country")
SessionEnded = error_type("SessionEnded", "session_ended", 409, "Session has ended")
SessionSettled = error_type("SessionSettled", "session_settled", 409, "Session is settled")
InvalidTransition = error_type("InvalidTransition", "invalid_transition", 409,
                               "Event does not apply to the session's state")
PaymentConflict = error_type("PaymentConflict", "payment_conflict", 409,
                             "Payment reference already granted with other content")
UnknownSubscription = error_type("UnknownSubscription", "unknown_subscription", 404,
                                 "Unknown payment reference")
SeatsExhausted = error_type("SeatsExhausted", "seats_exhausted", 409,
                            "All seats of the plan are taken")
UnknownMember = error_type("UnknownMember", "unknown_member", 404, "Not an active member")
IdempotencyConflict = error_type("IdempotencyConflict", "idempotency_conflict", 409,
                                 "Event id already used with a different body")
OccurredAtOutOfRange = error_type("OccurredAtOutOfRange", "occurred_at_out_of_range", 422,
                                  "occurred_at too far in the future or the past")
InvalidEvent = error_type("InvalidEvent", "invalid_event", 422, "Event payload is invalid")
InsufficientFunds = error_type("InsufficientFunds", "insufficient_funds", 409,
                               "Amount exceeds the available balance")
BelowMinimum = error_type("BelowMinimum", "withdrawal_below_minimum", 422,
                          "Amount is below the withdrawal minimum")
WithdrawalConflict = error_type("WithdrawalConflict", "withdrawal_conflict", 409,
                                "Withdrawal request id already used or not pending")
UnknownWithdrawal = error_type("UnknownWithdrawal", "unknown_withdrawal", 404,
                               "Unknown withdrawal request")
RetryLater = error_type("RetryLater", "retry_later", 503, "Too many concurrent writers; retry")
UnknownAppointment = error_type("UnknownAppointment", "unknown_appointment", 404,
                                "Unknown appointment")
AppointmentExists = error_type("AppointmentExists", "appointment_exists", 409,
                               "Appointment id already booked with other content")
AppointmentClosed = error_type("AppointmentClosed", "appointment_closed", 409,
                               "Appointment is completed, cancelled, expired or a no-show")

# Priced consultations and patient money wallets (billing-rules.md §10).
WalletInDebt = error_type("WalletInDebt", "wallet_in_debt", 409,
                          "The wallet owes money from a reversed payment")
UnknownPayment = error_type("UnknownPayment", "unknown_payment", 404, "Unknown top-up payment")
InvalidPriceList = error_type("InvalidPriceList", "invalid_price_list", 422,
                              "Price list version is invalid")
PriceListConflict = error_type("PriceListConflict", "price_list_conflict", 409,
                               "Price list version already published with other content")
InvalidBooking = error_type("InvalidBooking", "invalid_booking", 422,
                            "Booking is too soon or not in the price list in force")
UnknownConsultation = error_type("UnknownConsultation", "unknown_consultation", 404,
                                 "Unknown consultation")
ConsultationExists = error_type("ConsultationExists", "consultation_exists", 409,
                                "Consultation id already booked with other content")
ConsultationNotScheduled = error_type("ConsultationNotScheduled", "consultation_not_scheduled",
                                      409, "Consultation is not awaiting activation")
ActivationTooLate = error_type("ActivationTooLate", "activation_too_late", 409,
                               "Activation at or after the consultation's start")
ConsultationNotActivated = error_type("ConsultationNotActivated", "consultation_not_activated",
                                      409, "Consultation has not been activated")
JoinWindowNotOpen = error_type("JoinWindowNotOpen", "join_window_not_open", 409,
                               "The join window opens 5 minutes before the start")
JoinWindowClosed = error_type("JoinWindowClosed", "join_window_closed", 409,
                              "The join window closed at the consultation's scheduled end")
ConsultationNotStarted = error_type("ConsultationNotStarted", "consultation_not_started", 409,
                                    "Both participants have not joined")
CancellationWindowClosed = error_type("CancellationWindowClosed", "cancellation_window_closed",
                                      409, "A patient cancels at least 2 hours before the start")
ConsultationInProgress = error_type("ConsultationInProgress", "consultation_in_progress", 409,
                                    "Consultation is in progress")
ConsultationClosed = error_type("ConsultationClosed", "consultation_closed", 409,
                                "Consultation is completed, a no-show, cancelled or expired")
NotRefundable = error_type("NotRefundable", "not_refundable", 409,
                           "Only a completed consultation or a patient no-show is refunded, once")
ConsultationNotUnitBilled = error_type("ConsultationNotUnitBilled", "consultation_not_unit_billed",
                                       409, "A priced consultation is not a unit-billed session")
