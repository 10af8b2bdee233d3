"""The session resource and its billing statement: pure functions over the Session aggregate.

Blocks (billing-rules.md §1, §3): block k is `[start + (k−1)·600 s, start + k·600 s)` and is, at
any moment, `held` (a unit is held for it), `charged` (the hold was posted), `reversed`
(charged, then reversed at settlement) or `released` (the hold was voided at settlement).
The aggregate keeps holds, charges and reversals; released blocks are only named by the
`Settled` event, so the builder also takes the session's domain events (optional).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from ledger.domain import Session
from ledger.rules import block_end
from ledger.application import presence_view


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def released_blocks(events: Iterable[Any]) -> dict[int, str]:
    """block → pool id of every hold released at settlement (from the `Settled` event)."""
    released: dict[int, str] = {}
    for event in events:
        if isinstance(event, Session.Settled):
            for item in getattr(event, "released", None) or ():
                released[int(item["block"])] = str(item["pool_id"])
    return released


def blocks(session: Any, released: dict[int, str] | None = None) -> list[dict]:
    """Every block the session has held, charged, reversed or released, in block order:
    {"block", "start", "end", "status", "pool_id"} (`block` is the number k ≥ 1 everywhere in
    the statement: blocks, charges, reversals)."""
    status: dict[int, tuple[str, str]] = {}
    for number, pool_id in (released or {}).items():
        status[number] = ("released", pool_id)
    for number, pool_id in session.reversals.items():
        status[number] = ("reversed", pool_id)
    for number, pool_id in session.holds.items():
        status[number] = ("held", pool_id)
    for number, pool_id in session.charges.items():
        status[number] = ("charged", pool_id)
    start = session.started_at
    out = []
    for number in sorted(status):
        state, pool_id = status[number]
        out.append({"block": number,
                    "start": _iso(block_end(start, number - 1)) if start else None,
                    "end": _iso(block_end(start, number)) if start else None,
                    "status": state, "pool_id": pool_id})
    return out


def doctor_pay(session: Any) -> dict | None:
    """Pay for the units charged so far: pending until settled, then available (§5)."""
    if not session.rate:
        return None
    per_unit = int(session.rate["pay_minor"])
    units = len(session.charges)
    return {"per_unit_minor": per_unit, "units": units, "net_total_minor": per_unit * units,
            "currency": session.rate["currency"],
            "status": "available" if session.settled else "pending"}


def rate(session: Any) -> dict | None:
    if not session.rate:
        return None
    r = session.rate
    return {"tariff": r["tariff"], "amount_minor": r["amount_minor"], "pay_minor": r["pay_minor"],
            "currency": r["currency"], "commission_pct": r.get("commission_pct", 0),
            "country": r.get("country")}


def settlement(session: Any) -> dict | None:
    if not session.settled or not session.settlement:
        return None
    s = session.settlement
    return {"units_owed": s["units_owed"], "at": s["at"], "net_pay_minor": s["net_pay_minor"],
            "currency": s["currency"] or None}


def statement(session: Any, events: Iterable[Any] = ()) -> dict:
    """The billing statement: blocks, charges, reversals, doctor pay, settlement."""
    return {
        "blocks": blocks(session, released_blocks(events)),
        "charges": [{"block": n, "pool_id": p} for n, p in sorted(session.charges.items())],
        "reversals": [{"block": n, "pool_id": p} for n, p in sorted(session.reversals.items())],
        "doctor_pay": doctor_pay(session),
        "settlement": settlement(session),
    }


def presence(session: Any) -> dict | None:
    """A call's provider-derived connect and end (ledger/presence.py), None without reports."""
    if not session.presence:
        return None
    return {"reports": len(session.presence), **presence_view(session)}


def session_resource(session: Any, events: Iterable[Any] = ()) -> dict:
    """`GET /v1/sessions/{id}`: the session's facts, `paid_until`, rate and statement."""
    return {
        "session_id": session.session_id,
        "kind": session.kind,
        "patient_id": session.patient_id,
        "doctor_id": session.doctor_id,
        "state": session.state,
        "requested_at": _iso(session.requested_at),
        "ringing_at": _iso(session.ringing_at),
        "first_message_at": _iso(session.first_message_at),
        "started_at": _iso(session.started_at),
        "last_activity_at": _iso(session.last_activity_at),
        "ended_at": _iso(session.ended_at),
        "end_by": session.end_by,
        "end_reason": session.end_reason,
        "paid_until": _iso(session.paid_until()),
        "appointment_id": session.appointment_id,
        "presence": presence(session),
        "rate": rate(session),
        "statement": statement(session, events),
    }
