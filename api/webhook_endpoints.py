"""Outbound webhooks over HTTP (admin only): `/v1/webhook-endpoints` (register, list, read,
change, rotate the secret, replay from a position) and `/v1/webhook-deliveries` (list with
filters, read one with its payload, retry). What is sent and how: docs/webhooks.md.

The notifier (`app.state.notifier`, notifications/) is opened by the composition root. A
secret is in the answer of a registration or a rotation only, never in a read.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from api.auth import AdminRole
from api.deps import state_dependency
from api.problems import ServiceUnavailable, problem_responses
from api.schemas import text
from ledger.input_rules import ID_MAX_LENGTH, ID_PATTERN
from notifications import EVENT_TYPES

router = APIRouter(tags=["webhooks"])
FAMILIES = tuple(sorted({t.split(".")[0] + ".*" for t in EVENT_TYPES}))
EventTypeName = Literal[EVENT_TYPES + FAMILIES]  # type: ignore[valid-type]
WebhookId = Annotated[str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN,
                                description="an endpoint or delivery id")]
Url = Annotated[str, Field(min_length=8, max_length=2000, pattern=r"^https?://[^\s]+$",
                           description="https:// URL (plain http only for hosts in "
                                       "LEDGER_WEBHOOK_ALLOW_HTTP_HOSTS)",
                           examples=["https://backend.example/webhooks/ledger"])]
EventTypes = Annotated[list[EventTypeName], Field(
    max_length=len(EVENT_TYPES) + len(FAMILIES),
    description="notification types to send (a family as `withdrawal.*`); empty: every type")]
Description = Annotated[str, text(500, "what the endpoint is for")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EndpointCreate(Strict):
    url: Url
    event_types: EventTypes = []
    description: Description | None = None
    enabled: StrictBool = True


class EndpointChange(Strict):
    url: Url | None = None
    event_types: EventTypes | None = None
    description: Description | None = None
    enabled: StrictBool | None = None


class Rotation(Strict):
    grace_seconds: StrictInt = Field(86_400, ge=0, le=7 * 86_400, description=(
        "how long the previous secret still signs deliveries (both signatures are sent)"))


class Replay(Strict):
    from_position: StrictInt = Field(ge=0, le=2**63 - 1,
                                     description="log position (`position` of a notification) "
                                                 "to send from, inclusive")
    limit: StrictInt = Field(10_000, ge=1, le=100_000, description="notifications per call; "
                                                             "`next_position` continues")


class EndpointView(BaseModel):
    id: str
    url: str
    description: str
    event_types: list[str]
    enabled: bool
    start_position: int = Field(description="notifications of events after this log position "
                                            "are sent (earlier ones on replay)")
    previous_secret_valid_until: str | None
    created_at: str
    updated_at: str


class EndpointWithSecret(EndpointView):
    secret: str = Field(description="`whsec_…`: shown once; verify deliveries with it")


class EndpointList(BaseModel):
    endpoints: list[EndpointView]


class DeliveryView(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    webhook_id: str = Field(description="the `webhook-id` header: the same on every attempt")
    endpoint_id: str
    event_type: str
    ordering_key: str
    position: int
    status: Literal["pending", "retrying", "delivered", "dead"]
    attempts: int


class DeliveryList(BaseModel):
    deliveries: list[DeliveryView]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class ReplayResult(BaseModel):
    endpoint_id: str
    from_position: int
    deliveries: int
    next_position: int | None


def get_notifier(request: Request) -> Any:
    notifier = getattr(request.app.state, "notifier", None)
    if notifier is None:
        raise ServiceUnavailable("the webhook notifier is not open")
    return notifier


NotifierDep = Annotated[Any, state_dependency(get_notifier)]
RESPONSES = problem_responses(400, 401, 403, 404, 422, 500, 503)


def _view(notifier: Any, endpoint: Any) -> dict:
    return endpoint.view(notifier.clock())


@router.post("/v1/webhook-endpoints", status_code=201, response_model=EndpointWithSecret,
             responses=RESPONSES)
def create_endpoint(role: AdminRole, notifier: NotifierDep, body: EndpointCreate) -> dict:
    """Register an endpoint; the answer carries its signing secret, shown once. It receives
    the notifications of events committed from now on."""
    endpoint, secret = notifier.create_endpoint(body.url, list(body.event_types),
                                                body.description or "", body.enabled)
    return {**_view(notifier, endpoint), "secret": secret}


@router.get("/v1/webhook-endpoints", response_model=EndpointList, responses=RESPONSES)
def list_endpoints(role: AdminRole, notifier: NotifierDep) -> dict:
    """Every endpoint, in creation order (no secrets)."""
    return {"endpoints": [_view(notifier, e) for e in notifier.endpoints.all()]}


@router.get("/v1/webhook-endpoints/{endpoint_id}", response_model=EndpointView,
            responses=RESPONSES)
def get_endpoint(endpoint_id: WebhookId, role: AdminRole, notifier: NotifierDep) -> dict:
    """One endpoint (no secret); 404 `unknown_webhook_endpoint`."""
    return _view(notifier, notifier.endpoints.get(endpoint_id))


@router.patch("/v1/webhook-endpoints/{endpoint_id}", response_model=EndpointView,
              responses=RESPONSES)
def change_endpoint(endpoint_id: WebhookId, role: AdminRole, notifier: NotifierDep,
                    body: EndpointChange) -> dict:
    """Change the URL, types, description or `enabled` (a disabled endpoint is sent nothing;
    its undelivered notifications wait until it is enabled again)."""
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    return _view(notifier, notifier.endpoints.update(endpoint_id, changes))


@router.post("/v1/webhook-endpoints/{endpoint_id}/rotate-secret",
             response_model=EndpointWithSecret, responses=RESPONSES)
def rotate_secret(endpoint_id: WebhookId, role: AdminRole, notifier: NotifierDep,
                  body: Annotated[Rotation | None, Body()] = None) -> dict:
    """A new signing secret (shown once); the previous one signs too for `grace_seconds`."""
    grace = timedelta(seconds=(body or Rotation()).grace_seconds)
    endpoint, secret = notifier.endpoints.rotate(endpoint_id, grace)
    return {**_view(notifier, endpoint), "secret": secret}


@router.post("/v1/webhook-endpoints/{endpoint_id}/replay", response_model=ReplayResult,
             responses=RESPONSES)
def replay_endpoint(endpoint_id: WebhookId, role: AdminRole, notifier: NotifierDep,
                    body: Replay) -> dict:
    """Send the endpoint every notification it subscribes to from `from_position` on, again
    if already sent (same webhook-ids: receivers deduplicate), in order per session."""
    return notifier.replay(endpoint_id, body.from_position, body.limit)


@router.get("/v1/webhook-deliveries", response_model=DeliveryList, responses=RESPONSES)
def list_deliveries(
    role: AdminRole, notifier: NotifierDep,
    endpoint_id: Annotated[str | None, Query(max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)] = None,
    status: Annotated[Literal["pending", "retrying", "delivered", "dead"] | None, Query()] = None,
    event_type: Annotated[Literal[EVENT_TYPES] | None, Query()] = None,  # type: ignore[valid-type]
    # position and ordinal: at most 18 digits, so both fit the stores' 64-bit integers
    cursor: Annotated[str | None, Query(max_length=300,
                                        pattern=r"^\d{1,18}:\d{1,18}:[A-Za-z0-9_]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict:
    """Deliveries in log order, filtered by endpoint, status and notification type."""
    after = None
    if cursor is not None:
        position, ordinal, endpoint = cursor.split(":", 2)
        after = (int(position), int(ordinal), endpoint)
    rows = notifier.deliveries(endpoint_id=endpoint_id, status=status, event_type=event_type,
                               cursor=after, limit=limit)
    last = rows[-1] if len(rows) == limit else None
    return {"deliveries": rows,
            "next_cursor": f"{last['position']}:{last['ordinal']}:{last['endpoint_id']}"
            if last else None}


@router.get("/v1/webhook-deliveries/{delivery_id}", responses=RESPONSES)
def get_delivery(delivery_id: WebhookId, role: AdminRole, notifier: NotifierDep) -> dict:
    """One delivery, its attempts' outcome and the payload as sent; 404
    `unknown_webhook_delivery`."""
    return notifier.delivery(delivery_id)


@router.post("/v1/webhook-deliveries/{delivery_id}/retry", responses=RESPONSES)
def retry_delivery(delivery_id: WebhookId, role: AdminRole, notifier: NotifierDep) -> JSONResponse:
    """Send the delivery again now (a dead or delivered one too), same webhook-id, with a fresh
    retry window; 202 with the delivery."""
    return JSONResponse(notifier.retry(delivery_id), status_code=202)
