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

import re
from typing import Any

import orjson
from eventsourcing.persistence import JSONTranscoder

TYPE_KEY, DATA_KEY = "_type_", "_data_"
TYPE_MARK = b'"_type_"'  # present in the bytes whenever a custom type was encoded
# orjson reads an integer beyond 64 bits as a float, silently; the standard library keeps it
# exact. Any run of 19+ digits (also inside strings: harmless) takes the standard decoder.
LONG_DIGITS = re.compile(rb"[0-9]{19}")


class FastJSONTranscoder(JSONTranscoder):
    """eventsourcing's JSON transcoder with an orjson decoder; the same bytes in both directions.

    `encode(obj) -> bytes` is inherited unchanged. `decode(data: bytes) -> Any` returns what
    `JSONTranscoder.decode` returns for the same bytes. Input orjson refuses but the standard
    library accepts (NaN/Infinity literals, lone surrogates) falls back to the inherited decoder,
    and so does any run of 19 or more digits (orjson would read an integer beyond 64 bits as a
    float), so nothing the old transcoder could read becomes unreadable. Raises
    `TranscodingNotRegisteredError` for an unknown `_type_`, like the inherited decoder.
    """

    def decode(self, data: bytes) -> Any:
        """The object `data` encodes, custom types revived (uuid, Decimal, datetime, …)."""
        if LONG_DIGITS.search(data):
            return super().decode(data)
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            return super().decode(data)
        if TYPE_MARK not in data:
            return parsed  # nothing to revive: skip the walk
        return self._revive(parsed)

    def _revive(self, value: Any) -> Any:
        """`value` with every `{"_type_", "_data_"}` object replaced by its decoded type,
        innermost first (as json's object_hook applies); lists and dicts are rebuilt in place."""
        kind = type(value)
        if kind is dict:
            for key, item in value.items():
                if type(item) is dict or type(item) is list:
                    value[key] = self._revive(item)
            if len(value) == 2 and TYPE_KEY in value and DATA_KEY in value:
                return self._decode_obj(value)
            return value
        if kind is list:
            for index, item in enumerate(value):
                if type(item) is dict or type(item) is list:
                    value[index] = self._revive(item)
        return value
