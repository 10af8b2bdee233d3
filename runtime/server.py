"""The HTTP server's own limits, beyond what uvicorn offers: a request-header timeout and a
bound on open connections per worker process.

`LedgerHttpToolsProtocol` (uvicorn's httptools protocol: a C parser) and `LedgerHttpProtocol`
(its pure-Python h11 one) add:
- a connection that has not sent a complete request head within `header_timeout_seconds`
  (from connecting, or from the first byte of a following request) is closed; idle kept-alive
  connections are closed by uvicorn's own keep-alive timeout;
- beyond `max_connections` open connections, a new one is answered 503 `retry_later`
  (problem+json, Retry-After, Connection: close) and closed within LINGER_SECONDS, so a flood
  of connections cannot exhaust file descriptors.
Settings come from the `LEDGER_*` environment (runtime/settings.py), read once per process.
`ledger serve` runs uvicorn with `http=PROTOCOL`: the httptools one (a third of the h11
protocol's CPU per request, docs/benchmarks.md), or h11 where httptools is not installed.
"""

from __future__ import annotations

import asyncio
import json
import time
from functools import lru_cache

import h11
import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: h11 only
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from runtime.settings import Settings

LINGER_SECONDS = 2.0  # how long a refused connection's request is read and discarded
log = structlog.get_logger("ledger.server")


@lru_cache(maxsize=1)
def _limits() -> tuple[float, int]:
    settings = Settings()
    return settings.header_timeout_seconds, settings.max_connections


def _busy_response() -> bytes:
    body = json.dumps({"type": "/problems/retry_later", "title": "Too many open connections",
                       "status": 503, "code": "retry_later",
                       "detail": "The server holds its maximum of open connections; retry "
                                 "shortly on a new connection."}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n"
            f"retry-after: 1\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode() + body


_last_refusal_log = [float("-inf")]


def _log_refusal(open_connections: int, limit: int) -> None:
    """At most one line per second: a flood of connections must not become a flood of logs."""
    now = time.monotonic()
    if now - _last_refusal_log[0] >= 1.0:
        _last_refusal_log[0] = now
        log.warning("connections refused: too many open connections", open=open_connections,
                    limit=limit)


class _Limited:
    """The header timeout and the connection bound, for a uvicorn HTTP protocol class (mixed
    in before it). The subclass says when a request head is pending (`_arm_header_timer`
    when one starts, `_cancel_header_timer` when it is complete) and implements
    `_head_pending()`."""

    _header_timer: asyncio.TimerHandle | None = None
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        max_connections = _limits()[1]
        if len(self.connections) >= max_connections:  # type: ignore[attr-defined]
            self._refused = True
            _log_refusal(len(self.connections), max_connections)  # type: ignore[attr-defined]
            transport.write(_busy_response())
            # Half-close and discard what the client still sends, briefly: closing at once
            # with its request unread would reset the connection and lose the answer.
            if transport.can_write_eof():
                transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
            return
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._cancel_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._refused or self._lingering:
            return
        super().data_received(data)  # type: ignore[misc]

    _lingering = False

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(  # type: ignore[attr-defined]
                _limits()[0], self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        transport = self.transport  # type: ignore[attr-defined]
        if self._head_pending() and not transport.is_closing():
            transport.close()  # no request head in time: nothing to answer

    def _head_pending(self) -> bool:
        raise NotImplementedError


class LedgerHttpProtocol(_Limited, H11Protocol):
    """uvicorn's H11Protocol with a request-header timeout and a connection bound."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._refused:
            return
        if self._head_pending() and not self.transport.is_closing():
            self._arm_header_timer()  # (part of) a request head is pending: bound its wait
        else:
            self._cancel_header_timer()

    def _head_pending(self) -> bool:
        return self.conn.their_state is h11.IDLE


if HttpToolsProtocol is not None:
    class LedgerHttpToolsProtocol(_Limited, HttpToolsProtocol):
        """uvicorn's HttpToolsProtocol with a request-header timeout and a connection bound:
        the wait is bounded from connecting, and from a request's first byte (the parser's
        message begin) to its complete head."""

        _head_complete = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_LingeringClose(transport, self))

        def _body_unread(self) -> bool:
            cycle = self.cycle
            return cycle is not None and cycle.more_body and not cycle.disconnected

        def on_message_begin(self) -> None:
            self._head_complete = False
            self._arm_header_timer()
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._head_complete = True
            self._cancel_header_timer()
            super().on_headers_complete()

        def _head_pending(self) -> bool:
            return not self._head_complete


class _LingeringClose:
    """The transport as the protocol sees it, except `close()`: while the request's body is
    still unread (an answer before it, e.g. 413), the connection is half-closed and what the
    client still sends is discarded for LINGER_SECONDS before closing. Closing at once with
    data unread resets the connection, and a client still sending loses the answer."""

    def __init__(self, transport: asyncio.Transport, protocol) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        transport, protocol = self._transport, self._protocol
        if protocol._lingering or transport.is_closing():
            return
        if not protocol._body_unread() or not transport.can_write_eof():
            transport.close()
            return
        protocol._lingering = True
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)


PROTOCOL = ("runtime.server:LedgerHttpToolsProtocol" if HttpToolsProtocol is not None
            else "runtime.server:LedgerHttpProtocol")
