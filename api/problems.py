"""RFC 9457 problem details: the one place that turns errors into `application/problem+json`.

Every refusal the API gives is a problem object with `type` (a relative URI `/problems/<code>`),
`title`, `status`, `detail`, the stable `code`, the request path as `instance`, and any extension
members of the error (`LedgerError.extra`, e.g. `available_minor`; `errors` for validation).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.routing import Match
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from api.observe import problem_answered, store_unavailable_answered
from ledger.errors import ERROR_CODES, LedgerError, RetryLater, error_type
from storage import is_unavailable

log = logging.getLogger("api")
# A code returned without being registered is logged here; the test suite fails on it.
unregistered_log = logging.getLogger("api.error_codes")

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "/problems/"


class Problem(BaseModel):
    """A problem details object (RFC 9457) with the ledger's `code` extension."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    type: str = Field(description="relative URI identifying the problem type: /problems/<code>",
                      examples=["/problems/insufficient_units"])
    title: str
    status: int = Field(ge=100, le=599)
    detail: str
    code: str = Field(description="stable machine-readable code", examples=["insufficient_units"])
    instance: str | None = None


# ------------------------------------------------------------------------ API-level errors


class ApiError(LedgerError):
    """Refusals raised by the HTTP layer itself; same shape as the ledger's own."""

    headers: dict[str, str] | None = None

    def __init__(self, detail: str = "", *, headers: dict[str, str] | None = None,
                 **extra: object) -> None:
        super().__init__(detail, **extra)
        if headers:
            self.headers = headers


def _api_error(name: str, code: str, status: int, title: str, when: str = "") -> type[ApiError]:
    return error_type(name, code, status, title, base=ApiError,  # type: ignore[return-value]
                      when=when)


Unauthenticated = _api_error("Unauthenticated", "unauthenticated", 401,
                             "Missing or unknown API key",
                             when="no API key, or one the service does not know")
Forbidden = _api_error("Forbidden", "forbidden", 403, "The API key's role does not allow this",
                       when="the API key's role may not do this (e.g. an auditor posting, "
                            "a backend posting an admin-only type); a tick-only type, by anyone")
ValidationFailed = _api_error(
    "ValidationFailed", "validation_error", 422, "Request body is invalid",
    when="the request breaks the schema or the door's rules (ledger/input_rules.py): "
         "`errors` lists each field (`loc`, `msg`, `type`)")
AsOfOutOfRange = _api_error(
    "AsOfOutOfRange", "as_of_out_of_range", 422, "as_of is outside the window of the clock",
    when="a tick's `as_of` is outside [now − 35 days, now + 5 minutes] of the service clock")
ClockNotManual = _api_error("ClockNotManual", "clock_not_manual", 409,
                            "The service does not run a manual clock",
                            when="`PUT /v1/clock` on a service running the system clock")
ServiceUnavailable = _api_error("ServiceUnavailable", "service_unavailable", 503,
                                "The service is not ready",
                                when="the service is starting or stopping: retry")
InvalidSignature = _api_error("InvalidSignature", "invalid_signature", 403,
                              "The provider's signature is missing or invalid",
                              when="a provider webhook whose signature is missing or wrong")
PayloadTooLarge = _api_error("PayloadTooLarge", "payload_too_large", 413,
                             "The request body is too large",
                             when="the request body is larger than the limit "
                                  "(`LEDGER_MAX_BODY_BYTES`, 1 MiB; `max_bytes` says it)")
ProviderNotConfigured = _api_error("ProviderNotConfigured", "provider_not_configured", 503,
                                   "This call provider is not configured",
                                   when="a provider webhook whose credentials are not set")
NotReady = _api_error("NotReady", "not_ready", 503, "The service is not ready",
                      when="`GET /readyz`: the store, the projections or the scheduler is not "
                           "ready; `checks` says which and why")
