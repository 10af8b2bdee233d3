"""I7: rebuild every view from position zero into a scratch store and compare with the live views.

The scratch store is a temporary SQLite file, or the PostgreSQL schema `<schema>_replay`
(dropped and recreated, then dropped). The same projection code runs on both; accounts are
streamed in key order from both stores and merged. Live rows are also checked for I6
(conservation) and I3 (no negative free units, no negative available money).
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

from eventsourcing.utils import get_topic

from ledger.domain import Session
from ledger.rules import Policy
from projections.projector import Projector, ProjectionStalled, describe_stall, stall_of
from projections.store import Store
from projections.stored import StoredRow
from storage import is_postgres, postgres_conninfo, postgres_parts
from projections.views import PATIENT_FIELDS, POOL_FIELDS, WALLET_FIELDS
from projections.marketplace import MONEY_WALLET_FIELDS, PLATFORM_FIELDS

PAGE = 1000
SESSION_SETTLED = get_topic(Session.Settled)
MAX_PAGES = 10_000_000  # bound on pages per table (10^10 accounts)
REPLAY_CHUNK = 50_000
REPLAY_PAGE = 10_000  # notifications read and decoded at a time
FLUSH_ROWS = 20_000  # pending rows a projection folds in memory before writing them
TS_COLUMNS = frozenset({"starts_at", "effective_end", "added_at", "removed_at", "next_due_at"})
BOOL_COLUMNS = frozenset({"expired", "refunded", "active"})
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Account:
    """One kind of account: a view table, its key columns and compared value columns."""

    label: str
    table: str
    keys: tuple[str, ...]
    values: tuple[str, ...]


ACCOUNTS = (
    Account("pool", "balance_pool_buckets", ("pool_id", "bucket"), POOL_FIELDS),
    Account("pool", "balance_pools", ("pool_id",),
            ("payment_reference", "owner_id", "starts_at", "effective_end", "expired", "refunded")),
    Account("member", "balance_members", ("pool_id", "patient_id"),
            ("role", "active", "added_at", "removed_at")),
    Account("patient", "balance_patient_buckets", ("patient_id", "bucket"), PATIENT_FIELDS),
    Account("wallet", "wallet_balances", ("doctor_id", "currency"), WALLET_FIELDS),
    Account("wallet id", "wallet_ids", ("wallet_id",), ("doctor_id", "currency")),
    Account("session", "live_sessions", ("session_id",),
            ("patient_id", "doctor_id", "kind", "state", "next_due_at")),
    Account("live pool", "live_pools", ("pool_id",), ("effective_end", "expired")),
    Account("money wallet", "money_wallets", ("patient_id", "currency"), MONEY_WALLET_FIELDS),
    Account("platform", "platform_accounts", ("currency",), PLATFORM_FIELDS),
    Account("consultation", "live_consultations", ("consultation_id",),
            ("patient_id", "practitioner_id", "status", "next_due_at")),
)


@dataclass
class VerifyReport:
    """Outcome of replay_verify: `differences` name each account that disagrees."""

    events: int = 0  # events applied by the replay, across projections
    accounts: int = 0  # accounts (view rows) compared
    position: int = 0  # notification id the live views were compared at
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    @property
    def events_replayed(self) -> int:
        return self.events

    @property
    def accounts_compared(self) -> int:
        return self.accounts


def replay_verify(ledger: Any, database_url: str, policy: Policy,
                  progress: Progress | None = None) -> VerifyReport:
    """Catch the live views up, replay every view from zero into scratch, compare (I7).

    `progress(position, head)` is called after each replayed chunk (notification ids).
    """
    report = VerifyReport()
    live = Projector(ledger, database_url, policy)
    try:
        _drain(live, live._head(), None)
        report.differences += [f"live {describe_stall(stall)}" for stall in live.stalls()]
        positions = live._positions()
        report.position = min(positions.values(), default=0)
        with scratch_url(database_url) as url:
            replay = Projector(ledger, url, policy)
            try:
                scan = None
                if live._store.kind == "postgres":
                    scan = scan_postgres(live._store, ledger.recorder.events_table_name)
                report.events = bulk_replay(replay, positions, progress, scan)
                for account in ACCOUNTS:
                    compare(account, live._store, replay._store, report)
            finally:
                replay.close()
        if live._positions() != positions:
            report.notes.append("live views advanced during verification; "
                                "differences about recent accounts may be transient")
    finally:
        live.close()
    return report


def bulk_replay(projector: Projector, stop: dict[str, int],
                progress: Progress | None = None, scan: Any = None) -> int:
    """Rebuild `projector`'s (empty, scratch) views from position zero up to `stop` (per
    projection name) in one pass over the log; returns events applied across projections.

    Each page of REPLAY_PAGE notifications (every projection's topics, nothing else; `scan`
    reads them, default the recorder) is read once and each event decoded once; every
    projection folds its events in memory (`Projection.fold`) and writes only when its pending
    rows pass FLUSH_ROWS, and at the end (`flush`: one upsert per table, COPY on PostgreSQL), so
    an account touched on many pages is written about once. The projection code is the live
    one, so the comparison checks it. Memory: one page of events plus at most FLUSH_ROWS
    pending rows per projection and its bounded caches. Raises ProjectionStalled on an event a
    projection cannot decode or apply (the live projection would have stalled there first).
    """
    projections = projector._projections
    following: dict[str, list] = {}
    for projection in projections:
        for topic in projection.topics:
            following.setdefault(topic, []).append(projection)
    scan = scan or projector.ledger.recorder.select_notifications
    target = max(stop.values(), default=0)
    position, applied = 0, 0
    store = projector._store
    settled = settled_sessions(scan, stop.get("live", 0))
    topics = tuple(following)
    with store.locked(), store.transaction(), ThreadPoolExecutor(1, "replay-scan") as reader:
        # the next page is read (the database's time, and the driver's) while this one folds
        ahead = reader.submit(scan, start=0, limit=REPLAY_PAGE, stop=target, topics=topics,
                              inclusive_of_start=False) if target > 0 else None
        for _ in range(target // REPLAY_PAGE + 2):
            if ahead is None:
                break
            page = ahead.result()
            position = page[-1].id if len(page) >= REPLAY_PAGE else target
            ahead = reader.submit(scan, start=position, limit=REPLAY_PAGE, stop=target,
                                  topics=topics, inclusive_of_start=False) \
                if position < target else None
            applied += _fold_page(projector, following, stop, page, settled)
            if progress is not None:
                progress(position, target)
        for projection in projections:
            _flush(projection, store, [])
        store.executemany("UPDATE projection_tracking SET notification_id = ? WHERE name = ?",
                          [(stop.get(p.name, 0), p.name) for p in projections])
    return applied


def settled_sessions(scan: Any, stop: int) -> set:
    """originator_id of every session settled at or before notification id `stop`.

    Settlement is final (a settled session takes no further event, ledger/domain.py) and the
    `live` view holds unsettled sessions only, so their rows end absent whatever came before:
    the replay's `live` projection skips their events (neither decoded nor folded). Bounded
    by the number of settled sessions (one UUID each)."""
    topic, ids, position = SESSION_SETTLED, set(), 0
    for _ in range(stop // REPLAY_PAGE + 2):
        page = scan(start=position, limit=REPLAY_PAGE, stop=stop, topics=(topic,),
                    inclusive_of_start=False)
        ids.update(n.originator_id for n in page)
        if len(page) < REPLAY_PAGE:
            break
        position = page[-1].id
    return ids


def _fold_page(projector: Projector, following: dict[str, list], stop: dict[str, int],
               page: list, settled: set) -> int:
    """Decode `page` once; fold each projection's events (only those up to its stop; not
    the `live` projection's of a session in `settled`)."""
    batches: dict[str, list] = {p.name: [] for p in projector._projections}
    decode = projector.ledger.mapper.to_domain_event
    everyone = min((stop.get(p.name, 0) for p in projector._projections), default=0)
    skipped = 0
    for notification in page:
        readers = following.get(notification.topic, ())
        if notification.id > everyone:  # past some projection's stop: only those before it
            readers = [p for p in readers if notification.id <= stop.get(p.name, 0)]
        if notification.originator_id in settled:
            folded = len(readers)
            readers = [p for p in readers if p.name != "live"]
            skipped += folded - len(readers)  # accounted for: their effect is no row
        if not readers:
            continue
        try:
            event = decode(notification)
        except Exception as exc:  # noqa: BLE001 - a poison event: name it
            raise ProjectionStalled(stall_of(readers[0].name, notification, exc)) from exc
        for projection in readers:
            batches[projection.name].append((notification, event))
    store, applied = projector._store, skipped
    for projection in projector._projections:
        batch = batches[projection.name]
        try:
            projection.fold(store, [event for _, event in batch])
        except Exception as exc:  # noqa: BLE001 - name the page of the failing event
            raise ProjectionStalled(_first_failing(projector, projection, batch, exc)) from exc
        if projection.pending() >= FLUSH_ROWS:
            _flush(projection, store, batch)
        applied += len(batch)
    return applied


