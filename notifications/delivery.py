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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable

from standardwebhooks import Webhook

from notifications.endpoints import Endpoint, Endpoints, UrlPolicy
from notifications.sender import Attempt, Sender
from projections.store import Store

log = logging.getLogger("ledger.webhooks")
UNDELIVERED = ("pending", "retrying")
USER_AGENT = "telehealth-ledger-webhooks/1"
ERROR_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0)
SCAN_LIMIT = 500  # due deliveries read per scan of the undelivered ones (memory bound)
RESCAN_SECONDS = 2.0  # a ready list older than this is read again (retries fallen due)
# Appended to the claim token of a delivery in flight when a replay or a manual retry asks for
# it again: the attempt in flight began before that request, so its outcome must not settle it
# (`_record`): the delivery stays undelivered, due when the request said, and is sent again.
AGAIN = "+again"
# A delivery is the first undelivered one of its (endpoint, ordering key): `d` is the
# candidate's table name or alias.
HEAD_OF_KEY = ("NOT EXISTS (SELECT 1 FROM webhook_deliveries p "
               "WHERE p.endpoint_id = {d}.endpoint_id AND p.ordering_key = {d}.ordering_key "
               "AND p.status IN (?, ?) AND (p.position < {d}.position "
               "OR (p.position = {d}.position AND p.ordinal < {d}.ordinal)))")
RECORD = ("UPDATE webhook_deliveries SET attempts = ?, last_attempt_at = ?, "
          "last_status_code = ?, last_error = ?, last_response = ?, "
          "status = CASE WHEN claim_token = ? THEN ? ELSE status END, "
          "next_attempt_at = CASE WHEN claim_token = ? THEN ? ELSE next_attempt_at END, "
          "delivered_at = CASE WHEN claim_token = ? THEN ? ELSE delivered_at END, "
          "claimed_until = NULL, claim_token = NULL "
          "WHERE delivery_id = ? AND claim_token IN (?, ?)")
# What a replay or a manual retry sets on a delivery, besides its status and window.
ASK_AGAIN = "claim_token = CASE WHEN claim_token LIKE ? THEN claim_token ELSE claim_token || ? END"
ASK_AGAIN_PARAMS = ("%" + AGAIN, AGAIN)


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
class Claimed:
    """A delivery this process claimed (`token`), with what sending it needs."""

    delivery_id: str
    endpoint_id: str
    message_id: str
    event_type: str
    attempts: int  # attempts before this one
    deadline: datetime
    body: str
    token: str


_signers: dict[str, Webhook] = {}  # secret -> its signer (the secret decoded once)


def sign(secrets: list[str], message_id: str, at: datetime, body: str) -> str:
    """The `webhook-signature` header: one `v1,<base64>` per secret, space-separated."""
    signatures = []
    for secret in secrets:
        signer = _signers.get(secret)
        if signer is None:
            if len(_signers) >= 1000:  # bounded: secrets of rotated-away endpoints go
                _signers.clear()
            signer = _signers[secret] = Webhook(secret)
        signatures.append(signer.sign(message_id, at, body))
    return " ".join(signatures)


