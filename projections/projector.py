"""The Projector: a catch-up loop that keeps the read models exactly once, outside requests.

For each projection it reads the notifications after its tracked position (topic-filtered, at
most BATCH_EVENTS, never past the head read at the start of the call), and applies them plus
the tracking update in ONE transaction. The tracking update is a compare-and-set from the
position the batch was read at; if it changes no row another process already applied events
after that position, so the whole transaction is rolled back and the batch is re-read. On
PostgreSQL a per-projection `pg_advisory_xact_lock` makes concurrent catch-ups queue instead of
racing; SQLite serialises writers with BEGIN IMMEDIATE. Positions resume from "greater than
the last tracked id" (PostgreSQL ids have gaps); when a filtered read returns less than a full
batch the position moves to the head, so irrelevant trailing events cost no lag.

`start()` runs the catch-up in a background thread of this process (woken by `wake()` after a
write, by PostgreSQL NOTIFY from any process, else every `poll_seconds`); on PostgreSQL only the
process holding the projector's advisory session lock (projections/signal.py) projects in the
background, the others follow the tracking rows. Readers call `wait_for(position, names, …)`.

A poison event (one a projection cannot decode or apply) stops that projection, not the
others: the failing batch is re-applied one event at a time, the events before the poison are
applied, and the projection is marked stalled at the poison's notification id (logged as an
error, shown by `health()` and so by /readyz and /metrics); it is retried every
STALL_RETRY_SECONDS and `catch_up()` raises ProjectionStalled while a stall lasts.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from ledger.rules import BUCKETS, Policy
from projections import marketplace, schema
from projections.store import Store, open_store, utc
from projections.stored import select_rows
from projections.views import Projection, build_projections
from storage import is_unavailable

log = logging.getLogger("ledger.projections")
BATCH_EVENTS = 500
PATIENT_POOLS_LIMIT = 1000
EVENTS_PER_WAKE = 50_000  # the background thread's bound per catch-up call (then it loops)
STALL_RETRY_SECONDS = 60.0  # a stalled projection is retried this often (a fix needs a deploy)
WAIT_POLL_SECONDS = 0.05  # readers re-read the tracking rows this often (other processes)
NOTIFY_POLL_FACTOR = 10  # on PostgreSQL (NOTIFY wakes the thread) it polls 10 times less often
WAKES_PER_POLL = 100  # a reader is also woken by each committed batch: at most this many a poll


class ProjectionStalled(RuntimeError):
    """A projection stopped at an event it cannot apply. `stall` = {"projection", "position"
    (the event's notification id), "event_id" ("<originator_id>@<originator_version>"),
    "topic", "error" ("<ExceptionType>: message")}; `reached`, from `wait_for`, is the
    lowest position of the projections waited for."""

    def __init__(self, stall: dict, reached: int | None = None) -> None:
        super().__init__(describe_stall(stall))
        self.stall = stall
        self.reached = reached  # from `wait_for`: the position the projections did reach


class ProjectionsBehind(TimeoutError):
    """`wait_for` timed out: `reached` is the slowest named projection's position."""

    def __init__(self, target: int, reached: int) -> None:
        super().__init__(f"projections at position {reached}, not yet {target}")
        self.target, self.reached = target, reached


def stall_of(name: str, notification: Any, exc: Exception) -> dict:
    """The ProjectionStalled.stall of projection `name` at a stored event (a Notification)."""
    return {"projection": name, "position": int(getattr(notification, "id", 0)),
            "event_id": f"{notification.originator_id}@{notification.originator_version}"
            if notification is not None else None,
            "topic": getattr(notification, "topic", None),
            "error": f"{type(exc).__name__}: {exc}"[:500]}


def describe_stall(stall: dict) -> str:
    """One line naming the stalled projection, the event's position, id and topic, the error."""
    return (f"projection {stall['projection']} stalled at position {stall['position']} "
            f"(event {stall['event_id']}, topic {stall['topic']}): {stall['error']}")


class _LostRace(Exception):
    """The tracking row moved since the batch was read: roll back and re-read."""


class Projector:
    """Read models beside the ledger's event store (same SQLite file or PostgreSQL schema).

    Views: `balances` (units per pool/bucket and patient/bucket), `wallets` (minor units per
    doctor/currency), `live` (unsettled sessions with next_due_at, pools with effective_end).
    Thread-safe: one connection guarded by a lock, released between batches.
    """

    def __init__(self, ledger: Any, database_url: str, policy: Policy) -> None:
        self.ledger = ledger
        self.policy = policy
        self.database_url = database_url
        self._store: Store = open_store(database_url, derived=True)
        self._projections: list[Projection] = build_projections(ledger, policy)
        self._catching_up = threading.Lock()  # one catch-up at a time per instance
        self.races_lost = 0  # batches rolled back because another process applied them first
        self.failures = 0  # background catch-ups that raised (logged, retried)
        self._stalls: dict[str, dict] = {}  # projection name -> stall (ProjectionStalled.stall)
        self._retry_at: dict[str, float] = {}  # projection name -> monotonic time of retry
        self._progress = threading.Condition()  # notified after every committed batch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._signal: Any = None  # projections.signal.PostgresSignal while started on PG
        self._setup()

    def _setup(self) -> None:
        """Create the tables and one tracking row (position 0) per projection, if absent."""
        store = self._store
        with store.locked(), store.transaction():
            store.lock("ddl")
            for statement in schema.ALL:
                store.execute(statement.format(**store.ddl_types))
            for projection in self._projections:
                store.execute("INSERT INTO projection_tracking (name, notification_id) "
                              "VALUES (?, 0) ON CONFLICT (name) DO NOTHING", (projection.name,))

    # ------------------------------------------------------------------------ catching up

    def catch_up(self, max_events: int = 50_000) -> int:
        """Apply events up to the current head; returns events applied across projections.

        Bounded: at most `max_events` events per call; call again while
        `lag()` is non-zero to continue. Raises ProjectionStalled (after applying what the
        other projections can) while a projection is stopped at a poison event.
        """
        with self._catching_up:
            applied = self._catch_up(max_events, stop=None)
        stalls = self.stalls()
        if stalls:
            raise ProjectionStalled(stalls[0])
        return applied

    def _catch_up(self, max_events: int, stop: int | dict[str, int] | None) -> int:
        """`stop`: apply nothing past this id (one for all, or per projection name)."""
        head = self._head() if stop is None else stop
        heads = head if isinstance(head, dict) else {p.name: head for p in self._projections}
        applied, pending = 0, [p for p in self._projections if self._may_try(p.name)]
        rounds = 4 * (max_events // BATCH_EVENTS + 1) + 8 * len(pending)
        for _ in range(rounds):
            if not pending or applied >= max_events:
                break
            positions = self._positions()  # one read per round (a stale one loses the CAS)
            behind = [p for p in pending if positions.get(p.name, 0) < heads.get(p.name, 0)]
            for projection in pending:
                if projection not in behind:
                    self._resumed(projection.name)
            # an event counts once per projection applying it: the bound holds for all
            shared = min(BATCH_EVENTS, (max_events - applied) // max(1, len(behind)))
            count = None
            if self._store.kind == "postgres" and len(behind) > 1 and shared > 0 \
                    and not any(p.name in self._stalls for p in behind):
                count = self._together(behind, positions, heads, shared)
            if count is not None:
                applied += count[0]
                pending = [] if count[1] else behind  # a partial page: all at their heads
                continue
            still = []  # one projection at a time: a poison event stops only its projection
            for projection in behind:
                limit = min(BATCH_EVENTS, max_events - applied)
                if limit <= 0:
                    still.append(projection)
                    continue
                count = self._step(projection, heads.get(projection.name, 0), limit,
                                   positions.get(projection.name, 0))
                if count is not None:
                    applied += count
                    if projection.name not in self._stalls:
                        still.append(projection)
            pending = still
        return applied

    def _together(self, projections: list[Projection], positions: dict[str, int],
                  heads: dict[str, int], limit: int) -> tuple[int, bool] | None:
        """One read (every projection's topics), each event decoded once, and ONE transaction
        (each projection's advisory lock in name order, its tracking CAS, its changes) for
        several projections. PostgreSQL only: on SQLite the views share the ledger's file and
        its one write lock, which a shorter transaction per projection holds less long; returns (events applied, whether all reached their heads) — (0,
        False) on a lost race: re-read next round — or None if applying failed, and the caller
        then goes one projection at a time."""
        start = min(positions.get(p.name, 0) for p in projections)
        stop = max(heads.get(p.name, 0) for p in projections)
        topics = sorted({topic for p in projections for topic in p.topics})
        notifications = select_rows(self.ledger.recorder, start, stop, limit, topics)
        full = len(notifications) >= limit
        plan = []
        for projection in projections:
            old, head = positions.get(projection.name, 0), heads.get(projection.name, 0)
            new = min(notifications[-1].id, head) if full else head
            if new > old:
                follows = set(projection.topics)
                plan.append((projection, old, new, [n for n in notifications
                                                    if old < n.id <= new and n.topic in follows]))
        decoded: dict[int, Any] = {}
        try:
            batches = [(p, old, new, [decoded[n.id] if n.id in decoded else
                                      decoded.setdefault(n.id, self.ledger.mapper.
                                                         to_domain_event(n)) for n in mine])
                       for p, old, new, mine in plan]
            with self._store.locked(), self._store.transaction():
                for projection, *_ in sorted(batches, key=lambda b: b[0].name):
                    self._store.lock(projection.name)
                for projection, old, new, _ in batches:
                    if not self._advance(projection.name, old, new):
                        raise _LostRace(projection.name)
                for projection, _, _, events in batches:
                    projection.apply(self._store, events)
        except _LostRace:
            self._reset(p for p, *_ in plan)
            self.races_lost += 1
            return 0, False
        except Exception as exc:  # noqa: BLE001 - a poison event, or the store is down
            self._reset(p for p, *_ in plan)
            if is_unavailable(exc):
                raise
            return None
        except BaseException:
            self._reset(p for p, *_ in plan)
            raise
        with self._progress:
            self._progress.notify_all()
        return sum(len(events) for *_, events in batches), not full

    @staticmethod
    def _reset(projections: Iterable[Projection]) -> None:
        for projection in projections:
            projection.reset()

    def _may_try(self, name: str) -> bool:
        """Not stalled, or stalled and due for its periodic retry."""
        return name not in self._stalls or time.monotonic() >= self._retry_at.get(name, 0.0)

    def _head(self) -> int:
        return int(self.ledger.recorder.max_notification_id() or 0)

    def _step(self, projection: Projection, head: int, limit: int,
              position: int) -> int | None:
        """Apply one batch of `projection` from its tracked `position` (as read this round);
        returns events applied, or None if caught up."""
        if position >= head:
            self._resumed(projection.name)
            return None
        notifications = select_rows(self.ledger.recorder, position, head, limit,
                                    projection.topics)
        new_position = notifications[-1].id if len(notifications) >= limit else head
        try:
            events = [self.ledger.mapper.to_domain_event(n) for n in notifications]
            self._commit(projection, position, new_position, events)
        except _LostRace:
            self.races_lost += 1
            return 0
        except Exception as exc:  # noqa: BLE001 - a poison event, or the store is down
            if is_unavailable(exc):
                raise
            return self._one_by_one(projection, position, notifications)
        self._resumed(projection.name)
        return len(events)

    def _commit(self, projection: Projection, old: int, new: int, events: list) -> None:
        """Apply `events` and move the tracking row from `old` to `new`, in one transaction;
        wakes the readers waiting in `wait_for`."""
        try:
            with self._store.locked(), self._store.transaction():
                self._store.lock(projection.name)
                if not self._advance(projection.name, old, new):
                    raise _LostRace(projection.name)
                projection.apply(self._store, events)
        except BaseException:
            projection.reset()
            raise
        with self._progress:
            self._progress.notify_all()

    def _one_by_one(self, projection: Projection, position: int, notifications: list) -> int:
        """Re-apply a failed batch one event per transaction, up to the first event that fails
        again, and stall the projection there. Returns the events applied."""
        applied = 0
        for notification in notifications:
            try:
                event = self.ledger.mapper.to_domain_event(notification)
                self._commit(projection, position, notification.id, [event])
            except _LostRace:
                self.races_lost += 1
                return applied
            except Exception as exc:  # noqa: BLE001 - this is the poison event
                if is_unavailable(exc):
                    raise
                self._stall(projection.name, notification, exc)
                return applied
            position, applied = notification.id, applied + 1
        self._resumed(projection.name)  # the failure did not repeat: it was not this batch's
        return applied

    def _stall(self, name: str, notification: Any, exc: Exception) -> None:
        stall = stall_of(name, notification, exc)
        self._stalls[name] = stall
        self._retry_at[name] = time.monotonic() + STALL_RETRY_SECONDS
        log.error("PROJECTION STALLED: %s; the other projections continue; retried every "
                  "%d s", describe_stall(stall), STALL_RETRY_SECONDS, exc_info=exc,
                  extra={"projection_stall": stall})
        with self._progress:
            self._progress.notify_all()  # readers waiting on this projection answer now

    def _resumed(self, name: str) -> None:
        if self._stalls.pop(name, None) is not None:
            self._retry_at.pop(name, None)
            log.warning("projection %s resumed: its stalled event applied on retry", name)

    def stalls(self) -> list[dict]:
        """Every stall this process knows of (ProjectionStalled.stall), lowest position first."""
        return sorted(self._stalls.values(), key=lambda s: (s["position"], s["projection"]))

    def _advance(self, name: str, old: int, new: int) -> bool:
        """Compare-and-set the tracking row from `old` to `new` (> old); insert if absent."""
        changed = self._store.execute(
            "UPDATE projection_tracking SET notification_id = ? "
            "WHERE name = ? AND notification_id = ? AND notification_id < ?", (new, name, old, new))
        if changed == 0 and old == 0:
            changed = self._store.execute(
                "INSERT INTO projection_tracking (name, notification_id) VALUES (?, ?) "
                "ON CONFLICT (name) DO NOTHING", (name, new))
        return changed == 1

    def _positions(self) -> dict[str, int]:
        with self._store.locked():
            rows = self._store.query("SELECT name, notification_id FROM projection_tracking")
        return {name: int(position) for name, position in rows}

    def lag(self) -> dict[str, int]:
        """Projection name -> notifications behind `ledger.recorder.max_notification_id()`."""
        head, positions = self._head(), self._positions()
        return {p.name: max(0, head - positions.get(p.name, 0)) for p in self._projections}

    def health(self) -> dict:
        """The projections' progress, for /readyz, /metrics and logs:

        {"head": int, "position": int, "lag_events": int, "lag_seconds": float | None,
         "stalled": None | {"projection": str, "position": int, "event_id": str, "topic": str,
                            "error": str}}

        `position` is the slowest projection's tracked notification id; `lag_events` = head −
        position; `lag_seconds` is the wall-clock age of the first event not yet applied (0.0
        when caught up, None if it cannot be read). `stalled` is the lowest stall this process
        found (ProjectionStalled), None while every projection applies.
        """
        head, positions = self._head(), self._positions()
        position = min((positions.get(p.name, 0) for p in self._projections), default=head)
        lag_events = max(0, head - position)
        stalls = self.stalls()
        return {"head": head, "position": position, "lag_events": lag_events,
                "lag_seconds": self._lag_seconds(position) if lag_events else 0.0,
                "stalled": stalls[0] if stalls else None}

    # ------------------------------------------------------------ background and readers

    def start(self, poll_seconds: float = 0.5, coalesce_seconds: float = 0.0) -> "Projector":
        """Catch up in a background thread until `close()`: at once, after `wake()`, on a
        PostgreSQL NOTIFY of a new event (any process), else every `poll_seconds`; after a
        catch-up that applied anything it waits `coalesce_seconds` before the next, so a
        stream of small writes is applied in pages (each catch-up costs per call: reads of the
        head and the tracking rows, one transaction per projection)."""
        if self._thread is not None:
            return self
        if self._store.kind == "postgres":
            from projections.signal import PostgresSignal

            channel = getattr(self.ledger.recorder, "channel_name", None)
            self._signal = PostgresSignal(self.database_url, channel, self.wake,
                                          poll_seconds).start()
        self._poll_seconds, self._coalesce_seconds = poll_seconds, coalesce_seconds
        self._thread = threading.Thread(target=self._run, name="projector", daemon=True)
        self._thread.start()
        self.wake()
        return self

    def wake(self) -> None:
        """Ask the background thread (if started) to catch up now; returns at once."""
        self._wake.set()

    def _run(self) -> None:
        # with PostgreSQL NOTIFY every write wakes the thread: the poll is only a safety net
        poll = self._poll_seconds * (NOTIFY_POLL_FACTOR if self._signal is not None else 1)
        while not self._stop.is_set():
            self._wake.wait(poll)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._signal is not None and not self._signal.leader:
                continue  # another process projects; readers follow the tracking rows
            try:
                applied = self.catch_up(EVENTS_PER_WAKE)
            except ProjectionStalled:
                continue  # logged when found; the other projections went on
            except Exception:  # noqa: BLE001 - the thread must outlive a bad batch
                self.failures += 1
                log.exception("background projection catch-up failed; retrying")
                self._stop.wait(self._poll_seconds)
                continue
            if applied >= EVENTS_PER_WAKE:
                self._wake.set()  # a backlog: go on without waiting for a poll
            elif applied:
                self._stop.wait(self._coalesce_seconds)

    def wait_for(self, position: int, names: Iterable[str], timeout: float) -> int:
        """Block until every projection in `names` has applied the log up to notification id
        `position`; returns the lowest of their positions (>= `position`).

        Raises ProjectionStalled at once if one of them is stalled in this process, and
        ProjectionsBehind after `timeout` seconds. Wakes the background thread while waiting
        and re-reads the tracking rows at least every WAIT_POLL_SECONDS (other processes).
        """
        names = tuple(names) or tuple(p.name for p in self._projections)
        deadline = time.monotonic() + timeout
        # bounded by the deadline; the cap only guards against a clock that does not move
        for _ in range(int(timeout / WAIT_POLL_SECONDS) * WAKES_PER_POLL + 2):
            positions = self._positions()
            reached = min(positions.get(name, 0) for name in names)
            if reached >= position:
                return reached
            stalled = [s for s in map(self._stalls.get, names) if s is not None]
            if stalled:
                raise ProjectionStalled(stalled[0], reached)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.wake()
            with self._progress:
                self._progress.wait(min(left, WAIT_POLL_SECONDS))
        raise ProjectionsBehind(position, reached)

    def _lag_seconds(self, position: int) -> float | None:
        """Seconds since the first notification after `position` was recorded (wall clock:
        the stored events' own timestamps are wall-clock, whatever the ledger's clock)."""
        found = self.ledger.recorder.select_notifications(start=position, limit=1,
                                                          inclusive_of_start=False)
        if not found:
            return None
        recorded = getattr(self.ledger.mapper.to_domain_event(found[0]), "timestamp", None)
        if recorded is None:
            return None
        return max(0.0, (datetime.now(timezone.utc) - recorded).total_seconds())

    # ------------------------------------------------------------------------------ reads

    def patient_balance(self, patient_id: str, now: datetime) -> dict:
        """Units of one patient at `now` (aware datetime).

        {"patient_id", "as_of", "buckets": {b: {"available", "usable_now", "held", "charged"}},
         "pools": [{"pool_id", "payment_reference", "role": "owner"|"member", "active",
                    "starts_at", "effective_end", "expired", "refunded",
                    "buckets": {b: {"granted", "available", "held", "charged", "reversed",
                                    "forfeited", "revoked"}}}]}  for b in text, voice, video.
        buckets[b].available = free units of pools the patient owns or is an active member of,
        not expired/refunded; usable_now = those also valid at `now` (starts_at <= now <
        effective_end, member since); held/charged = units of the patient's own sessions.
        Pools are listed earliest effective_end first (draw order), inactive links included.
        """
        now, store = utc(now), self._store
        with store.locked(), store.snapshot():
            pools = store.query(
                "SELECT m.pool_id, m.role, m.active, m.added_at, p.payment_reference, p.starts_at, "
                "p.effective_end, p.expired, p.refunded FROM balance_members m "
                "JOIN balance_pools p ON p.pool_id = m.pool_id WHERE m.patient_id = ? "
                "ORDER BY p.effective_end, p.starts_at, m.pool_id LIMIT ?",
                (patient_id, PATIENT_POOLS_LIMIT))
            counts = store.query(
                "SELECT b.pool_id, b.bucket, b.granted, b.free, b.held, b.charged, b.reversed, "
                "b.forfeited, b.revoked FROM balance_pool_buckets b JOIN balance_members m "
                "ON m.pool_id = b.pool_id WHERE m.patient_id = ? LIMIT ?",
                (patient_id, len(BUCKETS) * PATIENT_POOLS_LIMIT))
            usage = store.query("SELECT bucket, held, charged FROM balance_patient_buckets "
                                "WHERE patient_id = ?", (patient_id,))
        return self._balance(patient_id, now, pools, counts, usage)

    def _balance(self, patient_id: str, now: datetime, pools: list, counts: list,
                 usage: list) -> dict:
        per_pool: dict[str, dict] = {}
        for pool_id, bucket, *values in counts:
            per_pool.setdefault(pool_id, {})[bucket] = pool_bucket(values)
        totals = {b: {"available": 0, "usable_now": 0, "held": 0, "charged": 0} for b in BUCKETS}
        for bucket, held, charged in usage:
            totals[bucket].update(held=int(held), charged=int(charged))
        entries = []
        for row in pools:
            entry = self._pool_entry(row, per_pool.get(row[0], {}))
            usable, usable_now = self._usability(entry, self._store.from_ts(row[3]), now)
            for bucket, count in entry["buckets"].items():
                totals[bucket]["available"] += count["available"] if usable else 0
                totals[bucket]["usable_now"] += count["available"] if usable_now else 0
            entries.append(entry)
        return {"patient_id": patient_id, "as_of": now.isoformat(), "buckets": totals,
                "pools": entries}

    def _pool_entry(self, row: tuple, buckets: dict) -> dict:
        pool_id, role, active, _added, reference, starts, end, expired, refunded = row
        return {"pool_id": pool_id, "payment_reference": reference, "role": role,
                "active": bool(active), "starts_at": self._store.from_ts(starts).isoformat(),
                "effective_end": self._store.from_ts(end).isoformat(), "expired": bool(expired),
                "refunded": bool(refunded),
                "buckets": {b: buckets.get(b, pool_bucket([0] * 7)) for b in BUCKETS}}

    @staticmethod
    def _usability(entry: dict, added_at: datetime, now: datetime) -> tuple[bool, bool]:
        """(counts in available, counts in usable_now) for the patient's link to this pool."""
        usable = entry["active"] and not entry["expired"] and not entry["refunded"]
        member_now = entry["role"] == "owner" or added_at <= now
        valid_now = (datetime.fromisoformat(entry["starts_at"]) <= now
                     < datetime.fromisoformat(entry["effective_end"]))
        return usable, usable and member_now and valid_now

    def doctor_wallet(self, doctor_id: str) -> dict:
        """Minor units per currency.

        {"doctor_id", "wallets": [{"currency", "pending_minor", "available_minor", "held_minor",
        "withdrawn_minor", "credited_minor", "reversed_minor"}]}, ordered by currency.
        """
        with self._store.locked():
            rows = self._store.query(
                "SELECT currency, pending, available, held, withdrawn, credited, reversed "
                "FROM wallet_balances WHERE doctor_id = ? ORDER BY currency", (doctor_id,))
        keys = ("pending_minor", "available_minor", "held_minor", "withdrawn_minor",
                "credited_minor", "reversed_minor")
        return {"doctor_id": doctor_id,
                "wallets": [{"currency": r[0], **{k: int(v) for k, v in zip(keys, r[1:])}}
                            for r in rows]}

    def due_sessions(self, as_of: datetime, limit: int = 1000) -> list[str]:
        """session_id of unsettled sessions with next_due_at <= as_of, earliest first."""
        with self._store.locked():
            rows = self._store.query(
                "SELECT session_id FROM live_sessions WHERE next_due_at <= ? "
                "ORDER BY next_due_at, session_id LIMIT ?", (self._store.ts(as_of), limit))
        return [r[0] for r in rows]

    def due_pools(self, as_of: datetime, limit: int = 1000) -> list[str]:
        """str(pool UUID) of unexpired pools with effective_end + skew <= as_of, earliest first."""
        cutoff = as_of - timedelta(seconds=self.policy.skew_seconds)
        with self._store.locked():
            rows = self._store.query(
                "SELECT pool_id FROM live_pools WHERE expired = ? AND effective_end <= ? "
                "ORDER BY effective_end, pool_id LIMIT ?", (False, self._store.ts(cutoff), limit))
        return [r[0] for r in rows]

    def live_session_ids(self, limit: int = 10_000) -> list[str]:
        """session_id of every unsettled session (up to `limit`), in id order."""
        with self._store.locked():
            rows = self._store.query("SELECT session_id FROM live_sessions ORDER BY session_id "
                                     "LIMIT ?", (limit,))
        return [r[0] for r in rows]

    # ---- priced consultations (§10): projections/marketplace.py

    def patient_money_wallet(self, patient_id: str) -> dict:
        """A patient's money wallets per currency (minor units)."""
        return marketplace.patient_money_wallet(self._store, patient_id)

    def platform_accounts(self) -> dict:
        """The platform and tax-payable accounts per currency (minor units)."""
        return marketplace.platform_accounts(self._store)

    def due_consultations(self, as_of: datetime, limit: int = 1000) -> list[str]:
        """consultation_id of consultations with a tick step due by `as_of`, earliest first."""
        return marketplace.due_consultations(self._store, as_of, limit)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the background thread (after its current batch, bounded by `timeout`) and
        close the view store."""
        self._stop.set()
        self._wake.set()
        if self._signal is not None:
            self._signal.close()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        with self._store.locked():
            self._store.close()


def pool_bucket(values: list) -> dict:
    """Counters of one pool/bucket in units; `available` is the pool's free units."""
    granted, free, held, charged, reversed_, forfeited, revoked = (int(v) for v in values)
    return {"granted": granted, "available": free, "held": held, "charged": charged,
            "reversed": reversed_, "forfeited": forfeited, "revoked": revoked}
