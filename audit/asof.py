"""Balances and wallets as the ledger showed them at a recorded instant T.

"As of T" is the state after every event whose recorded time (the running maximum in log
order, audit/history.py) is at or before T: the same numbers `GET /v1/patients/{id}/balance`
and `GET /v1/doctors/{id}/wallet` answered at T, in the same shape (projections/projector.py),
with `usable_now` judged at T. Each account is one index lookup in the history tables; nothing
replays the log. Plain functions of the audit store: callable without HTTP.

Where recorded time and event time differ the answer says so: `ended_later` lists the
account's sessions whose end happened at or before T (event time) but was recorded after T —
the ledger did not know of that end at T, so its balance still showed those holds or charges
(settlement later released or reversed them).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ledger.rules import BUCKETS

PATIENT_POOLS_LIMIT = 1000  # as the live read (projections/projector.py)
LATE_ENDS_LIMIT = 100
POOL_COLUMNS = ("granted", "free", "held", "charged", "reversed", "forfeited", "revoked")


def latest(store: Any, table: str, keys: dict[str, Any], columns: tuple[str, ...],
           as_of: Any) -> tuple | None:
    """The values of one account in the last history row recorded at or before `as_of`
    (a store instant), or None."""
    where = " AND ".join(f"{k} = ?" for k in keys)
    with store.locked():
        rows = store.query(f"SELECT {', '.join(columns)} FROM {table} WHERE {where} AND "
                           f"recorded_at <= ? ORDER BY recorded_at DESC, position DESC LIMIT 1",
                           (*keys.values(), as_of))
    return tuple(rows[0]) if rows else None


def position_at(store: Any, as_of: datetime) -> int:
    """The last log position (of an event that moves an account) recorded at or before
    `as_of`; 0 before the first."""
    with store.locked():  # the last index entry at or before as_of (recorded_at is monotone)
        rows = store.query("SELECT position FROM audit_events WHERE recorded_at <= ? "
                           "ORDER BY recorded_at DESC, position DESC LIMIT 1", (store.ts(as_of),))
    return int(rows[0][0]) if rows else 0


def links_at(store: Any, patient_id: str, as_of: Any) -> dict[str, tuple]:
    """pool_id → (role, active, added_at) of the patient's links as of `as_of` (store instant)."""
    with store.locked():
        rows = store.query("SELECT pool_id, role, active, added_at FROM audit_members WHERE "
                           "patient_id = ? AND recorded_at <= ? ORDER BY pool_id, recorded_at, "
                           "position", (patient_id, as_of))
    return {row[0]: tuple(row[1:]) for row in rows}  # the last row per pool wins


def pool_at(store: Any, pool_id: str, as_of: Any) -> tuple[tuple, dict[str, list[int]]]:
    """(meta row, {bucket: [granted, free, held, charged, reversed, forfeited, revoked]})."""
    meta = latest(store, "audit_pools", {"pool_id": pool_id},
                  ("payment_reference", "starts_at", "effective_end", "expired", "refunded"),
                  as_of)
    buckets = {}
    for bucket in BUCKETS:
        row = latest(store, "audit_pool_buckets", {"pool_id": pool_id, "bucket": bucket},
                     POOL_COLUMNS, as_of)
        buckets[bucket] = [int(v) for v in row] if row else [0] * len(POOL_COLUMNS)
    return meta, buckets


def patient_balance_as_of(store: Any, patient_id: str, as_of: datetime) -> dict | None:
    """The patient's balance as the ledger showed it at recorded time `as_of` (aware), or None
    if the patient held no pool then. The live read's shape (Projector.patient_balance) plus
    `position` (the last event reflected) and `ended_later` (see the module docstring)."""
    at = store.ts(as_of)
    links = links_at(store, patient_id, at)
    if not links:
        return None
    totals = {b: {"available": 0, "usable_now": 0, "held": 0, "charged": 0} for b in BUCKETS}
    for bucket in BUCKETS:
        usage = latest(store, "audit_patient_buckets",
                       {"patient_id": patient_id, "bucket": bucket}, ("held", "charged"), at)
        if usage:
            totals[bucket].update(held=int(usage[0]), charged=int(usage[1]))
    entries = []
    for pool_id, (role, active, added_at) in links.items():
        meta, buckets = pool_at(store, pool_id, at)
        entry = _pool_entry(store, pool_id, role, active, meta, buckets)
        usable, usable_now = _usability(entry, store.from_ts(added_at), as_of)
        for bucket, count in entry["buckets"].items():
            totals[bucket]["available"] += count["available"] if usable else 0
            totals[bucket]["usable_now"] += count["available"] if usable_now else 0
        entries.append(entry)
    entries.sort(key=lambda e: (e["effective_end_dt"], e["starts_at_dt"], e["pool_id"]))
    for entry in entries:
        del entry["effective_end_dt"], entry["starts_at_dt"]
    return {"patient_id": patient_id, "as_of": as_of.isoformat(), "buckets": totals,
            "pools": entries[:PATIENT_POOLS_LIMIT], "position": position_at(store, as_of),
            "ended_later": late_ends(store, "patient_id", patient_id, as_of)}


