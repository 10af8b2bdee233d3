"""The history: every account's balances after every event that moved them, with both times.

A follower of the ledger's log (audit/tracking.py, the same safe head as the chainer; the
service feeds it the chainer's pages, audit/service.py `follow_ledger`) that
folds the events which move units or money — the pool events, `Session.AutoDeducted`,
`Session.Settled`, the wallet events and a priced consultation's share (captured, refunded,
made available: §10), exactly as the live views fold them
(projections/views.py: Balances, Wallets) — and appends, per account touched, a row holding
the account's values *after* the event, keyed by (account, recorded_at, position). It also keeps
one row per folded event in `audit_events` (what it was, its event time, the ids it names) and
the sessions' requests and ends, for statements and for the late ends an as-of answer names.

An as-of answer is then one index lookup per account: the last row with recorded_at <= T
(audit/asof.py); a statement reads the rows between two instants (audit/statements.py). No
query replays the log. `recorded_at` on these rows is the running maximum of the events'
recorded times in log order, so the rows at or before T are always a prefix of the log even
when two processes committed in the other order than their clocks read.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable
from uuid import UUID

from eventsourcing.utils import get_topic

from audit import tracking
from audit.bulk import insert_rows
from audit.logs import PAGE, Log, Row
from audit.tracking import LostRace, Tracked
from ledger.consultations import Consultation
from ledger.domain import Doctor, Pool, Session, Wallet
from ledger.rules import BUCKETS

NAME = "history"
POOL_FIELDS = ("granted", "free", "held", "charged", "reversed", "forfeited", "revoked")
WALLET_FIELDS = ("credited", "reversed", "pending", "available", "held", "withdrawn")
CACHE_LIMIT = 200_000  # accounts kept in memory between batches; cleared beyond
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

FOLDED = (Pool.Granted, Pool.MemberAdded, Pool.MemberRemoved, Pool.Held, Pool.Charged,
          Pool.Released, Pool.Reversed, Pool.Expired, Pool.Revoked, Session.Requested,
          Session.AutoDeducted, Session.Settled, Session.Ended, Wallet.Opened,
          Wallet.WithdrawalHeld, Wallet.WithdrawalCompleted, Wallet.WithdrawalReleased,
          Doctor.Registered, Consultation.Closed, Consultation.Refunded,
          Wallet.EarningCredited)
TOPICS = tuple(get_topic(c) for c in FOLDED)
TOPIC_SET = frozenset(TOPICS)
Progress = Callable[[int, int], None]


def event_name(event: Any) -> str:
    """`Pool.Held`, `Session.Settled`, … (the event class's qualified name)."""
    return type(event).__qualname__


class Accounts:
    """Current values of the accounts the history touches, loaded on first use (bounded);
    the rows a batch appends.

    `complete`: the cache holds every account that has rows (the fold started from position 0
    in this process and nothing was evicted since), so an account not in it has none and is
    not looked up — a rebuild from zero reads nothing back.
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self.values: dict[tuple, list] = {}
        self.rows: dict[str, list[tuple]] = {}
        self.complete = False

    def get(self, table: str, keys: tuple, columns: tuple[str, ...]) -> list:
        """The account's latest values (a list to change in place), Nones if it has none."""
        cache_key = (table, *keys)
        if cache_key not in self.values:
            self.values[cache_key] = [None] * len(columns) if self.complete \
                else self._latest(table, keys, columns)
        return self.values[cache_key]

    def _latest(self, table: str, keys: tuple, columns: tuple[str, ...]) -> list:
        names = KEYS[table]
        where = " AND ".join(f"{k} = ?" for k in names)
        with self.store.locked():
            rows = self.store.query(
                f"SELECT {', '.join(columns)} FROM {table} WHERE {where} "
                f"ORDER BY recorded_at DESC, position DESC LIMIT 1", keys)
        return list(rows[0]) if rows else [None] * len(columns)

    def put(self, table: str, keys: tuple, recorded_at: Any, position: int,
            values: list) -> None:
        """Append the account's values after the event at `position`."""
        self.rows.setdefault(table, []).append((*keys, recorded_at, position, *values))

    def forget(self) -> None:
        self.values.clear()
        self.rows.clear()
        self.complete = False


EVENT_COLUMNS = ("position", "recorded_at", "occurred_at", "event", "originator_id",
                 "originator_version", "session_id", "pool_id", "block", "bucket", "patient_id",
                 "doctor_id", "currency", "request_id")
EXTRA_COLUMNS = {"audit_events": EVENT_COLUMNS,
                 "audit_wallet_currencies": ("doctor_id", "currency", "recorded_at"),
                 "audit_wallet_ids": ("wallet_id", "doctor_id", "currency")}
KEYS = {"audit_pools": ("pool_id",), "audit_pool_buckets": ("pool_id", "bucket"),
        "audit_members": ("patient_id", "pool_id"),
        "audit_patient_buckets": ("patient_id", "bucket"),
        "audit_wallets": ("doctor_id", "currency")}
COLUMNS = {"audit_pools": ("payment_reference", "owner_id", "starts_at", "effective_end",
                           "expired", "refunded"),
           "audit_pool_buckets": POOL_FIELDS,
           "audit_members": ("role", "active", "added_at", "removed_at"),
           "audit_patient_buckets": ("held", "charged"),
           "audit_wallets": WALLET_FIELDS}


class History:
    """Folds the ledger's log into the history tables of `store` (see the module docstring)."""

    def __init__(self, log: Log, store: Any) -> None:
        self.log, self.store = log, store
        self.accounts = Accounts(store)
        self.sessions: dict[UUID, str] = {}  # session aggregate id -> session_id (bounded)
        self.wallet_ids: dict[str, tuple[str, str]] = {}
        # The history position this process last wrote: the caches hold the accounts as of it.
        self._written: int | None = None
        self.handlers: dict[type, Callable[[Any, Any, int], None]] = {
            Pool.Granted: self._granted, Pool.MemberAdded: self._member_added,
            Pool.MemberRemoved: self._member_removed, Pool.Held: self._held,
            Pool.Charged: self._charged, Pool.Released: self._released,
            Pool.Reversed: self._reversed, Pool.Expired: self._expired,
            Pool.Revoked: self._revoked, Session.Requested: self._requested,
            Session.AutoDeducted: self._auto_deducted, Session.Settled: self._settled,
            Session.Ended: self._ended, Wallet.Opened: self._opened,
            Wallet.WithdrawalHeld: self._withdrawal_held,
            Wallet.WithdrawalCompleted: self._withdrawal_completed,
            Wallet.WithdrawalReleased: self._withdrawal_released,
            Doctor.Registered: self._doctor_registered,
            Consultation.Closed: self._share_captured,
            Consultation.Refunded: self._share_refunded,
            Wallet.EarningCredited: self._earning_credited}

    # ------------------------------------------------------------------------ following

    def position(self) -> Tracked:
        return tracking.read(self.store, NAME)

    def catch_up(self, max_events: int = 100_000, progress: Progress | None = None,
                 safe: int | None = None) -> int:
        """Fold committed events up to the safe head; returns how many were folded.

        Bounded: at most `max_events` (rounded up to a page) per call; a batch another process
        applied first ends the call (the next one continues).
        """
        row, folded = self.position(), 0
        if safe is None and self.log.head() > row.position:
            safe = self.log.safe_head()
        if safe is None or safe <= row.position:
            return 0
        self.begin(row)
        for _ in range(max_events // PAGE + 2):
            if row.position >= safe:
                break
            page = next(self.log.pages(row.position, safe, topics=TOPICS), [])
            end = page[-1][0] if len(page) >= PAGE else safe
            try:
                row = self._apply(row, page, end)
            except LostRace:
                return folded
            folded += len(page)
            if progress is not None:
                progress(row.position, safe)
            if folded >= max_events:
                break
        return folded

    def begin(self, row: Tracked) -> None:
        """Before folding from `row` (the tracking row as read now): the caches are kept only
        if `row` is at the position this process last wrote; otherwise another process folded
        since, or a commit of ours did not survive (the store commits asynchronously: a
        server crash can undo the last ones), and they are dropped. From position 0 with
        nothing cached, every account starts empty (Accounts.complete)."""
        if row.position != self._written:
            self.forget()
        if row.position == 0 and not self.accounts.values:
            self.accounts.complete = True

    def _apply(self, row: Tracked, page: list[Row], end: int) -> Tracked:
        """Fold `page` in memory, then append its rows and move the tracking to `end` in one
        short transaction (on SQLite it holds the one write lock the ledger's writers need)."""
        store = self.store
        try:
            new = self.fold(row, [(stored[0], self.log.decode(stored)) for stored in page], end)
            with store.locked(), store.transaction():
                store.lock(NAME)
                self.write(row, new)
        except BaseException:
            self.forget()
            raise
        self.trim()
        return new

    def fold(self, row: Tracked, events: list[tuple[int, Any]], end: int) -> Tracked:
        """Fold `events` ((position, domain event) of the folded topics, in position order,
        after `row.position`) into the accounts in memory; returns the tracking row at `end`
        (>= the last position) that `write` stores. On an error call `forget`."""
        store, recorded, handlers = self.store, row.recorded_at or EPOCH, self.handlers
        for position, event in events:
            recorded = max(recorded, event.timestamp.astimezone(timezone.utc))
            handlers[type(event)](event, store.ts(recorded), position)
        return Tracked(NAME, end, None, row.events + len(events),
                       recorded if recorded > EPOCH else None)

    def write(self, old: Tracked, new: Tracked) -> None:
        """Inside the caller's transaction, holding the history's lock: move the tracking from
        `old` to `new` (LostRace if another process moved it) and append the folded rows."""
        tracking.advance(self.store, old, new)
        self._flush()
        self._written = new.position  # a failed commit then calls `forget`

    def forget(self) -> None:
        """Drop what is folded but not written, and the caches it may have changed."""
        self.accounts.forget()
        self.sessions.clear()
        self._written = None

    def trim(self) -> None:
        """Bound the caches after a batch (CACHE_LIMIT entries each)."""
        if len(self.accounts.values) > CACHE_LIMIT:
            self.accounts.values.clear()
            self.accounts.complete = False
        if len(self.sessions) > CACHE_LIMIT:
            self.sessions.clear()
            self.accounts.complete = False
        if len(self.wallet_ids) > CACHE_LIMIT:
            self.wallet_ids.clear()  # looked up again in audit_wallet_ids

    def _flush(self) -> None:
        for table, rows in self.accounts.rows.items():
            names = EXTRA_COLUMNS.get(table) or (*KEYS[table], "recorded_at", "position",
                                                 *COLUMNS[table])
            insert_rows(self.store, table, names, rows)
        self.accounts.rows.clear()

    # --------------------------------------------------------------------------- helpers

    def _event(self, e: Any, recorded: Any, position: int, occurred_at: datetime | None = None,
               **ids: Any) -> None:
        """One audit_events row for event `e`."""
        names = ("session_id", "pool_id", "block", "bucket", "patient_id", "doctor_id",
                 "currency", "request_id")
        self.accounts.rows.setdefault("audit_events", []).append(
            (position, recorded, self.store.ts(occurred_at), event_name(e),
             str(e.originator_id), e.originator_version, *(ids.get(n) for n in names)))

    def _change(self, table: str, keys: tuple, recorded: Any, position: int,
                **deltas: int) -> None:
        """Add `deltas` to an integer account and append its new values."""
        columns = COLUMNS[table]
        values = self.accounts.get(table, keys, columns)
        if table == "audit_wallets" and values[0] is None:  # this wallet's first movement
            self.accounts.rows.setdefault("audit_wallet_currencies", []).append((*keys, recorded))
        for i, name in enumerate(columns):
            values[i] = int(values[i] or 0) + int(deltas.get(name, 0))
        self.accounts.put(table, keys, recorded, position, list(values))

    def _set(self, table: str, keys: tuple, recorded: Any, position: int, **fields: Any) -> None:
        """Set fields of a row account (pool facts, membership) and append its new values."""
        columns = COLUMNS[table]
        values = self.accounts.get(table, keys, columns)
        for i, name in enumerate(columns):
            if name in fields:
                values[i] = fields[name]
        self.accounts.put(table, keys, recorded, position, list(values))

    def _unit(self, e: Any, recorded: Any, position: int, pool: dict, patient: dict) -> None:
        """A unit movement of a pool (and of the patient whose session it is)."""
        pool_id = str(e.originator_id)
        self._change("audit_pool_buckets", (pool_id, e.bucket), recorded, position, **pool)
        if patient:
            self._change("audit_patient_buckets", (e.patient_id, e.bucket), recorded, position,
                         **patient)
        self._event(e, recorded, position, getattr(e, "at", None), session_id=e.session_id,
                    pool_id=pool_id, block=e.block, bucket=e.bucket, patient_id=e.patient_id)

    @staticmethod
    def _returned(e: Any) -> str:
        """Where a released or reversed unit goes (projections/views.py `_return_unit`)."""
        return "forfeited" if e.forfeited else "revoked" if e.revoked else "free"

    # ------------------------------------------------------------------------ pool events

    def _granted(self, e: Any, recorded: Any, position: int) -> None:
        pool_id, ts = str(e.originator_id), self.store.ts
        self._set("audit_pools", (pool_id,), recorded, position,
                  payment_reference=e.payment_reference, owner_id=e.owner_id,
                  starts_at=ts(e.starts_at), effective_end=ts(e.effective_end), expired=False,
                  refunded=False)
        self._set("audit_members", (e.owner_id, pool_id), recorded, position, role="owner",
                  active=True, added_at=ts(e.starts_at), removed_at=None)
        for bucket in BUCKETS:
            units = int(e.plan["units"].get(bucket, 0))
            self._change("audit_pool_buckets", (pool_id, bucket), recorded, position,
                         granted=units, free=units)
        self._event(e, recorded, position, e.starts_at, pool_id=pool_id, patient_id=e.owner_id)

    def _member_added(self, e: Any, recorded: Any, position: int) -> None:
        pool_id = str(e.originator_id)
        role = self.accounts.get("audit_members", (e.patient_id, pool_id),
                                 COLUMNS["audit_members"])[0] or "member"
        self._set("audit_members", (e.patient_id, pool_id), recorded, position, role=role,
                  active=True, added_at=self.store.ts(e.at), removed_at=None)
        self._event(e, recorded, position, e.at, pool_id=pool_id, patient_id=e.patient_id)

    def _member_removed(self, e: Any, recorded: Any, position: int) -> None:
        pool_id = str(e.originator_id)
        if self.accounts.get("audit_members", (e.patient_id, pool_id),
                             COLUMNS["audit_members"])[0] is not None:
            self._set("audit_members", (e.patient_id, pool_id), recorded, position,
                      active=False, removed_at=self.store.ts(e.at))
        self._event(e, recorded, position, e.at, pool_id=pool_id, patient_id=e.patient_id)

    def _held(self, e: Any, recorded: Any, position: int) -> None:
        self._unit(e, recorded, position, {"free": -1, "held": 1}, {"held": 1})

    def _charged(self, e: Any, recorded: Any, position: int) -> None:
        self._unit(e, recorded, position, {"held": -1, "charged": 1}, {"held": -1, "charged": 1})

    def _released(self, e: Any, recorded: Any, position: int) -> None:
        self._unit(e, recorded, position, {"held": -1, self._returned(e): 1}, {"held": -1})

    def _reversed(self, e: Any, recorded: Any, position: int) -> None:
        self._unit(e, recorded, position, {"charged": -1, "reversed": 1, self._returned(e): 1},
                   {"charged": -1})

    def _closed(self, e: Any, recorded: Any, position: int, field: str, units: dict,
                flag: str) -> None:
        """Expired or Revoked: the pool's free units move to `field`; the pool is closed."""
        pool_id = str(e.originator_id)
        for bucket, count in units.items():
            self._change("audit_pool_buckets", (pool_id, bucket), recorded, position,
                         **{field: count, "free": -count})
        self._set("audit_pools", (pool_id,), recorded, position, **{flag: True})
        meta = self.accounts.get("audit_pools", (pool_id,), COLUMNS["audit_pools"])
        occurred = self.store.from_ts(meta[3]) if flag == "expired" and meta[3] else None
        self._event(e, recorded, position, occurred, pool_id=pool_id)

    def _expired(self, e: Any, recorded: Any, position: int) -> None:
        self._closed(e, recorded, position, "forfeited", e.forfeited, "expired")

    def _revoked(self, e: Any, recorded: Any, position: int) -> None:
        self._closed(e, recorded, position, "revoked", e.revoked, "refunded")

    # --------------------------------------------------------------------- session events

    def _session_id(self, aggregate_id: UUID) -> str | None:
        if aggregate_id not in self.sessions and not self.accounts.complete:
            with self.store.locked():
                rows = self.store.query("SELECT session_id FROM audit_events WHERE "
                                        "originator_id = ? AND originator_version = 1",
                                        (str(aggregate_id),))
            self.sessions[aggregate_id] = rows[0][0] if rows else None
        return self.sessions.get(aggregate_id)

    def _requested(self, e: Any, recorded: Any, position: int) -> None:
        self.sessions[e.originator_id] = e.session_id
        self._event(e, recorded, position, e.requested_at, session_id=e.session_id,
                    patient_id=e.patient_id, doctor_id=e.doctor_id, bucket=e.kind)

    def _ended(self, e: Any, recorded: Any, position: int) -> None:
        self._event(e, recorded, position, e.ended_at,
                    session_id=self._session_id(e.originator_id), patient_id=e.patient_id,
                    doctor_id=e.doctor_id)

    def _auto_deducted(self, e: Any, recorded: Any, position: int) -> None:
        self._change("audit_wallets", (e.doctor_id, e.currency), recorded, position,
                     credited=e.pay_minor, pending=e.pay_minor)
        self._event(e, recorded, position, None, session_id=self._session_id(e.originator_id),
                    pool_id=e.pool_id, block=e.n, bucket=e.bucket, patient_id=e.patient_id,
                    doctor_id=e.doctor_id, currency=e.currency)

    def _settled(self, e: Any, recorded: Any, position: int) -> None:
        if e.currency:  # never started: no rate, no pay (projections/views.py Wallets)
            pay = e.pay_per_unit_minor
            self._change("audit_wallets", (e.doctor_id, e.currency), recorded, position,
                         credited=pay * len(e.charged), reversed=pay * len(e.reversed),
                         pending=-e.pending_before_minor, available=e.net_pay_minor)
        self._event(e, recorded, position, e.at, session_id=self._session_id(e.originator_id),
                    bucket=e.bucket, patient_id=e.patient_id, doctor_id=e.doctor_id,
                    currency=e.currency or None)

    # ---------------------------------------------------------------------- wallet events

    def _doctor_registered(self, e: Any, recorded: Any, position: int) -> None:
        self._event(e, recorded, position, e.at, doctor_id=e.doctor_id)

    def _opened(self, e: Any, recorded: Any, position: int) -> None:
        wallet_id = str(e.originator_id)
        self.accounts.rows.setdefault("audit_wallet_ids", []).append(
            (wallet_id, e.doctor_id, e.currency))
        self.wallet_ids[wallet_id] = (e.doctor_id, e.currency)
        self._change("audit_wallets", (e.doctor_id, e.currency), recorded, position)
        self._event(e, recorded, position, None, doctor_id=e.doctor_id, currency=e.currency)

    def _wallet(self, wallet_id: UUID) -> tuple[str, str]:
        key = str(wallet_id)
        if key not in self.wallet_ids:
            with self.store.locked():
                rows = self.store.query("SELECT doctor_id, currency FROM audit_wallet_ids "
                                        "WHERE wallet_id = ?", (key,))
            if not rows:
                raise LookupError(f"wallet {key} has no Opened event before its withdrawal")
            self.wallet_ids[key] = (rows[0][0], rows[0][1])
        return self.wallet_ids[key]

    def _withdrawal(self, e: Any, recorded: Any, position: int, **deltas: int) -> None:
        doctor_id, currency = self._wallet(e.originator_id)
        self._change("audit_wallets", (doctor_id, currency), recorded, position, **deltas)
        self._event(e, recorded, position, e.at, doctor_id=doctor_id, currency=currency,
                    request_id=e.request_id)

    def _withdrawal_held(self, e: Any, recorded: Any, position: int) -> None:
        self._withdrawal(e, recorded, position, available=-e.amount_minor, held=e.amount_minor)

    def _withdrawal_completed(self, e: Any, recorded: Any, position: int) -> None:
        self._withdrawal(e, recorded, position, held=-e.amount_minor, withdrawn=e.amount_minor)

    def _withdrawal_released(self, e: Any, recorded: Any, position: int) -> None:
        self._withdrawal(e, recorded, position, held=-e.amount_minor, available=e.amount_minor)

    # ---------------------------------- priced consultations' shares in the §5 wallets (§10)

    def _share_captured(self, e: Any, recorded: Any, position: int) -> None:
        """A capture credits the practitioner's share, pending (views.py `_share_captured`)."""
        if e.capture is not None:
            share = e.capture["share_minor"]
            self._change("audit_wallets", (e.practitioner_id, e.currency), recorded, position,
                         credited=share, pending=share)
            self._event(e, recorded, position, e.completed_at or e.at,
                        doctor_id=e.practitioner_id, currency=e.currency)

    def _share_refunded(self, e: Any, recorded: Any, position: int) -> None:
        """A refund while the earning is pending reverses the share; once available it stays."""
        if e.share_reversed_minor:
            self._change("audit_wallets", (e.practitioner_id, e.currency), recorded, position,
                         reversed=e.share_reversed_minor, pending=-e.share_reversed_minor)
            self._event(e, recorded, position, e.at, doctor_id=e.practitioner_id,
                        currency=e.currency)

    def _earning_credited(self, e: Any, recorded: Any, position: int) -> None:
        """The share becomes available after the settlement grace (§10 Earnings)."""
        doctor_id, currency = self._wallet(e.originator_id)
        self._change("audit_wallets", (doctor_id, currency), recorded, position,
                     pending=-e.amount_minor, available=e.amount_minor)
        self._event(e, recorded, position, None, doctor_id=doctor_id, currency=currency)
