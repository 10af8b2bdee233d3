"""Provider webhooks: `POST /webhooks/twilio/voice`, `/webhooks/twilio/video`, `/webhooks/livekit`.

Outside `/v1` on purpose: the API-key middleware guards only `/v1`; these authenticate by the
provider's signature instead. One route per registered adapter (api/providers/__init__.py).
Answers:
- 200 `{...ledger result, "replayed": bool}`: recorded now, or a redelivery (replayed);
- 200 `{"ignored": reason}`: verified but not for the ledger (other event, room not ours);
- 403 `invalid_signature`, 503 `provider_not_configured`, 422 `validation_error`,
  413 `payload_too_large` (over 64 KiB), and the
  ledger's own refusals (404 `unknown_session`, 409 `session_settled`, …): nothing recorded.

A translated event is validated by the same schema as a posted one (api/schemas.py, the rule of
ledger/input_rules.py): a room name, participant identity or timestamp no event may carry (a
control character, an id outside the alphabet, an instant outside its window) is refused with
422 `validation_error` and nothing is recorded.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.observe import event_answered
from api.problems import PayloadTooLarge, ProviderNotConfigured, ValidationFailed, validation_errors
from api.providers import PROVIDERS, Ignored, LedgerEvent, Provider, WebhookRequest
from api.routes import catch_up, get_ledger
from api.schemas import parse_event
from ledger.errors import LedgerError

log = logging.getLogger("api")

router = APIRouter(tags=["webhooks"])

# Callbacks are a few kB; the routes are open to anyone until the signature is checked, so a
# body is never buffered past this.
MAX_BODY_BYTES = 64 * 1024


def handle(request: Request, provider: Provider, hook: WebhookRequest) -> JSONResponse:
    """Verify, translate and ingest one delivery (blocking: runs in the thread pool)."""
    settings = request.app.state.settings
    if not provider.configured(settings):
        raise ProviderNotConfigured(f"{provider.name} has no credentials in the settings")
    message = provider.verify(hook, settings)  # before anything else reads the body
    outcome = provider.translate(message, hook)
    if isinstance(outcome, Ignored):
        log.info("%s callback ignored: %s", provider.name, outcome.reason)
        return JSONResponse({"ignored": outcome.reason})
    checked = validated(outcome)
    session_id = outcome.payload.get("session_id")
    try:
        accepted = get_ledger(request).ingest(checked.event_id, checked.type,
                                              checked.occurred_at, outcome.payload)
    except LedgerError as exc:
        event_answered(checked.type, checked.event_id, session_id, "refused", exc.code)
        raise
    event_answered(checked.type, checked.event_id, session_id,
                   "replayed" if accepted.replayed else "accepted")
    if not accepted.replayed:
        catch_up(request)
    headers = {"Idempotent-Replayed": "true"} if accepted.replayed else None
    return JSONResponse({**accepted.result, "replayed": accepted.replayed}, headers=headers)


def validated(event: LedgerEvent):
    """The translated event checked by the schema of `POST /v1/events` (one rule for every
    door); raises ValidationFailed (422) with the field errors."""
    try:
        return parse_event({"event_id": event.event_id, "type": event.type,
                            "occurred_at": event.occurred_at.isoformat(),
                            "payload": event.payload})
    except ValidationError as exc:
        raise ValidationFailed("the callback's event breaks the ledger's input rules",
                               errors=validation_errors(exc.errors())) from None


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body; raises PayloadTooLarge (413) past `limit` bytes without reading on."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"webhook bodies are at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _endpoint(provider: Provider) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def receive(request: Request) -> JSONResponse:
        # The raw body is needed as signed (LiveKit hashes it byte for byte), hence async.
        hook = WebhookRequest(path=request.url.path, query=request.url.query,
                              headers=dict(request.headers), body=await read_body(request))
        return await run_in_threadpool(handle, request, provider, hook)

    receive.__doc__ = f"Signed {provider.name} callbacks (docs/providers.md)."
    return receive


for _provider in PROVIDERS:
    # Not in the OpenAPI: providers, not API clients, call these, and their bodies are the
    # providers' formats (documented in docs/providers.md).
    router.add_api_route(_provider.path, _endpoint(_provider), methods=["POST"],
                         name=f"webhook_{_provider.name}", include_in_schema=False)
