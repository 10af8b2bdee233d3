"""HTTP endpoints. Plain `def` handlers: eventsourcing is synchronous (FastAPI runs them in
its thread pool). Errors are raised as LedgerError subclasses and rendered by api/problems.py.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Annotated, Any, Literal, Union

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Scope, Send

from api.audit_routes import AsOfQuery, doctor_wallet_as_of, patient_balance_as_of
from api.auth import WRITE, AdminRole, ReadRole, WriteRole, route_role
from api.deps import state_dependency
from api.event_permissions import authorize_event
from api.problems import (
    AsOfOutOfRange,
    ClockNotManual,
    InternalError,
    Problem,
    ProjectionsBehindRead,
    ServiceUnavailable,
    ValidationFailed,
    error_problem,
    error_response,
    problem_response,
    problem_responses,
    validation_problem,
)
from api.observe import event_answered
from api.schemas import (EVENTS_BODY, ClockRequest, EventBase, EventBatch, EventsBody,
                         TickRequest, parse_event)
from api.statements import session_resource
from ledger.errors import DoctorNotFound, LedgerError, UnknownPatient
from ledger.input_rules import ID_MAX_LENGTH, ID_PATTERN, id_problem, occurred_at_window, within
from ledger.rules import utc_seconds
from projections import ProjectionsBehind, ProjectionStalled
from storage import is_unavailable

log = logging.getLogger("api")

# Path ids follow the same rule as the ids in event bodies (ledger/input_rules.py).
Ident = Annotated[str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN,
                            description="an identifier: 1–200 of A–Z a–z 0–9 . _ - : @ + = ~")]

router = APIRouter()


# ----------------------------------------------------------------------- response models


class EventResult(BaseModel):
    """The result of an accepted event (its fields depend on the event type)."""

    model_config = ConfigDict(extra="allow")
    event_id: str
    type: str


class BatchAccepted(BaseModel):
    event_id: str
    status: Literal[200, 201] = Field(description="201 accepted now, 200 accepted earlier (replay)")
    result: EventResult


class BatchRefused(BaseModel):
    event_id: str | None = Field(description="the item's event_id, null when it is not a "
                                             "valid identifier")
    status: int = Field(ge=400, le=599)
    problem: Problem


class BatchResult(BaseModel):
    results: list[Union[BatchAccepted, BatchRefused]]


class Health(BaseModel):
    status: Literal["ok"]


class ClockState(BaseModel):
    now: str
    manual: bool


class ClockSet(BaseModel):
    now: str


# ------------------------------------------------------------------------- dependencies


def _state(request: Request, name: str) -> Any:
    value = getattr(request.app.state, name, None)
    if value is None:
        raise ServiceUnavailable(f"{name} is not running")
    return value


def get_ledger(request: Request):
    return _state(request, "ledger")


def get_projector(request: Request):
    return _state(request, "projector")


def get_clock(request: Request):
    return _state(request, "clock")


def get_tick(request: Request):
    """`tick(as_of) -> TickReport`, wired by the composition root (scheduler.tick.run_tick)."""
    return _state(request, "tick")


LedgerDep = Annotated[Any, state_dependency(get_ledger)]
ProjectorDep = Annotated[Any, state_dependency(get_projector)]
ClockDep = Annotated[Any, state_dependency(get_clock)]
TickDep = Annotated[Any, state_dependency(get_tick)]


POSITION_HEADER = "Ledger-Position"
_positions: ContextVar[list[int | None] | None] = ContextVar("written_positions", default=None)


def noted_positions() -> list[int | None]:
    """A fresh list, filled by `note_position` during this request's writes."""
    positions: list[int | None] = []
    _positions.set(positions)
    return positions


def note_position(accepted) -> None:
    """Remember `accepted.position` (None for a replay, or a ledger that does not say)."""
    positions = _positions.get()
    if positions is not None:
        positions.append(getattr(accepted, "position", None))


def catch_up(request: Request) -> None:
    """Tell this worker's background projector that events were written; returns at once.

    The projections are applied outside the request (projections/projector.py `start`); a
    reader that must see this write passes the response's `Ledger-Position` as `min_position`
    (docs/design.md, "Projections outside the request").
    """
    projector = getattr(request.app.state, "projector", None)
    wake = getattr(projector, "wake", None)
    if wake is not None:
        wake()


