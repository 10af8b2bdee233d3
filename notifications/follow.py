"""Aggregate state at each event of the log, for notifications that need more than the event.

`AggregateFollower.advance(event)` returns the aggregate just after `event`, having read what
it needs just before (`before(aggregate)`). Aggregates are folded from the log with
`ledger.recording.fold` (the events' own `mutate` without the library's per-call layers, the
same code a load on the write path runs), kept in a bounded LRU cache, and reloaded
from the event store up to the event's version whenever the cache does not hold the version
just before it (a restart, an eviction, a batch rolled back and read again).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable, TypeVar

from ledger.recording import fold, fold_up_to, versions_missed

T = TypeVar("T")
CACHE_SIZE = 20_000  # aggregates kept in memory (sessions and wallets in flight)


class AggregateFollower:
    """Folds events of the aggregates they belong to. `events(aggregate_id, lte)` yields the
    stored domain events of one aggregate up to version `lte` (the ledger's event store);
    `streams(ids)`, if given, {id: its stored domain events in version order} for many ids
    in one read (`prefetch`)."""

    def __init__(self, events: Callable[[Any, int], Any], cache_size: int = CACHE_SIZE,
                 streams: Callable[[Iterable[Any]], dict[Any, list[Any]]] | None = None
                 ) -> None:
        self._events, self._streams = events, streams
        self._cache: OrderedDict[Any, Any] = OrderedDict()
        self._size = cache_size

    def prefetch(self, events: Iterable[Any]) -> None:
        """Read together (`streams`) the aggregates of `events` (in log order) that `advance`
        could not fold from the cache: those whose first event here is not their first and
        whose cached version is not the one just before it; fold each up to that version and
        keep it. A follower that starts mid-log (after a restart) otherwise reads each on its
        own, a query per aggregate (projections/views.py `SessionCache.prefetch`, the same
        for the live view)."""
        if self._streams is None:
            return
        wanted = versions_missed(events, lambda i: getattr(self._cache.get(i), "version", None))
        if not wanted:
            return
        streams = self._streams(wanted)
        for aggregate_id, version in wanted.items():
            aggregate = fold_up_to(streams.get(aggregate_id, ()), version)
            if aggregate is not None:
                self._keep(aggregate_id, aggregate)

    def advance(self, event: Any, before: Callable[[Any], T]) -> tuple[T | None, Any]:
        """(`before(aggregate)` just before `event`, or None for a created event; the
        aggregate just after it)."""
        version = event.originator_version
        aggregate = self._at(event.originator_id, version - 1)
        seen = before(aggregate) if aggregate is not None else None
        aggregate = fold(aggregate, event)
        self._keep(event.originator_id, aggregate)
        return seen, aggregate

    def _at(self, aggregate_id: Any, version: int) -> Any:
        if version < 1:
            return None
        cached = self._cache.get(aggregate_id)
        if cached is not None and cached.version == version:
            self._cache.move_to_end(aggregate_id)
            return cached
        aggregate = None
        for event in self._events(aggregate_id, version):  # bounded by the aggregate's length
            aggregate = fold(aggregate, event)
        return aggregate

    def _keep(self, aggregate_id: Any, aggregate: Any) -> None:
        self._cache[aggregate_id] = aggregate
        self._cache.move_to_end(aggregate_id)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)

    def clear(self) -> None:
        self._cache.clear()
