"""Audit endpoints: the chain digest, account statements, and the as-of reads that
`GET /v1/patients/{id}/balance?as_of=T` and `GET /v1/doctors/{id}/wallet?as_of=T` delegate to.

All of it is `app.state.audit` (audit/service.py), plain functions this module only exposes.
Times in `as_of`, `from` and `to` are recorded times (when the ledger recorded an event, by its
clock), not event times: docs/audit.md "Two times".
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response

from api.auth import ReadRole, require
from api.deps import state_dependency
from api.problems import ApiError, ServiceUnavailable, ValidationFailed, problem_responses
from api.schemas import timestamp
from ledger.errors import DoctorNotFound, UnknownPatient, error_type
from ledger.input_rules import ID_MAX_LENGTH, ID_PATTERN
from ledger.rules import utc_seconds

router = APIRouter()

AUDIT = frozenset({"auditor", "admin"})
AuditRole = Annotated[str, Depends(require(AUDIT))]
Ident = Annotated[str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN,
                            description="an identifier: 1–200 of A–Z a–z 0–9 . _ - : @ + = ~")]
RecordedTime = timestamp("a recorded time: when the ledger recorded events, by its clock "
                         "(not when they happened); at most the ledger's clock now "
                         "(else 422 `as_of_in_future`)")
AsOfQuery = Annotated[RecordedTime | None, Query(
    description="answer as the ledger showed it at this recorded time (docs/audit.md)")]
Currency = Annotated[str | None, Query(pattern="^[A-Z]{3}$", description="ISO 4217 code")]

AsOfInFuture = error_type(
    "AsOfInFuture", "as_of_in_future", 422, "The instant is later than the ledger's clock",
    base=ApiError, when="an as-of instant, or a statement's `to`, is later than the ledger's "
                        "clock: what the ledger shows then is not known yet")

_STATEMENT_RESPONSES: dict[int | str, dict] = {
    200: {"description": "The statement (JSON), or as CSV with `format=csv`",
          "content": {"text/csv": {"schema": {"type": "string"}}}},
    **problem_responses(401, 403, 404, 422, 500, 503),
}


def get_audit(request: Request) -> Any:
    audit = getattr(request.app.state, "audit", None)
    if audit is None:
        raise ServiceUnavailable("the audit is not running")
    return audit


AuditDep = Annotated[Any, state_dependency(get_audit)]


def _not_after_now(request: Request, moment: datetime, name: str) -> None:
    clock = getattr(request.app.state, "clock", None)
    now = utc_seconds(clock()) if clock is not None else moment
    if moment > now:
        raise AsOfInFuture(f"{name} {moment.isoformat()} is after the ledger's clock "
                           f"{now.isoformat()}")


# ------------------------------------------------------------------------------- digest


@router.get("/v1/audit/digest", tags=["audit"],
            responses=problem_responses(401, 403, 500, 503))
def get_digest(role: AuditRole, audit: AuditDep) -> dict:
    """The head of every hash chain (`ledger`, and `legacy` once imported): position, link,
    events chained and the head's recorded time. Keep it outside the ledger; `ledger audit
    verify --digest FILE` later proves the log still extends it. Auditor and admin keys."""
    audit.catch_up(history=False)
    return audit.digest().as_dict()


# ------------------------------------------------------------------------------- as of


def patient_balance_as_of(request: Request, patient_id: str, as_of: datetime) -> dict:
    """`GET /v1/patients/{id}/balance?as_of=T`: the balance the ledger showed at T."""
    _not_after_now(request, as_of, "as_of")
    balance = get_audit(request).patient_balance(patient_id, as_of)
    if balance is None:
        raise UnknownPatient(f"{patient_id!r} held no pool at {as_of.isoformat()}")
    return balance


def doctor_wallet_as_of(request: Request, doctor_id: str, as_of: datetime) -> dict:
    """`GET /v1/doctors/{id}/wallet?as_of=T`: the wallets the ledger showed at T."""
    _not_after_now(request, as_of, "as_of")
    wallet = get_audit(request).doctor_wallet(doctor_id, as_of)
    if wallet is None:
        raise DoctorNotFound(f"doctor {doctor_id!r} was not registered at {as_of.isoformat()}")
    return wallet


# --------------------------------------------------------------------------- statements


def _period(request: Request, start: datetime, end: datetime | None) -> tuple[datetime, datetime]:
    clock = request.app.state.clock
    end = end if end is not None else utc_seconds(clock())
    _not_after_now(request, end, "to")
    if start >= end:
        raise ValidationFailed("`from` must be before `to`", errors=[
            {"loc": ["query", "from"], "type": "period", "msg": "from must be before to"}])
    return start, end


def _answer(statement: dict, fmt: str, name: str) -> Any:
    if fmt == "csv":
        from audit.statements import as_csv

        return Response(as_csv(statement), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})
    return statement


@router.get("/v1/patients/{patient_id}/statement", tags=["audit"], response_model=None,
            responses=_STATEMENT_RESPONSES)
def get_patient_statement(
    request: Request, patient_id: Ident, role: ReadRole,
    start: Annotated[RecordedTime, Query(alias="from", description="recorded time; exclusive")],
    end: Annotated[RecordedTime | None, Query(alias="to", description="recorded time; "
                                              "inclusive; default now")] = None,
    fmt: Annotated[Literal["json", "csv"], Query(alias="format")] = "json",
) -> Any:
    """Units per bucket: the opening balance at `from`, every movement recorded after it up to
    `to` (its event, both times, session, pool, block), the closing balance at `to`."""
    start, end = _period(request, start, end)
    statement = get_audit(request).patient_statement(patient_id, start, end)
    if statement is None:
        raise UnknownPatient(f"{patient_id!r} held no pool by {end.isoformat()}")
    return _answer(statement, fmt, f"statement-{patient_id}")


@router.get("/v1/doctors/{doctor_id}/statement", tags=["audit"], response_model=None,
            responses=_STATEMENT_RESPONSES)
def get_doctor_statement(
    request: Request, doctor_id: Ident, role: ReadRole,
    start: Annotated[RecordedTime, Query(alias="from", description="recorded time; exclusive")],
    end: Annotated[RecordedTime | None, Query(alias="to", description="recorded time; "
                                              "inclusive; default now")] = None,
    currency: Currency = None,
    fmt: Annotated[Literal["json", "csv"], Query(alias="format")] = "json",
) -> Any:
    """Minor units per currency (or one `currency`): opening at `from`, every movement (pay
    per block, settlement, withdrawals) recorded after it up to `to`, closing at `to`."""
    start, end = _period(request, start, end)
    statement = get_audit(request).doctor_statement(doctor_id, start, end, currency)
    if statement is None:
        raise DoctorNotFound(f"doctor {doctor_id!r} was not registered by {end.isoformat()}")
    return _answer(statement, fmt, f"statement-{doctor_id}")
