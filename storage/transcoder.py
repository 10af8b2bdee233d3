"""The stored events' JSON transcoder: eventsourcing's format, encoded and decoded with orjson.

`FastJSONTranscoder` is selected by `TRANSCODER_TOPIC` (storage/environment.py). The stored
format does not change: `encode` writes the bytes eventsourcing's `JSONTranscoder.encode`
writes (compact separators, UTF-8, custom types as `{"_type_": name, "_data_": …}`), so
either transcoder reads what the other wrote.

Why: `ledger replay --verify` decodes every stored event; the standard library's decoder with a
Python `object_hook` called for every JSON object was about a quarter of the replay's CPU.
orjson parses in C; the custom types are then revived by one Python walk over the containers,
innermost first, exactly as the `object_hook` would (see `_revive`).

Encoding the same way: the standard library's C encoder calls back into Python for every
datetime, UUID and Decimal; `encode` instead replaces them by their markers in one Python walk
and lets orjson write the result (5.3 → 3.4 µs CPU for an average stored event state; about a tenth
of a batch's service CPU went to encoding). Whatever orjson could write differently goes to the
inherited encoder: a float (its shortest repr differs, e.g. `1e16`), an integer beyond 64 bits,
a key that is not a str, any type that is not exactly a JSON type or a registered transcoding's
(str and int subclasses, enums, dataclasses: orjson would write them natively), and a lone
surrogate (the inherited encoder raises its own error for it).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Callable
from uuid import UUID

import orjson
from eventsourcing.persistence import (DatetimeAsISO, DecimalAsStr, JSONTranscoder, Transcoding,
                                      UUIDAsHex)

TYPE_KEY, DATA_KEY = "_type_", "_data_"
# eventsourcing's own transcodings, decoded by the C constructor their `decode` wraps (the same
# value; the wrappers only add an isinstance assertion).
STOCK_DECODERS: dict[type, Callable[[Any], Any]] = {
    UUIDAsHex: UUID, DecimalAsStr: Decimal, DatetimeAsISO: datetime.fromisoformat}
# ... and encoded by what their `encode` returns, called directly (the same str).
STOCK_ENCODERS: dict[type, Callable[[Any], str]] = {
    UUIDAsHex: lambda value: value.hex, DecimalAsStr: str, DatetimeAsISO: datetime.isoformat}


class _Inexact(Exception):
    """orjson might not give what the standard library gives. Decoding: it produced a float (it
    reads an integer beyond 64 bits as a float, silently, where the standard library keeps it
    exact), so a document holding any float is decoded again by the inherited decoder (the
    ledger stores no floats: money is integer minor units). Encoding: see `_plain`."""


class FastJSONTranscoder(JSONTranscoder):
    """eventsourcing's JSON transcoder on orjson; the same bytes in both directions.

    `encode(obj) -> bytes` returns what `JSONTranscoder.encode` returns for the same object
    (raising what it raises). `decode(data: bytes) -> Any` returns what
    `JSONTranscoder.decode` returns for the same bytes. Documents orjson refuses but the
    standard library accepts (NaN/Infinity literals, lone surrogates), and documents holding a
    float (orjson would read an integer beyond 64 bits as one), are decoded by the inherited
    decoder, so nothing the old transcoder could read becomes unreadable or reads differently.
    Raises `TranscodingNotRegisteredError` for an unknown `_type_`, like the inherited decoder.
    """

    def __init__(self) -> None:
        super().__init__()
        self._decoders: dict[str, Callable[[Any], Any]] = {}  # name -> decoder (`register`)
        # type -> (name, direct encoder or None: through the transcoding's `encode`)
        self._encoders: dict[type, tuple[str, Callable[[Any], str] | None]] = {}

    def encode(self, obj: Any) -> bytes:
        """The bytes `JSONTranscoder.encode(obj)` returns (module docstring); raises what it
        raises (TranscodingNotRegisteredError for an unregistered type)."""
        try:
            return orjson.dumps(self._plain(obj))
        except (_Inexact, orjson.JSONEncodeError, RecursionError):
            return super().encode(obj)

    def _plain(self, value: Any) -> Any:
        """`value` with every registered custom type replaced by its marker, recursively;
        tuples become lists (as json writes them). Raises _Inexact for anything orjson might
        write otherwise than the standard library (see the module docstring)."""
        kind = type(value)
        if kind is str or kind is int or kind is bool or value is None:
            return value
        if kind is dict:
            plain = {}
            for key, item in value.items():
                if type(key) is not str:
                    raise _Inexact
                kind = type(item)  # a JSON scalar inline: most values are (no call)
                plain[key] = item if kind is str or kind is int or kind is bool \
                    or item is None else self._plain(item)
            return plain
        if kind is list or kind is tuple:
            return [self._plain(item) for item in value]
        return self._marker(kind, value)

    def _marker(self, kind: type, value: Any) -> dict:
        """`{"_type_": name, "_data_": data}` of a registered type's value; eventsourcing's own
        transcodings (uuid, datetime, Decimal) without the call through them (STOCK_ENCODERS:
        the same strings). Raises _Inexact for an unregistered type or a subclass."""
        encoder = self._encoders.get(kind)
        if encoder is None:  # a float, a subclass, an unregistered type
            raise _Inexact
        name, direct = encoder
        if direct is not None:
            return {TYPE_KEY: name, DATA_KEY: direct(value)}
        return {TYPE_KEY: name, DATA_KEY: self._plain(self.types[kind].encode(value))}

    def register(self, transcoding: Transcoding) -> None:
        """Registers `transcoding` as the inherited method does, and keeps its decoder by name
        for the walk (`STOCK_DECODERS` for eventsourcing's own, else its bound `decode`)."""
        super().register(transcoding)
        decoder = STOCK_DECODERS.get(type(transcoding), transcoding.decode)
        self._decoders[transcoding.name] = decoder
        self._encoders[transcoding.type] = (transcoding.name,
                                            STOCK_ENCODERS.get(type(transcoding)))

    def decode(self, data: bytes) -> Any:
        """The object `data` encodes, custom types revived (uuid, Decimal, datetime, …)."""
        try:
            value = orjson.loads(data)
            if type(value) is not dict or (len(value) == 2 and TYPE_KEY in value
                                           and DATA_KEY in value):
                return self._revive(value)
            # An event's state: its top level walked here, the common case without a call.
            for key, item in value.items():
                kind = type(item)
                if kind is dict and len(item) == 2 and TYPE_KEY in item and DATA_KEY in item:
                    value[key] = self._typed(item)
                elif kind is dict or kind is list or kind is float:
                    value[key] = self._revive(item)
            return value
        except (orjson.JSONDecodeError, _Inexact):
            return super().decode(data)

    def _revive(self, value: Any) -> Any:
        """`value` with every `{"_type_": name, "_data_": data}` object replaced by its
        decoded type, innermost first (as json's object_hook applies); containers are updated
        in place. Raises _Inexact on a float."""
        kind = type(value)
        if kind is dict:
            if len(value) == 2 and TYPE_KEY in value and DATA_KEY in value:
                return self._typed(value)
            for key, item in value.items():
                kind = type(item)
                if kind is dict or kind is list or kind is float:
                    value[key] = self._revive(item)
        elif kind is list:
            for index, item in enumerate(value):
                kind = type(item)
                if kind is dict or kind is list or kind is float:
                    value[index] = self._revive(item)
        elif kind is float:
            raise _Inexact
        return value

    def _typed(self, marker: dict) -> Any:
        """The value of one `{"_type_": name, "_data_": data}` object, its data revived first."""
        data = marker[DATA_KEY]
        if type(data) is not str:
            data = self._revive(data)
        try:
            decoder = self._decoders[marker[TYPE_KEY]]
        except (KeyError, TypeError):  # unknown or unhashable name: the inherited error
            return self._decode_obj({TYPE_KEY: marker[TYPE_KEY], DATA_KEY: data})
        return decoder(data)
