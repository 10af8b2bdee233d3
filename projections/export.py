"""Export the event log as JSON lines, one per stored event, in ledger (notification) order."""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any, Callable, TextIO
from uuid import UUID

PAGE = 1000


def export_events(ledger: Any, out: TextIO,
                  progress: Callable[[int, int], None] | None = None) -> int:
    """Write every event up to the current head; returns the number of lines written.

    Each line: {"position", "originator_id", "originator_version", "topic", "timestamp",
    …the event's own attributes} with datetimes as ISO-8601, UUIDs and Decimals as strings.
    `progress(position, head)` is called after each page of PAGE events.
    """
    head = int(ledger.recorder.max_notification_id() or 0)
    position, count = 0, 0
    for _ in range(head // PAGE + 2):  # each full page advances >= PAGE ids
        page = ledger.recorder.select_notifications(start=position, limit=PAGE, stop=head,
                                                    inclusive_of_start=False)
        for notification in page:
            out.write(json.dumps(event_record(ledger, notification), separators=(",", ":")))
            out.write("\n")
        count += len(page)
        position = page[-1].id if page else head
        if progress is not None:
            progress(position, head)
        if len(page) < PAGE:
            break
    return count


def event_record(ledger: Any, notification: Any) -> dict:
    """One JSON-safe record of a stored event."""
    event = ledger.mapper.to_domain_event(notification)
    attributes = {k: json_safe(v) for k, v in vars(event).items()}
    return {"position": notification.id, "originator_id": str(notification.originator_id),
            "originator_version": notification.originator_version, "topic": notification.topic,
            "timestamp": json_safe(getattr(event, "timestamp", None)), **{
                k: v for k, v in attributes.items()
                if k not in ("originator_id", "originator_version", "timestamp")}}


def json_safe(value: Any, depth: int = 0) -> Any:
    """Datetimes/dates → ISO text, UUID/Decimal → str, containers recursively (depth ≤ 32)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (UUID, Decimal)):
        return str(value)
    if isinstance(value, Enum):
        return json_safe(value.value, depth + 1)
    if depth > 32:
        raise ValueError("event attribute nested too deeply to export")
    if isinstance(value, dict):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [json_safe(v, depth + 1) for v in items]
    return str(value)
