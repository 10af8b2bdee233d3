"""Signing in to the console: the API key posted once, a signed session cookie afterwards.

The login form posts an API key; a key whose role is `auditor` or `admin` gets a session
cookie, anything else gets the form again with 401. The cookie is signed (itsdangerous, with
`LEDGER_CONSOLE_SECRET`, or a secret derived from the configured API keys when that is unset)
and holds no key: only a keyed fingerprint of it (HMAC-SHA256 with the same secret) and the
signing time. Each request looks the fingerprint up among the keys configured *now*, so a key
removed from `LEDGER_API_KEYS` ends its console sessions at once; a session also ends
`SESSION_SECONDS` after sign-in.

Cookie: `HttpOnly`, `SameSite=Strict`, `Path=/console`, `Secure` unless
`LEDGER_CONSOLE_COOKIE_SECURE=false` (browsers keep Secure cookies on http://localhost and
127.0.0.1 too). CSRF: the console's only state-changing requests are sign-in and sign-out
(POST). They are refused (403) unless their `Origin` (or, lacking it, `Referer`) names this
host; with the SameSite=Strict cookie that is the whole defence — no CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import urlsplit

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from api.auth import role_of

CONSOLE_ROLES = frozenset({"auditor", "admin"})  # read-only pages; the audit endpoints' roles
COOKIE = "ledger_console"
COOKIE_PATH = "/console"
SESSION_SECONDS = 8 * 3600
_SALT = "ledger-console-session"


def console_secret(settings: Any, keys: dict[str, str]) -> bytes:
    """The signing secret: `settings.console_secret` if set, else one derived from every
    configured API key (stable across worker processes; changes when the keys do)."""
    configured = getattr(settings, "console_secret", None)
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value().encode()
    material = "\n".join(sorted(f"{key}:{role}" for key, role in keys.items())).encode()
    return hmac.new(b"ledger-console-v1", material, hashlib.sha256).digest()


class Signer:
    """Makes and reads session cookies for the API keys `keys` (key → role)."""

    def __init__(self, secret: bytes, keys: dict[str, str], secure: bool = True) -> None:
        self.secret, self.keys, self.secure = secret, keys, secure
        self.serializer = URLSafeTimedSerializer(secret, salt=_SALT)
        self.by_fingerprint = {self.fingerprint(key): role for key, role in keys.items()}

    def fingerprint(self, key: str) -> str:
        """HMAC-SHA256 of the key under the console secret, hex: names a key without
        revealing it."""
        return hmac.new(self.secret, key.encode(), hashlib.sha256).hexdigest()

    def role_for_key(self, key: str) -> str | None:
        """The role of a posted key if it may use the console, else None (constant time)."""
        role = role_of(key.strip(), self.keys)
        return role if role in CONSOLE_ROLES else None

    def cookie_value(self, key: str) -> str:
        return self.serializer.dumps({"fp": self.fingerprint(key.strip())})

    def role_of_cookie(self, value: str | None) -> str | None:
        """The console role of a session cookie, or None (absent, forged, expired, or its key
        no longer configured or no longer a console role)."""
        if not value:
            return None
        try:
            data = self.serializer.loads(value, max_age=SESSION_SECONDS)
        except BadSignature:  # includes SignatureExpired
            return None
        fingerprint = data.get("fp") if isinstance(data, dict) else None
        if not isinstance(fingerprint, str):
            return None
        role = None
        for candidate, candidate_role in self.by_fingerprint.items():
            if hmac.compare_digest(candidate, fingerprint):
                role = candidate_role
        return role if role in CONSOLE_ROLES else None

    def set_cookie(self, response: Response, key: str) -> None:
        response.set_cookie(COOKIE, self.cookie_value(key), max_age=SESSION_SECONDS,
                            path=COOKIE_PATH, secure=self.secure, httponly=True,
                            samesite="strict")

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path=COOKIE_PATH, secure=self.secure, httponly=True,
                               samesite="strict")


def same_origin(request: Request) -> bool:
    """Whether a POST comes from a page of this host: its `Origin`, else its `Referer`,
    names the host the request was sent to. Neither header: refused."""
    source = request.headers.get("origin") or request.headers.get("referer")
    host = request.headers.get("host")
    if not source or not host or source == "null":
        return False
    return urlsplit(source).netloc.lower() == host.lower()


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path only (no open redirect)."""
    if target and target.startswith("/console/") and "//" not in target and "\\" not in target:
        return target
    return "/console/"
