"""The FastAPI application: `create_app(settings, clock=...)`.

The lifespan builds, per process, the clock, the Ledger application, the Projector and (if
`settings.tick_enabled`) the in-process tick scheduler, keeps them in `app.state`, and closes
them in reverse order on shutdown. OpenAPI at /openapi.json, docs at /docs.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.auth import AuthenticationMiddleware
from api.problems import add_problem_schema, install_problem_handlers
from api.routes import router
from api.webhooks import router as webhook_router
from service.clock import ManualClock, SystemClock
from service.settings import Settings

log = logging.getLogger("api")

ProjectorFactory = Callable[[Any, str, Any], Any]  # (ledger, database_url, policy) -> Projector


def _build_clock(settings: Settings):
    if settings.clock == "manual":
        return ManualClock(datetime.now(timezone.utc).replace(microsecond=0))
    return SystemClock()


def _start_scheduler(state) -> Any | None:
    try:
        from scheduler.service import start_scheduler
    except ImportError:
        log.warning("tick_enabled but scheduler.service is unavailable; no in-process tick")
        return None
    return start_scheduler(state)


def create_app(settings: Settings | None = None, *, clock: Callable[[], datetime] | None = None,
               projector_factory: ProjectorFactory | None = None) -> FastAPI:
    """The HTTP API. `clock` overrides the clock chosen by `settings.clock` (tests pass one);
    `projector_factory(ledger, database_url, policy)` overrides `projections.Projector`."""
    settings = settings or Settings()
    api_keys = settings.api_key_roles()  # fail fast on a malformed LEDGER_API_KEYS

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from service.bootstrap import open_ledger

        state = app.state
        state.clock = clock if clock is not None else _build_clock(settings)
        state.ledger = state.projector = state.scheduler = None
        try:
            state.ledger, state.projector = open_ledger(settings, state.clock, projector_factory)
            try:
                state.projector.catch_up()
            except Exception:  # noqa: BLE001 - reads may lag; the next write or tick retries
                log.exception("initial projection catch-up failed")
            if settings.tick_enabled:
                state.scheduler = _start_scheduler(state)
            yield
        finally:
            for name in ("scheduler", "projector", "ledger"):
                resource = getattr(state, name, None)
                if resource is None:
                    continue
                try:
                    resource.shutdown() if name == "scheduler" else resource.close()
                except Exception:  # noqa: BLE001 - close the rest regardless
                    log.exception("error closing %s", name)
                setattr(state, name, None)

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
    install_problem_handlers(app)
    app.add_middleware(AuthenticationMiddleware, keys=api_keys)
    app.include_router(router)
    app.include_router(webhook_router)  # /webhooks/*: provider signatures, not API keys

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            app.openapi_schema = add_problem_schema(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
