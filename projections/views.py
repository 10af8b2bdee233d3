"""The three projections: balances, wallets and live (what the tick needs).

Each projection turns one batch of domain events (ledger order) into view changes inside the
caller's transaction. Integer counters are accumulated per account and written at the end of
the batch with one additive upsert per account; row facts (pool metadata, membership, live
rows) are written in event order. Units are whole units; money is integer minor units.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable
from uuid import UUID

from eventsourcing.utils import get_topic

from ledger.billing import next_due_at
from ledger.consultations import Consultation
from ledger.domain import Pool, Session, Wallet
from ledger.recording import AggregateFollower
from ledger.rules import BUCKETS, Policy
from projections.store import Store

POOL_FIELDS = ("granted", "free", "held", "charged", "reversed", "forfeited", "revoked")
PATIENT_FIELDS = ("held", "charged")
WALLET_FIELDS = ("credited", "reversed", "pending", "available", "held", "withdrawn")
SESSION_CACHE_SIZE = 20_000
PREFETCH_EVENTS = 5_000  # events per prefetch (AggregateFollower): fewer than the cache holds
WALLET_CACHE_SIZE = 100_000
POOL_COLUMNS = ("pool_id", "payment_reference", "owner_id", "starts_at", "effective_end",
                "expired", "refunded")
MEMBER_COLUMNS = ("pool_id", "patient_id", "role", "active", "added_at", "removed_at")


def event_classes(aggregate: type) -> tuple[type, ...]:
    """Every concrete event class of an aggregate (decorated methods), bases excluded."""
    bases = (aggregate.Event, getattr(aggregate, "Created", None))
    return tuple(v for v in vars(aggregate).values()
                 if isinstance(v, type) and issubclass(v, aggregate.Event) and v not in bases)


def topics_of(classes: Iterable[type]) -> tuple[str, ...]:
    return tuple(get_topic(c) for c in classes)


class Deltas:
    """Additive changes to integer columns per account key; `flush` upserts them."""

    def __init__(self, table: str, keys: tuple[str, ...], fields: tuple[str, ...]) -> None:
        self.table, self.keys, self.fields = table, keys, fields
        self.index = {f: i for i, f in enumerate(fields)}
        self.rows: dict[tuple, list[int]] = {}

    def add(self, key: tuple, **changes: int) -> None:
        row = self.rows.setdefault(key, [0] * len(self.fields))
        for name, amount in changes.items():
            row[self.index[name]] += int(amount)

    def flush(self, store: Store) -> None:
        sets = ", ".join(f"{f} = {self.table}.{f} + excluded.{f}" for f in self.fields)
        store.upsert(self.table, self.keys, self.keys + self.fields, sets,
                     [key + tuple(vals) for key, vals in self.rows.items()])
        self.rows.clear()


class Writes:
    """Row statements of one batch, kept per table in event order and sent at the end of the
    batch as one statement per run of the same statement: the order within a table is kept
    and the tables are independent (no foreign keys), so the result is the same as executing
    each at once, with a round trip per run instead of per row. A run of plain inserts
    (`insert`) is one `Store.insert` (on PostgreSQL one INSERT of an array per column: psycopg's
    executemany costs about 10 µs of client CPU a row); other runs one executemany."""

    def __init__(self) -> None:
        # table -> [(SQL text, or the column names of a plain insert; the row's parameters)]
        self.tables: dict[str, list[tuple[str | tuple[str, ...], tuple]]] = {}

    def add(self, table: str, sql: str, params: tuple) -> None:
        self.tables.setdefault(table, []).append((sql, params))

    def insert(self, table: str, cols: tuple[str, ...], row: tuple) -> None:
        """A plain INSERT of `row` (values in `cols` order) into `table`."""
        self.tables.setdefault(table, []).append((cols, row))

    def __len__(self) -> int:
        return sum(len(statements) for statements in self.tables.values())

    def flush(self, store: Store) -> None:
        for table, statements in self.tables.items():
            run_key, run = None, []
            for key, params in statements:
                if key != run_key and run:
                    _send(store, table, run_key, run)
                    run = []
                run_key = key
                run.append(params)
            _send(store, table, run_key, run)
        self.tables.clear()


def _send(store: Store, table: str, key: str | tuple[str, ...], rows: list[tuple]) -> None:
    """One run of `Writes`: a plain insert's rows, or an executemany of one statement."""
    if isinstance(key, tuple):
        store.insert(table, key, rows)
    else:
        store.executemany(key, rows)