ProjectionsBehindRead = _api_error(
    "ProjectionsBehindRead", "projections_behind", 503, "The read model is not yet current",
    when="a read of a projection (balance, wallet, money wallet, platform accounts) whose "
         "projection did not reach `min_position` (default: the head when the read began) "
         "within `LEDGER_READ_WAIT_SECONDS`, or is stalled at an event it cannot apply: retry "
         "after `Retry-After`; `position` says how far it is")
InternalError = _api_error("InternalError", "internal_error", 500, "Internal server error",
                           when="an unexpected error; it is logged, nothing is recorded for it")
# What the framework itself answers (routing, body parsing), by status.
BadRequest = _api_error("BadRequest", "bad_request", 400, "Bad Request",
                        when="the body could not be read")
NotFound = _api_error("NotFound", "not_found", 404, "Not Found", when="no such route")
MethodNotAllowed = _api_error("MethodNotAllowed", "method_not_allowed", 405,
                              "Method Not Allowed",
                              when="the route does not take this method (see `Allow`)")
NotAcceptable = _api_error("NotAcceptable", "not_acceptable", 406, "Not Acceptable",
                           when="the `Accept` header excludes JSON")
UnsupportedMediaType = _api_error("UnsupportedMediaType", "unsupported_media_type", 415,
                                  "Unsupported Media Type",
                                  when="the body's content type is not one the route reads")
TooManyRequests = _api_error("TooManyRequests", "too_many_requests", 429, "Too Many Requests",
                             when="too many requests: retry after `Retry-After`")
HttpError = _api_error("HttpError", "http_error", 400, "Request refused",
                       when="any other refusal by the HTTP framework (status as given)")

# ------------------------------------------------------------------------------ building


def problem_body(code: str, status: int, title: str, detail: str,
                 instance: str | None = None, **extra: Any) -> dict:
    """A problem object; `code` must be in the registry (ledger.errors.ERROR_CODES) with this
    `status`: an unregistered one is logged as an error (and fails the test suite)."""
    known = ERROR_CODES.get(code)
    if known is None or (status not in known.statuses and code != HttpError.code):
        unregistered_log.error("problem code %r (status %d) is not in the error-code registry "
                               "(ledger/errors.py ERROR_CODES)", code, status)
    body = {"type": PROBLEM_BASE + code, "title": title, "status": status,
            "detail": detail, "code": code}
    if instance is not None:
        body["instance"] = instance
    for key, value in extra.items():
        body.setdefault(key, value)  # extensions never overwrite the standard members
    return body


def error_problem(exc: LedgerError, instance: str | None = None) -> dict:
    """The problem object of a LedgerError (ledger refusals and ApiError alike)."""
    return problem_body(exc.code, exc.status, exc.title, exc.detail, instance,
                        **_jsonable(exc.extra))


