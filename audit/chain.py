"""The hash chain over a stored event log: canonical bytes, links and digests.

Exactly as docs/audit.md "The chain" specifies (an auditor re-implements it from there):

    record(e) = u64(position) ‖ originator_id (16 bytes) ‖ u64(originator_version)
                ‖ u32(len topic) ‖ topic (UTF-8) ‖ u32(len state) ‖ state (the stored bytes)
    link_0    = SHA-256("telehealth-ledger audit chain v1 " ‖ chain name)       (ASCII)
    link_n    = SHA-256(link_{n-1} ‖ record(e_n))       e_1, e_2, … in position order

u64/u32 are unsigned big-endian integers. Positions are the log's notification ids (not
dense: PostgreSQL skips ids of aborted inserts); the chain covers the events that exist, in
order, each with its own position. Pure functions; no I/O.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

CHAIN_VERSION = "telehealth-ledger audit chain v1 "
DIGEST_FORMAT = "telehealth-ledger-digest/1"
_POSITION_ID_VERSION = struct.Struct(">Q16sQ")
_U32 = struct.Struct(">I")


def genesis(chain: str) -> bytes:
    """link_0 of the chain named `chain` ("ledger" or "legacy"): 32 bytes."""
    return hashlib.sha256((CHAIN_VERSION + chain).encode("ascii")).digest()


def uuid_bytes(originator_id: Any) -> bytes:
    """The 16 bytes of an originator id (a UUID, or its hex/hyphenated text)."""
    return (originator_id if isinstance(originator_id, UUID) else UUID(str(originator_id))).bytes


def record(position: int, originator_id: Any, version: int, topic: str, state: bytes) -> bytes:
    """The canonical bytes of one stored event (see the module docstring). Raises ValueError
    for an originator id that is not a UUID (a stored event no ledger writes)."""
    topic_bytes = str(topic).encode("utf-8")
    state_bytes = bytes(state) if isinstance(state, (bytes, bytearray, memoryview)) \
        else str(state).encode("utf-8")  # a SQLite BLOB column rewritten with text
    return b"".join((_POSITION_ID_VERSION.pack(position, uuid_bytes(originator_id), version),
                     _U32.pack(len(topic_bytes)), topic_bytes, _U32.pack(len(state_bytes)),
                     state_bytes))


def link(previous: bytes, position: int, originator_id: Any, version: int, topic: str,
         state: bytes) -> bytes:
    """link_n = SHA-256(link_{n-1} ‖ record(e_n)): 32 bytes."""
    digest = hashlib.sha256(previous)
    digest.update(record(position, originator_id, version, topic, state))
    return digest.digest()


def link_rows(previous: bytes, rows: list) -> list[bytes]:
    """The links of `rows` ((position, originator_id, originator_version, topic, state)
    tuples, in position order) chained after `previous`: exactly `link` of each, one record
    built inline for the usual row (a UUID and bytes; anything else goes through `record`)."""
    links, sha256, head, u32 = [], hashlib.sha256, _POSITION_ID_VERSION.pack, _U32.pack
    for position, originator_id, version, topic, state in rows:
        if type(originator_id) is UUID and type(state) is bytes and type(topic) is str:
            topic_bytes = topic.encode("utf-8")
            previous = sha256(b"".join((previous, head(position, originator_id.bytes, version),
                                        u32(len(topic_bytes)), topic_bytes, u32(len(state)),
                                        state))).digest()
        else:
            previous = link(previous, position, originator_id, version, topic, state)
        links.append(previous)
    return links


def link_notification(previous: bytes, notification: Any) -> bytes:
    """`link` of an eventsourcing Notification (id, originator_id, version, topic, state)."""
    return link(previous, notification.id, notification.originator_id,
                notification.originator_version, notification.topic, notification.state)


@dataclass(frozen=True)
class Head:
    """Where one chain stands: the last chained `position`, its `link` (hex), how many `events`
    are chained, and the recorded time of the event at `position` (None for an empty chain)."""

    chain: str
    position: int
    link: str
    events: int
    recorded_at: datetime | None

    def as_dict(self) -> dict:
        return {"position": self.position, "link": self.link, "events": self.events,
                "recorded_at": self.recorded_at.isoformat() if self.recorded_at else None}


def empty_head(chain: str) -> Head:
    return Head(chain, 0, genesis(chain).hex(), 0, None)


@dataclass(frozen=True)
class Digest:
    """The heads of every chain at one moment: small enough to paste (about 400 bytes)."""

    heads: tuple[Head, ...]

    def as_dict(self) -> dict:
        return {"format": DIGEST_FORMAT, **{h.chain: h.as_dict() for h in self.heads}}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def head(self, chain: str) -> Head | None:
        return next((h for h in self.heads if h.chain == chain), None)


class DigestFormatError(ValueError):
    """A digest that is not `telehealth-ledger-digest/1` JSON with valid heads."""


def parse_digest(text: str) -> Digest:
    """A Digest from its JSON (`Digest.to_json`); raises DigestFormatError."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DigestFormatError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != DIGEST_FORMAT:
        raise DigestFormatError(f"not a {DIGEST_FORMAT} digest")
    heads = []
    for chain, value in data.items():
        if chain == "format":
            continue
        heads.append(_parse_head(chain, value))
    if not heads:
        raise DigestFormatError("the digest names no chain")
    return Digest(tuple(heads))


def _parse_head(chain: str, value: Any) -> Head:
    try:
        position, events = int(value["position"]), int(value["events"])
        link_hex = str(value["link"])
        if len(bytes.fromhex(link_hex)) != 32 or position < 0 or events < 0:
            raise ValueError("bad position, events or link")
        recorded = value.get("recorded_at")
        recorded_at = datetime.fromisoformat(recorded) if recorded else None
    except (KeyError, TypeError, ValueError) as exc:
        raise DigestFormatError(f"chain {chain!r}: {exc}") from None
    return Head(chain, position, link_hex.lower(), events, recorded_at)
