"""The call-provider adapter protocol and the helpers the adapters share.

An adapter turns one signed provider callback into at most one ledger event. It never decides
billing: the ledger derives Connected and Ended from the presence events itself. Adapters see a
framework-free `WebhookRequest`, so they can be tested and swapped without FastAPI.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Mapping, Protocol
from urllib.parse import parse_qsl

from starlette.datastructures import ImmutableMultiDict
from twilio.request_validator import RequestValidator

from api.problems import InvalidSignature, ValidationFailed
from ledger.input_rules import id_problem

log = logging.getLogger("api.providers")

MAX_TOKEN_CHARS = 128  # event ids are kept forever; an unsigned header must not make them huge
ROOM_PREFIX = "call_"  # room names are call_<ledger session id> (the legacy platform's call_{id})


class ProviderSettings(Protocol):
    """The settings the adapters read (runtime/settings.py `Settings` provides them)."""

    public_base_url: str | None
    twilio_auth_token: Any  # pydantic SecretStr or None
    livekit_api_key: str | None
    livekit_api_secret: Any  # pydantic SecretStr or None


@dataclass(frozen=True)
class WebhookRequest:
    """One delivery as received: `path` ("/webhooks/livekit"), the raw `query` string ("" if
    none), `headers` with lower-case names, and the raw `body` bytes."""

    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class LedgerEvent:
    """What `Ledger.ingest` takes: `occurred_at` is the provider's time (aware UTC), never the
    arrival time; `payload` holds only JSON strings."""

    event_id: str
    type: str
    occurred_at: datetime
    payload: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ignored:
    """A verified callback the ledger has no use for; answered 200 `{"ignored": reason}`."""

    reason: str


class Provider(Protocol):
    """One call provider. `name` ("twilio-video") prefixes event ids and is the presence
    events' `provider`; `path` is its webhook route (outside /v1: no API key)."""

    name: str
    path: str

    def configured(self, settings: ProviderSettings) -> bool:
        """Whether the settings hold what `verify` needs."""

    def verify(self, request: WebhookRequest, settings: ProviderSettings) -> Any:
        """The verified message; raises api.problems.InvalidSignature (403)."""

    def translate(self, message: Any, request: WebhookRequest) -> LedgerEvent | Ignored:
        """The ledger event of a verified message; raises ValidationFailed (422) when a signed
        callback lacks what the ledger needs (its timestamp)."""


# ------------------------------------------------------------------------------ helpers


def session_of_room(room_name: str) -> str | None:
    """`call_<session id>` → the session id; None for a room that is not ours."""
    if not room_name.startswith(ROOM_PREFIX) or len(room_name) == len(ROOM_PREFIX):
        return None
    return room_name[len(ROOM_PREFIX):]


def content_id(provider: str, **fields: str) -> str:
    """`<provider>:<sha256 hex>` of the named fields (room or call, participant, event, provider
    timestamp): a redelivery of the same callback gets the same ledger event id, so the ledger's
    receipt replays the first result (I8) instead of recording it twice."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return f"{provider}:{hashlib.sha256(canonical.encode()).hexdigest()}"


def provider_time(text: str | None) -> datetime:
    """A provider timestamp → aware UTC datetime. Accepts ISO 8601 ("2026-11-21T10:00:00.379Z",
    Twilio Video) and RFC 2822 ("Sat, 21 Nov 2026 10:00:00 +0000", Twilio Voice); a time
    without a zone is UTC (both providers send UTC). Raises ValidationFailed (422)."""
    if not text:
        raise ValidationFailed("the callback has no Timestamp")
    moment = _parse_iso(text) or _parse_rfc2822(text)
    if moment is None:
        raise ValidationFailed(f"unreadable Timestamp {text[:60]!r}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-14:00 is after year 9999 in UTC
        raise ValidationFailed(f"Timestamp {text[:60]!r} is out of range") from None


def _parse_iso(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        return None


def _parse_rfc2822(text: str) -> datetime | None:
    try:
        return parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------ Twilio (Voice, Video)


def twilio_configured(settings: ProviderSettings) -> bool:
    return bool(settings.twilio_auth_token and settings.public_base_url)


def public_url(settings: ProviderSettings, request: WebhookRequest) -> str:
    """The URL the provider called and signed: `public_base_url` + path (+ "?" + raw query).
    Never the request's own host: the proxy in front rewrites it."""
    base = (settings.public_base_url or "").rstrip("/")
    return base + request.path + (f"?{request.query}" if request.query else "")


def verify_twilio(request: WebhookRequest, settings: ProviderSettings) -> ImmutableMultiDict:
    """The form parameters of a Twilio callback whose `X-Twilio-Signature` (HMAC-SHA1 with the
    account's auth token over the public URL and the sorted parameters) is valid.
    Raises InvalidSignature (403) when the header is missing or does not match."""
    signature = request.header("x-twilio-signature")
    if not signature:
        raise InvalidSignature("X-Twilio-Signature is missing")
    try:
        form = ImmutableMultiDict(parse_qsl(request.body.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        raise InvalidSignature("the body is not UTF-8 form data") from None
    token = settings.twilio_auth_token.get_secret_value()  # type: ignore[union-attr]
    url = public_url(settings, request)
    if not RequestValidator(token).validate(url, form, signature):
        log.warning("Twilio signature mismatch for %s", url)
        raise InvalidSignature("X-Twilio-Signature does not match this request")
    return form


def twilio_event_id(provider: str, request: WebhookRequest, **fields: str) -> str:
    """`twilio:<I-Twilio-Idempotency-Token>` (the same on every retry of one callback) when the
    token is an identifier (ledger/input_rules.py), else the content id of `fields`."""
    token = (request.header("i-twilio-idempotency-token") or "").strip()
    if 0 < len(token) <= MAX_TOKEN_CHARS and not id_problem(token):
        return f"twilio:{token}"
    return content_id(provider, **fields)
