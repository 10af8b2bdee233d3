"""The dispatcher: sends pending deliveries, signed, with bounded concurrency, in order per
ordering key (a session, a patient, a pool, a wallet) and endpoint.

A delivery is attempted only when it is the oldest undelivered one of its (endpoint, ordering
key): the next notification of a session waits until the previous one is delivered or dead-
lettered. A delivery is claimed by a compare-and-set on `claimed_until` before it is sent, so
two processes never send it at once; a process killed mid-send leaves a claim that expires, and
the delivery is sent again with the same `webhook-id`. Each endpoint has at most
`per_endpoint` requests in flight and every request a timeout, so a slow or dead endpoint holds
at most that many of the `concurrency` workers and never delays the others (nor the write path,
which never waits for the notifier). Failed attempts are retried with exponential backoff and
jitter until `deadline_at` (created + `retry_for`), then dead-lettered.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

import httpx
from standardwebhooks import Webhook

from notifications.endpoints import Endpoints, UrlPolicy
from projections.store import Store

log = logging.getLogger("ledger.webhooks")
UNDELIVERED = ("pending", "retrying")
USER_AGENT = "telehealth-ledger-webhooks/1"
ERROR_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class DeliveryPolicy:
    """Delivery limits (docs/webhooks.md, "Retries"). Seconds unless named otherwise."""

    concurrency: int = 8  # requests in flight per process
    per_endpoint: int = 4  # of which at most this many to one endpoint
    timeout_seconds: float = 10.0  # per request, connecting and reading included
    response_cap_bytes: int = 1024  # response body read at most (kept for the operator)
    retry_base_seconds: float = 5.0  # the first retry comes after 2.5–5 s
    retry_max_seconds: float = 6 * 3600.0  # the delay stops doubling here
    retry_for: timedelta = timedelta(days=3)  # then the delivery is dead-lettered
    poll_seconds: float = 0.5  # look for due deliveries at least this often
    claim_margin_seconds: float = 30.0  # a claim outlives its request's timeout by this much

    def backoff(self, attempts: int, rng: random.Random) -> float:
        """Delay before attempt `attempts + 1`: base·2^(attempts−1), at most the max, times a
        uniform jitter factor in [0.5, 1]."""
        delay = min(self.retry_max_seconds, self.retry_base_seconds * 2 ** max(0, attempts - 1))
        return delay * (0.5 + rng.random() / 2)


@dataclass(frozen=True)
class Attempt:
    """What one HTTP attempt gave: `status_code` (None if no answer), a short `error`, the
    response body's first bytes, and a Retry-After in seconds if the endpoint sent one."""

    status_code: int | None
    error: str | None
    response: str
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def sign(secrets: list[str], message_id: str, at: datetime, body: str) -> str:
    """The `webhook-signature` header: one `v1,<base64>` per secret, space-separated."""
    return " ".join(Webhook(s).sign(message_id, at, body) for s in secrets)


