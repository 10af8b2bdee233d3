"""Recorded time: when the ledger decided what it stored, by its own (injected) clock.

Every stored event carries a `timestamp`. The eventsourcing library stamps it with the wall
clock as the event is created; the ledger's aggregates stamp it instead with the instant the
command that created it was decided, read once from the ledger's clock (UTC, whole seconds):
`Ledger.ingest` and the tick wrap each decision in `recording_at(now)`, so every event of one
command carries the same recorded time, and a simulation's manual clock records simulated time.
Outside such a command (a script building aggregates by hand) the library's wall clock applies.

Recorded time is not event time: `occurred_at` and the instants inside events say when something
happened; the recorded time says when the ledger learnt it (docs/audit.md, "Two times").
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import OrderedDict
from contextvars import ContextVar
from datetime import datetime
from types import MethodType
from typing import Any, Callable, Iterable, TypeVar
from uuid import UUID

from eventsourcing.domain import (Aggregate, CanInitAggregate, CanMutateAggregate,
                                  CommandMethodDecorator, DecoratedFuncCaller, MetaAggregate,
                                  _annotations_mention_id, _create_id_param_names,
                                  _created_event_classes, _init_mentions_id,
                                  datetime_now_with_tzinfo, decorated_func_callers,
                                  decorated_funcs, get_topic, resolve_topic)

_recorded_at: ContextVar[datetime | None] = ContextVar("recorded_at", default=None)
T = TypeVar("T")


class recording_at:  # noqa: N801 - used as a function: `with recording_at(now):`
    """Stamp every ledger event created inside the `with` block with `moment` (an aware UTC
    datetime; a naive one raises ValueError). A class, not a @contextmanager generator: it
    wraps every decision of the write path and the tick."""

    __slots__ = ("moment", "token")

    def __init__(self, moment: datetime) -> None:
        if moment.tzinfo is None:
            raise ValueError("recorded time must be timezone-aware")
        self.moment = moment

    def __enter__(self) -> datetime:
        self.token = _recorded_at.set(self.moment)
        return self.moment

    def __exit__(self, *exc_info: object) -> None:
        _recorded_at.reset(self.token)


def recorded_now() -> datetime:
    """The recorded time of an event created now: the enclosing command's, else the wall clock
    (the library's default, for aggregates built outside a ledger command)."""
    moment = _recorded_at.get()
    return moment if moment is not None else datetime_now_with_tzinfo()


class _LedgerMeta(MetaAggregate):
    """eventsourcing's aggregate metaclass, with a cheaper construction for the classes given
    to `fast_creation` (`Receipt(...)` and the like): see `_FastCreation`."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        creation = _CREATIONS.get(cls)
        if creation is None or args or kwargs.keys() != creation.params:
            return super().__call__(*args, **kwargs)
        return creation.create(kwargs)


class LedgerAggregate(Aggregate, metaclass=_LedgerMeta):
    """Base of the ledger's aggregates: their events carry the recorded time (`recorded_now`).

    Adds no event of its own; stored topics stay `ledger.<module>:<Aggregate>.<Event>`.
    """

    class Event(Aggregate.Event):
        @staticmethod
        def create_timestamp() -> datetime:
            return recorded_now()

    class Created(Event, Aggregate.Created):
        pass

    class Snapshot(Aggregate.Snapshot):
        """A snapshot of a ledger aggregate (docs/design.md, Write path), stamped with the
        recorded time like the events: the ledger reads no wall clock for what it stores."""

        @staticmethod
        def create_timestamp() -> datetime:
            return recorded_now()


# ------------------------------------------------------------------ cheaper events (issue 10)
#
# eventsourcing's `@event` machinery costs about half of a tick's decision CPU: every call of a
# command method builds a bound decorator object, coerces and filters its arguments through
# two signature caches, constructs the frozen dataclass event (one object.__setattr__ per
# field) and applies it through `DecoratedFuncCaller.apply`, which filters the event's fields
# again; a replay goes through the same `apply`. `fast_commands` and `fold` do the same
# things directly for the common call (every parameter passed by keyword), and hand every
# other call to the library. The event object is the one the library builds: the same class,
# the same `__dict__` in the dataclass's field order (so the stored bytes are the same), built
# the way the library's own mapper rebuilds a stored event.

_BASE_FIELDS = ("originator_id", "originator_version", "timestamp")
_APPLIERS: dict[type, tuple[Any, frozenset[str]] | None] = {}  # event class -> (func, names)


class _FastCommand:
    """Stands in the aggregate class for one `@event` command method's CommandMethodDecorator
    (kept as `decorator`; the class attribute read on the class itself still gives the
    library's object). Called with exactly the method's parameters as keywords, it triggers
    the same event the library would; any other call goes through the library."""

    def __init__(self, decorator: CommandMethodDecorator, event_cls: type,
                 func: Callable[..., None]) -> None:
        self.decorator, self.event_cls, self.func = decorator, event_cls, func
        self.params = frozenset(list(inspect.signature(func).parameters)[1:])
        self.fields = tuple(f.name for f in dataclasses.fields(event_cls))[len(_BASE_FIELDS):]

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self.decorator.__get__(instance, owner)
        return MethodType(self._trigger, instance)

    def _trigger(self, aggregate: Any, *args: Any, **kwargs: Any) -> None:
        if args or kwargs.keys() != self.params:  # defaults, positional or extra arguments
            return self.decorator.__get__(aggregate, type(aggregate))(*args, **kwargs)
        event_cls = self.event_cls
        state = {"originator_id": aggregate.id, "originator_version": aggregate.version + 1,
                 "timestamp": event_cls.create_timestamp()}
        for name in self.fields:
            state[name] = kwargs[name]
        new_event = object.__new__(event_cls)
        object.__setattr__(new_event, "__dict__", state)
        self.func(aggregate, **kwargs)  # as DecoratedFuncCaller.apply; raises before any append
        aggregate.version = state["originator_version"]
        aggregate.modified_on = state["timestamp"]
        aggregate.pending_events.append(new_event)
        return None


def fast_commands(*aggregate_classes: type) -> None:
    """Replace the `@event` command methods of these aggregate classes (not `__init__`, not
    properties) with `_FastCommand`s; call once, after the classes are defined. Raises
    TypeError on a method whose event the library built differently than expected (the
    fields must be the base fields, then exactly the method's parameters)."""
    for cls in aggregate_classes:
        for name, attribute in list(vars(cls).items()):
            if not isinstance(attribute, CommandMethodDecorator) or attribute.decorated_property \
                    or attribute.decorated_func.__name__ in ("__init__", "_"):
                continue
            event_cls = decorated_func_callers[attribute]
            command = _FastCommand(attribute, event_cls, attribute.decorated_func)
            fields = tuple(f.name for f in dataclasses.fields(event_cls))
            if fields[:len(_BASE_FIELDS)] != _BASE_FIELDS or set(command.fields) != command.params \
                    or _applier(event_cls) is None:
                raise TypeError(f"unexpected event shape for {cls.__name__}.{name}: {fields}")
            setattr(cls, name, command)


class _FastCreation:
    """Constructs one aggregate class as `MetaAggregate.__call__` → `BaseAggregate._create` →
    `CanInitAggregate.mutate` do for the common call (every `__init__` parameter by keyword,
    no `id`): the id from `create_id`, the created event with the same `__dict__` (the
    dataclass's field order, so the stored bytes are the same), the aggregate's base
    attributes, then its `__init__`. It skips the library's per-call layers: coercing and
    filtering the arguments through signature caches (three times), the dataclass `__init__`
    and resolving the topic back to the class; those were about a tenth of a batch's service
    CPU (every accepted event creates a Receipt)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.event_cls = _created_event_classes[cls][0]
        self.params = frozenset(list(inspect.signature(cls.__init__).parameters)[1:])
        self.id_params = tuple(_create_id_param_names[cls])
        self.topic = get_topic(cls)
        names = tuple(f.name for f in dataclasses.fields(self.event_cls))
        self.fields = names[len(_CREATED_FIELDS):]
        plain = (len(_created_event_classes[cls]) == 1 and not getattr(cls, "TOPIC", None)
                 and names[:len(_CREATED_FIELDS)] == _CREATED_FIELDS
                 and set(self.fields) == self.params and set(self.id_params) <= self.params
                 and cls not in _init_mentions_id and cls not in _annotations_mention_id
                 and resolve_topic(self.topic) is cls
                 and self.event_cls.mutate is CanInitAggregate.mutate
                 and self.event_cls.apply is CanMutateAggregate.apply)
        if not plain:
            raise TypeError(f"unexpected created event shape for {cls.__name__}: {names}")

    def create(self, kwargs: dict[str, Any]) -> Any:
        """The new aggregate with its created event pending (as `cls(**kwargs)`); raises what
        the library raises (a non-UUID id goes through the library for its error)."""
        cls, event_cls = self.cls, self.event_cls
        originator_id = cls.create_id(**{name: kwargs[name] for name in self.id_params})
        if type(originator_id) is not UUID:
            return MetaAggregate.__call__(cls, **kwargs)
        timestamp = event_cls.create_timestamp()
        state = {"originator_id": originator_id, "originator_version": cls.INITIAL_VERSION,
                 "timestamp": timestamp, "originator_topic": self.topic}
        for name in self.fields:
            state[name] = kwargs[name]
        created = object.__new__(event_cls)
        object.__setattr__(created, "__dict__", state)
        aggregate = object.__new__(cls)
        aggregate.__base_init__(originator_id, cls.INITIAL_VERSION, timestamp)
        aggregate.__init__(**kwargs)
        aggregate.pending_events.append(created)
        return aggregate


_CREATED_FIELDS = ("originator_id", "originator_version", "timestamp", "originator_topic")
_CREATIONS: dict[type, _FastCreation] = {}


def fast_creation(*aggregate_classes: type) -> None:
    """Construct these LedgerAggregate classes through `_FastCreation` when called with every
    `__init__` parameter by keyword (any other call goes through the library). Raises
    TypeError for a class whose created event the library builds differently than expected."""
    for cls in aggregate_classes:
        if not isinstance(cls, _LedgerMeta):
            raise TypeError(f"{cls.__name__} is not a LedgerAggregate")
        _CREATIONS[cls] = _FastCreation(cls)


def _applier(event_cls: type) -> tuple[Any, frozenset[str]] | None:
    """(the decorated function, its parameter names) when `event_cls` mutates exactly as
    `DecoratedFuncCaller` does (no override of `mutate` or `apply`), else None."""
    if event_cls not in _APPLIERS:
        plain = (issubclass(event_cls, DecoratedFuncCaller)
                 and event_cls.mutate is CanMutateAggregate.mutate
                 and event_cls.apply is DecoratedFuncCaller.apply)
        func = decorated_funcs.get(event_cls) if plain else None
        _APPLIERS[event_cls] = (func, frozenset(inspect.signature(func).parameters)) \
            if func is not None else None
    return _APPLIERS[event_cls]


def fold(aggregate: Any, domain_event: Any) -> Any:
    """`domain_event.mutate(aggregate)`, without the library's layers for a plain `@event`
    method's event: the same checks (its aggregate, the next version; the library raises
    them), the decorated function called with the event's fields it names, then the version
    and modified time. Returns the aggregate (a created event returns a new one)."""
    applier = _applier(type(domain_event))
    if applier is None or aggregate is None or domain_event.originator_id != aggregate.id \
            or domain_event.originator_version != aggregate.version + 1:
        return domain_event.mutate(aggregate)
    func, names = applier
    func(aggregate, **{k: v for k, v in domain_event.__dict__.items() if k in names})
    aggregate.version = domain_event.originator_version
    aggregate.modified_on = domain_event.timestamp
    return aggregate


def versions_missed(events: Iterable[Any],
                    cached_version: Callable[[Any], int | None]) -> dict[Any, int]:
    """{aggregate id: the version just before its first event in `events`} for each aggregate
    a follower cannot fold `events` onto from its cache: its first event here is not its
    first (version 1), and `cached_version(id)` (None if not cached) is not the one before
    it. What such a follower reads together before folding (`AggregateFollower.prefetch`)."""
    first: dict[Any, int] = {}
    for event in events:
        first.setdefault(event.originator_id, event.originator_version)
    return {i: v - 1 for i, v in first.items() if v > 1 and cached_version(i) != v - 1}


def fold_up_to(events: Iterable[Any], version: int) -> Any:
    """The aggregate `fold`ed from `events` (its domain events in version order, from version
    1 or from a snapshot) up to `version`; None unless they reach exactly that version (a
    snapshot past it included). Events after it are not read."""
    aggregate = None
    for event in events:
        if event.originator_version > version:
            break
        aggregate = fold(aggregate, event)
    return aggregate if aggregate is not None and aggregate.version == version else None


class AggregateFollower:
    """Aggregates folded event by event along the log, for followers that need the state at
    each event (the live and marketplace views, the webhook deriver), in a bounded LRU of
    `cache_size` aggregates.

    `events(aggregate_id, lte)`: one aggregate's stored domain events up to version `lte`, in
    version order (the ledger's event store), read on a miss. `streams(ids)`, if given: {id:
    its stored domain events in version order, from its latest snapshot if any} for many ids
    in one read (`Ledger.read_streams`), used by `prefetch`. A miss is a restart, an
    eviction, or a batch rolled back and read again; the aggregate is then read up to the
    version just before the event, so a fold always starts from the aggregate at exactly that
    version.
    """

    def __init__(self, events: Callable[[Any, int], Iterable[Any]], cache_size: int,
                 streams: Callable[[Iterable[Any]], dict[Any, list[Any]]] | None = None
                 ) -> None:
        self._events, self._streams = events, streams
        self._cache: OrderedDict[Any, Any] = OrderedDict()
        self._size = cache_size

    @classmethod
    def reading(cls, ledger: Any, cache_size: int) -> "AggregateFollower":
        """A follower reading from `ledger` (the Ledger application): a miss from its event
        store, a prefetch with `Ledger.read_streams`."""
        return cls(lambda aggregate_id, lte: ledger.events.get(aggregate_id, lte=lte),
                   cache_size, streams=ledger.read_streams)

    def prefetch(self, events: Iterable[Any]) -> None:
        """Read together (`streams`) the aggregates of `events` (in log order) that `advance`
        could not fold from the cache (`versions_missed`); fold each up to the version just
        before its first event here and keep it.

        Why: a follower that starts mid-log (after a restart, or beside a tick) has none of
        them cached and read each with a query of its own: 68 % of the followers' process
        during a tick of 10,000 charges (docs/benchmarks.md, the tenth stop)."""
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

    def advance(self, event: Any, before: Callable[[Any], T] | None = None
                ) -> tuple[T | None, Any]:
        """(`before(aggregate)` just before `event`, or None for a created event or without
        `before`; the aggregate just after it). The aggregate is folded in place: a caller
        that keeps it sees it change with its later events."""
        aggregate = self._at(event.originator_id, event.originator_version - 1)
        seen = before(aggregate) if before is not None and aggregate is not None else None
        aggregate = fold(aggregate, event)
        self._keep(event.originator_id, aggregate)
        return seen, aggregate

    def _at(self, aggregate_id: Any, version: int) -> Any:
        if version < 1:
            return None
        cached = self._cache.get(aggregate_id)
        if cached is not None and cached.version == version:
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

    def forget(self, aggregate_id: Any) -> None:
        """Drop one aggregate from the cache (a settled session: no event follows)."""
        self._cache.pop(aggregate_id, None)

    def clear(self) -> None:
        self._cache.clear()
