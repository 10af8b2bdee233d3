"""API keys and roles: `Authorization: Bearer <key>` or `X-API-Key: <key>`.

Roles: `backend` (post events, read), `auditor` (read only), `admin` (everything, incl. ticks and
the manual clock). A missing or unknown key is 401 `unauthenticated`; a known key whose role
lacks the permission is 403 `forbidden`. Authentication is checked by a small ASGI middleware
before the body is even parsed (so an unauthenticated caller never learns anything from
validation); authorisation per route by the `require(...)` dependency.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Callable, Iterable

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import Forbidden, Unauthenticated, error_response

READ = frozenset({"backend", "auditor", "admin"})
WRITE = frozenset({"backend", "admin"})
ADMIN = frozenset({"admin"})

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def role_of(key: str | None, keys: dict[str, str]) -> str | None:
    """The role of `key`, comparing in constant time against every configured key."""
    if not key:
        return None
    found = None
    for candidate, role in keys.items():
        if hmac.compare_digest(candidate.encode(), key.encode()):
            found = role
    return found


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ledger"'}


class AuthenticationMiddleware:
    """Refuse requests under `prefix` without a known API key (401), before anything else."""

    def __init__(self, app: ASGIApp, keys: dict[str, str], prefix: str = "/v1") -> None:
        self.app = app
        self.keys = keys
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope.get("headers", ())}
            role = role_of(key_from_headers(headers.get("authorization"),
                                            headers.get("x-api-key")), self.keys)
            if role is None:
                response = error_response(Unauthenticated(
                    "Send a known API key as 'Authorization: Bearer <key>' or 'X-API-Key'",
                    headers=_CHALLENGE), scope["path"])
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["role"] = role
        await self.app(scope, receive, send)


def require(roles: Iterable[str]) -> Callable[..., str]:
    """A dependency that returns the caller's role, or raises 401/403."""
    allowed = frozenset(roles)

    async def dependency(  # async: no blocking, so no hop to the thread pool
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        api_key: Annotated[str | None, Depends(_api_key)],
    ) -> str:
        key = bearer.credentials if bearer else None
        role = role_of(key or api_key, request.app.state.api_keys)
        if role is None:
            raise Unauthenticated(
                "Send a known API key as 'Authorization: Bearer <key>' or 'X-API-Key'",
                headers=_CHALLENGE)
        if role not in allowed:
            raise Forbidden(f"role {role!r} may not do this; allowed: {sorted(allowed)}")
        return role

    return dependency


ReadRole = Annotated[str, Depends(require(READ))]
WriteRole = Annotated[str, Depends(require(WRITE))]
AdminRole = Annotated[str, Depends(require(ADMIN))]
