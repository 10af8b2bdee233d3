"""Twilio Programmable Voice call-status callbacks → call.ringing / presence / session.ended.

The backend creates each call with
`StatusCallback=<public_base_url>/webhooks/twilio/voice?session_id=<ledger session id>` and
`StatusCallbackEvent=initiated ringing answered completed`. The query is part of the signed URL,
so the session id cannot be swapped. Form fields used: `CallStatus`, `Timestamp` (RFC 2822),
`CallSid` (only in the dedupe key).
"""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.datastructures import ImmutableMultiDict

from api.providers.base import (
    Ignored,
    LedgerEvent,
    WebhookRequest,
    provider_time,
    twilio_configured,
    twilio_event_id,
    verify_twilio,
)

# CallStatus → (ledger type, end reason). `queued` and unknown statuses are ignored.
STATUSES: dict[str, tuple[str, str | None]] = {
    "initiated": ("call.ringing", None),
    "ringing": ("call.ringing", None),
    # Both legs are up from `in-progress` to `completed`: reported as both participants in a
    # room ("*"), so the call is not idle in between and ends when Twilio says it completed.
    "in-progress": ("call.participant_joined", None),
    "completed": ("call.room_ended", None),
    "busy": ("session.ended", "declined"),
    "no-answer": ("session.ended", "missed"),
    "canceled": ("session.ended", "cancelled"),
    "failed": ("session.ended", "failed"),
}


class TwilioVoice:
    name = "twilio-voice"
    path = "/webhooks/twilio/voice"

    configured = staticmethod(twilio_configured)
    verify = staticmethod(verify_twilio)

    def translate(self, form: ImmutableMultiDict, request: WebhookRequest) -> LedgerEvent | Ignored:
        """One status callback → its ledger event; a callback URL without exactly one
        `session_id` is not ours (ignored). Raises ValidationFailed without a Timestamp."""
        session_ids = parse_qs(request.query).get("session_id", [])
        if len(session_ids) != 1:
            return Ignored("the callback URL names no single session_id")
        status = form.get("CallStatus", "")
        if status not in STATUSES:
            return Ignored(f"CallStatus {status[:40]!r}")
        event_type, reason = STATUSES[status]
        payload = {"session_id": session_ids[0]}
        if reason is not None:
            payload |= {"ended_by": "system", "reason": reason}
        elif event_type == "call.participant_joined":
            payload |= {"participant": "*", "provider": self.name}
        elif event_type == "call.room_ended":
            payload |= {"provider": self.name}
        timestamp = form.get("Timestamp")
        event_id = twilio_event_id(self.name, request, call=form.get("CallSid", ""),
                                   session=session_ids[0], event=status, at=timestamp or "")
        return LedgerEvent(event_id, event_type, provider_time(timestamp), payload)


PROVIDER = TwilioVoice()
