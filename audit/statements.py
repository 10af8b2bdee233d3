"""Account statements between two recorded instants: opening, every movement, closing.

A period is (from, to] in recorded time: the opening balance is the balance as of `from`
(audit/asof.py), each movement is one event recorded after `from` and at or before `to` that
changed the account — with its position, both times, the event's name and ids, the session,
pool and block — and the closing balance is the balance as of `to`. So the closing balance of
one period is the opening balance of the next, and opening + the movements = closing.

- Patient, per bucket (units): `available` (free units of the pools the patient may draw on:
  a family member's hold on a shared pool moves it too), `held` and `charged` (the patient's own
  sessions). `usable_now` depends on the instant asked, not on movements: see the as-of read.
- Doctor, per currency (minor units): `credited`, `reversed`, `pending`, `available`, `held`,
  `withdrawn` (billing-rules.md §5, §7).

Bounded: a statement holds at most MAX_MOVEMENTS movements (StatementTooLong otherwise: ask for
a shorter period). Plain functions of the audit store; `as_csv` renders either as CSV.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any, Iterable

from audit.asof import POOL_COLUMNS, currencies_at, latest, links_at, pool_at, registered_at
from ledger.errors import error_type
from ledger.rules import BUCKETS

MAX_MOVEMENTS = 20_000
MAX_ROWS = 5 * MAX_MOVEMENTS  # history rows read for one statement (a shared pool's others)
UNIT_FIELDS = ("available", "held", "charged")
MONEY_FIELDS = ("credited", "reversed", "pending", "available", "held", "withdrawn")
EVENT_COLUMNS = ("position", "recorded_at", "occurred_at", "event", "originator_id",
                 "originator_version", "session_id", "pool_id", "block", "request_id")


StatementTooLong = error_type(
    "StatementTooLong", "statement_too_long", 422, "The period holds too many movements",
    when=f"a statement period with more than {MAX_MOVEMENTS:,} movements: ask for a shorter one")


# ------------------------------------------------------------------------------ patients


def patient_statement(store: Any, patient_id: str, start: datetime,
                      end: datetime) -> dict | None:
    """{"patient_id", "from", "to", "buckets": {b: {"opening", "closing"}}, "movements": [...]}
    or None if the patient held no pool by `end`. Movement: {"position", "recorded_at",
    "occurred_at", "event", "originator_id", "originator_version", "session_id", "pool_id",
    "block", "bucket", "change": {available, held, charged}, "balance": {…}}."""
    lo, hi = store.ts(start), store.ts(end)
    links_by_end = links_at(store, patient_id, hi)
    if not links_by_end:
        return None
    state = _UnitState(store, patient_id, lo, links_by_end)
    opening = state.totals()
    rows = _period_rows(store, patient_id, list(links_by_end), lo, hi)
    movements, events = [], _events(store, {r[0] for r in rows})
    for position, changes in _by_position(rows):
        before = state.totals()
        for change in changes:
            state.apply(change)
        after = state.totals()
        for bucket in BUCKETS:
            delta = {f: after[bucket][f] - before[bucket][f] for f in UNIT_FIELDS}
            if any(delta.values()):
                movements.append({**events[position], "bucket": bucket, "change": delta,
                                  "balance": dict(after[bucket])})
        if len(movements) > MAX_MOVEMENTS:
            raise StatementTooLong(f"more than {MAX_MOVEMENTS} movements: shorten the period")
    closing = state.totals()
    return {"patient_id": patient_id, "from": start.isoformat(), "to": end.isoformat(),
            "buckets": {b: {"opening": opening[b], "closing": closing[b]} for b in BUCKETS},
            "movements": movements}


class _UnitState:
    """A patient's pools (free units, link active) and own usage, moved row by row."""

    def __init__(self, store: Any, patient_id: str, at: Any, pools: Iterable[str]) -> None:
        links = links_at(store, patient_id, at)
        self.active = {pool_id: bool(link[1]) for pool_id, link in links.items()}
        self.free: dict[str, dict[str, int]] = {}
        for pool_id in pools:
            _, buckets = pool_at(store, pool_id, at)
            self.free[pool_id] = {b: values[1] for b, values in buckets.items()}
        self.usage = {}
        for bucket in BUCKETS:
            row = latest(store, "audit_patient_buckets",
                         {"patient_id": patient_id, "bucket": bucket}, ("held", "charged"), at)
            self.usage[bucket] = [int(v) for v in row] if row else [0, 0]

    def apply(self, change: tuple) -> None:
        kind, key, values = change
        if kind == "pool":
            pool_id, bucket = key
            self.free[pool_id][bucket] = int(values[1])
        elif kind == "member":
            self.active[key] = bool(values[1])
        else:
            self.usage[key] = [int(values[0]), int(values[1])]

    def totals(self) -> dict[str, dict[str, int]]:
        """Per bucket: available (free units of actively linked pools), held, charged."""
        out = {}
        for bucket in BUCKETS:
            available = sum(free[bucket] for pool_id, free in self.free.items()
                            if self.active.get(pool_id))
            out[bucket] = {"available": available, "held": self.usage[bucket][0],
                           "charged": self.usage[bucket][1]}
        return out