def written_position(ledger, positions: list[int | None]) -> int:
    """The notification id a reader must wait for to see these writes: the highest
    `Accepted.position` when the ledger reports them, else the head now (which is at least
    every committed write's position, replays included)."""
    known = [p for p in positions if p is not None]
    if known and len(known) == len(positions):
        return max(known)
    return int(ledger.recorder.max_notification_id() or 0)


MinPosition = Annotated[int | None, Query(
    ge=0, le=2**63 - 1,
    description="notification id the read must reflect (e.g. a write's `Ledger-Position`); "
                "default: the log's head when the read begins. The read waits for it (at most "
                "`LEDGER_READ_WAIT_SECONDS`, 2 s), else 503 `projections_behind`. `0`: answer "
                "at once from the projection as it is (it may lag)")]


def fresh(*names: str):
    """A dependency for reads of the projections `names`: wait until they reach the client's
    `min_position` (default: the head now); set `Ledger-Position` to the position the answer
    reflects. Errors: those of `wait_until_fresh`."""

    def wait_for_position(request: Request, response: Response,
                          min_position: MinPosition = None) -> int:
        if request.query_params.get("as_of") is not None:
            return 0  # an as-of read comes from the audit history, not the projections
        reached = wait_until_fresh(request, names, min_position)
        response.headers[POSITION_HEADER] = str(reached)
        return reached

    return Depends(wait_for_position)


def wait_until_fresh(request: Request, names: tuple[str, ...], min_position: int | None) -> int:
    """Wait until the projections `names` reach `min_position` (None: the log's head now);
    returns the position they reflect. Raises 422 `validation_error` for a position beyond the
    head and 503 `projections_behind` (with Retry-After) if it is not reached within
    `LEDGER_READ_WAIT_SECONDS` or a projection is stalled."""
    projector, ledger = get_projector(request), get_ledger(request)
    settings = request.app.state.settings
    head = int(ledger.recorder.max_notification_id() or 0)
    if min_position is not None and min_position > head:
        raise ValidationFailed(
            f"min_position {min_position} is beyond the log's head {head}",
            errors=[{"loc": ["query", "min_position"], "type": "less_than_equal",
                     "msg": f"Input should be less than or equal to {head}"}])
    target = head if min_position is None else min_position
    try:
        return projector.wait_for(target, names, settings.read_wait_seconds)
    except ProjectionStalled as exc:
        reached = exc.reached if exc.reached is not None else exc.stall["position"] - 1
        raise ProjectionsBehindRead(str(exc), position=reached,
                                    headers=_retry_after(settings)) from None
    except ProjectionsBehind as exc:
        raise ProjectionsBehindRead(
            f"the {'/'.join(names)} projection is at position {exc.reached}, not yet "
            f"{exc.target}, after {settings.read_wait_seconds} s",
            position=exc.reached, headers=_retry_after(settings)) from None


def _retry_after(settings) -> dict[str, str]:
    return {"Retry-After": str(settings.retry_after_seconds)}


FreshBalances = Annotated[int, fresh("balances")]
FreshWallets = Annotated[int, fresh("wallets")]
FreshMarketplace = Annotated[int, fresh("marketplace")]


# ------------------------------------------------------------------------------- health


@router.get("/healthz", response_model=Health, tags=["health"])
def healthz() -> dict:
    """Liveness: no key needed."""
    return {"status": "ok"}


# ------------------------------------------------------------------------------- events


def _ingest(ingest, event) -> tuple[int, dict, bool]:
    """(status, result, replayed) of one validated event through `ingest` (Ledger.ingest's
    contract); raises LedgerError on refusal. Each answer is reported to the request's log line
    and metrics (api/observe.py)."""
    session_id = getattr(event.payload, "session_id", None)
    try:
        accepted = ingest(event.event_id, event.type, event.occurred_at,
                                 event.payload.model_dump(mode="json"))
    except LedgerError as exc:
        event_answered(event.type, event.event_id, session_id, "refused", exc.code)
        raise
    event_answered(event.type, event.event_id, session_id,
                   "replayed" if accepted.replayed else "accepted")
    note_position(accepted)
    return (200 if accepted.replayed else 201), accepted.result, accepted.replayed


