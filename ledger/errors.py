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


_error = error_type


InsufficientUnits = _error("InsufficientUnits", "insufficient_units", 409, "No unit can be held")
SessionConflict = _error("SessionConflict", "session_conflict", 409, "A live session conflicts")
SessionExists = _error("SessionExists", "session_exists", 409, "Session id already requested")
UnknownSession = _error("UnknownSession", "unknown_session", 404, "Unknown session")
UnknownDoctor = _error("UnknownDoctor", "unknown_doctor", 422, "Doctor has no recorded country")
SessionEnded = _error("SessionEnded", "session_ended", 409, "Session has ended")
SessionSettled = _error("SessionSettled", "session_settled", 409, "Session is settled")
InvalidTransition = _error("InvalidTransition", "invalid_transition", 409,
                           "Event does not apply to the session's state")
PaymentConflict = _error("PaymentConflict", "payment_conflict", 409,
                         "Payment reference already granted with other content")
UnknownSubscription = _error("UnknownSubscription", "unknown_subscription", 404,
                             "Unknown payment reference")
SeatsExhausted = _error("SeatsExhausted", "seats_exhausted", 409, "All seats of the plan are taken")
UnknownMember = _error("UnknownMember", "unknown_member", 404, "Not an active member")
IdempotencyConflict = _error("IdempotencyConflict", "idempotency_conflict", 409,
                             "Event id already used with a different body")
OccurredAtOutOfRange = _error("OccurredAtOutOfRange", "occurred_at_out_of_range", 422,
                              "occurred_at too far in the future or the past")
InvalidEvent = _error("InvalidEvent", "invalid_event", 422, "Event payload is invalid")
InsufficientFunds = _error("InsufficientFunds", "insufficient_funds", 409,
                           "Amount exceeds the available balance")
BelowMinimum = _error("BelowMinimum", "withdrawal_below_minimum", 422,
                      "Amount is below the withdrawal minimum")
WithdrawalConflict = _error("WithdrawalConflict", "withdrawal_conflict", 409,
                            "Withdrawal request id already used or not pending")
UnknownWithdrawal = _error("UnknownWithdrawal", "unknown_withdrawal", 404, "Unknown withdrawal request")
RetryLater = _error("RetryLater", "retry_later", 503, "Too many concurrent writers; retry")
