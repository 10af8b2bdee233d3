"""Signed outbound webhooks derived from the event log (issue 13, docs/webhooks.md).

`Notifier` runs the deriver (follows the log with tracking, writes notifications and
deliveries: the log is the outbox) and the dispatcher (sends them, signed with Standard
Webhooks, in order per session, at least once, with backoff and a dead letter).
"""

from notifications.catalogue import EVENT_TYPES
from notifications.delivery import DeliveryPolicy
from notifications.notifier import Notifier, NotifierConfig

__all__ = ["EVENT_TYPES", "DeliveryPolicy", "Notifier", "NotifierConfig"]