def _authorize(event, role: str) -> None:
    """Raise Forbidden (403) if `role` may not post the event's type (admin-only and tick-only
    types, api/event_permissions.py), reporting the refusal like any other answer."""
    try:
        authorize_event(role, event.type)
    except LedgerError as exc:
        event_answered(event.type, event.event_id, getattr(event.payload, "session_id", None),
                       "refused", exc.code)
        raise


_EVENT_RESPONSES: dict[int | str, dict] = {
    201: {"description": "Event accepted now; the body is its result", "model": EventResult},
    200: {"description": "A re-posted event (header `Idempotent-Replayed: true`, the original "
                         "result), or a batch (`{\"results\": [...]}` in array order, one per "
                         "item: a malformed item gets its own 422 and the others apply)",
          "model": Union[EventResult, BatchResult],
          "headers": {"Idempotent-Replayed": {"description": "`true` on a re-post",
                                              "schema": {"type": "string", "enum": ["true"]}}}},
    **problem_responses(400, 401, 403, 404, 409, 422, 500, 503),
}


@router.post("/v1/events", tags=["events"], status_code=201, response_model=None,
             responses=_EVENT_RESPONSES)
def post_events(
    request: Request,
    role: WriteRole,
    ledger: LedgerDep,
    body: Annotated[EventsBody, Body(description="one event, or {\"events\": [...]} (1..100)")],
) -> JSONResponse:
    """Record one backend event, or a batch applied in array order, exactly once each (I8)."""
    return answer_events(request, ledger, body, role)


def answer_events(request: Request, ledger, body: EventBase | EventBatch,
                  role: str) -> JSONResponse:
    """The answer of `POST /v1/events` to a validated `body` posted by `role` (the route's and
    the direct route's); raises LedgerError for a refused single event."""
    if isinstance(body, EventBatch):
        positions = noted_positions()
        response = _post_batch(request, ledger, body, role)
        if response.status_code == 200:
            response.headers[POSITION_HEADER] = str(written_position(ledger, positions))
        return response
    _authorize(body, role)
    positions = noted_positions()
    status, result, replayed = _ingest(_single_ingest(request, ledger), body)
    if not replayed:
        catch_up(request)
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    headers[POSITION_HEADER] = str(written_position(ledger, positions or [None]))
    return JSONResponse(result, status_code=status, headers=headers)


async def post_events_direct(scope: Scope, body: bytes, send: Send) -> bool:
    """`POST /v1/events` answered outside FastAPI (the front middleware hands it over,
    api/front.py): the same answer as `post_events`, from the same `answer_events` in the same
    thread pool, without the router, the dependency resolution and `json.loads`: the body is
    validated from its bytes (`EVENTS_BODY.validate_json`). Returns False, having sent
    nothing, whenever the route's own answer could differ: the role the route's dependency
    finds (`route_role`) may not post (its 401/403), the service is not ready (503), or the
    body does not validate from its bytes (the route's 400/422; a body that only `json.loads`
    reads, e.g. with a byte-order mark, is the route's too). The caller then hands the request
    to the route."""
    app = scope["app"]
    role = route_role(scope, app.state.api_keys)
    ledger = getattr(app.state, "ledger", None)
    if role not in WRITE or ledger is None:
        return False
    try:
        events = EVENTS_BODY.validate_json(body)
    except ValidationError:
        return False
    request = Request(scope)
    try:
        response = await run_in_threadpool(answer_events, request, ledger, events, role)
    except LedgerError as exc:  # what the route's exception handler answers
        response = error_response(exc, request.url.path)
    await response(scope, _nothing_to_receive, send)
    return True


async def _nothing_to_receive() -> Message:
    return {"type": "http.disconnect"}


def _single_ingest(request: Request, ledger):
    """Ingest for a single event: through the group commit when the service has one (concurrent
    single events decided and saved as one unit, ledger/group_commit.py), else Ledger.ingest."""
    group = getattr(request.app.state, "group_commit", None)
    return group.ingest if group is not None else ledger.ingest


