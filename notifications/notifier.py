"""The Notifier: the deriver and the dispatcher of one process, and what the API asks of them
(endpoints, deliveries, retry, replay, health).

Both loops run in daemon threads next to the API; neither is on the write path. Several
processes may run them on one database: the deriver's tracking is compare-and-set and a
delivery is claimed before it is sent (docs/webhooks.md).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from notifications.delivery import ASK_AGAIN, ASK_AGAIN_PARAMS, UNDELIVERED, DeliveryPolicy, Dispatcher
from notifications.deriver import Deriver, insert_deliveries, subscribed
from notifications.endpoints import Endpoint, Endpoints, UrlPolicy
from notifications.errors import UnknownWebhookDelivery
from projections.store import open_store

log = logging.getLogger("ledger.webhooks")
ERROR_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0)
MAX_REPLAY = 100_000
DELIVERY_COLUMNS = ("delivery_id, message_id, endpoint_id, event_type, ordering_key, position, "
                    "ordinal, status, attempts, created_at, deadline_at, next_attempt_at, "
                    "last_attempt_at, last_status_code, last_error, last_response, delivered_at")
STATUSES = ("pending", "retrying", "delivered", "dead")


def system_clock() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class NotifierConfig:
    """What the notifier needs from the settings (runtime/settings.py, `LEDGER_WEBHOOK_*`)."""

    balance_low_units: int = 1
    public_base_url: str = ""
    allow_http_hosts: frozenset[str] = frozenset()
    policy: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    derive_poll_seconds: float = 0.2
    coalesce_seconds: float = 0.0  # after a partial page, wait this long (runtime/settings.py)


class Notifier:
    """Webhooks of one process. `clock()` is the wall clock (aware UTC): delivery times,
    signatures' timestamps and secret grace periods use it, never the ledger's clock (which may
    be manual). `observe(outcome, event_type)` counts attempts for the metrics."""

    def __init__(self, ledger: Any, database_url: str, config: NotifierConfig = NotifierConfig(),
                 *, clock: Callable[[], datetime] = system_clock,
                 observe: Callable[[str, str], None] | None = None) -> None:
        self.ledger, self.config, self.clock = ledger, config, clock
        self.url_policy = UrlPolicy(frozenset(h.lower() for h in config.allow_http_hosts))
        self._derive_store = open_store(database_url, derived=True)
        self.store = open_store(database_url)
        self.deriver = Deriver(ledger, self._derive_store, clock=clock,
                               threshold=config.balance_low_units,
                               base_url=config.public_base_url, retry_for=config.policy.retry_for)
        self.deriver.setup()
        self.endpoints = Endpoints(self.store, clock, self.deriver.head, self.url_policy)
        self.dispatcher = Dispatcher(self.store, self.endpoints, clock=clock,
                                     policy=config.policy, url_policy=self.url_policy,
                                     observe=observe)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # ---------------------------------------------------------------------------- loops

    def derive(self) -> int:
        """Derive everything committed so far (bounded per call); returns events read."""
        read = self.deriver.catch_up()
        if read:
            self.dispatcher.wake.set()
        return read

    def run_once(self) -> tuple[int, int]:
        """One round in the calling thread: derive, then hand what is due to the senders.
        Returns (events read, deliveries handed over)."""
        return self.derive(), self.dispatcher.dispatch()

    def drain(self, max_seconds: float = 600.0) -> int:
        """Derive everything committed, then send until nothing is due now and nothing is in
        flight (deliveries waiting for a later retry stay for the next run); bounded by
        `max_seconds`. Returns deliveries handed to the senders."""
        deadline, handed = time.monotonic() + max_seconds, 0
        while self.derive() and time.monotonic() < deadline:
            pass
        while time.monotonic() < deadline:
            was_busy = self.dispatcher.busy()  # a send finishing meanwhile may free a next one
            sent = self.dispatcher.dispatch()
            handed += sent
            if not sent and not was_busy and not self.dispatcher.busy():
                return handed
            self.dispatcher.wake.wait(0.05)
            self.dispatcher.wake.clear()
        return handed

    def start(self) -> None:
        """Run the deriver and the dispatcher in daemon threads. Idempotent."""
        if self._thread is not None:
            return
        self._stop.clear()
        listeners = getattr(self.ledger, "commit_listeners", None)
        if listeners is not None:  # derive right after this process's commits
            listeners.append(self._on_commit)
        self._thread = threading.Thread(target=self._derive_loop, name="webhook-derive",
                                        daemon=True)
        self._thread.start()
        self.dispatcher.start()

    def _on_commit(self, *args: Any) -> None:
        self._wake.set()

    def _derive_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()
            try:
                read = self.derive()
                failures, self.last_error = 0, None
            except Exception as exc:  # noqa: BLE001 - store unreachable or a bug: retry, bounded
                delay = ERROR_BACKOFF_SECONDS[min(failures, len(ERROR_BACKOFF_SECONDS) - 1)]
                failures += 1
                self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
                log.exception("webhook derivation failed; retrying in %.1f s", delay)
                self._stop.wait(delay)
                continue
            if not read:
                self._wake.wait(self.config.derive_poll_seconds)
            else:  # caught up to the head read at the start: let the next page gather
                self._stop.wait(self.config.coalesce_seconds)

    def close(self) -> None:
        """Stop both loops (requests in flight get up to their timeout) and close the stores."""
        thread, self._thread = self._thread, None
        self._stop.set()
        self._wake.set()
        listeners = getattr(self.ledger, "commit_listeners", None)
        if listeners is not None and self._on_commit in listeners:
            listeners.remove(self._on_commit)
        if thread is not None:
            thread.join(30)
        self.dispatcher.stop(timeout=self.config.policy.timeout_seconds + 5)
        for store in (self._derive_store, self.store):
            with store.locked():
                store.close()

    # ------------------------------------------------------------------------ endpoints

    def create_endpoint(self, url: str, event_types: list[str], description: str = "",
                        enabled: bool = True) -> tuple[Endpoint, str]:
        return self.endpoints.create(url, event_types, description, enabled)

    # ----------------------------------------------------------------------- deliveries

    def deliveries(self, *, endpoint_id: str | None = None, status: str | None = None,
                   event_type: str | None = None, cursor: tuple[int, int, str] | None = None,
                   limit: int = 100) -> list[dict]:
        """Deliveries in log order (position, ordinal, endpoint), filtered, after `cursor`
        (position, ordinal, endpoint id of the last one seen), at most `limit`."""
        where, params = [], []
        for column, value in (("endpoint_id", endpoint_id), ("status", status),
                              ("event_type", event_type)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if cursor is not None:
            where.append("(position > ? OR (position = ? AND (ordinal > ? OR (ordinal = ? "
                         "AND endpoint_id > ?))))")
            params += [cursor[0], cursor[0], cursor[1], cursor[1], cursor[2]]
        sql = (f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY position, ordinal, endpoint_id LIMIT ?")
        with self.store.locked():
            rows = self.store.query(sql, (*params, limit))
        return [self._delivery(r) for r in rows]

    def delivery(self, delivery_id: str) -> dict:
        """One delivery with its message (`payload`, as sent); raises UnknownWebhookDelivery."""
        with self.store.locked():
            rows = self.store.query(f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries "
                                    "WHERE delivery_id = ?", (delivery_id,))
            if not rows:
                raise UnknownWebhookDelivery(f"no webhook delivery {delivery_id!r}")
            body = self.store.query("SELECT body FROM webhook_messages WHERE message_id = ?",
                                    (rows[0][1],))[0][0]
        return {**self._delivery(rows[0]), "payload": body}

    def retry(self, delivery_id: str) -> dict:
        """Send a delivery again now, whatever its status, with a fresh retry window (a
        delivered or dead one becomes pending; the same webhook-id is sent). An attempt in
        flight meanwhile began before this request: its outcome does not settle the delivery
        (delivery.py AGAIN)."""
        self.delivery(delivery_id)
        now = self.clock()
        ts = self.store.ts
        with self.store.locked(), self.store.transaction(durable=True):  # acknowledged
            self.store.execute(
                "UPDATE webhook_deliveries SET status = CASE WHEN status IN (?, ?) THEN status "
                f"ELSE ? END, next_attempt_at = ?, deadline_at = ?, delivered_at = NULL, {ASK_AGAIN} "
                "WHERE delivery_id = ?", (*UNDELIVERED, "pending", ts(now),
                                          ts(now + self.config.policy.retry_for),
                                          *ASK_AGAIN_PARAMS, delivery_id))
        self.dispatcher.wake.set()
        return self.delivery(delivery_id)

    def replay(self, endpoint_id: str, from_position: int, limit: int = 10_000) -> dict:
        """Send the endpoint every notification it subscribes to from log position
        `from_position` on (at most `limit` per call; `next_position` continues), again if
        already sent, each with its own webhook-id and a fresh retry window. An attempt in
        flight meanwhile does not count as that sending (delivery.py AGAIN)."""
        endpoint = self.endpoints.get(endpoint_id)
        now, ts = self.clock(), self.store.ts
        with self.store.locked():
            messages = self.store.query(
                "SELECT message_id, position, ordinal, event_type, ordering_key "
                "FROM webhook_messages WHERE position >= ? ORDER BY position, ordinal LIMIT ?",
                (from_position, limit))
            wanted = [m for m in messages if subscribed(endpoint.event_types, m[3])]
            with self.store.transaction(durable=True):
                insert_deliveries(self.store, [self.deriver.delivery_row(m, endpoint_id, now)
                                               for m in wanted])
                self.store.executemany(
                    "UPDATE webhook_deliveries SET status = CASE WHEN status IN (?, ?) "
                    "THEN status ELSE ? END, next_attempt_at = ?, deadline_at = ?, "
                    f"delivered_at = NULL, {ASK_AGAIN} WHERE message_id = ? AND endpoint_id = ?",
                    [(*UNDELIVERED, "pending", ts(now), ts(now + self.config.policy.retry_for),
                      *ASK_AGAIN_PARAMS, m[0], endpoint_id) for m in wanted])
        self.dispatcher.wake.set()
        more = len(messages) == limit
        return {"endpoint_id": endpoint_id, "from_position": from_position,
                "deliveries": len(wanted),
                "next_position": int(messages[-1][1]) + 1 if more else None}

    def _delivery(self, row: tuple) -> dict:
        (delivery_id, message_id, endpoint_id, event_type, key, position, ordinal, status,
         attempts, created, deadline, next_at, last_at, code, error, response, delivered) = row
        iso = lambda v: (self.store.from_ts(v).isoformat() if v is not None else None)  # noqa: E731
        undelivered = status in UNDELIVERED
        return {"id": delivery_id, "webhook_id": message_id, "endpoint_id": endpoint_id,
                "event_type": event_type, "ordering_key": key, "position": int(position),
                "ordinal": int(ordinal), "status": status, "attempts": int(attempts),
                "created_at": iso(created), "deadline_at": iso(deadline),
                "next_attempt_at": iso(next_at) if undelivered else None,
                "last_attempt_at": iso(last_at), "last_status_code": code,
                "last_error": error, "last_response": response, "delivered_at": iso(delivered)}

    # --------------------------------------------------------------------------- health

    def health(self) -> dict:
        """{"head", "position", "lag_events", "undelivered", "oldest_undelivered_seconds",
        "dead", "last_error"}: the derivation's progress and the undelivered backlog of
        enabled endpoints (oldest: seconds since the oldest undelivered notification was
        derived, 0.0 when none)."""
        head, position = self.deriver.head(), self.deriver.position()
        with self.store.locked():
            count, oldest = self.store.query(
                "SELECT COUNT(*), MIN(d.created_at) FROM webhook_deliveries d "
                "JOIN webhook_endpoints e ON e.endpoint_id = d.endpoint_id "
                "WHERE d.status IN (?, ?) AND e.enabled = ?", (*UNDELIVERED, True))[0]
            dead = self.store.query("SELECT COUNT(*) FROM webhook_deliveries WHERE status = ?",
                                    ("dead",))[0][0]
        age = 0.0 if oldest is None else max(
            0.0, (self.clock() - self.store.from_ts(oldest)).total_seconds())
        return {"head": head, "position": position, "lag_events": max(0, head - position),
                "undelivered": int(count), "oldest_undelivered_seconds": age, "dead": int(dead),
                "last_error": self.last_error}
