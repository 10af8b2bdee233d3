"""The deriver: follows the committed event log with tracking and turns events into
notifications and deliveries: the log is the outbox.

Like the Projector (projections/projector.py), it reads the notifications after its tracked
position (topic-filtered, at most BATCH_EVENTS, never past the head read at the start), and
writes the messages, one delivery per subscribed endpoint and the new tracking position in ONE
transaction, compare-and-set from the position the batch was read at (a second process that
applied the batch first makes this one roll back and re-read). A crash between a commit of the
ledger and the send therefore loses nothing (the events are in the log, the position is not
past them), and nothing uncommitted is ever derived (only committed events are read; on
PostgreSQL commit order is id order, docs/design.md). Message ids are derived from the events,
so a batch derived twice gives the same ids.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from typing import Any, Callable
from uuid import uuid5

from eventsourcing.utils import get_topic

from ledger.consultations import Consultation
from ledger.domain import Pool, Session, Wallet
from ledger.recording import AggregateFollower
from ledger.rules import block_end
from notifications import catalogue, schema
from notifications.catalogue import LEDGER_END_REASONS, Message, build, iso, resource
from notifications.units import Fall, Units, UnitsBatch
from projections.store import Store

BATCH_EVENTS = 500
FOLLOWED_AGGREGATES = 20_000  # per kind (sessions, wallets, consultations) in flight
NAME = "webhooks"
MESSAGE_COLUMNS = ("message_id", "position", "ordinal", "event_type", "ordering_key", "body",
                   "created_at")
DELIVERY_COLUMNS = ("delivery_id", "message_id", "endpoint_id", "event_type", "ordering_key",
                    "position", "ordinal", "status", "attempts", "created_at", "deadline_at",
                    "next_attempt_at")


def _event_classes(aggregate: type) -> tuple[type, ...]:
    bases = (aggregate.Event, getattr(aggregate, "Created", None))
    return tuple(v for v in vars(aggregate).values()
                 if isinstance(v, type) and issubclass(v, aggregate.Event) and v not in bases)


# Every event of the aggregates followed (the followers fold each version in turn).
TOPICS = tuple(get_topic(c) for a in (Session, Pool, Wallet, Consultation)
               for c in _event_classes(a))
# A priced consultation's events (billing-rules §10) and the notification each one gives.
CONSULTATION_EVENTS = {"Booked": "consultation.booked", "Activated": "consultation.activated",
                       "Confirmed": "consultation.confirmed", "Joined": "consultation.started",
                       "Closed": "consultation.closed",
                       "EarningReleased": "consultation.earning_released",
                       "Refunded": "consultation.refunded"}


def _owner(event: Any) -> str:
    """The aggregate class name of a domain event ("Pool" for Pool.Held)."""
    return type(event).__qualname__.split(".")[0]


class _LostRace(Exception):
    """Another process moved the tracking position first: roll back and re-read."""


def delivery_id(message_id: str, endpoint_id: str) -> str:
    """The id of the delivery of one message to one endpoint (stable)."""
    return "dlv_" + uuid5(catalogue.NS, f"{message_id}|{endpoint_id}").hex


def subscribed(event_types: list[str], event_type: str) -> bool:
    """An empty list subscribes to every type; `withdrawal.*` to the family."""
    return not event_types or any(
        t == event_type or (t.endswith(".*") and event_type.startswith(t[:-1]))
        for t in event_types)


class Deriver:
    """Derives messages and deliveries from `ledger`'s log into `store` (the ledger's database).

    `clock()` is the wall clock (aware UTC) stamped on deliveries; `threshold` the units at
    which `balance.low` is sent; `base_url` prefixes the payloads' `resource` links;
    `retry_for` bounds each delivery's retries.
    """

    def __init__(self, ledger: Any, store: Store, *, clock: Callable[[], datetime],
                 threshold: int = 1, base_url: str = "",
                 retry_for: timedelta = timedelta(days=3)) -> None:
        self.ledger, self.store, self.clock = ledger, store, clock
        self.base_url, self.retry_for = base_url, retry_for
        self.units = Units(threshold)
        self.sessions, self.wallets, self.consultations = (
            AggregateFollower.reading(ledger, FOLLOWED_AGGREGATES) for _ in range(3))
        self._catching_up = threading.Lock()
        self.races_lost = 0

    def setup(self) -> None:
        """Create the tables and the tracking row (position 0), if absent."""
        with self.store.locked(), self.store.transaction():
            self.store.lock("ddl")
            for statement in schema.ALL:
                self.store.execute(statement.format(**self.store.ddl_types))
            self.store.execute("INSERT INTO webhook_tracking (name, notification_id) VALUES (?, 0) "
                               "ON CONFLICT (name) DO NOTHING", (NAME,))

    # ------------------------------------------------------------------------ following

    def head(self) -> int:
        return int(self.ledger.recorder.max_notification_id() or 0)

    def position(self) -> int:
        """The notification id up to which the log has been derived."""
        with self.store.locked():
            rows = self.store.query("SELECT notification_id FROM webhook_tracking WHERE name = ?",
                                    (NAME,))
        return int(rows[0][0]) if rows else 0

    def catch_up(self, max_events: int = 50_000) -> int:
        """Derive up to the current head, at most `max_events` events; returns events read."""
        with self._catching_up:
            head, done = self.head(), 0
            for _ in range(4 * (max_events // BATCH_EVENTS + 1)):  # bounded; lost races retry
                if done >= max_events:
                    break
                count = self._step(head, min(BATCH_EVENTS, max_events - done))
                if count is None:
                    break
                done += count
            return done

    def _step(self, head: int, limit: int) -> int | None:
        position = self.position()
        if position >= head:
            return None
        notifications = self.ledger.recorder.select_notifications(
            start=position, limit=limit, stop=head, topics=TOPICS, inclusive_of_start=False)
        new_position = notifications[-1].id if len(notifications) >= limit else head
        events = [(n.id, self.ledger.mapper.to_domain_event(n)) for n in notifications]
        # Derived before the write transaction (reads only), so that it holds the database's
        # write lock briefly; the compare-and-set below discards it if another process won.
        for owner, follower in (("Session", self.sessions), ("Wallet", self.wallets),
                                ("Consultation", self.consultations)):
            follower.prefetch(e for _, e in events if _owner(e) == owner)
        with self.store.locked():
            units = self.units.batch(self.store, position)
            units.read_ahead(e for _, e in events if _owner(e) == "Pool")
            messages = self._derive(events, units)
        try:
            with self.store.locked(), self.store.transaction():
                self.store.lock(NAME)
                if not self._advance(position, new_position):
                    raise _LostRace()
                units.flush()
                self._record(messages)
        except _LostRace:
            self.races_lost += 1
            return 0
        # Only now: a batch that raised or lost leaves nothing kept (Units.batch took it).
        self.units.keep(units, new_position)
        return len(events)

    def _advance(self, old: int, new: int) -> bool:
        return self.store.execute(
            "UPDATE webhook_tracking SET notification_id = ? WHERE name = ? "
            "AND notification_id = ? AND notification_id < ?", (new, NAME, old, new)) == 1

    # ------------------------------------------------------------------------- deriving

    def _derive(self, events: list[tuple[int, Any]], units: UnitsBatch) -> list[Message]:
        out: list[Message] = []
        for position, event in events:
            owner = _owner(event)
            if owner == "Session":
                out += self._session(position, event)
            elif owner == "Pool":
                out += self._pool(position, event, units)
            elif owner == "Wallet":
                out += self._wallet(position, event)
            elif owner == "Consultation":
                out += self._consultation(position, event)
        return out

    def _build(self, position: int, event: Any, items: list[tuple[str, str, dict, str]]):
        source = f"{event.originator_id}:{event.originator_version}"
        return [build(t, data, source=source, position=position, ordinal=i,
                      recorded_at=getattr(event, "timestamp", None), ordering_key=key,
                      discriminator=disc)
                for i, (t, key, data, disc) in enumerate(items)]

    def _session(self, position: int, e: Any) -> list[Message]:
        before, s = self.sessions.advance(e, lambda a: a.paid_until())
        name, key = type(e).__name__, f"session:{s.session_id}"
        paid_until = s.paid_until()
        base = {"session_id": s.session_id, "kind": s.kind, "patient_id": s.patient_id,
                "doctor_id": s.doctor_id, "state": s.state, "paid_until": iso(paid_until),
                "resource": resource(self.base_url, f"/v1/sessions/{s.session_id}")}
        items = []
        if name == "AutoDeducted":
            items.append(("session.block_charged", key, {
                **base, "block": e.n, "pool_id": e.pool_id,
                "block_started_at": iso(block_end(s.started_at, e.n - 1)),
                "block_ended_at": iso(block_end(s.started_at, e.n))}, ""))
        elif name == "Ended":
            source = "ledger" if e.by == "system" and e.reason in LEDGER_END_REASONS else "report"
            items.append(("session.ended", key, {
                **base, "ended_at": iso(e.ended_at), "ended_by": e.by, "reason": e.reason,
                "decided_by": source, "replaces_earlier_report": not e.first}, ""))
        elif name == "Settled":
            items.append(("session.settled", key, {
                **base, "settled_at": iso(e.at), "ended_at": iso(s.ended_at),
                "reason": s.end_reason, "units_owed": e.units_owed,
                "units_charged": len(s.charges),
                "units_charged_at_settlement": len(e.charged),
                "units_reversed": len(e.reversed),
                "reversed_blocks": sorted(item["block"] for item in e.reversed),
                "doctor_pay": {"currency": e.currency or None,
                               "per_unit_minor": e.pay_per_unit_minor,
                               "net_minor": e.net_pay_minor}}, ""))
        if name != "Settled" and e.originator_version > 1 and before != paid_until:
            items.append(("session.paid_until_changed", key, {
                **base, "previous_paid_until": iso(before)}, ""))
        return self._build(position, e, items)

    def _pool(self, position: int, e: Any, units: UnitsBatch) -> list[Message]:
        name, pool_id = type(e).__name__, str(e.originator_id)
        items = [self._balance_low(fall) for fall in units.apply(name, pool_id, e)]
        if name == "Expired":
            reference, owner = units.pool(pool_id) or ("", "")
            items.append(("pool.expired", f"pool:{pool_id}", {
                "pool_id": pool_id, "payment_reference": reference, "owner_id": owner,
                "forfeited": {b: int(n) for b, n in sorted(e.forfeited.items())},
                "resource": resource(self.base_url, f"/v1/patients/{owner}/balance")}, ""))
        return self._build(position, e, items)

    def _balance_low(self, fall: Fall) -> tuple[str, str, dict, str]:
        return ("balance.low", f"patient:{fall.patient_id}", {
            "patient_id": fall.patient_id, "bucket": fall.bucket, "units_available": fall.after,
            "previous_units_available": fall.before, "threshold": self.units.threshold,
            "level": "empty" if fall.after <= 0 else "low",
            "resource": resource(self.base_url, f"/v1/patients/{fall.patient_id}/balance")},
            f"{fall.patient_id}|{fall.bucket}")

    def _wallet(self, position: int, e: Any) -> list[Message]:
        _, w = self.wallets.advance(e, lambda a: None)
        types = {"WithdrawalHeld": ("withdrawal.held", "held"),
                 "WithdrawalCompleted": ("withdrawal.completed", "completed"),
                 "WithdrawalReleased": ("withdrawal.rejected", "rejected")}
        name = type(e).__name__
        if name not in types:
            return []
        event_type, status = types[name]
        data = {"request_id": e.request_id, "doctor_id": w.doctor_id, "currency": w.currency,
                "amount_minor": e.amount_minor, "status": status, "at": iso(e.at),
                "available_minor": w.available_minor,
                "resource": resource(self.base_url, f"/v1/doctors/{w.doctor_id}/wallet")}
        if name == "WithdrawalReleased":
            data["reason"] = e.reason
        return self._build(position, e, [(event_type, f"wallet:{w.doctor_id}:{w.currency}",
                                          data, "")])

    def _consultation(self, position: int, e: Any) -> list[Message]:
        """A priced consultation's lifecycle (§10): booked, activated, confirmed, started (its
        first join), closed (captured or released), earning released, refunded."""
        before, c = self.consultations.advance(e, lambda a: a.status)
        name = type(e).__name__
        if name not in CONSULTATION_EVENTS or (name == "Joined" and before == "in_progress"):
            return []
        data = {"consultation_id": c.consultation_id, "patient_id": c.patient_id,
                "practitioner_id": c.practitioner_id, "consultation_type": c.consultation_type,
                "mode": c.mode, "status": c.status, "start": iso(c.start),
                "duration_minutes": c.duration_minutes, "currency": c.currency,
                "total_minor": c.total_minor,
                "resource": resource(self.base_url, f"/v1/consultations/{c.consultation_id}")}
        if name == "Joined":
            data["first_joined"] = e.role
        elif name == "Closed":
            data.update(reason=e.reason, closed_by=e.by, closed_at=iso(e.at),
                        completed_at=iso(e.completed_at),
                        money="captured" if e.capture is not None else "released")
        elif name == "EarningReleased":
            data.update(share_minor=e.amount_minor)
        elif name == "Refunded":
            data.update(refunded_minor=e.total_minor, earning=e.earning, reason=e.reason)
        return self._build(position, e, [(CONSULTATION_EVENTS[name],
                                          f"consultation:{c.consultation_id}", data, "")])

    # ------------------------------------------------------------------------ recording

    def _record(self, messages: list[Message]) -> None:
        """Insert the messages and one pending delivery per enabled, subscribed endpoint
        registered before the message's position."""
        if not messages:
            return
        now = self.clock()
        store = self.store
        created_at = store.ts(now)
        store.insert_new("webhook_messages", ("message_id",), MESSAGE_COLUMNS,
                         [(m.message_id, m.position, m.ordinal, m.event_type, m.ordering_key,
                           m.body, created_at) for m in messages])
        endpoints = store.query("SELECT endpoint_id, event_types, start_position "
                                "FROM webhook_endpoints WHERE enabled = ?", (True,))
        rows = []
        for endpoint_id, types, start in endpoints:
            wanted = json.loads(types)
            rows += [self.delivery_row(m, endpoint_id, now) for m in messages
                     if m.position > int(start) and subscribed(wanted, m.event_type)]
        insert_deliveries(store, rows)

    def delivery_row(self, m: Message | tuple, endpoint_id: str, now: datetime) -> tuple:
        """A new pending delivery of message `m` (a Message or a row of webhook_messages:
        message_id, position, ordinal, event_type, ordering_key) to `endpoint_id`."""
        if isinstance(m, Message):
            m = (m.message_id, m.position, m.ordinal, m.event_type, m.ordering_key)
        mid, position, ordinal, event_type, key = m
        ts = self.store.ts
        return (delivery_id(mid, endpoint_id), mid, endpoint_id, event_type, key, position,
                ordinal, "pending", 0, ts(now), ts(now + self.retry_for), ts(now))


def insert_deliveries(store: Store, rows: list[tuple]) -> None:
    """Insert delivery rows (see Deriver.delivery_row), in one statement per call on
    PostgreSQL; an existing one (same message and endpoint) is left alone."""
    store.insert_new("webhook_deliveries", ("message_id", "endpoint_id"), DELIVERY_COLUMNS, rows)
