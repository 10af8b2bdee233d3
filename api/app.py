"""The FastAPI application: `build_app(settings, lifespan)`.

The HTTP edge only: routes, webhooks, authentication and problem details. What runs behind it
(the Ledger, the Projector, the clock, the tick) is opened by the caller's `lifespan` and kept in
`app.state` (`ledger`, `projector`, `clock`, `tick`); the composition root (runtime/asgi.py)
supplies it. OpenAPI at /openapi.json, docs at /docs.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.audit_routes import router as audit_router
from api.front import Front
from api.observe import Observation
from api.ops import router as ops_router
from api.problems import add_problem_schema, install_problem_handlers
from api.marketplace_routes import router as marketplace_router
from api.routes import post_events_direct, router
from api.webhook_endpoints import router as webhook_endpoints_router
from api.webhooks import router as webhook_router
from observability import Metrics
from storage import pool_usage


def build_app(settings: Any, lifespan: Callable[[FastAPI], Any]) -> FastAPI:
    """The HTTP API. `settings` provides `api_key_roles()`, `batch_limit`, `max_body_bytes`,
    `retry_after_seconds`, the readiness bounds and the provider credentials
    (api/providers/base.py `ProviderSettings`); raises ValueError on malformed keys.
    `app.state.metrics` is this app's Metrics (the lifespan gives it to the tick)."""
    api_keys = settings.api_key_roles()  # fail fast on a malformed LEDGER_API_KEYS
    app = FastAPI(
        title="Telehealth billing ledger",
        version="0.1.0",
        description=(
            "Event-sourced billing ledger. Post backend events to `/v1/events`; read sessions, "
            "balances and wallets. Errors are `application/problem+json` (RFC 9457) with a "
            "stable `code`. Authenticate with `Authorization: Bearer <key>` or `X-API-Key`."),
        lifespan=lifespan,
        docs_url="/docs",
    )
    app.state.settings = settings
    app.state.api_keys = api_keys
    app.state.metrics = Metrics()
    install_problem_handlers(app)
    # One middleware: observation (request id, log line, metrics) of every answer, including
    # its own 500/503 for unexpected errors, 413 for a body over the cap and 401; and the
    # direct route of POST /v1/events (api/front.py).
    app.add_middleware(Front, keys=api_keys, max_bytes=settings.max_body_bytes,
                       retry_after_seconds=settings.retry_after_seconds,
                       observation=Observation(app.state.metrics, lambda: _pool_usage(app)),
                       direct=post_events_direct)
    app.include_router(router)
    app.include_router(audit_router)  # /v1/audit/digest, statements (docs/audit.md)
    app.include_router(webhook_endpoints_router)  # /v1/webhook-endpoints, /v1/webhook-deliveries
    app.include_router(marketplace_router)  # priced consultations and money wallets (§10)
    app.include_router(ops_router)  # /readyz, /metrics
    app.include_router(webhook_router)  # /webhooks/*: provider signatures, not API keys

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            app.openapi_schema = add_problem_schema(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _pool_usage(app: FastAPI) -> dict[str, int] | None:
    ledger = getattr(app.state, "ledger", None)
    return pool_usage(ledger.recorder.datastore) if ledger is not None else None
