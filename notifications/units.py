"""Units a patient can still draw, per bucket, kept beside the notifier's tracking position:
what `balance.low` is decided on (docs/webhooks.md).

`available(patient, bucket)` = the free units of the pools the patient owns or is an active
member of (an expired or refunded pool has none): the `available` of
`GET /v1/patients/{id}/balance`. It is updated from the Pool events alone, inside the
notifier's transaction, so it is exactly the value at the notifier's position in the log.
`balance.low` is sent when one event makes it fall from above the threshold to at most the
threshold, or from above zero to zero (one notification per event, patient and bucket).
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
    """Pool free units, pool links (owner and active members) and per-patient sums."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold

    def apply(self, store: Store, name: str, pool_id: str, e: Any) -> list[Fall]:
        """Apply one Pool event (`name` is its class name) inside the caller's transaction;
        returns the falls it caused, in (patient, bucket) order."""
        if name == "Granted":
            return self._granted(store, pool_id, e)
        if name == "MemberAdded":
            return self._link(store, pool_id, e.patient_id, +1)
        if name == "MemberRemoved":
            return self._link(store, pool_id, e.patient_id, -1)
        if name == "Held":
            return self._free(store, pool_id, {e.bucket: -1})
        if name in ("Released", "Reversed") and not (e.forfeited or e.revoked):
            return self._free(store, pool_id, {e.bucket: +1})
        if name == "Expired":
            return self._free(store, pool_id, {b: -int(n) for b, n in e.forfeited.items()})
        if name == "Revoked":
            return self._free(store, pool_id, {b: -int(n) for b, n in e.revoked.items()})
        return []

    def pool(self, store: Store, pool_id: str) -> tuple[str, str] | None:
        """(payment_reference, owner_id) of a pool seen granted."""
        rows = store.query("SELECT payment_reference, owner_id FROM webhook_pools "
                           "WHERE pool_id = ?", (pool_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    def _granted(self, store: Store, pool_id: str, e: Any) -> list[Fall]:
        store.execute("INSERT INTO webhook_pools (pool_id, payment_reference, owner_id) "
                      "VALUES (?, ?, ?) ON CONFLICT (pool_id) DO NOTHING",
                      (pool_id, e.payment_reference, e.owner_id))
        units = e.plan.get("units", {})
        store.executemany("INSERT INTO webhook_pool_units (pool_id, bucket, free) VALUES (?, ?, ?) "
                          "ON CONFLICT (pool_id, bucket) DO NOTHING",
                          [(pool_id, b, int(units.get(b, 0))) for b in BUCKETS])
        return self._link(store, pool_id, e.owner_id, +1)

    def _link(self, store: Store, pool_id: str, patient_id: str, sign: int) -> list[Fall]:
        if sign > 0:
            added = store.execute("INSERT INTO webhook_pool_links (pool_id, patient_id) "
                                  "VALUES (?, ?) ON CONFLICT (pool_id, patient_id) DO NOTHING",
                                  (pool_id, patient_id))
            if added != 1:
                return []
        elif store.execute("DELETE FROM webhook_pool_links WHERE pool_id = ? AND patient_id = ?",
                           (pool_id, patient_id)) != 1:
            return []
        free = dict(store.query("SELECT bucket, free FROM webhook_pool_units WHERE pool_id = ?",
                                (pool_id,)))
        return self._add(store, [patient_id], {b: sign * int(n) for b, n in free.items()})

    def _free(self, store: Store, pool_id: str, deltas: dict[str, int]) -> list[Fall]:
        deltas = {b: d for b, d in deltas.items() if d}
        if not deltas:
            return []
        store.executemany("UPDATE webhook_pool_units SET free = free + ? "
                          "WHERE pool_id = ? AND bucket = ?",
                          [(d, pool_id, b) for b, d in sorted(deltas.items())])
        patients = [r[0] for r in store.query(
            "SELECT patient_id FROM webhook_pool_links WHERE pool_id = ? ORDER BY patient_id",
            (pool_id,))]
        return self._add(store, patients, deltas)

    def _add(self, store: Store, patients: list[str], deltas: dict[str, int]) -> list[Fall]:
        falls = []
        for patient in patients:
            for bucket, delta in sorted(deltas.items()):
                if not delta:
                    continue
                rows = store.query("SELECT available FROM webhook_patient_units "
                                   "WHERE patient_id = ? AND bucket = ?", (patient, bucket))
                before = int(rows[0][0]) if rows else 0
                after = before + delta
                store.execute("INSERT INTO webhook_patient_units (patient_id, bucket, available) "
                              "VALUES (?, ?, ?) ON CONFLICT (patient_id, bucket) "
                              "DO UPDATE SET available = excluded.available",
                              (patient, bucket, after))
                if self.falls(before, after):
                    falls.append(Fall(patient, bucket, before, after))
        return falls

    def falls(self, before: int, after: int) -> bool:
        """Whether a change from `before` to `after` units is reported (see module doc)."""
        return after < before and (before > self.threshold >= after or before > 0 == after)
