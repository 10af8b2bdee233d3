"""The session page's model: the session resource, its events as timeline rows, and the
geometry of the timeline picture (an SVG the template draws).

Rows come from the session's own events (ledger/domain.py `Session`): the request, the
billable start and its stamped rate, provider presence, activity, each block's hold and charge
(AutoDeducted names the pool and the doctor's pay), the end reports (the earliest end stands,
billing-rules.md §3) and the settlement with its charges, reversals and releases. Blocks and
pools are the statement's (api/statements.py `session_resource`): the page shows what
`GET /v1/sessions/{id}` answers. Times on the axis are event times; each row also gives the
recorded time, the log position and the backend event id (console/log.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from api.statements import session_resource
from console import log
from console.format import major, parse_instant
from ledger.domain import Pool, Session

WIDTH, LEFT, RIGHT = 960, 120, 20  # SVG user units
LANES = ("session", "presence", "blocks", "pay")
LANE_HEIGHT, TOP = 46, 24
AXIS_TICKS = 6


@dataclass
class Row:
    """One event of the session: what, when (event and recorded time), where in the log."""

    version: int
    name: str
    lane: str
    at: datetime
    recorded_at: datetime
    text: str
    position: int | None = None
    event_id: str | None = None
    event_type: str | None = None
    block: int | None = None
    pool_id: str | None = None


@dataclass
class SessionPage:
    resource: dict
    rows: list[Row]
    references: dict[str, str]  # pool id → payment reference
    picture: dict = field(default_factory=dict)


def session_page(ledger: Any, session_id: str) -> SessionPage:
    """Everything the session page shows; raises UnknownSession (api 404) for an unknown id."""
    session, events = ledger.session_with_events(session_id)
    events = events[:log.MAX_EVENTS]
    resource = session_resource(session, events)
    where = log.positions(ledger, session.id)
    ids = log.event_ids(ledger, session_id, events, where)
    references = _references(ledger, resource)
    rows = [_row(e, resource, references) for e in events]
    for row in rows:
        row.position = where.get(row.version)
        found = ids.get(row.version)
        if found:
            row.event_id, row.event_type = found["event_id"], found["type"]
    page = SessionPage(resource=resource, rows=rows, references=references)
    page.picture = picture(resource, rows)
    return page


def _references(ledger: Any, resource: dict) -> dict[str, str]:
    pools = {b["pool_id"] for b in resource["statement"]["blocks"]}
    out = {}
    for pool_id in sorted(pools):
        pool = ledger.load(UUID(pool_id))
        out[pool_id] = pool.payment_reference if isinstance(pool, Pool) else pool_id
    return out


def _pay(resource: dict) -> str:
    rate = resource["rate"]
    return major(rate["pay_minor"], rate["currency"]) if rate else "no rate"


def _row(e: Any, resource: dict, refs: dict[str, str]) -> Row:
    name = type(e).__name__
    recorded = e.timestamp
    at = parse_instant(getattr(e, "at", None) or getattr(e, "requested_at", None)
                       or getattr(e, "ended_at", None)) or recorded
    ref = lambda pool_id: refs.get(pool_id, pool_id)  # noqa: E731
    row = Row(version=e.originator_version, name=name, lane="session", at=at,
              recorded_at=recorded, text=name)
    if isinstance(e, Session.Requested):
        row.text = (f"{e.kind} session requested by patient {e.patient_id} with doctor "
                    f"{e.doctor_id}; block 1 held on pool {ref(e.pool_id)}")
        row.block, row.pool_id = 1, e.pool_id
    elif isinstance(e, Session.Ringing):
        row.text = "call ringing"
    elif isinstance(e, Session.PatientMessaged):
        row.text = "the patient's first message"
    elif isinstance(e, (Session.Activated, Session.Connected)):
        row.text = ("billable start: " + ("text activated" if isinstance(e, Session.Activated)
                                          else "call connected"))
        rate = e.rate or {}
        if rate:
            row.text += (f"; rate {major(rate['amount_minor'], rate['currency'])} per block, "
                         f"doctor's pay {major(rate['pay_minor'], rate['currency'])}")
    elif isinstance(e, Session.RateStamped):
        rate = e.rate
        row.text = (f"rate stamped: {major(rate['amount_minor'], rate['currency'])} per block, "
                    f"doctor's pay {major(rate['pay_minor'], rate['currency'])} "
                    f"(tariff {rate.get('tariff')})")
    elif isinstance(e, Session.PresenceRecorded):
        row.lane, row.text = "presence", f"provider: {e.role} {e.action.replace('_', ' ')}"
    elif isinstance(e, Session.LinkedToAppointment):
        row.text = f"linked to appointment {e.appointment_id}"
    elif isinstance(e, Session.ActivityRecorded):
        row.text = "activity reported"
    elif isinstance(e, Session.BlockHeld):
        row.lane, row.block, row.pool_id = "blocks", e.block, e.pool_id
        row.text = f"block {e.block}: a unit held on pool {ref(e.pool_id)}"
    elif isinstance(e, Session.AutoDeducted):
        row.lane, row.block, row.pool_id = "pay", e.n, e.pool_id
        row.text = (f"block {e.n} charged to pool {ref(e.pool_id)}; doctor's pay "
                    f"{major(e.pay_minor, e.currency)} (pending)")
    elif isinstance(e, Session.Ended):
        stands = parse_instant(resource["ended_at"]) == parse_instant(e.ended_at)
        row.text = (f"end reported by {e.by} ({e.reason}) at {e.ended_at:%H:%M:%S}"
                    + ("; the first end report" if e.first else "; earlier than the end "
                       "standing before, so it replaces it")
                    + ("; stands: the earliest end" if stands else "; superseded by an "
                       "earlier end"))
    elif isinstance(e, Session.Settled):
        row.text = _settled_text(e, refs)
    return row


def _settled_text(e: Any, refs: dict[str, str]) -> str:
    def blocks(items: list) -> str:
        return ", ".join(f"{i['block']} ({refs.get(i['pool_id'], i['pool_id'])})"
                         for i in items) or "none"
    text = (f"settled: {e.units_owed} unit(s) owed; charged now: {blocks(e.charged)}; "
            f"reversed: {blocks(e.reversed)}; released: {blocks(e.released)}")
    if e.currency:
        text += f"; doctor's net pay {major(e.net_pay_minor, e.currency)} (available)"
    return text


# ------------------------------------------------------------------------------ picture


def picture(resource: dict, rows: list[Row]) -> dict:
    """The timeline's geometry in SVG user units: lanes, axis ticks, block bars and event
    marks, each with its label (the template draws them; no script needed)."""
    blocks = resource["statement"]["blocks"]
    moments = [r.at for r in rows] + [parse_instant(b["end"]) for b in blocks if b["end"]]
    moments += [parse_instant(b["start"]) for b in blocks if b["start"]]
    start, end = min(moments), max(moments)
    span = max((end - start).total_seconds(), 60.0)
    plot = WIDTH - LEFT - RIGHT

    def x(moment: datetime) -> float:
        return round(LEFT + (moment - start).total_seconds() / span * plot, 1)

    def y(lane: str) -> int:
        return TOP + LANES.index(lane) * LANE_HEIGHT

    lanes = [{"name": lane, "y": y(lane), "label": _LANE_LABELS[lane]} for lane in LANES]
    ticks = []
    for i in range(AXIS_TICKS + 1):
        moment = start + (end - start) * i / AXIS_TICKS
        ticks.append({"x": x(moment), "label": f"{moment:%H:%M:%S}", "iso": moment.isoformat()})
    bars = []
    pay = resource["rate"]
    for b in blocks:
        if not b["start"]:
            continue
        x0, x1 = x(parse_instant(b["start"])), x(parse_instant(b["end"]))
        bars.append({"x": x0, "width": max(x1 - x0 - 2, 2), "y": y("blocks") + 6,
                     "status": b["status"], "block": b["block"], "pool_id": b["pool_id"],
                     "label": f"{b['block']}"})
        if b["status"] in ("charged", "reversed") and pay:
            bars.append({"x": x0, "width": max(x1 - x0 - 2, 2), "y": y("pay") + 6,
                         "status": "pay-" + b["status"], "block": b["block"],
                         "pool_id": b["pool_id"],
                         "label": major(pay["pay_minor"], pay["currency"])})
    marks = [{"x": x(r.at), "y": y(r.lane) + LANE_HEIGHT // 2, "name": r.name, "text": r.text,
              "version": r.version} for r in rows if r.lane in ("session", "presence")]
    height = TOP + len(LANES) * LANE_HEIGHT + 28
    return {"width": WIDTH, "height": height, "left": LEFT, "right": WIDTH - RIGHT,
            "lanes": lanes, "lane_height": LANE_HEIGHT, "ticks": ticks, "bars": bars,
            "marks": marks, "axis_y": TOP + len(LANES) * LANE_HEIGHT + 4,
            "start": start, "end": end}


_LANE_LABELS = {"session": "Session", "presence": "Presence", "blocks": "Blocks (units)",
                "pay": "Doctor's pay"}