def _flush(projection: Any, store: Store, batch: list) -> None:
    try:
        projection.flush(store)
    except Exception as exc:  # noqa: BLE001 - name the page
        raise ProjectionStalled(_first_failing(None, projection, batch, exc)) from exc


def scan_postgres(store: Store, table: str) -> Any:
    """A `select_notifications` over the events `table` of the store's schema for the
    replay: tuple rows on the view store's connection (the recorder's own builds a dict per
    row), same arguments and Notification results. Gathers the table's planner statistics
    first if it has none (`ensure_statistics`)."""
    ensure_statistics(store, table)

    def select(start: int, limit: int, stop: int, topics: tuple, inclusive_of_start: bool):
        assert not inclusive_of_start
        with store.locked():
            rows = store.query_binary(
                f"SELECT notification_id, originator_id, originator_version, topic, state "
                f"FROM {table} WHERE notification_id > ? AND notification_id <= ? "
                f"AND topic = ANY(?) ORDER BY notification_id LIMIT ?",
                (start, stop, list(topics), limit))
        return list(map(StoredRow._make, rows))

    return select


def ensure_statistics(store: Store, table: str) -> None:
    """ANALYZE the events `table` (on the store's search path) if PostgreSQL has never gathered
    its statistics (`pg_class.reltuples` = -1: a store bulk-loaded while autovacuum is off or
    has not come round yet). Without them the planner guesses the page query's id range at
    0.5 % of the table and, for every page, reads all the rest of the table and sorts it
    (quadratic in the table's size). ANALYZE reads a bounded sample (300 ×
    default_statistics_target rows) and changes no data; for a role that does not own the
    table PostgreSQL skips it with a warning."""
    with store.locked():
        rows = store.query("SELECT reltuples FROM pg_class WHERE oid = to_regclass(?)", (table,))
        if rows and rows[0][0] is not None and rows[0][0] < 0:
            store.execute(f"ANALYZE {table}")


