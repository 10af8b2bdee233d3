"""Webhook notifier throughput (docs/webhooks.md): deriving notifications from the log, and
sending them signed over loopback HTTP to a receiver that verifies each one, beside a raw
INSERT of the same number of rows into the same database (the ceiling of the store).

Timing lives here, never in pass/fail tests.
"""

from __future__ import annotations

import time
from notifications import DeliveryPolicy, Notifier, NotifierConfig
from projections.store import open_store
from simulation.receiver import Receiver


def bench_notifier(label: str, url: str, ledger) -> list[tuple[str, str, int, float]]:
    """Rows (store, stage, count, seconds) for a ledger whose log is already written."""
    config = NotifierConfig(allow_http_hosts=frozenset({"127.0.0.1"}),
                            policy=DeliveryPolicy(poll_seconds=0.01))
    notifier = Notifier(ledger, url, config)
    receiver = Receiver()
    rows = []
    try:
        started = time.perf_counter()
        read = 0
        while chunk := notifier.derive():
            read += chunk
        rows.append((label, "webhook derive (events)", read, time.perf_counter() - started))
        endpoint, secret = notifier.create_endpoint(receiver.url, [])
        receiver.secrets.append(secret)
        started = time.perf_counter()
        queued, position = 0, 0
        while True:  # bounded: next_position grows until the log's end
            replay = notifier.replay(endpoint.endpoint_id, position)
            queued += replay["deliveries"]
            if replay["next_position"] is None:
                break
            position = replay["next_position"]
        rows.append((label, "webhook fan-out (deliveries)", queued, time.perf_counter() - started))
        started = time.perf_counter()
        notifier.drain(max_seconds=600)
        receiver.wait_for(queued, timeout=60)
        rows.append((label, "webhook send+verify (HTTP)", len(receiver.distinct()),
                     time.perf_counter() - started))
        rows.append(_raw_insert(label, url, max(queued, 1)))
    finally:
        notifier.close()
        receiver.close()
    return rows


def _raw_insert(label: str, url: str, count: int) -> tuple[str, str, int, float]:
    """The store's ceiling: `count` delivery-sized rows in transactions of 500."""
    store = open_store(url)
    try:
        store.execute("CREATE TABLE IF NOT EXISTS bench_raw (id TEXT PRIMARY KEY, body TEXT)")
        body = "x" * 400
        started = time.perf_counter()
        for first in range(0, count, 500):
            with store.transaction():
                store.executemany("INSERT INTO bench_raw (id, body) VALUES (?, ?)",
                                  [(f"r{i}", body) for i in range(first, min(count, first + 500))])
        return label, "raw insert, 500 rows/txn", count, time.perf_counter() - started
    finally:
        store.execute("DROP TABLE IF EXISTS bench_raw")
        store.close()