def problem_response(body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    problem_answered(body["code"])
    return JSONResponse(body, status_code=body["status"], media_type=PROBLEM_MEDIA_TYPE,
                        headers=headers)


def error_response(exc: LedgerError, instance: str | None = None) -> JSONResponse:
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status == 503:
        headers.setdefault("Retry-After", "1")
    return problem_response(error_problem(exc, instance), headers or None)


def validation_errors(errors: Any) -> list[dict]:
    """Pydantic errors made JSON-safe and small: loc, msg, type (+ ctx), never the input."""
    out = []
    for err in errors:
        item = {"loc": [p if isinstance(p, (str, int)) else str(p) for p in err.get("loc", ())],
                "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        if err.get("ctx"):
            item["ctx"] = _jsonable(err["ctx"])
        out.append(item)
    return out


def validation_problem(errors: Any, instance: str | None = None,
                       detail: str = "The request body failed validation") -> dict:
    return problem_body("validation_error", 422, ValidationFailed.title, detail, instance,
                        errors=validation_errors(errors))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# ------------------------------------------------------------------------------ handlers


def _ledger_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LedgerError)
    return error_response(exc, request.url.path)


def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return problem_response(validation_problem(exc.errors(), request.url.path))


_HTTP_ERRORS: dict[int, type[ApiError]] = {
    e.status: e for e in (BadRequest, Unauthenticated, Forbidden, NotFound, MethodNotAllowed,
                          NotAcceptable, PayloadTooLarge, UnsupportedMediaType, ValidationFailed,
                          TooManyRequests, ServiceUnavailable)}


def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    code = _HTTP_ERRORS[status].code if status in _HTTP_ERRORS \
        else InternalError.code if status >= 500 else HttpError.code
    detail = exc.detail if isinstance(exc.detail, str) else title
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return problem_response(problem_body(code, status, title, detail, request.url.path),
                            headers=headers or None)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette only names the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        match_any, _ = route.matches(request.scope)
        if match != Match.NONE or match_any != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def unavailable_response(path: str, retry_after_seconds: int) -> JSONResponse:
    """503 `retry_later` while the store is unreachable: nothing was decided that a retry of
    the same request (same event ids) would repeat."""
    store_unavailable_answered()
    return problem_response(problem_body(
        RetryLater.code, 503, "The event store is unreachable; retry",
        "The ledger's database cannot be reached right now. Retry the same request (with the "
        "same event ids) after Retry-After seconds: an event already recorded is answered as a "
        "replay, never applied twice.", path), headers={"Retry-After": str(retry_after_seconds)})


def unexpected_error_response(scope: Scope, exc: Exception,
                              retry_after_seconds: int) -> JSONResponse:
    """The answer to an exception no handler took, before any of the response was sent (the
    front middleware, api/front.py): 503 `retry_later` if the store is unreachable, else 500
    `internal_error`, logged with its traceback. Unlike Starlette's outermost error middleware
    the front does not re-raise after answering, so the server keeps the connection and the
    client's next request on it is served normally."""
    if is_unavailable(exc):
        log.warning("store unreachable on %s %s: %s", scope["method"], scope["path"],
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return unavailable_response(scope["path"], retry_after_seconds)
    log.exception("unexpected error on %s %s", scope["method"], scope["path"], exc_info=exc)
    return error_response(InternalError("An unexpected error occurred; it has been logged"),
                          scope["path"])


def install_problem_handlers(app: FastAPI) -> None:
    """Problem details for ledger refusals, validation and HTTP errors; everything else is
    answered by the front middleware (api/front.py, `unexpected_error_response`)."""
    app.add_exception_handler(LedgerError, _ledger_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)


# ----------------------------------------------------------------------- OpenAPI declaration

def _codes_with(status: int) -> list[str]:
    return sorted(c.code for c in ERROR_CODES.values() if status in c.statuses)


def problem_responses(*statuses: int) -> dict[int | str, dict]:
    """`responses=` entries declaring `application/problem+json` for these statuses, each
    described by the registered codes that come with it."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {status: {"description": f"{HTTPStatus(status).phrase}: "
                                    + ", ".join(f"`{c}`" for c in _codes_with(status)),
                     "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}}}
            for status in statuses}


def error_code_table() -> str:
    """The registry as a Markdown table (status, code, when), for the OpenAPI description."""
    rows = sorted(ERROR_CODES.values(), key=lambda c: (c.statuses[0], c.code))
    lines = ["| status | code | when |", "|---|---|---|"]
    lines += [f"| {' / '.join(map(str, c.statuses))} | `{c.code}` | {c.when} |" for c in rows]
    return "\n".join(lines)


def add_problem_schema(openapi_schema: dict) -> dict:
    """Put the Problem schema in components (the responses above refer to it by $ref), its
    `code` restricted to the registry, and the registry's table in the API description."""
    schemas = openapi_schema.setdefault("components", {}).setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    problem["properties"]["code"]["enum"] = sorted(ERROR_CODES)
    schemas["Problem"] = problem
    info = openapi_schema.setdefault("info", {})
    info["description"] = (info.get("description", "") + "\n\n## Error codes\n\n"
                           + error_code_table())
    return openapi_schema