def _first_failing(projector: Projector, projection: Any, batch: list, exc: Exception) -> dict:
    """A stall for a page `projection` could not apply: the live projection applied these
    events (a poison stalls it first, and the replay stops at its position), so this is a
    projection that is not deterministic; the page's range is named."""
    first, last = (batch[0][0], batch[-1][0]) if batch else (None, None)
    stall = stall_of(projection.name, first, exc)
    if last is not None:
        stall["event_id"] = f"one of the events at positions {first.id}..{last.id}"
    return stall


def _drain(projector: Projector, stop: int | dict[str, int], progress: Progress | None) -> int:
    """Catch `projector` up to `stop` in chunks; returns events applied."""
    target = max(stop.values(), default=0) if isinstance(stop, dict) else stop
    applied = 0
    for _ in range(target // REPLAY_CHUNK + len(projector._projections) * 4 + 4):
        applied += projector._catch_up(REPLAY_CHUNK, stop)
        reached = min(projector._positions().values(), default=0)
        if progress is not None:
            progress(min(reached, target), target)
        if _reached(projector._positions(), stop):
            break
    return applied


def _reached(positions: dict[str, int], stop: int | dict[str, int]) -> bool:
    stops = stop if isinstance(stop, dict) else {name: stop for name in positions}
    return all(positions.get(name, 0) >= at for name, at in stops.items())


@contextmanager
def scratch_url(database_url: str) -> Iterator[str]:
    """A throwaway database URL for the replay: temp SQLite file or `<schema>_replay`."""
    if not is_postgres(database_url):
        folder = tempfile.mkdtemp(prefix="ledger-replay-")
        try:
            yield f"sqlite:///{Path(folder) / 'replay.db'}"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    schema = postgres_parts(database_url)["schema"] + "_replay"
    _recreate_schema(database_url, schema, create=True)
    parsed = urlparse(database_url)
    query = {**parse_qs(parsed.query), "schema": [schema]}
    try:
        yield urlunparse(parsed._replace(query=urlencode(query, doseq=True)))
    finally:
        _recreate_schema(database_url, schema, create=False)


def _recreate_schema(database_url: str, schema: str, create: bool) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(postgres_conninfo(database_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        if create:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))


# ------------------------------------------------------------------------------ comparing


def stream(store: Store, account: Account) -> Iterator[tuple[tuple, dict]]:
    """(key, {column: normalised value}) for every row, in key (byte) order, page by page."""
    keys, cols = ", ".join(account.keys), account.keys + account.values
    after = f"({keys}) > ({', '.join('?' * len(account.keys))})"
    last: tuple | None = None
    for _ in range(MAX_PAGES):
        where = "" if last is None else f"WHERE {after} "
        with store.locked():
            rows = store.query(f"SELECT {', '.join(cols)} FROM {account.table} {where}"
                               f"ORDER BY {keys} LIMIT ?", (*(last or ()), PAGE))
        for row in rows:
            key = tuple(row[:len(account.keys)])
            values = row[len(account.keys):]
            yield key, {c: normalise(store, c, v) for c, v in zip(account.values, values)}
        if len(rows) < PAGE:
            return
        last = tuple(rows[-1][:len(account.keys)])


def normalise(store: Store, column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in TS_COLUMNS:
        return store.from_ts(value).isoformat()
    if column in BOOL_COLUMNS:
        return bool(value)
    return value


def compare(account: Account, live: Store, replay: Store, report: VerifyReport) -> None:
    """Merge both key-ordered streams; append one line per differing account."""
    left, right = stream(live, account), stream(replay, account)
    a, b = next(left, None), next(right, None)
    for _ in range(MAX_PAGES * PAGE):
        if a is None and b is None:
            return
        report.accounts += 1
        if b is None or (a is not None and a[0] < b[0]):
            report.differences.append(f"{name(account, a[0])}: missing in replay")
            check_invariants(account, a, report)
            a = next(left, None)
        elif a is None or b[0] < a[0]:
            report.differences.append(f"{name(account, b[0])}: missing in live")
            b = next(right, None)
        else:
            diff_values(account, a, b, report)
            check_invariants(account, a, report)
            a, b = next(left, None), next(right, None)


def name(account: Account, key: tuple) -> str:
    return f"{account.label} {'/'.join(str(k) for k in key)}"


def diff_values(account: Account, a: tuple, b: tuple, report: VerifyReport) -> None:
    changed = [c for c in account.values if a[1][c] != b[1][c]]
    if changed:
        live = " ".join(f"{c}={a[1][c]}" for c in changed)
        replay = " ".join(f"{c}={b[1][c]}" for c in changed)
        report.differences.append(f"{name(account, a[0])}: live {live} replay {replay}")


def check_invariants(account: Account, row: tuple, report: VerifyReport) -> None:
    """I6 conservation and I3 non-negativity on a live pool/bucket or wallet row."""
    v = row[1]
    if account.table == "balance_pool_buckets":
        rest = v["free"] + v["held"] + v["charged"] + v["forfeited"] + v["revoked"]
        if v["granted"] != rest:
            report.differences.append(f"I6 {name(account, row[0])}: granted={v['granted']} "
                                      f"free+held+charged+forfeited+revoked={rest}")
        negative = [c for c in ("free", "held", "charged") if v[c] < 0]
    elif account.table == "wallet_balances":
        rest = v["pending"] + v["available"] + v["held"] + v["withdrawn"]
        if v["credited"] - v["reversed"] != rest:
            report.differences.append(f"I6 {name(account, row[0])}: credited-reversed="
                                      f"{v['credited'] - v['reversed']} "
                                      f"pending+available+held+withdrawn={rest}")
        negative = [c for c in ("pending", "available", "held") if v[c] < 0]
    elif account.table in ("money_wallets", "platform_accounts"):
        negative = check_money(account, row, report)
    else:
        return
    if negative:
        report.differences.append(f"I3 {name(account, row[0])}: negative "
                                  + " ".join(f"{c}={v[c]}" for c in negative))


def check_money(account: Account, row: tuple, report: VerifyReport) -> list[str]:
    """I11 on a live money wallet row, I14 on a live platform row (billing-rules.md §6, §10);
    returns the columns that must not be negative and are."""
    v = row[1]
    if account.table == "money_wallets":
        lhs = v["topped_up"] - v["refunded_to_source"] - v["reversed_payments"] + v["debt"]
        rhs = v["available"] + v["held"] + v["captured"] - v["refunds"]
        if lhs != rhs:
            report.differences.append(
                f"I11 {name(account, row[0])}: topped_up-refunded_to_source-reversed_payments"
                f"+debt={lhs} available+held+captured-refunds={rhs}")
        return [c for c in ("available", "held", "debt") if v[c] < 0]
    lhs = v["captured"] - v["refunds"]
    rhs = v["shares"] - v["shares_reversed"] + v["platform"] + v["tax_payable"]
    if lhs != rhs:
        report.differences.append(f"I14 {name(account, row[0])}: captured-refunds={lhs} "
                                  f"shares-shares_reversed+platform+tax_payable={rhs}")
    return [c for c in ("tax_payable",) if v[c] < 0]  # the platform account may go negative
