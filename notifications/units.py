"""Units a patient can still draw, per bucket, kept beside the notifier's tracking position:
what `balance.low` is decided on (docs/webhooks.md).

`available(patient, bucket)` = the free units of the pools the patient owns or is an active
member of (an expired or refunded pool has none): the `available` of
`GET /v1/patients/{id}/balance`. It is updated from the Pool events alone, in the deriver's
batches, so it is exactly the value at the deriver's position in the log. `balance.low` is sent
when one event makes it fall from above the threshold to at most the threshold, or from above
zero to zero (one notification per event, patient and bucket).

A batch (`UnitsBatch`) reads the rows it needs before the deriver's write transaction, changes
them in memory, and writes the changed rows back inside it (`flush`): the transaction that holds
the database's write lock stays short. It is safe because only the deriver that moves the
tracking position writes these rows, and the position is compared-and-set in that transaction:
if another process derived meanwhile, this batch is rolled back and read again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from projections.store import Store

BUCKETS = ("text", "voice", "video")


@dataclass(frozen=True)
class Fall:
    """One patient's available units of one bucket fell across the threshold or to zero."""

    patient_id: str
    bucket: str
    before: int
    after: int


class Units:
    """The rule and a factory of batches."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold

    def batch(self, store: Store) -> "UnitsBatch":
        return UnitsBatch(store, self)

    def falls(self, before: int, after: int) -> bool:
        """Whether a change from `before` to `after` units is reported (see module doc)."""
        return after < before and (before > self.threshold >= after or before > 0 == after)


class UnitsBatch:
    """Pool free units, pool links (owner and active members) and per-patient sums, read on
    first use and written back by `flush` (see the module doc)."""

    def __init__(self, store: Store, units: Units) -> None:
        self.store, self.units = store, units
        self._pools: dict[str, tuple[str, str] | None] = {}  # pool -> (reference, owner)
        self._free: dict[str, dict[str, int]] = {}
        self._links: dict[str, set[str]] = {}
        self._links_read: dict[str, frozenset[str]] = {}
        self._available: dict[tuple[str, str], int] = {}
        self._new_pools: list[tuple[str, str, str]] = []
        self._dirty_free: set[str] = set()
        self._dirty_available: set[tuple[str, str]] = set()

    # ---------------------------------------------------------------------------- events

    def apply(self, name: str, pool_id: str, e: Any) -> list[Fall]:
        """Apply one Pool event (`name` is its class name); returns the falls it caused, in
        (patient, bucket) order."""
        if name == "Granted":
            return self._granted(pool_id, e)
        if name == "MemberAdded":
            return self._link(pool_id, e.patient_id, +1)
        if name == "MemberRemoved":
            return self._link(pool_id, e.patient_id, -1)
        if name == "Held":
            return self._change_free(pool_id, {e.bucket: -1})
        if name in ("Released", "Reversed") and not (e.forfeited or e.revoked):
            return self._change_free(pool_id, {e.bucket: +1})
        if name == "Expired":
            return self._change_free(pool_id, {b: -int(n) for b, n in e.forfeited.items()})
        if name == "Revoked":
            return self._change_free(pool_id, {b: -int(n) for b, n in e.revoked.items()})
        return []

    def pool(self, pool_id: str) -> tuple[str, str] | None:
        """(payment_reference, owner_id) of a pool seen granted."""
        if pool_id not in self._pools:
            rows = self.store.query("SELECT payment_reference, owner_id FROM webhook_pools "
                                    "WHERE pool_id = ?", (pool_id,))
            self._pools[pool_id] = (rows[0][0], rows[0][1]) if rows else None
        return self._pools[pool_id]

    def _granted(self, pool_id: str, e: Any) -> list[Fall]:
        if self.pool(pool_id) is None:
            self._pools[pool_id] = (e.payment_reference, e.owner_id)
            self._new_pools.append((pool_id, e.payment_reference, e.owner_id))
            units = e.plan.get("units", {})
            self._free[pool_id] = {b: int(units.get(b, 0)) for b in BUCKETS}
            self._dirty_free.add(pool_id)
        return self._link(pool_id, e.owner_id, +1)

    def _link(self, pool_id: str, patient_id: str, sign: int) -> list[Fall]:
        links = self._pool_links(pool_id)
        if (patient_id in links) == (sign > 0):
            return []
        (links.add if sign > 0 else links.discard)(patient_id)
        free = self._pool_free(pool_id)
        return self._add([patient_id], {b: sign * n for b, n in free.items()})

    def _change_free(self, pool_id: str, deltas: dict[str, int]) -> list[Fall]:
        deltas = {b: d for b, d in deltas.items() if d}
        if not deltas:
            return []
        free = self._pool_free(pool_id)
        for bucket, delta in deltas.items():
            free[bucket] = free.get(bucket, 0) + delta
        self._dirty_free.add(pool_id)
        return self._add(sorted(self._pool_links(pool_id)), deltas)

    def _add(self, patients: list[str], deltas: dict[str, int]) -> list[Fall]:
        falls = []
        for patient in patients:
            for bucket, delta in sorted(deltas.items()):
                if not delta:
                    continue
                before = self._patient_available(patient, bucket)
                after = before + delta
                self._available[(patient, bucket)] = after
                self._dirty_available.add((patient, bucket))
                if self.units.falls(before, after):
                    falls.append(Fall(patient, bucket, before, after))
        return falls

    # ------------------------------------------------------------------- rows, read once

    def _pool_free(self, pool_id: str) -> dict[str, int]:
        if pool_id not in self._free:
            self._free[pool_id] = {b: int(n) for b, n in self.store.query(
                "SELECT bucket, free FROM webhook_pool_units WHERE pool_id = ?", (pool_id,))}
        return self._free[pool_id]

    def _pool_links(self, pool_id: str) -> set[str]:
        if pool_id not in self._links:
            found = frozenset(r[0] for r in self.store.query(
                "SELECT patient_id FROM webhook_pool_links WHERE pool_id = ?", (pool_id,)))
            self._links_read[pool_id] = found
            self._links[pool_id] = set(found)
        return self._links[pool_id]

    def _patient_available(self, patient: str, bucket: str) -> int:
        key = (patient, bucket)
        if key not in self._available:
            rows = self.store.query("SELECT available FROM webhook_patient_units "
                                    "WHERE patient_id = ? AND bucket = ?", key)
            self._available[key] = int(rows[0][0]) if rows else 0
        return self._available[key]

    # ----------------------------------------------------------------------------- write

    def flush(self) -> None:
        """Write every changed row, inside the caller's transaction: one statement per table
        (Store.upsert/insert_new); a pool row or link that exists is left as it is."""
        store = self.store
        store.insert_new("webhook_pools", ("pool_id",),
                         ("pool_id", "payment_reference", "owner_id"), self._new_pools)
        store.upsert("webhook_pool_units", ("pool_id", "bucket"), ("pool_id", "bucket", "free"),
                     "free = excluded.free",
                     [(p, b, n) for p in sorted(self._dirty_free) for b, n in self._free[p].items()])
        added, removed = [], []
        for pool_id, links in self._links.items():
            read = self._links_read.get(pool_id, frozenset())
            added += [(pool_id, p) for p in sorted(links - read)]
            removed += [(pool_id, p) for p in sorted(read - links)]
        store.insert_new("webhook_pool_links", ("pool_id", "patient_id"),
                         ("pool_id", "patient_id"), added)
        # Rare (a member removed): a statement per row is cheap enough.
        store.executemany("DELETE FROM webhook_pool_links WHERE pool_id = ? AND patient_id = ?",
                          removed)
        store.upsert("webhook_patient_units", ("patient_id", "bucket"),
                     ("patient_id", "bucket", "available"), "available = excluded.available",
                     [(p, b, self._available[(p, b)]) for p, b in sorted(self._dirty_available)])