class Projection:
    """A named view fed by the events whose topics it lists."""

    name = ""
    topics: tuple[str, ...] = ()

    def __init__(self, ledger: Any, policy: Policy) -> None:
        self.ledger, self.policy = ledger, policy
        self.handlers: dict[type, Callable[..., None]] = {}

    def apply(self, store: Store, events: list) -> None:
        """Apply `events` (in ledger order) inside the caller's transaction."""
        self.fold(store, events)
        self.flush(store)

    def fold(self, store: Store, events: list) -> None:
        """Fold `events` (in ledger order) into the pending changes (in memory; reads from
        `store` only what earlier flushes wrote)."""
        raise NotImplementedError

    def flush(self, store: Store) -> None:
        """Write the pending changes inside the caller's transaction, and forget them."""
        raise NotImplementedError

    def pending(self) -> int:
        """Rows the pending changes will write (a bound for callers folding many batches)."""
        return 0

    def reset(self) -> None:
        """Forget in-memory state after a rolled-back batch."""


# -------------------------------------------------------------------------------- balances


class Balances(Projection):
    """Per pool/bucket counters, pool metadata, membership, per patient/bucket usage.

    I6 per pool/bucket with `charged` net of reversals:
    granted = free + held + charged + forfeited + revoked (`reversed` counts returns).
    """

    name = "balances"
    topics = topics_of(event_classes(Pool))

    def __init__(self, ledger: Any, policy: Policy) -> None:
        super().__init__(ledger, policy)
        self.handlers = {Pool.Granted: self._granted, Pool.MemberAdded: self._member_added,
                         Pool.MemberRemoved: self._member_removed, Pool.Held: self._held,
                         Pool.Charged: self._charged, Pool.Released: self._released,
                         Pool.Reversed: self._reversed, Pool.Expired: self._expired,
                         Pool.Revoked: self._revoked}
        self.reset()

    def reset(self) -> None:
        self.pools = Deltas("balance_pool_buckets", ("pool_id", "bucket"), POOL_FIELDS)
        self.patients = Deltas("balance_patient_buckets", ("patient_id", "bucket"), PATIENT_FIELDS)
        self.writes = Writes()

    def fold(self, store: Store, events: list) -> None:
        for event in events:
            handler = self.handlers.get(type(event))
            if handler is not None:
                handler(store, event, str(event.originator_id))

    def flush(self, store: Store) -> None:
        self.writes.flush(store)
        self.pools.flush(store)
        self.patients.flush(store)

    def pending(self) -> int:
        return len(self.writes) + len(self.pools.rows) + len(self.patients.rows)

    def _granted(self, store: Store, e: Any, pool_id: str) -> None:
        self.writes.insert("balance_pools", POOL_COLUMNS,
                           (pool_id, e.payment_reference, e.owner_id, store.ts(e.starts_at),
                            store.ts(e.effective_end), False, False))
        self.writes.insert("balance_members", MEMBER_COLUMNS,
                           (pool_id, e.owner_id, "owner", True, store.ts(e.starts_at), None))
        for bucket in BUCKETS:
            units = int(e.plan["units"].get(bucket, 0))
            self.pools.add((pool_id, bucket), granted=units, free=units)

    def _member_added(self, store: Store, e: Any, pool_id: str) -> None:
        self.writes.add("balance_members",
                        "INSERT INTO balance_members (pool_id, patient_id, role, active, "
                        "added_at, removed_at) VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT "
                        "(pool_id, patient_id) DO UPDATE SET active = excluded.active, "
                        "added_at = excluded.added_at, removed_at = NULL",
                        (pool_id, e.patient_id, "member", True, store.ts(e.at)))

    def _member_removed(self, store: Store, e: Any, pool_id: str) -> None:
        self.writes.add("balance_members", "UPDATE balance_members SET active = ?, "
                        "removed_at = ? WHERE pool_id = ? AND patient_id = ?",
                        (False, store.ts(e.at), pool_id, e.patient_id))

    def _held(self, store: Store, e: Any, pool_id: str) -> None:
        self.pools.add((pool_id, e.bucket), free=-1, held=1)
        self.patients.add((e.patient_id, e.bucket), held=1)

    def _charged(self, store: Store, e: Any, pool_id: str) -> None:
        self.pools.add((pool_id, e.bucket), held=-1, charged=1)
        self.patients.add((e.patient_id, e.bucket), held=-1, charged=1)

    def _released(self, store: Store, e: Any, pool_id: str) -> None:
        self.pools.add((pool_id, e.bucket), held=-1)
        self._return_unit(pool_id, e)
        self.patients.add((e.patient_id, e.bucket), held=-1)

    def _reversed(self, store: Store, e: Any, pool_id: str) -> None:
        self.pools.add((pool_id, e.bucket), charged=-1, reversed=1)
        self._return_unit(pool_id, e)
        self.patients.add((e.patient_id, e.bucket), charged=-1)

    def _return_unit(self, pool_id: str, e: Any) -> None:
        """A released or reversed unit: forfeited if the pool expired, revoked if refunded."""
        field = "forfeited" if e.forfeited else "revoked" if e.revoked else "free"
        self.pools.add((pool_id, e.bucket), **{field: 1})

    def _expired(self, store: Store, e: Any, pool_id: str) -> None:
        for bucket, units in e.forfeited.items():
            self.pools.add((pool_id, bucket), forfeited=units, free=-units)
        self.writes.add("balance_pools", "UPDATE balance_pools SET expired = ? WHERE pool_id = ?",
                        (True, pool_id))

    def _revoked(self, store: Store, e: Any, pool_id: str) -> None:
        for bucket, units in e.revoked.items():
            self.pools.add((pool_id, bucket), revoked=units, free=-units)
        self.writes.add("balance_pools", "UPDATE balance_pools SET refunded = ? WHERE pool_id = ?",
                        (True, pool_id))