def _post_batch(request: Request, ledger, batch: EventBatch, role: str) -> JSONResponse:
    """Validate each item on its own; hand the valid ones to the ledger in array order; merge
    the results by index (a malformed item's 422, or a type `role` may not post's 403, sits at
    its own position)."""
    limit = request.app.state.settings.batch_limit
    if len(batch.events) > limit:
        return problem_response(validation_problem(
            [{"loc": ("body", "events"), "type": "too_long",
              "msg": f"List should have at most {limit} items, not {len(batch.events)}"}],
            request.url.path, detail=f"a batch holds at most {limit} events"))
    results: list[dict | None] = [None] * len(batch.events)
    valid = []
    for index, item in enumerate(batch.events):
        try:
            event = parse_event(item)
        except ValidationError as exc:
            results[index] = _invalid_item(index, item, exc)
            event_answered("(invalid)", results[index]["event_id"] or f"#{index}", None,
                           "refused", "validation_error")
            continue
        try:
            _authorize(event, role)
        except LedgerError as exc:
            results[index] = {"event_id": event.event_id, "status": exc.status,
                              "problem": error_problem(exc)}
            continue
        valid.append((index, event))
    outcomes = ingest_in_order(ledger, [event for _, event in valid])
    for (index, _), outcome in zip(valid, outcomes):
        outcome.pop("position", None)  # the response's Ledger-Position header carries it
        results[index] = outcome
    if any(r["status"] == 201 for r in outcomes):
        catch_up(request)
    return JSONResponse({"results": results}, status_code=200)


def ingest_in_order(ledger, events: list) -> list[dict]:
    """Per validated event, in order: {"event_id", "status": 201|200, "result", "position"}
    or {"event_id", "status", "problem"}. The batch is one unit of work (Ledger.ingest_batch):
    the outcomes are those of posting the events one by one; a refusal does not stop the
    others. `position`: the log position the event's save wrote (None on a replay). A store
    outage raises (the whole batch answers 503 retry_later; events already durable replay)."""
    items = [(e.event_id, e.type, e.occurred_at, e.payload.model_dump(mode="json"))
             for e in events]
    out = []
    for event, outcome in zip(events, ledger.ingest_batch(items, fatal=is_unavailable)):
        session_id = getattr(event.payload, "session_id", None)
        if isinstance(outcome, LedgerError):
            event_answered(event.type, event.event_id, session_id, "refused", outcome.code)
            out.append({"event_id": event.event_id, "status": outcome.status,
                        "problem": error_problem(outcome)})
        elif isinstance(outcome, Exception):
            log.error("unexpected error ingesting %s", event.event_id, exc_info=outcome)
            error = InternalError("An unexpected error occurred; it has been logged")
            out.append({"event_id": event.event_id, "status": 500,
                        "problem": error_problem(error)})
        else:
            event_answered(event.type, event.event_id, session_id,
                           "replayed" if outcome.replayed else "accepted")
            note_position(outcome)
            out.append({"event_id": event.event_id, "status": 200 if outcome.replayed else 201,
                        "result": outcome.result, "position": outcome.position})
    return out


def _invalid_item(index: int, item: Any, exc: ValidationError) -> dict:
    """The 422 result of one malformed batch item; its event_id is echoed only if valid."""
    event_id = item.get("event_id") if isinstance(item, dict) else None
    if not isinstance(event_id, str) or id_problem(event_id):
        event_id = None
    errors = [{**e, "loc": ("body", "events", index, *e.get("loc", ()))} for e in exc.errors()]
    problem = validation_problem(errors, detail=f"event {index} of the batch failed validation")
    return {"event_id": event_id, "status": 422, "problem": problem}


# -------------------------------------------------------------------------------- reads


@router.get("/v1/sessions/{session_id}", tags=["reads"],
            responses=problem_responses(401, 403, 404, 422, 500, 503))
def get_session(session_id: Ident, role: ReadRole, ledger: LedgerDep) -> dict:
    """A session from its aggregate: facts, `paid_until`, rate and billing statement."""
    return session_resource(*ledger.session_with_events(session_id))  # UnknownSession: 404


@router.get("/v1/appointments/{appointment_id}", tags=["reads"],
            responses=problem_responses(401, 403, 404, 422, 500, 503))
def get_appointment(appointment_id: Ident, role: ReadRole, ledger: LedgerDep) -> dict:
    """An appointment's lifecycle state and the session that serves it (never a charge, I10)."""
    return ledger.get_appointment(appointment_id).view()  # raises UnknownAppointment (404)


