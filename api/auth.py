"""API keys and roles: `Authorization: Bearer <key>` or `X-API-Key: <key>`.

Roles: `backend` (post events, read), `auditor` (read only), `admin` (everything, incl. ticks and
the manual clock). A missing or unknown key is 401 `unauthenticated`; a known key whose role
lacks the permission is 403 `forbidden`. Authentication is checked by the front middleware
(api/front.py) before the body is even parsed (so an unauthenticated caller never learns
anything from validation); authorisation per route by the `require(...)` dependency.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Callable, Iterable

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from fastapi.responses import JSONResponse
from starlette.types import Scope

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


def route_role(scope: Scope, keys: dict[str, str]) -> str | None:
    """The role `require`'s dependency finds for this request (the first `Authorization`
    header's bearer token as FastAPI's HTTPBearer reads it, else the first `X-API-Key`), for a
    route answered outside FastAPI (api/routes.py `post_events_direct`)."""
    headers = Headers(scope=scope)
    authorization = headers.get("authorization")
    scheme, credentials = get_authorization_scheme_param(authorization)
    bearer = credentials if authorization and scheme.lower() == "bearer" else ""
    return role_of(bearer or headers.get("x-api-key"), keys)


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ledger"'}


def unauthenticated_response(scope: Scope) -> JSONResponse:
    """401 `unauthenticated` with the Bearer challenge, for a request under `/v1` without a
    known API key (the front middleware checks it before anything else, api/front.py)."""
    return error_response(Unauthenticated(
        "Send a known API key as 'Authorization: Bearer <key>' or 'X-API-Key'",
        headers=_CHALLENGE), scope["path"])


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
