"""Per-request observation: request id, one JSON log line per request, request and event metrics.

`Observation` (the first step of the front middleware, api/front.py) accepts `X-Request-ID`
(1–128 of `A-Z a-z 0-9 . _ : -`, else a fresh one) and returns it on every answer, binds it to
every log line written during the request, and writes one line per request: method, path, route, status, duration, role, the
event ids and session ids involved, their outcomes and the problem code. Never headers, bodies
or keys. Routes report what happened to each event through `event_answered` (a contextvar
carries the request's record into the thread pool, where sync routes run).
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Mapping

import structlog
from starlette.types import Scope

log = structlog.get_logger("api.request")
_stdlib_log = logging.getLogger("api.request")  # the logger structlog's lines go through

REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_IDS_LOGGED = 100  # a batch holds at most 100 events
MAX_CHILDREN = 4096  # request metric children remembered (far above the routes' label sets)
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


class Observation:
    """Request ids, metrics and log lines of one app's requests, for the front middleware
    (api/front.py): `enter` before a request, `finish` and `leave` after it. `metrics`: the
    app's Metrics (or None); `pool_usage()`: the store's connection pool (or None)."""

    def __init__(self, metrics: Any = None, pool_usage: Any = None) -> None:
        self.metrics, self.pool_usage = metrics, pool_usage
        # (method, route, status) -> its request counter and duration histogram: prometheus'
        # `labels()` takes a lock and checks the labels on every call. Bounded: the routes'
        # templates (or "unmatched") × METHODS + OTHER × the statuses.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._pool_seen: dict[str, int] | None = None

    @staticmethod
    def enter(record: RequestRecord, request_id: str) -> tuple[Token, Mapping[str, Token]]:
        """Make `record` the current request's (for `event_answered`) and bind `request_id`
        to every log line written until `leave`."""
        return _current.set(record), structlog.contextvars.bind_contextvars(
            request_id=request_id)

    @staticmethod
    def leave(tokens: tuple[Token, Mapping[str, Token]]) -> None:
        """Undo `enter`."""
        structlog.contextvars.reset_contextvars(**tokens[1])
        _current.reset(tokens[0])

    def finish(self, scope: Scope, record: RequestRecord, status: int, seconds: float,
               route: str | None = None) -> None:
        """Count the request (`route`: its template, default the matched route's or
        "unmatched") and write its log line."""
        route = route or getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        if self.metrics is not None:
            self._count(method, route, status, seconds)
        level = _level(scope["path"], status)
        if not _stdlib_log.isEnabledFor(level):
            return  # the line would be dropped: do not build it
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

    def _count(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.metrics.requests.labels(method, route, str(status)),
                        self.metrics.request_seconds.labels(method, route))
            if len(self._children) < MAX_CHILDREN:
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if self.pool_usage is not None:
            usage = self.pool_usage()
            if usage != self._pool_seen:  # setting a gauge to its value changes nothing
                self.metrics.observe_pool(usage)
                self._pool_seen = usage


def request_id_of(candidate: str | None) -> str:
    """`candidate` (the request's X-Request-ID) if it is a valid request id, else a fresh one."""
    if candidate is not None and REQUEST_ID.match(candidate):
        return candidate
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