@router.get("/v1/patients/{patient_id}/balance", tags=["reads"],
            responses=problem_responses(401, 403, 404, 422, 500, 503))
def get_patient_balance(request: Request, patient_id: Ident, role: ReadRole,
                        projector: ProjectorDep, clock: ClockDep, ledger: LedgerDep,
                        position: FreshBalances, as_of: AsOfQuery = None) -> dict:
    """Units per bucket usable now and per pool (projection); 404 `unknown_patient` for a
    patient who holds no pool. With `as_of`: as the ledger showed it then (docs/audit.md).
    Reflects every event up to `min_position` (default: the head when the read began);
    `Ledger-Position` says up to where."""
    if as_of is not None:
        return patient_balance_as_of(request, patient_id, as_of)
    balance = projector.patient_balance(patient_id, clock())
    if not balance["pools"] and not ledger.knows_patient(patient_id):
        raise UnknownPatient(f"no pool was ever granted to or shared with {patient_id!r}")
    return balance


@router.get("/v1/doctors/{doctor_id}/wallet", tags=["reads"],
            responses=problem_responses(401, 403, 404, 422, 500, 503))
def get_doctor_wallet(request: Request, doctor_id: Ident, role: ReadRole,
                      projector: ProjectorDep, ledger: LedgerDep,
                      position: FreshWallets, as_of: AsOfQuery = None) -> dict:
    """Pending, available, held and withdrawn pay per currency (projection); 404
    `unknown_doctor` for a doctor never registered. With `as_of`: as the ledger showed it then
    (docs/audit.md). Reflects every event up to `min_position` (default: the head when the
    read began); `Ledger-Position` says up to where."""
    if as_of is not None:
        return doctor_wallet_as_of(request, doctor_id, as_of)
    wallet = projector.doctor_wallet(doctor_id)
    if not wallet["wallets"] and not ledger.knows_doctor(doctor_id):
        raise DoctorNotFound(f"doctor {doctor_id!r} was never registered")
    return wallet


@router.get("/v1/projections", tags=["reads"], responses=problem_responses(401, 403, 500, 503))
def get_projections(role: ReadRole, projector: ProjectorDep, ledger: LedgerDep) -> dict:
    """Lag of each projection behind the event log, in events."""
    return {"head": ledger.recorder.max_notification_id() or 0, "lag": projector.lag()}


# ------------------------------------------------------------------------ ticks, clock


@router.post("/v1/ticks", tags=["admin"],
             responses=problem_responses(400, 401, 403, 422, 500, 503))
def post_tick(role: AdminRole, tick: TickDep, clock: ClockDep, body: Annotated[TickRequest | None, Body()] = None) -> dict:
    """Run one tick now: charge due blocks, apply timeouts, settle, expire pools. The report
    lists each decision (`steps`: session, action, block, units, pool, reason)."""
    now = utc_seconds(clock())
    as_of = body.as_of if body is not None and body.as_of is not None else now
    window = occurred_at_window(now)
    if not within(as_of, window):
        raise AsOfOutOfRange(f"as_of {as_of.isoformat()} is outside [{window[0].isoformat()}, "
                             f"{window[1].isoformat()}] (the clock − 35 days, + 5 minutes)")
    return tick(as_of).as_dict()


@router.get("/v1/clock", tags=["admin"], response_model=ClockState,
            responses=problem_responses(401, 403, 500, 503))
def get_clock_now(role: ReadRole, clock: ClockDep) -> dict:
    """The service clock, and whether it is manual."""
    return {"now": utc_seconds(clock()).isoformat(), "manual": _is_manual(clock)}


@router.put("/v1/clock", tags=["admin"], response_model=ClockSet,
            responses=problem_responses(400, 401, 403, 409, 422, 500, 503))
def put_clock(role: AdminRole, clock: ClockDep, body: ClockRequest) -> dict:
    """Move a manual clock forward (never backwards); 409 `clock_not_manual` otherwise."""
    if not _is_manual(clock):
        raise ClockNotManual("the service runs the system clock; set LEDGER_CLOCK=manual")
    current = clock()
    if body.now > current:
        clock.set(body.now)
    return {"now": utc_seconds(clock()).isoformat()}


def _is_manual(clock) -> bool:
    return callable(getattr(clock, "set", None))
