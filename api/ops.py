"""The operator's endpoints: `GET /readyz` (readiness, no key) and `GET /metrics` (Prometheus,
API key with role `metrics`, `auditor` or `admin`). `GET /healthz` (liveness) is in routes.py.

Readiness checks, each with its reason when it fails (docs/operations.md, "Health"):
- `store`: the event store answers (the head's notification id is read);
- `projections`: no projection is stalled and the lag is within `ready_max_lag_events` events
  and `ready_max_lag_seconds` seconds;
- `scheduler`: where the tick is enabled, its scheduler is running.
"""

from __future__ import annotations

from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from api.auth import require
from api.problems import NotReady, error_problem, problem_response, problem_responses
from observability import ProjectionCollector, WebhookCollector
from observability.metrics import CONTENT_TYPE
from storage import is_unavailable

log = structlog.get_logger("api.ops")
router = APIRouter(tags=["operations"])
MetricsRole = Annotated[str, Depends(require({"metrics", "auditor", "admin"}))]


class Readiness(BaseModel):
    status: str
    checks: dict[str, dict[str, Any]]


@router.get("/readyz", response_model=Readiness, responses=problem_responses(503))
def readyz(request: Request):
    """Readiness: 200 when the store answers, projections keep up and the scheduler runs;
    else 503 `not_ready` with `checks` saying which failed and why."""
    state = request.app.state
    checks = {"store": _store_check(state), "projections": _projection_check(state),
              "scheduler": _scheduler_check(state)}
    failing = [f"{name}: {check['reason']}" for name, check in checks.items() if not check["ok"]]
    if not failing:
        return {"status": "ready", "checks": checks}
    body = error_problem(NotReady("; ".join(failing), checks=checks), request.url.path)
    return problem_response(body, headers={"Retry-After": str(state.settings.retry_after_seconds)})


def _store_check(state) -> dict:
    ledger = getattr(state, "ledger", None)
    if ledger is None:
        return {"ok": False, "reason": "the ledger is not open (starting or stopping)"}
    try:
        head = int(ledger.recorder.max_notification_id() or 0)
    except Exception as exc:  # noqa: BLE001 - reported as the reason
        reason = "event store unreachable" if is_unavailable(exc) else "event store error"
        log.warning("readiness: store check failed", reason=reason,
                    error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return {"ok": False, "reason": reason}
    return {"ok": True, "head": head}


def _projection_check(state) -> dict:
    projector = getattr(state, "projector", None)
    if projector is None:
        return {"ok": False, "reason": "the projector is not open"}
    try:
        health = projector.health()
    except Exception as exc:  # noqa: BLE001 - reported as the reason
        reason = "projections unreadable: store unreachable" if is_unavailable(exc) \
            else "projections unreadable"
        return {"ok": False, "reason": reason}
    settings = state.settings
    reason = None
    if health["stalled"] is not None:
        stalled = health["stalled"]
        reason = (f"projection {stalled.get('projection', '?')} stalled at position "
                  f"{stalled['position']} (event {stalled.get('event_id')}, topic "
                  f"{stalled['topic']}): {stalled['error']}")
    elif health["lag_events"] > settings.ready_max_lag_events:
        reason = f"lagging {health['lag_events']} events (bound {settings.ready_max_lag_events})"
    elif (health["lag_seconds"] or 0) > settings.ready_max_lag_seconds:
        reason = (f"lagging {health['lag_seconds']:.1f} s "
                  f"(bound {settings.ready_max_lag_seconds} s)")
    return {"ok": reason is None, **health, **({"reason": reason} if reason else {})}


def _scheduler_check(state) -> dict:
    if not state.settings.tick_enabled:
        return {"ok": True, "enabled": False}
    scheduler = getattr(state, "scheduler", None)
    if scheduler is None or not getattr(scheduler, "running", False):
        return {"ok": False, "enabled": True, "reason": "the tick scheduler is not running"}
    return {"ok": True, "enabled": True, "last_tick": getattr(scheduler, "last_outcome", None)}


@router.get("/metrics", response_class=Response, include_in_schema=True,
            responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"},
                       **problem_responses(401, 403)})
def metrics(request: Request, role: MetricsRole) -> Response:
    """Prometheus metrics of every worker (docs/operations.md lists them)."""
    state = request.app.state
    projector = getattr(state, "projector", None)
    extra = [ProjectionCollector(projector.health)] if projector is not None else []
    notifier = getattr(state, "notifier", None)
    if notifier is not None:
        extra.append(WebhookCollector(notifier.health))
    return Response(state.metrics.exposition(extra), media_type=CONTENT_TYPE)
