"""Per-request observation: request id, one JSON log line per request, request and event metrics.

`RequestObservation` (outermost middleware) accepts `X-Request-ID` (1–128 of `A-Z a-z 0-9 . _ :
-`, else a fresh one) and returns it on every answer, binds it to every log line written during
the request, and writes one line per request: method, path, route, status, duration, role, the
event ids and session ids involved, their outcomes and the problem code. Never headers, bodies
or keys. Routes report what happened to each event through `event_answered` (a contextvar
carries the request's record into the thread pool, where sync routes run).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("api.request")

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_IDS_LOGGED = 100  # a batch holds at most 100 events
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})  # logged at debug unless they fail


@dataclass
class RequestRecord:
    """What a request did, filled in by the routes: events answered and the problem code."""

    metrics: Any
    event_ids: list[str] = field(default_factory=list)
    session_ids: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    code: str | None = None


_current: ContextVar[RequestRecord | None] = ContextVar("ledger_request_record", default=None)


def event_answered(event_type: str, event_id: str, session_id: str | None, outcome: str,
                   code: str | None = None) -> None:
    """Record one event's answer: outcome `accepted`, `replayed` or `refused` (with `code`)."""
    record = _current.get()
    if record is None:
        return
    if record.metrics is not None:
        record.metrics.events.labels(event_type, outcome, code or "").inc()
        if code == "retry_later":
            record.metrics.retry_later.labels("conflicts").inc()
    if len(record.event_ids) < MAX_IDS_LOGGED:
        record.event_ids.append(event_id)
    if session_id and session_id not in record.session_ids and \
            len(record.session_ids) < MAX_IDS_LOGGED:
        record.session_ids.append(session_id)
    key = f"{outcome}:{code}" if code else outcome
    record.outcomes[key] = record.outcomes.get(key, 0) + 1


def problem_answered(code: str) -> None:
    """Record the problem code of the request's answer (for its log line)."""
    record = _current.get()
    if record is not None:
        record.code = code


def store_unavailable_answered() -> None:
    """Count a 503 retry_later given because the store is unreachable."""
    record = _current.get()
    if record is not None and record.metrics is not None:
        record.metrics.retry_later.labels("store_unavailable").inc()


class RequestObservation:
    """Outermost middleware: request id, metrics and the request's log line."""

    def __init__(self, app: ASGIApp, metrics: Any = None,
                 pool_usage: Any = None) -> None:
        self.app, self.metrics, self.pool_usage = app, metrics, pool_usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        record = RequestRecord(metrics=self.metrics)
        status = {"value": 500}
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["value"] = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        token = _current.set(record)
        started = time.perf_counter()
        try:
            with structlog.contextvars.bound_contextvars(request_id=request_id):
                try:
                    await self.app(scope, receive, send_with_id)
                finally:
                    self._finish(scope, record, status["value"], time.perf_counter() - started)
        finally:
            _current.reset(token)

    def _finish(self, scope: Scope, record: RequestRecord, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        if self.metrics is not None:
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.request_seconds.labels(method, route).observe(seconds)
            if self.pool_usage is not None:
                self.metrics.observe_pool(self.pool_usage())
        level = _level(scope["path"], status)
        fields: dict[str, Any] = {
            "method": method, "path": scope["path"], "route": route, "status": status,
            "duration_ms": round(seconds * 1000, 2), "outcome": _outcome(status),
            "role": (scope.get("state") or {}).get("role")}
        if record.event_ids:
            fields.update(event_ids=record.event_ids, events=record.outcomes)
        if record.session_ids:
            fields["session_ids"] = record.session_ids
        if record.code:
            fields["code"] = record.code
        log.log(level, "request", **fields)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 503:
        return "retry_later"
    return "refused" if status < 500 else "error"


def _level(path: str, status: int) -> int:
    if status >= 500:
        return logging.ERROR if status != 503 else logging.WARNING
    return logging.DEBUG if path in PROBES else logging.INFO
