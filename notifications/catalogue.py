"""The event catalogue: which notifications the ledger sends, and their payloads (version 1).

A notification is derived from one committed domain event (its `position` in the event log)
and the state of the aggregate it belongs to just before and just after that event, so the same
log always gives the same notifications with the same ids (docs/webhooks.md lists them with
examples). Payloads are small: ids, times, `paid_until`, and `resource`, the path of the full
resource in this API. Money is integer minor units with an ISO 4217 currency; instants are
RFC 3339 UTC strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, uuid5

PAYLOAD_VERSION = 1
NS = uuid5(NAMESPACE_URL, "urn:telehealth-ledger:webhooks")

SESSION_TYPES = ("session.block_charged", "session.ended", "session.settled",
                 "session.paid_until_changed")
CONSULTATION_TYPES = ("consultation.booked", "consultation.activated", "consultation.confirmed",
                      "consultation.started", "consultation.closed",
                      "consultation.earning_released", "consultation.refunded")
EVENT_TYPES = (*SESSION_TYPES, "balance.low", "pool.expired", "withdrawal.held",
               "withdrawal.completed", "withdrawal.rejected", *CONSULTATION_TYPES)
# Ends the ledger decides itself (the tick, billing-rules.md §3, §8; provider ends, issue 4).
LEDGER_END_REASONS = frozenset({"not_started", "doctor_no_response", "missed", "idle_timeout",
                                "max_duration", "balance_exhausted", "participant_left",
                                "room_ended"})


@dataclass(frozen=True)
class Message:
    """One notification: `message_id` (the `webhook-id`, the same on every retry and every
    endpoint), `event_type`, `ordering_key` (deliveries with the same key are sent in order:
    `session:<id>`, `patient:<id>`, `pool:<id>`, `wallet:<doctor>:<currency>`,
    `consultation:<id>`), the log `position` of the
    event it derives from and its `ordinal` among that event's notifications, and the JSON
    `body` exactly as signed and sent."""

    message_id: str
    event_type: str
    ordering_key: str
    position: int
    ordinal: int
    body: str


def message_id(source: str, event_type: str, discriminator: str = "") -> str:
    """A stable id: the same source event (`<aggregate id>:<version>`) gives the same id."""
    return "msg_" + uuid5(NS, f"{source}|{event_type}|{discriminator}").hex


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def build(event_type: str, data: dict[str, Any], *, source: str, position: int, ordinal: int,
          recorded_at: datetime | None, ordering_key: str, discriminator: str = "") -> Message:
    """The Message for `data`, with the envelope {id, type, version, timestamp (when the ledger
    recorded the event), position, data}; keys sorted so the body is the same every time."""
    mid = message_id(source, event_type, discriminator)
    envelope = {"id": mid, "type": event_type, "version": PAYLOAD_VERSION,
                "timestamp": iso(recorded_at), "position": position, "data": data}
    body = json.dumps(envelope, sort_keys=True, separators=(",", ":"))
    return Message(mid, event_type, ordering_key, position, ordinal, body)


def resource(base_url: str, path: str) -> str:
    """The full resource's URL: `base_url` + path, or the path alone without a base URL."""
    return (base_url.rstrip("/") + path) if base_url else path
