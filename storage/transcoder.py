"""The stored events' JSON transcoder: eventsourcing's format, decoded with orjson.

`FastJSONTranscoder` is selected by `TRANSCODER_TOPIC` (storage/environment.py). The stored
format does not change: `encode` is eventsourcing's `JSONTranscoder.encode` itself (compact
separators, UTF-8, custom types as `{"_type_": name, "_data_": …}`), so the bytes written are the
ones the default transcoder writes and either transcoder reads what the other wrote.

Why: `ledger replay --verify` decodes every stored event; the standard library's decoder with a
Python `object_hook` called for every JSON object was about a quarter of the replay's CPU.
orjson parses in C; the custom types are then revived by one Python walk over the containers,
innermost first, exactly as the `object_hook` would (see `_revive`).
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


class _Inexact(Exception):
    """orjson produced a float: it reads an integer beyond 64 bits as a float, silently, where
    the standard library keeps it exact, so a document holding any float is decoded again by
    the inherited decoder (the ledger stores no floats: money is integer minor units)."""


class FastJSONTranscoder(JSONTranscoder):
    """eventsourcing's JSON transcoder with an orjson decoder; the same bytes in both directions.

    `encode(obj) -> bytes` is inherited unchanged. `decode(data: bytes) -> Any` returns what
    `JSONTranscoder.decode` returns for the same bytes. Documents orjson refuses but the
    standard library accepts (NaN/Infinity literals, lone surrogates), and documents holding a
    float (orjson would read an integer beyond 64 bits as one), are decoded by the inherited
    decoder, so nothing the old transcoder could read becomes unreadable or reads differently.
    Raises `TranscodingNotRegisteredError` for an unknown `_type_`, like the inherited decoder.
    """

    def register(self, transcoding: Transcoding) -> None:
        """Registers `transcoding` as the inherited method does, and keeps its decoder by name
        for the walk (`STOCK_DECODERS` for eventsourcing's own, else its bound `decode`)."""
        super().register(transcoding)
        decoder = STOCK_DECODERS.get(type(transcoding), transcoding.decode)
        self.__dict__.setdefault("_decoders", {})[transcoding.name] = decoder

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