# --------------------------------------------------------------------------------- wallets


class Wallets(Projection):
    """Per doctor/currency minor units.

    I6: credited − reversed = pending + available + held + withdrawn.

    Pay is credited (pending) per AutoDeducted, settled by Session.Settled; Wallet.Credited is
    the same money as Settled and is ignored. A priced consultation's share (§10) is credited
    pending by its capture (Consultation.Closed), reversed by a refund while pending, and made
    available by Wallet.EarningCredited.
    """

    name = "wallets"
    topics = topics_of((Session.AutoDeducted, Session.Settled, Wallet.Opened,
                        Wallet.WithdrawalHeld, Wallet.WithdrawalCompleted,
                        Wallet.WithdrawalReleased, Consultation.Closed, Consultation.Refunded,
                        Wallet.EarningCredited))

    def __init__(self, ledger: Any, policy: Policy) -> None:
        super().__init__(ledger, policy)
        self.accounts: dict[str, tuple[str, str]] = {}  # wallet id -> (doctor, currency); facts
        self.handlers = {Session.AutoDeducted: self._auto_deducted, Session.Settled: self._settled,
                         Wallet.Opened: self._opened, Wallet.WithdrawalHeld: self._withdrawal_held,
                         Wallet.WithdrawalCompleted: self._withdrawal_completed,
                         Wallet.WithdrawalReleased: self._withdrawal_released,
                         Consultation.Closed: self._share_captured,
                         Consultation.Refunded: self._share_refunded,
                         Wallet.EarningCredited: self._earning_credited}
        self.reset()

    def reset(self) -> None:
        self.wallets = Deltas("wallet_balances", ("doctor_id", "currency"), WALLET_FIELDS)
        self.writes = Writes()

    def fold(self, store: Store, events: list) -> None:
        for event in events:
            handler = self.handlers.get(type(event))
            if handler is not None:
                handler(store, event)

    def flush(self, store: Store) -> None:
        self.writes.flush(store)
        self.wallets.flush(store)

    def pending(self) -> int:
        return len(self.writes) + len(self.wallets.rows)

    def _auto_deducted(self, store: Store, e: Any) -> None:
        self.wallets.add((e.doctor_id, e.currency), credited=e.pay_minor, pending=e.pay_minor)

    def _settled(self, store: Store, e: Any) -> None:
        if not e.currency:
            return  # never started: no rate, no pay
        pay = e.pay_per_unit_minor
        self.wallets.add((e.doctor_id, e.currency), credited=pay * len(e.charged),
                         reversed=pay * len(e.reversed), pending=-e.pending_before_minor,
                         available=e.net_pay_minor)

    def _opened(self, store: Store, e: Any) -> None:
        wallet_id = str(e.originator_id)
        self.writes.insert("wallet_ids", ("wallet_id", "doctor_id", "currency"),
                           (wallet_id, e.doctor_id, e.currency))
        self.accounts[wallet_id] = (e.doctor_id, e.currency)
        self.wallets.add((e.doctor_id, e.currency))

    def _account(self, store: Store, wallet_id: UUID) -> tuple[str, str]:
        key = str(wallet_id)
        if key not in self.accounts:
            if len(self.accounts) >= WALLET_CACHE_SIZE:
                self.accounts.clear()
            self.writes.flush(store)  # a wallet opened earlier in this batch is then found
            rows = store.query("SELECT doctor_id, currency FROM wallet_ids WHERE wallet_id = ?",
                               (key,))
            if not rows:
                raise LookupError(f"wallet {key} has no Opened event before its withdrawal")
            self.accounts[key] = (rows[0][0], rows[0][1])
        return self.accounts[key]

    def _withdrawal_held(self, store: Store, e: Any) -> None:
        self.wallets.add(self._account(store, e.originator_id), available=-e.amount_minor,
                         held=e.amount_minor)

    def _withdrawal_completed(self, store: Store, e: Any) -> None:
        self.wallets.add(self._account(store, e.originator_id), held=-e.amount_minor,
                         withdrawn=e.amount_minor)

    def _withdrawal_released(self, store: Store, e: Any) -> None:
        self.wallets.add(self._account(store, e.originator_id), held=-e.amount_minor,
                         available=e.amount_minor)

    def _share_captured(self, store: Store, e: Any) -> None:
        if e.capture is not None:  # a capture credits the share, pending (§10 Earnings)
            share = e.capture["share_minor"]
            self.wallets.add((e.practitioner_id, e.currency), credited=share, pending=share)

    def _share_refunded(self, store: Store, e: Any) -> None:
        if e.share_reversed_minor:  # refunded while pending; once available the share stays
            self.wallets.add((e.practitioner_id, e.currency), reversed=e.share_reversed_minor,
                             pending=-e.share_reversed_minor)

    def _earning_credited(self, store: Store, e: Any) -> None:
        self.wallets.add(self._account(store, e.originator_id), pending=-e.amount_minor,
                         available=e.amount_minor)