def _period_rows(store: Any, patient_id: str, pools: list[str], lo: Any,
                 hi: Any) -> list[tuple]:
    """(position, kind, key, values) of every history row of the patient's pools, links and
    usage recorded in (lo, hi], by position; raises StatementTooLong beyond MAX_ROWS."""
    rows: list[tuple] = []
    for pool_id in pools:
        rows += [(r[0], "pool", (pool_id, r[1]), r[2:]) for r in _query(
            store, f"SELECT position, bucket, {', '.join(POOL_COLUMNS)} FROM audit_pool_buckets "
                   "WHERE pool_id = ? AND recorded_at > ? AND recorded_at <= ?",
            (pool_id, lo, hi))]
    rows += [(r[0], "member", r[1], r[2:]) for r in _query(
        store, "SELECT position, pool_id, role, active FROM audit_members WHERE patient_id = ? "
               "AND recorded_at > ? AND recorded_at <= ?", (patient_id, lo, hi))]
    rows += [(r[0], "usage", r[1], r[2:]) for r in _query(
        store, "SELECT position, bucket, held, charged FROM audit_patient_buckets WHERE "
               "patient_id = ? AND recorded_at > ? AND recorded_at <= ?", (patient_id, lo, hi))]
    return sorted(rows, key=lambda r: r[0])


def _query(store: Any, sql: str, params: tuple) -> list[tuple]:
    with store.locked():
        rows = store.query(f"{sql} ORDER BY position LIMIT ?", (*params, MAX_ROWS + 1))
    if len(rows) > MAX_ROWS:
        raise StatementTooLong(f"more than {MAX_ROWS} history rows: shorten the period")
    return rows


def _by_position(rows: list[tuple]) -> Iterable[tuple[int, list[tuple]]]:
    """Rows grouped by position: (position, [(kind, key, values), …])."""
    group: list[tuple] = []
    current = None
    for position, kind, key, values in rows:
        if position != current and group:
            yield current, group
            group = []
        current = position
        group.append((kind, key, values))
    if group:
        yield current, group


def _events(store: Any, positions: set[int]) -> dict[int, dict]:
    """position → the event's description (EVENT_COLUMNS), read in chunks."""
    out: dict[int, dict] = {}
    ordered = sorted(positions)
    for start in range(0, len(ordered), 500):
        chunk = ordered[start:start + 500]
        with store.locked():
            rows = store.query(f"SELECT {', '.join(EVENT_COLUMNS)} FROM audit_events WHERE "
                               f"position IN ({', '.join('?' * len(chunk))})", chunk)
        for row in rows:
            item = dict(zip(EVENT_COLUMNS, row))
            for name in ("recorded_at", "occurred_at"):
                item[name] = store.from_ts(item[name]).isoformat() if item[name] else None
            out[int(item["position"])] = item
    return out


