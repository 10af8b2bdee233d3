"""Units a patient can still draw, per bucket, kept beside the notifier's tracking position:
what `balance.low` is decided on (docs/webhooks.md).

`available(patient, bucket)` = the free units of the pools the patient owns or is an active
member of (an expired or refunded pool has none): the `available` of
`GET /v1/patients/{id}/balance`. It is updated from the Pool events alone, in the deriver's
batches, so it is exactly the value at the deriver's position in the log. `balance.low` is sent
when one event makes it fall from above the threshold to at most the threshold, or from above
zero to zero (one notification per event, patient and bucket).

A batch (`UnitsBatch`) reads the rows it needs before the deriver's write transaction (those of
its Pool events' pools and of their patients in one query per table, `read_ahead`; anything
else on first use), changes them in memory, and writes the changed rows back inside it, one
statement per table (`flush`): the transaction that holds the database's write lock stays
short. It is safe because only the deriver that moves the tracking position writes these rows,
and the position is compared-and-set in that transaction: if another process derived
meanwhile, this batch is rolled back and read again.

For the same reason the rows a committed batch held are the tables' content for as long as the
tracking row still reads the position that batch committed: `Units` keeps them (`keep`, bounded
by MAX_KEPT_POOLS and MAX_KEPT_AVAILABLE) and hands them to the next batch only if it starts
from exactly that position (`batch`). Any other start (another process advanced, this one lost
the race) or a batch that never commits (an exception, a rollback) drops them: a batch takes
the kept rows and changes them in place, and only a commit gives them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from projections.store import Store

BUCKETS = ("text", "voice", "video")
# Bounds on the rows kept between batches (about 1 KiB per pool with its units and links,
# ~100 B per patient and bucket: some 70 MB at most); beyond them the next batch reads again.
MAX_KEPT_POOLS = 50_000
MAX_KEPT_AVAILABLE = 200_000


@dataclass(frozen=True)
class Fall:
    """One patient's available units of one bucket fell across the threshold or to zero."""

    patient_id: str
    bucket: str
    before: int
    after: int


@dataclass
class UnitsRows:
    """The units rows a batch has read or changed (absent key: not read yet; a pool never
    granted reads as None / {} / empty set, a patient without a row as 0)."""

    pools: dict[str, tuple[str, str] | None] = field(default_factory=dict)  # → (ref, owner)
    free: dict[str, dict[str, int]] = field(default_factory=dict)  # pool → {bucket: units}
    links: dict[str, set[str]] = field(default_factory=dict)  # pool → owner and active members
    available: dict[tuple[str, str], int] = field(default_factory=dict)  # (patient, bucket)

    def within(self, max_pools: int, max_available: int) -> bool:
        """Whether it holds at most `max_pools` pools and `max_available` patient buckets."""
        pools = max(len(self.pools), len(self.free), len(self.links))
        return pools <= max_pools and len(self.available) <= max_available


class Units:
    """The rule, a factory of batches, and the rows the last committed batch left (see the
    module doc). Used by one deriver, one batch at a time."""

    def __init__(self, threshold: int, max_pools: int = MAX_KEPT_POOLS,
                 max_available: int = MAX_KEPT_AVAILABLE) -> None:
        self.threshold = threshold
        self.max_pools, self.max_available = max_pools, max_available
        self._kept: tuple[int, UnitsRows] | None = None

    def batch(self, store: Store, position: int) -> "UnitsBatch":
        """A batch of the events after tracking `position` (the notification id the tracking
        row read when it started). It starts from the rows kept at exactly that position, if
        any; they are no longer kept (a batch that does not commit cannot leave them stale)."""
        kept, self._kept = self._kept, None
        rows = kept[1] if kept is not None and kept[0] == position else UnitsRows()
        return UnitsBatch(store, self, rows)

    def keep(self, batch: "UnitsBatch", position: int) -> None:
        """Keep `batch`'s rows after its transaction committed tracking `position`; dropped
        instead if beyond the bounds."""
        rows = batch.rows
        self._kept = (position, rows) if rows.within(self.max_pools, self.max_available) \
            else None

    def kept_position(self) -> int | None:
        """The position the kept rows are the tables' content at, None when none are kept."""
        return None if self._kept is None else self._kept[0]

    def falls(self, before: int, after: int) -> bool:
        """Whether a change from `before` to `after` units is reported (see module doc)."""
        return after < before and (before > self.threshold >= after or before > 0 == after)