class Dispatcher:
    """Sends the deliveries in `store`. `observe(outcome, event_type)` is told of every
    attempt's outcome (`sent`, `failed`, `dead`), for the metrics."""

    def __init__(self, store: Store, endpoints: Endpoints, *, clock: Callable[[], datetime],
                 policy: DeliveryPolicy = DeliveryPolicy(), url_policy: UrlPolicy = UrlPolicy(),
                 observe: Callable[[str, str], None] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.store, self.endpoints, self.clock, self.policy = store, endpoints, clock, policy
        self.url_policy = url_policy
        self.observe = observe or (lambda outcome, event_type: None)
        self.rng = random.Random()
        self.client = httpx.Client(
            timeout=httpx.Timeout(policy.timeout_seconds), follow_redirects=False,
            trust_env=False, transport=transport, headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=policy.concurrency * 2,
                                max_keepalive_connections=policy.concurrency))
        self.pool = ThreadPoolExecutor(max_workers=policy.concurrency,
                                       thread_name_prefix="webhook-send")
        self._inflight: dict[str, int] = {}  # endpoint id -> requests in flight (this process)
        self._mutex = threading.Lock()
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------- dispatching

    def dispatch(self) -> int:
        """Claim and hand to the workers what is due now, within the concurrency bounds;
        returns how many were handed over."""
        with self._mutex:
            free = self.policy.concurrency - sum(self._inflight.values())
            full = [e for e, n in self._inflight.items() if n >= self.policy.per_endpoint]
        if free <= 0:
            return 0
        now, handed = self.clock(), 0
        for delivery_id, endpoint_id in self._due(now, free * 4, full):
            with self._mutex:
                if self._inflight.get(endpoint_id, 0) >= self.policy.per_endpoint:
                    continue
                if sum(self._inflight.values()) >= self.policy.concurrency:
                    break
            token = self._claim(delivery_id, now)
            if token is None:
                continue  # another process claimed it first
            with self._mutex:
                self._inflight[endpoint_id] = self._inflight.get(endpoint_id, 0) + 1
            self.pool.submit(self._send_claimed, delivery_id, endpoint_id, token)
            handed += 1
        return handed

    def busy(self) -> bool:
        """Whether a request of this process is in flight."""
        with self._mutex:
            return bool(self._inflight)

    def _due(self, now: datetime, limit: int, full: list[str]) -> list[tuple[str, str]]:
        """(delivery id, endpoint id) of deliveries that may be sent now: due, unclaimed, of an
        enabled endpoint not saturated here, and first undelivered of their ordering key."""
        ts = self.store.ts(now)
        skip = "".join(" AND d.endpoint_id <> ?" for _ in full)
        with self.store.locked():
            return [(r[0], r[1]) for r in self.store.query(
                "SELECT d.delivery_id, d.endpoint_id FROM webhook_deliveries d "
                "JOIN webhook_endpoints e ON e.endpoint_id = d.endpoint_id "
                "WHERE d.status IN (?, ?) AND d.next_attempt_at <= ? AND e.enabled = ? "
                "AND (d.claimed_until IS NULL OR d.claimed_until < ?)" + skip +
                " AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p "
                "WHERE p.endpoint_id = d.endpoint_id AND p.ordering_key = d.ordering_key "
                "AND p.status IN (?, ?) AND (p.position < d.position "
                "OR (p.position = d.position AND p.ordinal < d.ordinal))) "
                "ORDER BY d.next_attempt_at, d.position, d.ordinal LIMIT ?",
                (*UNDELIVERED, ts, True, ts, *full, *UNDELIVERED, limit))]

    def _claim(self, delivery_id: str, now: datetime) -> str | None:
        token = uuid.uuid4().hex
        until = now + timedelta(seconds=self.policy.timeout_seconds
                                + self.policy.claim_margin_seconds)
        with self.store.locked():
            claimed = self.store.execute(
                "UPDATE webhook_deliveries SET claimed_until = ?, claim_token = ? "
                "WHERE delivery_id = ? AND status IN (?, ?) "
                "AND (claimed_until IS NULL OR claimed_until < ?)",
                (self.store.ts(until), token, delivery_id, *UNDELIVERED, self.store.ts(now)))
        return token if claimed == 1 else None

    # -------------------------------------------------------------------------- sending

    def _send_claimed(self, delivery_id: str, endpoint_id: str, token: str) -> None:
        try:
            self.send(delivery_id, token)
        except Exception:  # noqa: BLE001 - the claim expires and the delivery is retried
            log.exception("webhook delivery %s failed unexpectedly", delivery_id)
        finally:
            with self._mutex:
                self._inflight[endpoint_id] -= 1
                if not self._inflight[endpoint_id]:
                    del self._inflight[endpoint_id]
            self.wake.set()

    def send(self, delivery_id: str, token: str) -> str:
        """Attempt one claimed delivery and record the outcome; returns it (`sent`, `failed`,
        `dead`, or `released` when its endpoint was disabled meanwhile)."""
        with self.store.locked():
            rows = self.store.query(
                "SELECT d.endpoint_id, d.message_id, d.event_type, d.attempts, d.deadline_at, "
                "m.body FROM webhook_deliveries d JOIN webhook_messages m "
                "ON m.message_id = d.message_id WHERE d.delivery_id = ? AND d.claim_token = ?",
                (delivery_id, token))
        if not rows:
            return "released"
        endpoint_id, message_id, event_type, attempts, deadline, body = rows[0]
        endpoint = self.endpoints.get(endpoint_id)
        if not endpoint.enabled:
            self._release(delivery_id, token)
            return "released"
        at = self.clock()
        problem = self.url_policy.problem(endpoint.url)
        attempt = Attempt(None, problem, "") if problem else self._post(
            endpoint.url, message_id, at, body, endpoint.signing_secrets(at))
        outcome = self._record(delivery_id, token, int(attempts) + 1,
                               self.store.from_ts(deadline), attempt)
        self.observe(outcome, event_type)
        if outcome != "sent":
            log.warning("webhook delivery %s", "dead-lettered" if outcome == "dead" else "failed",
                        extra={"delivery_id": delivery_id, "endpoint_id": endpoint_id,
                               "message_id": message_id, "event_type": event_type,
                               "attempt": int(attempts) + 1, "status_code": attempt.status_code,
                               "error": attempt.error})
        return outcome

    def _post(self, url: str, message_id: str, at: datetime, body: str,
              secrets: list[str]) -> Attempt:
        headers = {"content-type": "application/json", "webhook-id": message_id,
                   "webhook-timestamp": str(int(at.timestamp())),
                   "webhook-signature": sign(secrets, message_id, at, body)}
        started = time.monotonic()
        try:
            with self.client.stream("POST", url, content=body.encode(), headers=headers) as r:
                excerpt = self._read_capped(r, started)
                return Attempt(r.status_code, None if 200 <= r.status_code < 300
                               else f"HTTP {r.status_code}", excerpt, _retry_after(r))
        except httpx.TimeoutException:
            return Attempt(None, f"timed out after {self.policy.timeout_seconds:g} s", "")
        except httpx.HTTPError as exc:
            return Attempt(None, f"{type(exc).__name__}: {str(exc)[:200]}", "")

    def _read_capped(self, response: httpx.Response, started: float) -> str:
        """At most `response_cap_bytes` of the body, within the request's time bound."""
        cap, data = self.policy.response_cap_bytes, b""
        for chunk in response.iter_raw():
            data += chunk
            if len(data) >= cap or time.monotonic() - started > self.policy.timeout_seconds:
                break
        return data[:cap].decode("utf-8", "replace").replace("\x00", "")

    def _record(self, delivery_id: str, token: str, attempts: int, deadline: datetime,
                attempt: Attempt) -> str:
        now = self.clock()
        ts = self.store.ts
        common = (attempts, ts(now), attempt.status_code, attempt.error, attempt.response)
        if attempt.ok:
            outcome, status, next_at, delivered = "sent", "delivered", now, now
        elif now >= deadline:
            outcome, status, next_at, delivered = "dead", "dead", now, None
        else:
            delay = self.policy.backoff(attempts, self.rng)
            if attempt.retry_after is not None:
                delay = min(max(delay, attempt.retry_after), self.policy.retry_max_seconds)
            outcome, status, delivered = "failed", "retrying", None
            next_at = min(now + timedelta(seconds=delay), deadline)
        with self.store.locked():
            self.store.execute(
                "UPDATE webhook_deliveries SET attempts = ?, last_attempt_at = ?, "
                "last_status_code = ?, last_error = ?, last_response = ?, status = ?, "
                "next_attempt_at = ?, delivered_at = ?, claimed_until = NULL, claim_token = NULL "
                "WHERE delivery_id = ? AND claim_token = ?",
                (*common, status, ts(next_at), ts(delivered), delivery_id, token))
        return outcome

    def _release(self, delivery_id: str, token: str) -> None:
        with self.store.locked():
            self.store.execute("UPDATE webhook_deliveries SET claimed_until = NULL, "
                               "claim_token = NULL WHERE delivery_id = ? AND claim_token = ?",
                               (delivery_id, token))

    # ----------------------------------------------------------------------- the thread

    def start(self) -> None:
        """Dispatch in a daemon thread until `stop()`. Idempotent."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="webhook-dispatch",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self.wake.clear()
            try:
                handed = self.dispatch()
                failures = 0
            except Exception:  # noqa: BLE001 - the store is unreachable: retry, bounded delay
                delay = ERROR_BACKOFF_SECONDS[min(failures, len(ERROR_BACKOFF_SECONDS) - 1)]
                failures += 1
                log.exception("webhook dispatch failed; retrying in %.1f s", delay)
                self._stop.wait(delay)
                continue
            if not handed:
                self.wake.wait(self.policy.poll_seconds)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop dispatching, wait up to `timeout` seconds for requests in flight, close."""
        thread, self._thread = self._thread, None
        self._stop.set()
        self.wake.set()
        if thread is not None:
            thread.join(timeout)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds of a numeric Retry-After on a 429 or 503, else None."""
    if response.status_code not in (429, 503):
        return None
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None