def _pool_entry(store: Any, pool_id: str, role: str, active: Any, meta: tuple,
                buckets: dict[str, list[int]]) -> dict:
    reference, starts, end, expired, refunded = meta
    starts_at, effective_end = store.from_ts(starts), store.from_ts(end)
    return {"pool_id": pool_id, "payment_reference": reference, "role": role,
            "active": bool(active), "starts_at": starts_at.isoformat(),
            "effective_end": effective_end.isoformat(), "expired": bool(expired),
            "refunded": bool(refunded),
            "buckets": {b: _bucket(values) for b, values in buckets.items()},
            "effective_end_dt": effective_end, "starts_at_dt": starts_at}


def _bucket(values: list[int]) -> dict:
    granted, free, held, charged, reversed_, forfeited, revoked = values
    return {"granted": granted, "available": free, "held": held, "charged": charged,
            "reversed": reversed_, "forfeited": forfeited, "revoked": revoked}


def _usability(entry: dict, added_at: datetime, now: datetime) -> tuple[bool, bool]:
    """(counts in available, counts in usable_now): the live read's rule
    (projections/projector.py `_usability`, billing-rules.md §4)."""
    usable = entry["active"] and not entry["expired"] and not entry["refunded"]
    member_now = entry["role"] == "owner" or added_at <= now
    valid_now = entry["starts_at_dt"] <= now < entry["effective_end_dt"]
    return usable, usable and member_now and valid_now


def doctor_wallet_as_of(store: Any, doctor_id: str, as_of: datetime) -> dict | None:
    """The doctor's wallets as the ledger showed them at recorded time `as_of`, or None if the
    doctor was not registered and had no wallet then. The live read's shape
    (Projector.doctor_wallet) plus `position` and `ended_later`."""
    at = store.ts(as_of)
    keys = ("pending_minor", "available_minor", "held_minor", "withdrawn_minor",
            "credited_minor", "reversed_minor")
    wallets = []
    for currency in currencies_at(store, doctor_id, at):
        row = latest(store, "audit_wallets", {"doctor_id": doctor_id, "currency": currency},
                     ("pending", "available", "held", "withdrawn", "credited", "reversed"), at)
        wallets.append({"currency": currency, **{k: int(v) for k, v in zip(keys, row)}})
    if not wallets and not registered_at(store, doctor_id, at):
        return None
    return {"doctor_id": doctor_id, "wallets": wallets, "as_of": as_of.isoformat(),
            "position": position_at(store, as_of),
            "ended_later": late_ends(store, "doctor_id", doctor_id, as_of)}


def currencies_at(store: Any, doctor_id: str, at: Any) -> list[str]:
    with store.locked():
        rows = store.query("SELECT currency FROM audit_wallet_currencies WHERE doctor_id = ? "
                           "AND recorded_at <= ? ORDER BY currency", (doctor_id, at))
    return [row[0] for row in rows]


def registered_at(store: Any, doctor_id: str, at: Any) -> bool:
    with store.locked():
        rows = store.query("SELECT 1 FROM audit_events WHERE doctor_id = ? AND event = ? AND "
                           "recorded_at <= ? LIMIT 1", (doctor_id, "Doctor.Registered", at))
    return bool(rows)


def late_ends(store: Any, column: str, account_id: str, as_of: datetime) -> list[dict]:
    """Ends of the account's sessions that happened at or before `as_of` but were recorded
    after it: {session_id, ended_at (event time), recorded_at, position}, earliest first."""
    at = store.ts(as_of)
    with store.locked():
        rows = store.query(
            f"SELECT session_id, occurred_at, recorded_at, position FROM audit_events WHERE "
            f"{column} = ? AND event = ? AND occurred_at <= ? AND recorded_at > ? "
            f"ORDER BY position LIMIT ?",
            (account_id, "Session.Ended", at, at, LATE_ENDS_LIMIT))
    return [{"session_id": sid, "ended_at": store.from_ts(occurred).isoformat(),
             "recorded_at": store.from_ts(recorded).isoformat(), "position": int(position)}
            for sid, occurred, recorded, position in rows]
