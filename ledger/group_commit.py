"""Group commit: single events posted concurrently are decided and saved as one unit of work.

Every single-event request used to be its own unit (reads, one write transaction under the
library's table lock, a commit). Under concurrency those transactions queue on the table lock
one commit at a time. `GroupCommit.ingest` instead queues the event; the first thread to find
no unit running leads: it takes what is queued (its own event first, at most `max_items`),
runs `Ledger.ingest_batch` on them as one unit, hands each waiting thread its own outcome and
passes the lead to the next queued thread, if any. No timer: a lone request runs at once
(the lead is free), and a group only forms while a unit is already being written.

Correctness is `ingest_batch`'s: the outcomes are those of ingesting the items one after the
other in queue order (concurrent requests have no order of their own), a refused event writes
nothing and gets its own refusal, a duplicate event_id replays the first one's result (I8).
If the unit raises (a `fatal` error, e.g. the store unreachable), which of its events are
durable is not known to the waiters: each then ingests its own event alone, which answers
from the receipt if it was written (I8) or raises that request's own error.

Bounds: at most `max_items` events per unit; at most `max_items * 4` queued; beyond that a
request ingests alone (its own unit, as without grouping). The wait is bounded by the unit
ahead plus its own: each thread leads at most one unit.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from ledger.application import Accepted, Item


class _Slot:
    """One queued event and, once decided, its outcome (Accepted or an exception)."""

    __slots__ = ("item", "outcome", "decided", "lead", "ready")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.outcome: Accepted | Exception | None = None
        self.decided = False  # the unit ran: `outcome` is this event's
        self.lead = False  # handed the lead: this thread runs the next unit
        self.ready = threading.Event()


class GroupCommit:
    """Groups concurrent `ingest` calls into units of `ingest_batch` (module docstring).

    `ledger`: the Ledger; its `ingest_batch` runs a unit of several events, its `ingest` a
    unit of one (looked up at each call). `fatal(exc)`: whether an unexpected error aborts a
    unit (every waiter then redoes its own event alone). `max_items` ≥ 1: events per unit
    (1: no grouping).
    """

    def __init__(self, ledger, fatal: Callable[[Exception], bool], max_items: int) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._ledger = ledger
        self._fatal = fatal
        self._max_items = max_items
        self._max_queued = max_items * 4
        self._lock = threading.Lock()
        self._queue: deque[_Slot] = deque()
        self._leading = False

    def ingest(self, event_id: str, event_type: str, occurred_at, payload: dict) -> Accepted:
        """Ledger.ingest's contract (its Accepted; raises its refusal or error) for one event,
        decided in a unit with the events queued beside it."""
        item: Item = (event_id, event_type, occurred_at, payload)
        if self._max_items == 1:
            return self._ledger.ingest(*item)
        slot = _Slot(item)
        with self._lock:
            if len(self._queue) >= self._max_queued:
                slot = None
            else:
                self._queue.append(slot)
                if not self._leading:
                    self._leading = slot.lead = True
        if slot is None:
            return self._ledger.ingest(*item)  # queue full: our own unit, as without grouping
        if not slot.lead:
            slot.ready.wait()
        if not slot.decided:  # we lead: run the unit that starts with our event
            self._run_unit()
        return self._answer(slot)

    def _run_unit(self) -> None:
        with self._lock:
            unit = [self._queue.popleft() for _ in range(min(self._max_items, len(self._queue)))]
        outcomes: list = [_Undecided()] * len(unit)  # if the unit raises, or is interrupted
        try:
            outcomes = self._decide(unit)
        except Exception:  # noqa: BLE001 - each waiter redoes its own event alone
            pass
        finally:
            self._pass_lead()
            for slot, outcome in zip(unit, outcomes):
                slot.outcome, slot.decided = outcome, True
                slot.ready.set()

    def _decide(self, unit: list[_Slot]) -> list:
        if len(unit) == 1:  # alone: exactly Ledger.ingest, its refusal or error raised as is
            try:
                return [self._ledger.ingest(*unit[0].item)]
            except Exception as exc:  # noqa: BLE001 - re-raised by its own (the only) thread
                return [_Raised(exc)]
        return self._ledger.ingest_batch([s.item for s in unit], self._fatal)

    def _pass_lead(self) -> None:
        """Hand the lead to the first queued thread, or free it."""
        with self._lock:
            if self._queue:
                successor = self._queue[0]
                successor.lead = True
                successor.ready.set()
            else:
                self._leading = False

    def _answer(self, slot: _Slot) -> Accepted:
        outcome = slot.outcome
        if isinstance(outcome, _Undecided):
            return self._ledger.ingest(*slot.item)  # durable or not: the receipt answers (I8)
        if isinstance(outcome, _Raised):
            raise outcome.error
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class _Undecided(Exception):
    """The unit raised: whether this event was written is not known to its waiter."""


class _Raised(Exception):
    """What Ledger.ingest raised for a unit of one (re-raised unchanged)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error
