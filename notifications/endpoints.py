"""Webhook endpoints: where notifications go, which types, and the signing secrets.

Secrets are `whsec_` + base64 of 32 random bytes (Standard Webhooks), returned only by
`create` and `rotate`, never by a read and never logged. A rotation keeps the previous secret
valid for a grace period: until it ends every delivery is signed with both (the
`webhook-signature` header carries one signature per secret). An endpoint receives the
notifications derived from events after the log's head when it was created (`start_position`);
history is sent on request by a replay (notifier.py).
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable
from urllib.parse import urlsplit

from notifications.errors import UnknownWebhookEndpoint, WebhookUrlNotAllowed
from projections.store import Store

MAX_ENDPOINTS = 1000  # bound on a listing
COLUMNS = ("endpoint_id, url, description, event_types, enabled, secret, previous_secret, "
           "previous_secret_until, start_position, created_at, updated_at")


def new_secret() -> str:
    """A fresh signing secret: `whsec_` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class UrlPolicy:
    """HTTPS only, except plain HTTP to the hosts listed (tests, loopback receivers)."""

    allow_http_hosts: frozenset[str] = frozenset()

    def problem(self, url: str) -> str | None:
        """Why `url` may not receive webhooks, or None."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            return f"not a URL: {exc}"
        if parts.scheme not in ("https", "http") or not host:
            return "the URL must be https://host/…"
        if parts.username is not None or parts.password is not None:
            return "the URL must not carry a user name or password"
        if parts.scheme == "http" and host.lower() not in self.allow_http_hosts:
            return (f"plain http is allowed only for {sorted(self.allow_http_hosts) or 'no host'} "
                    "(LEDGER_WEBHOOK_ALLOW_HTTP_HOSTS); use https")
        return None

    def check(self, url: str) -> None:
        """Raise WebhookUrlNotAllowed (422) unless `url` may receive webhooks."""
        if (problem := self.problem(url)) is not None:
            raise WebhookUrlNotAllowed(problem, url=url)


@dataclass(frozen=True)
class Endpoint:
    """One endpoint as stored (secrets included: never return this object over HTTP)."""

    endpoint_id: str
    url: str
    description: str
    event_types: list[str]
    enabled: bool
    secret: str
    previous_secret: str | None
    previous_secret_until: datetime | None
    start_position: int
    created_at: datetime
    updated_at: datetime

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets that sign a delivery at `now`: the current one, and the previous one
        until its grace period ends."""
        valid = [self.secret]
        if self.previous_secret and self.previous_secret_until and now < self.previous_secret_until:
            valid.append(self.previous_secret)
        return valid

    def view(self, now: datetime) -> dict:
        """The public view (no secret)."""
        grace = self.previous_secret_until if self.previous_secret_until and \
            now < self.previous_secret_until else None
        return {"id": self.endpoint_id, "url": self.url, "description": self.description,
                "event_types": self.event_types, "enabled": self.enabled,
                "start_position": self.start_position,
                "previous_secret_valid_until": grace.isoformat() if grace else None,
                "created_at": self.created_at.isoformat(),
                "updated_at": self.updated_at.isoformat()}


class Endpoints:
    """The endpoint registry in the notifier's tables. `clock()` is the wall clock; `head()`
    the event log's head (an endpoint starts after it)."""

    def __init__(self, store: Store, clock: Callable[[], datetime], head: Callable[[], int],
                 policy: UrlPolicy) -> None:
        self.store, self.clock, self.head, self.policy = store, clock, head, policy

    def create(self, url: str, event_types: list[str], description: str = "",
               enabled: bool = True) -> tuple[Endpoint, str]:
        """Register an endpoint; returns it and its secret (shown once)."""
        self.policy.check(url)
        now, secret = self.clock(), new_secret()
        endpoint_id = "ep_" + uuid.uuid4().hex
        ts = self.store.ts
        with self.store.locked(), self.store.transaction(durable=True):
            self.store.execute(
                f"INSERT INTO webhook_endpoints ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, "
                "?, ?, ?)", (endpoint_id, url, description, json.dumps(event_types), enabled,
                             secret, self.head(), ts(now), ts(now)))
        return self.get(endpoint_id), secret

    def get(self, endpoint_id: str) -> Endpoint:
        """Raises UnknownWebhookEndpoint (404)."""
        with self.store.locked():
            rows = self.store.query(f"SELECT {COLUMNS} FROM webhook_endpoints "
                                    "WHERE endpoint_id = ?", (endpoint_id,))
        if not rows:
            raise UnknownWebhookEndpoint(f"no webhook endpoint {endpoint_id!r}")
        return self._endpoint(rows[0])

    def all(self, limit: int = MAX_ENDPOINTS) -> list[Endpoint]:
        """Endpoints in creation order (at most `limit`)."""
        with self.store.locked():
            rows = self.store.query(f"SELECT {COLUMNS} FROM webhook_endpoints "
                                    "ORDER BY created_at, endpoint_id LIMIT ?", (limit,))
        return [self._endpoint(r) for r in rows]

    def update(self, endpoint_id: str, changes: dict[str, Any]) -> Endpoint:
        """Change `url`, `description`, `event_types` or `enabled` (only those given)."""
        self.get(endpoint_id)
        if "url" in changes:
            self.policy.check(changes["url"])
        values = {k: (json.dumps(v) if k == "event_types" else v) for k, v in changes.items()
                  if k in ("url", "description", "event_types", "enabled")}
        if values:
            sets = ", ".join(f"{k} = ?" for k in values)
            with self.store.locked(), self.store.transaction(durable=True):
                self.store.execute(f"UPDATE webhook_endpoints SET {sets}, updated_at = ? "
                                   "WHERE endpoint_id = ?",
                                   (*values.values(), self.store.ts(self.clock()), endpoint_id))
        return self.get(endpoint_id)

    def rotate(self, endpoint_id: str, grace: timedelta) -> tuple[Endpoint, str]:
        """A new secret; the current one stays valid for `grace` (an older previous secret
        is dropped). Returns the endpoint and the new secret (shown once)."""
        current = self.get(endpoint_id)
        now, secret = self.clock(), new_secret()
        ts = self.store.ts
        with self.store.locked(), self.store.transaction(durable=True):
            self.store.execute(
                "UPDATE webhook_endpoints SET secret = ?, previous_secret = ?, "
                "previous_secret_until = ?, updated_at = ? WHERE endpoint_id = ?",
                (secret, current.secret if grace.total_seconds() > 0 else None,
                 ts(now + grace) if grace.total_seconds() > 0 else None, ts(now), endpoint_id))
        return self.get(endpoint_id), secret

    def _endpoint(self, row: tuple) -> Endpoint:
        (endpoint_id, url, description, types, enabled, secret, previous, until, start,
         created, updated) = row
        from_ts = self.store.from_ts
        return Endpoint(endpoint_id, url, description, json.loads(types), bool(enabled), secret,
                        previous, from_ts(until), int(start), from_ts(created), from_ts(updated))