# ------------------------------------------------------------------------------------ live


def pages(events: list) -> Iterable[list]:
    """`events` in pages of PREFETCH_EVENTS: a view prefetches a page's aggregates
    (`AggregateFollower.prefetch`), then folds it, so what it read is still cached when used."""
    for start in range(0, len(events), PREFETCH_EVENTS):
        yield events[start:start + PREFETCH_EVENTS]


class Live(Projection):
    """Unsettled sessions with when the tick is next due, and pools with their expiry."""

    name = "live"
    topics = topics_of(event_classes(Session) + (Pool.Granted, Pool.Expired))

    def __init__(self, ledger: Any, policy: Policy) -> None:
        super().__init__(ledger, policy)
        self.sessions = AggregateFollower.reading(ledger, SESSION_CACHE_SIZE)
        # session_id -> its state after the pending events, None once settled (row deleted)
        self.states: dict[str, Session | None] = {}
        self.writes = Writes()

    def reset(self) -> None:
        self.sessions.clear()
        self.states, self.writes = {}, Writes()

    def fold(self, store: Store, events: list) -> None:
        for page in pages(events):
            self._fold(store, page)

    def _fold(self, store: Store, events: list) -> None:
        self.sessions.prefetch(e for e in events if isinstance(e, Session.Event))
        for e in events:
            if isinstance(e, Session.Event):
                _, session = self.sessions.advance(e)
                self.states[session.session_id] = None if session.settled else session
                if session.settled:
                    self.sessions.forget(e.originator_id)
            elif isinstance(e, Pool.Granted):
                self.writes.insert("live_pools", ("pool_id", "effective_end", "expired"),
                                   (str(e.originator_id), store.ts(e.effective_end), False))
            elif isinstance(e, Pool.Expired):
                self.writes.add("live_pools", "UPDATE live_pools SET expired = ? "
                                "WHERE pool_id = ?", (True, str(e.originator_id)))

    def flush(self, store: Store) -> None:
        """Each pending session's row is computed once, from its last state (a settled
        session's row is deleted)."""
        self.writes.flush(store)
        self._flush(store, {sid: s and self._row(store, s) for sid, s in self.states.items()})
        self.states = {}

    def pending(self) -> int:
        return len(self.writes) + len(self.states)

    def _row(self, store: Store, session: Session) -> tuple | None:
        if session.settled:
            return None
        return (session.session_id, session.patient_id, session.doctor_id, session.kind,
                session.state, store.ts(next_due_at(session, self.policy)))

    @staticmethod
    def _flush(store: Store, rows: dict[str, tuple | None]) -> None:
        store.delete_keys("live_sessions", "session_id",
                          [sid for sid, row in rows.items() if row is None])
        store.upsert("live_sessions", ("session_id",),
                     ("session_id", "patient_id", "doctor_id", "kind", "state", "next_due_at"),
                     "state = excluded.state, next_due_at = excluded.next_due_at",
                     [row for row in rows.values() if row is not None])


def build_projections(ledger: Any, policy: Policy) -> list[Projection]:
    from projections.marketplace import MarketplaceView  # it builds on this module

    return [Balances(ledger, policy), Wallets(ledger, policy), Live(ledger, policy),
            MarketplaceView(ledger, policy)]
