"""Reads of the marketplace (billing-rules.md §10): a consultation with its money, a patient's
money wallets, the platform and tax-payable accounts, a practitioner's price list.

Amounts are integer minor units. The consultation is read from its aggregate and its own
events (current as soon as an event is accepted); wallets and accounts from the `marketplace`
projection, caught up after every accepted write.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from api.auth import ReadRole, require
from api.problems import problem_responses
from api.routes import FreshMarketplace, Ident, LedgerDep, ProjectorDep
from ledger.consultations import PriceList
from ledger.marketplace import get_consultation

router = APIRouter(tags=["marketplace"])
AccountsRole = Annotated[str, Depends(require({"admin", "auditor"}))]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _decided_by(event: Any) -> dict:
    """A reference to the consultation event that decided a movement."""
    return {"event": type(event).__name__, "version": event.originator_version,
            "recorded_at": _iso(event.timestamp)}


def consultation_resource(c: Any, events: list) -> dict:
    """`GET /v1/consultations/{id}`: state, price breakdown, hold, capture or release, refund
    and earning, each with the consultation event that decided it."""
    by_name: dict[str, Any] = {}
    for event in events:
        by_name.setdefault(type(event).__name__, event)
    closed, refunded = by_name.get("Closed"), by_name.get("Refunded")
    released = by_name.get("EarningReleased")
    price = c.price
    hold_status = "captured" if c.captured else "released" if c.released else "held"
    return {
        "consultation_id": c.consultation_id, "status": c.status,
        "patient_id": c.patient_id, "practitioner_id": c.practitioner_id,
        "consultation_type": c.consultation_type, "mode": c.mode,
        "start": _iso(c.start), "end": _iso(c.end), "duration_minutes": c.duration_minutes,
        "booked_at": _iso(c.booked_at), "activated_at": _iso(c.activated_at),
        "activated_by": c.activated_by, "confirmed_at": _iso(c.confirmed_at),
        "joins": {role: _iso(at) for role, at in sorted(c.joins.items())},
        "closed_at": _iso(c.closed_at), "completed_at": _iso(c.completed_at), "close": c.close,
        "price": dict(price),
        "hold": {"amount_minor": price["total_minor"], "currency": price["currency"],
                 "status": hold_status, **_decided_by(by_name["Booked"])},
        "capture": None if not c.captured else {
            **closed.capture, "at": _iso(closed.at), **_decided_by(closed)},
        "release": None if not c.released else {
            "amount_minor": closed.released_minor, "at": _iso(closed.at), **_decided_by(closed)},
        "earning": None if c.earning is None else {
            "status": c.earning, "amount_minor": price["share_minor"],
            "available_at": _iso(c.earning_released_at),
            **(_decided_by(released) if released else {})},
        "refund": None if refunded is None else {
            **{k: v for k, v in c.refund.items() if k != "at"}, "at": _iso(refunded.at),
            **_decided_by(refunded)},
    }


@router.get("/v1/consultations/{consultation_id}",
            responses=problem_responses(401, 403, 404, 422, 500, 503))
def get_consultation_route(consultation_id: Ident, role: ReadRole, ledger: LedgerDep) -> dict:
    """A priced consultation: state, price breakdown, hold, capture, refund, earning (§10)."""
    c = get_consultation(ledger, consultation_id)  # raises UnknownConsultation (404)
    return consultation_resource(c, list(ledger.events.get(c.id)))


@router.get("/v1/patients/{patient_id}/wallet", responses=problem_responses(401, 403, 422, 500, 503))
def get_patient_wallet(patient_id: Ident, role: ReadRole, projector: ProjectorDep,
                       position: FreshMarketplace) -> dict:
    """A patient's money wallets per currency: available, held, captured, refunded, debt (§10).
    Reflects `min_position` (default: the head when the read began), api/routes.py `fresh`."""
    return projector.patient_money_wallet(patient_id)


@router.get("/v1/platform/accounts", responses=problem_responses(401, 403, 422, 500, 503))
def get_platform_accounts(role: AccountsRole, projector: ProjectorDep,
                          position: FreshMarketplace) -> dict:
    """The platform account and the tax-payable account per currency (admin, auditor; §10).
    Reflects `min_position` (default: the head when the read began), api/routes.py `fresh`."""
    return projector.platform_accounts()


@router.get("/v1/practitioners/{practitioner_id}/price-list",
            responses=problem_responses(401, 403, 422, 500, 503))
def get_price_list(practitioner_id: Ident, role: ReadRole, ledger: LedgerDep) -> dict:
    """Every published version of a practitioner's price list (fees in minor units)."""
    price_list = ledger.load(PriceList.create_id(practitioner_id))
    versions = price_list.versions if price_list is not None else []
    return {"practitioner_id": practitioner_id, "versions": [
        {**v, "effective_from": _iso(v["effective_from"])} for v in versions]}