class Dispatcher:
    """Sends the deliveries in `store`. `observe(outcome, event_type)` is told of every
    attempt's outcome (`sent`, `failed`, `dead`), for the metrics.

    Per round (`dispatch`): the outcomes the workers reported since the previous round are
    written in one transaction; the due deliveries come from a list read by one scan of the
    undelivered ones (up to SCAN_LIMIT, read again when used up, when only saturated
    endpoints are left in it, or after RESCAN_SECONDS); those handed to the workers are
    claimed in one transaction whose statements check again, for each, that it is due,
    unclaimed and the first undelivered one of its key (so an old list cannot break the
    order), and read with their messages by one query. A scan costs in proportion to the
    undelivered backlog (docs/design.md, "Webhook delivery"), so it is not run per delivery.
    """

    def __init__(self, store: Store, endpoints: Endpoints, *, clock: Callable[[], datetime],
                 policy: DeliveryPolicy = DeliveryPolicy(), url_policy: UrlPolicy = UrlPolicy(),
                 observe: Callable[[str, str], None] | None = None,
                 sender: Sender | None = None) -> None:
        self.store, self.endpoints, self.clock, self.policy = store, endpoints, clock, policy
        self.url_policy = url_policy
        self.observe = observe or (lambda outcome, event_type: None)
        self.rng = random.Random()
        self.sender = sender or Sender(policy.timeout_seconds, policy.response_cap_bytes,
                                       policy.concurrency, USER_AGENT)
        self.pool = ThreadPoolExecutor(max_workers=policy.concurrency,
                                       thread_name_prefix="webhook-send")
        self._inflight: dict[str, int] = {}  # endpoint id -> requests in flight (this process)
        self._outcomes: list[tuple] = []  # RECORD rows the workers reported, not yet written
        self._ready: deque[tuple[str, str]] = deque()  # (delivery, endpoint) of the last scan
        self._scanned_at = 0.0  # time.monotonic() of that scan
        self._mutex = threading.Lock()
        self._dispatching = threading.Lock()
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------- dispatching

    def dispatch(self) -> int:
        """Write the outcomes reported so far, then claim and hand to the workers what is due
        now, within the concurrency bounds; returns how many were handed over."""
        with self._dispatching:
            self.flush()
            with self._mutex:
                inflight = dict(self._inflight)
            free = self.policy.concurrency - sum(inflight.values())
            if free <= 0:
                return 0
            now = self.clock()
            claimed = self._claim(self._pick(now, free, inflight), now)
            endpoints = {e: self.endpoints.get(e) for e in {c.endpoint_id for c in claimed}}
            for item in claimed:
                with self._mutex:
                    self._inflight[item.endpoint_id] = self._inflight.get(item.endpoint_id, 0) + 1
                self.pool.submit(self._send_claimed, item, endpoints[item.endpoint_id])
            return len(claimed)

    def busy(self) -> bool:
        """Whether a request of this process is in flight."""
        with self._mutex:
            return bool(self._inflight)

    def _pick(self, now: datetime, free: int, inflight: dict[str, int]) -> list[tuple[str, str]]:
        """Up to `free` (delivery, endpoint) from the ready list, at most `per_endpoint` in
        flight per endpoint. The list is read again when it is used up or old, and when all
        it holds is for saturated endpoints at most every `poll_seconds` (another endpoint's
        deliveries may be due meanwhile; scanning for them each round would cost as much as
        before)."""
        age = time.monotonic() - self._scanned_at
        picked = [] if age > RESCAN_SECONDS else self._take(free, inflight)
        if not picked and (not self._ready or age > min(self.policy.poll_seconds,
                                                        RESCAN_SECONDS)):
            full = [e for e, n in inflight.items() if n >= self.policy.per_endpoint]
            self._ready = deque(self._due(now, SCAN_LIMIT, full))
            self._scanned_at = time.monotonic()
            picked = self._take(free, inflight)
        return picked

    def _take(self, free: int, inflight: dict[str, int]) -> list[tuple[str, str]]:
        counts, picked, kept = dict(inflight), [], []
        while self._ready and len(picked) < free:
            item = self._ready.popleft()
            if counts.get(item[1], 0) >= self.policy.per_endpoint:
                kept.append(item)
                continue
            counts[item[1]] = counts.get(item[1], 0) + 1
            picked.append(item)
        self._ready.extendleft(reversed(kept))
        return picked

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
                " AND " + HEAD_OF_KEY.format(d="d") +
                " ORDER BY d.next_attempt_at, d.position, d.ordinal LIMIT ?",
                (*UNDELIVERED, ts, True, ts, *full, *UNDELIVERED, limit))]

    def _claim(self, picked: list[tuple[str, str]], now: datetime) -> list[Claimed]:
        """Claim those of `picked` still due, unclaimed and first of their key (one
        transaction), and read them with their messages (one query); in `picked` order."""
        if not picked:
            return []
        token = uuid.uuid4().hex
        until = now + timedelta(seconds=self.policy.timeout_seconds
                                + self.policy.claim_margin_seconds)
        ids = [d for d, _ in picked]
        marks = ", ".join("?" * len(ids))
        ts = self.store.ts
        with self.store.locked():
            # One statement per id, in one transaction: with `IN (ids…)` SQLite's planner
            # (no statistics) walks the due index instead of the primary key.
            with self.store.transaction():
                self.store.executemany(
                    "UPDATE webhook_deliveries SET claimed_until = ?, claim_token = ? "
                    "WHERE delivery_id = ? AND status IN (?, ?) AND next_attempt_at <= ? "
                    "AND (claimed_until IS NULL OR claimed_until < ?) AND "
                    + HEAD_OF_KEY.format(d="webhook_deliveries"),
                    [(ts(until), token, d, *UNDELIVERED, ts(now), ts(now), *UNDELIVERED)
                     for d in ids])
            rows = self.store.query(
                "SELECT d.delivery_id, d.endpoint_id, d.message_id, d.event_type, d.attempts, "
                "d.deadline_at, m.body FROM webhook_deliveries d JOIN webhook_messages m "
                f"ON m.message_id = d.message_id WHERE d.delivery_id IN ({marks}) "
                "AND d.claim_token IN (?, ?)", (*ids, token, token + AGAIN))
        order = {d: i for i, d in enumerate(ids)}
        return [Claimed(r[0], r[1], r[2], r[3], int(r[4]), self.store.from_ts(r[5]), r[6], token)
                for r in sorted(rows, key=lambda r: order[r[0]])]

    # -------------------------------------------------------------------------- sending

    def _send_claimed(self, item: Claimed, endpoint: Endpoint) -> None:
        try:
            self.send(item, endpoint)
        except Exception:  # noqa: BLE001 - the claim expires and the delivery is retried
            log.exception("webhook delivery %s failed unexpectedly", item.delivery_id)
        finally:
            with self._mutex:
                self._inflight[item.endpoint_id] -= 1
                if not self._inflight[item.endpoint_id]:
                    del self._inflight[item.endpoint_id]
            self.wake.set()

    def send(self, item: Claimed, endpoint: Endpoint) -> str:
        """Attempt one claimed delivery and queue its outcome for the next round's write
        (`flush`); returns it (`sent`, `failed`, `dead`, or `released` when its endpoint
        was disabled meanwhile)."""
        if not endpoint.enabled:
            self._release(item)
            return "released"
        at = self.clock()
        problem = self.url_policy.problem(endpoint.url)
        attempt = Attempt(None, problem, "") if problem else self._post(
            endpoint.url, item.message_id, at, item.body, endpoint.signing_secrets(at))
        outcome = self._record(item, attempt)
        self.observe(outcome, item.event_type)
        if outcome != "sent":
            log.warning("webhook delivery %s", "dead-lettered" if outcome == "dead" else "failed",
                        extra={"delivery_id": item.delivery_id, "endpoint_id": item.endpoint_id,
                               "message_id": item.message_id, "event_type": item.event_type,
                               "attempt": item.attempts + 1, "status_code": attempt.status_code,
                               "error": attempt.error})
        return outcome

    def _post(self, url: str, message_id: str, at: datetime, body: str,
              secrets: list[str]) -> Attempt:
        headers = {"content-type": "application/json", "webhook-id": message_id,
                   "webhook-timestamp": str(int(at.timestamp())),
                   "webhook-signature": sign(secrets, message_id, at, body)}
        return self.sender.post(url, body.encode(), headers)

    def _record(self, item: Claimed, attempt: Attempt) -> str:
        """Decide the attempt's outcome and queue the row that records it (written by the
        next `flush`, which releases the claim). If a replay or a manual retry asked for
        the delivery while the attempt was in flight (AGAIN), the row keeps the status,
        window and due time that request set: it is sent again."""
        now, ts = self.clock(), self.store.ts
        attempts = item.attempts + 1
        if attempt.ok:
            outcome, status, next_at, delivered = "sent", "delivered", now, now
        elif now >= item.deadline:
            outcome, status, next_at, delivered = "dead", "dead", now, None
        else:
            delay = self.policy.backoff(attempts, self.rng)
            if attempt.retry_after is not None:
                delay = min(max(delay, attempt.retry_after), self.policy.retry_max_seconds)
            outcome, status, delivered = "failed", "retrying", None
            next_at = min(now + timedelta(seconds=delay), item.deadline)
        token = item.token
        row = (attempts, ts(now), attempt.status_code, attempt.error, attempt.response,
               token, status, token, ts(next_at), token, ts(delivered),
               item.delivery_id, token, token + AGAIN)
        with self._mutex:
            self._outcomes.append(row)
        return outcome

    def flush(self) -> int:
        """Write the outcomes the workers reported (one transaction); returns how many. On
        an error they stay queued for the next round (their claims hold them meanwhile)."""
        with self._mutex:
            rows = list(self._outcomes)
        if not rows:
            return 0
        with self.store.locked(), self.store.transaction():
            self.store.executemany(RECORD, rows)
        with self._mutex:
            del self._outcomes[:len(rows)]
        return len(rows)

    def _release(self, item: Claimed) -> None:
        with self.store.locked():
            self.store.execute("UPDATE webhook_deliveries SET claimed_until = NULL, "
                               "claim_token = NULL WHERE delivery_id = ? AND claim_token IN (?, ?)",
                               (item.delivery_id, item.token, item.token + AGAIN))

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
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - unwritten outcomes: their claims expire, resent
            log.exception("webhook outcomes could not be written at stop")
        self.sender.close()