class UnitsBatch:
    """Pool free units, pool links (owner and active members) and per-patient sums, read on
    first use (or kept from the previous batch) and written back by `flush` (see the module
    doc)."""

    def __init__(self, store: Store, units: Units, rows: UnitsRows | None = None) -> None:
        self.store, self.units = store, units
        self.rows = rows if rows is not None else UnitsRows()
        self._pools, self._free = self.rows.pools, self.rows.free
        self._links, self._available = self.rows.links, self.rows.available
        # This batch's own: the links as they were before it (what flush diffs against) and
        # the rows it changed.
        self._links_read: dict[str, frozenset[str]] = {}
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
            self._read_pools([pool_id])
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

    def read_ahead(self, events: Iterable[Any]) -> None:
        """Read the rows the Pool `events` will need and this batch does not hold yet: one
        query per table (a query per pool or patient cost most of the deriver's reads); what
        is still missing later is read on first use."""
        pool_ids, patients = set(), set()
        for e in events:
            pool_ids.add(str(e.originator_id))
            name = type(e).__name__
            if name == "Granted":
                patients.add(e.owner_id)
            elif name in ("MemberAdded", "MemberRemoved"):
                patients.add(e.patient_id)
        self._read_pools(sorted(pool_ids))
        for pool_id in pool_ids:
            patients.update(self._links[pool_id])
        self._read_patients(sorted(p for p in patients
                                   if any((p, b) not in self._available for b in BUCKETS)))

    def _read_pools(self, pool_ids: list[str]) -> None:
        store = self.store
        wanted = [p for p in pool_ids if p not in self._pools]
        found = {r[0]: (r[1], r[2]) for r in store.query_keys(
            "webhook_pools", ("pool_id", "payment_reference", "owner_id"), "pool_id", wanted)}
        self._pools.update((p, found.get(p)) for p in wanted)
        wanted = [p for p in pool_ids if p not in self._free]
        self._free.update((p, {}) for p in wanted)
        for pool_id, bucket, free in store.query_keys(
                "webhook_pool_units", ("pool_id", "bucket", "free"), "pool_id", wanted):
            self._free[pool_id][bucket] = int(free)
        wanted = [p for p in pool_ids if p not in self._links]
        self._links.update((p, set()) for p in wanted)
        for pool_id, patient_id in store.query_keys(
                "webhook_pool_links", ("pool_id", "patient_id"), "pool_id", wanted):
            self._links[pool_id].add(patient_id)

    def _read_patients(self, patients: list[str]) -> None:
        found = {(p, b): int(n) for p, b, n in self.store.query_keys(
            "webhook_patient_units", ("patient_id", "bucket", "available"), "patient_id",
            patients)}
        for key, available in found.items():
            self._available.setdefault(key, available)
        for patient in patients:
            for bucket in BUCKETS:
                self._available.setdefault((patient, bucket), 0)

    def _pool_free(self, pool_id: str) -> dict[str, int]:
        if pool_id not in self._free:
            self._read_pools([pool_id])
        return self._free[pool_id]

    def _pool_links(self, pool_id: str) -> set[str]:
        if pool_id not in self._links_read:  # first use in this batch: what flush diffs against
            if pool_id not in self._links:  # neither kept nor read ahead
                self._read_pools([pool_id])
            self._links_read[pool_id] = frozenset(self._links[pool_id])
        return self._links[pool_id]

    def _patient_available(self, patient: str, bucket: str) -> int:
        key = (patient, bucket)
        if key not in self._available:
            self._read_patients([patient])
        return self._available[key]

    # ----------------------------------------------------------------------------- write

    def flush(self) -> None:
        """Write every changed row, inside the caller's transaction: one statement per table
        (Store.upsert/insert_new); a pool row or link that exists is left as it is."""
        store = self.store
        store.insert_new("webhook_pools", ("pool_id",),
                         ("pool_id", "payment_reference", "owner_id"), self._new_pools)
        store.upsert("webhook_pool_units", ("pool_id", "bucket"), ("pool_id", "bucket", "free"),
                     "free = excluded.free", [(p, b, n) for p in sorted(self._dirty_free)
                                              for b, n in self._free[p].items()])
        added, removed = [], []
        for pool_id, read in self._links_read.items():
            links = self._links[pool_id]
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
