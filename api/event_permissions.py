"""Who may post which event type, beyond the `backend`/`admin` write roles (billing-rules.md §10
"Who sends what").

- Admin only (the admin's id is in the payload and recorded): activation, admin cancellation,
  consultation refunds and refunds to source.
- Nobody: the tick's own decisions (confirmation, no-shows, expiry, completion by time, earning
  release). Posted by anyone, `admin` included, they are refused with 403 `forbidden`.
Every refusal changes nothing.
"""

from __future__ import annotations

from api.problems import Forbidden
from ledger.marketplace import TICK_ONLY_TYPES

ADMIN_ONLY_TYPES = frozenset({"consultation.activated", "consultation.admin_cancelled",
                              "consultation.refunded", "wallet.refunded_to_source"})


def authorize_event(role: str, event_type: str) -> None:
    """Raise Forbidden (403) unless `role` may post `event_type`."""
    if event_type in TICK_ONLY_TYPES:
        raise Forbidden(f"{event_type} is recorded only by the ledger's tick")
    if event_type in ADMIN_ONLY_TYPES and role != "admin":
        raise Forbidden(f"{event_type} needs an admin key; role {role!r} may not post it")
