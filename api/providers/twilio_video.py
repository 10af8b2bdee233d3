"""Twilio Programmable Video room status callbacks → presence events.

Rooms are created with `UniqueName=call_<ledger session id>` and
`StatusCallback=<public_base_url>/webhooks/twilio/video`. Form fields used: `StatusCallbackEvent`,
`RoomName`, `ParticipantIdentity`, `Timestamp` (ISO 8601, UTC).

Twilio Video ends service on 2026-12-05: delete this module and its line in
api/providers/__init__.py; nothing else refers to it.
"""

from __future__ import annotations

from starlette.datastructures import ImmutableMultiDict

from api.providers.base import (
    Ignored,
    LedgerEvent,
    WebhookRequest,
    provider_time,
    session_of_room,
    twilio_configured,
    twilio_event_id,
    verify_twilio,
)

# StatusCallbackEvent → ledger type; room-created, track-* and recording-* are ignored.
EVENTS = {
    "participant-connected": "call.participant_joined",
    "participant-disconnected": "call.participant_left",
    "room-ended": "call.room_ended",
}


class TwilioVideo:
    name = "twilio-video"
    path = "/webhooks/twilio/video"

    configured = staticmethod(twilio_configured)
    verify = staticmethod(verify_twilio)

    def translate(self, form: ImmutableMultiDict, request: WebhookRequest) -> LedgerEvent | Ignored:
        """One room callback → a presence event; other events and rooms not named
        `call_<id>` are ignored. Raises ValidationFailed without a Timestamp."""
        event = form.get("StatusCallbackEvent", "")
        if event not in EVENTS:
            return Ignored(f"StatusCallbackEvent {event[:40]!r}")
        room = form.get("RoomName", "")
        session_id = session_of_room(room)
        if session_id is None:
            return Ignored(f"room {room[:60]!r} is not call_<session id>")
        payload = {"session_id": session_id, "provider": self.name}
        identity = form.get("ParticipantIdentity", "")
        if event != "room-ended":
            if not identity:
                return Ignored(f"{event} without ParticipantIdentity")
            payload["participant"] = identity  # the ledger ignores identities not its own
        timestamp = form.get("Timestamp")
        event_id = twilio_event_id(self.name, request, room=room, participant=identity,
                                   event=event, at=timestamp or "")
        return LedgerEvent(event_id, EVENTS[event], provider_time(timestamp), payload)


PROVIDER = TwilioVideo()