# ------------------------------------------------------------------------------- doctors


def doctor_statement(store: Any, doctor_id: str, start: datetime, end: datetime,
                     currency: str | None = None) -> dict | None:
    """{"doctor_id", "from", "to", "currencies": {c: {"opening", "closing", "movements"}}}, or
    None if the doctor was neither registered nor had a wallet by `end` (a registered doctor
    without pay yet has no currency). Movement: the event's description (EVENT_COLUMNS) with
    "change" and "balance" over MONEY_FIELDS."""
    lo, hi = store.ts(start), store.ts(end)
    currencies = [c for c in currencies_at(store, doctor_id, hi) if currency in (None, c)]
    if not currencies and not registered_at(store, doctor_id, hi):
        return None
    sections = {c: _wallet_section(store, doctor_id, c, lo, hi) for c in currencies}
    return {"doctor_id": doctor_id, "from": start.isoformat(), "to": end.isoformat(),
            "currencies": sections}


def _wallet_section(store: Any, doctor_id: str, currency: str, lo: Any, hi: Any) -> dict:
    keys = {"doctor_id": doctor_id, "currency": currency}
    row = latest(store, "audit_wallets", keys, MONEY_FIELDS, lo)
    balance = dict(zip(MONEY_FIELDS, (int(v) for v in row))) if row \
        else dict.fromkeys(MONEY_FIELDS, 0)
    opening = dict(balance)
    rows = _query(store, f"SELECT position, {', '.join(MONEY_FIELDS)} FROM audit_wallets WHERE "
                         "doctor_id = ? AND currency = ? AND recorded_at > ? AND recorded_at <= ?",
                  (doctor_id, currency, lo, hi))
    if len(rows) > MAX_MOVEMENTS:
        raise StatementTooLong(f"more than {MAX_MOVEMENTS} movements: shorten the period")
    events = _events(store, {int(r[0]) for r in rows})
    movements = []
    for position, *values in rows:
        after = dict(zip(MONEY_FIELDS, (int(v) for v in values)))
        delta = {f: after[f] - balance[f] for f in MONEY_FIELDS}
        balance = after
        if not any(delta.values()):
            continue  # e.g. Wallet.Opened: a fact, not a movement
        movements.append({**events[int(position)], "currency": currency, "change": delta,
                          "balance": dict(after)})
    return {"opening": opening, "closing": balance, "movements": movements}


# ----------------------------------------------------------------------------------- CSV


def as_csv(statement: dict) -> str:
    """A statement (patient or doctor) as CSV: one row for each opening, movement and closing,
    with the account (`bucket` or `currency`), the changes and the balance after."""
    unit = "buckets" in statement
    fields = UNIT_FIELDS if unit else MONEY_FIELDS
    account = "bucket" if unit else "currency"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["row", account, *EVENT_COLUMNS, *(f"{f}_change" for f in fields), *fields])
    blank = [""] * len(EVENT_COLUMNS)
    sections = statement["buckets"] if unit else statement["currencies"]
    for name, section in sections.items():
        writer.writerow(["opening", name, *blank, *[""] * len(fields),
                         *(section["opening"][f] for f in fields)])
        moves = [m for m in statement["movements"] if m["bucket"] == name] if unit \
            else section["movements"]
        for m in moves:
            writer.writerow(["movement", name, *(_cell(m.get(c)) for c in EVENT_COLUMNS),
                             *(m["change"][f] for f in fields), *(m["balance"][f] for f in fields)])
        writer.writerow(["closing", name, *blank, *[""] * len(fields),
                         *(section["closing"][f] for f in fields)])
    return out.getvalue()


def _cell(value: Any) -> Any:
    return "" if value is None else value
