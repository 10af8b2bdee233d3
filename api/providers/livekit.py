"""LiveKit webhooks → presence events.

LiveKit posts a JSON `WebhookEvent` (`Content-Type: application/webhook+json`) with an
`Authorization` header holding a JWT signed with the API secret (issuer = the API key) whose
`sha256` claim is the base64 SHA-256 of the body. Rooms are named `call_<ledger session id>`;
participant identities are the ledger's patient or doctor ids.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from livekit import api as livekit_api
from livekit.protocol.webhook import WebhookEvent

from api.problems import InvalidSignature, ValidationFailed
from api.providers.base import (Ignored, LedgerEvent, ProviderSettings, WebhookRequest,
                                content_id, session_of_room)

log = logging.getLogger("api.providers")

# WebhookEvent.event → ledger type; room_started, track_*, egress_* and others are ignored.
EVENTS = {
    "participant_joined": "call.participant_joined",
    "participant_left": "call.participant_left",
    "room_finished": "call.room_ended",
}


class LiveKit:
    name = "livekit"
    path = "/webhooks/livekit"

    def configured(self, settings: ProviderSettings) -> bool:
        return bool(settings.livekit_api_key and settings.livekit_api_secret)

    def verify(self, request: WebhookRequest, settings: ProviderSettings) -> WebhookEvent:
        """The event, if the JWT verifies (signature, issuer, expiry with LiveKit's 1-minute
        leeway) and its sha256 claim matches the body. Raises InvalidSignature (403)."""
        auth = (request.header("authorization") or "").strip()
        if auth[:7].lower() == "bearer ":  # LiveKit sends the bare JWT; tolerate a scheme
            auth = auth[7:].strip()
        if not auth:
            raise InvalidSignature("the Authorization header is missing")
        secret = settings.livekit_api_secret.get_secret_value()  # type: ignore[union-attr]
        receiver = livekit_api.WebhookReceiver(
            livekit_api.TokenVerifier(settings.livekit_api_key, secret))
        try:
            return receiver.receive(request.body.decode("utf-8"), auth)
        except Exception as exc:  # noqa: BLE001 - jwt, hash and parse errors alike are a 403
            log.warning("LiveKit webhook refused: %s", type(exc).__name__)
            raise InvalidSignature("the Authorization token does not verify this body") from None

    def translate(self, event: WebhookEvent, request: WebhookRequest) -> LedgerEvent | Ignored:
        """One webhook → a presence event; other events and rooms not named `call_<id>` are
        ignored. Raises ValidationFailed without `created_at` (unix seconds)."""
        if event.event not in EVENTS:
            return Ignored(f"event {event.event[:40]!r}")
        session_id = session_of_room(event.room.name)
        if session_id is None:
            return Ignored(f"room {event.room.name[:60]!r} is not call_<session id>")
        payload = {"session_id": session_id, "provider": self.name}
        identity = event.participant.identity
        if event.event != "room_finished":
            if not identity:
                return Ignored(f"{event.event} without a participant identity")
            payload["participant"] = identity  # the ledger ignores identities not its own
        if event.created_at <= 0:
            raise ValidationFailed("the webhook has no created_at")
        event_id = content_id(self.name, room=event.room.name, participant=identity,
                              event=event.event, at=str(event.created_at))
        try:
            occurred_at = datetime.fromtimestamp(event.created_at, timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise ValidationFailed(f"created_at {event.created_at} is out of range") from None
        return LedgerEvent(event_id, EVENTS[event.event], occurred_at, payload)


PROVIDER = LiveKit()
