"""The HTTP server's own limits, beyond what uvicorn offers: a request-header timeout and a
bound on open connections per worker process.

`LedgerHttpProtocol` is uvicorn's h11 protocol plus:
- a connection that has not sent a complete request head within `header_timeout_seconds`
  (from connecting, or from the first byte of a following request) is closed; idle kept-alive
  connections are closed by uvicorn's own keep-alive timeout;
- beyond `max_connections` open connections, a new one is answered 503 `retry_later`
  (problem+json, Retry-After, Connection: close) and closed within LINGER_SECONDS, so a flood
  of connections cannot exhaust file descriptors.
Settings come from the `LEDGER_*` environment (runtime/settings.py), read once per process.
`ledger serve` runs uvicorn with it (`http=PROTOCOL`).
"""

from __future__ import annotations

import asyncio
import json
import time
from functools import lru_cache

import h11
import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

from runtime.settings import Settings

PROTOCOL = "runtime.server:LedgerHttpProtocol"
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


class LedgerHttpProtocol(H11Protocol):
    """uvicorn's H11Protocol with a request-header timeout and a connection bound."""

    _header_timer: asyncio.TimerHandle | None = None
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        max_connections = _limits()[1]
        if len(self.connections) >= max_connections:
            self._refused = True
            _log_refusal(len(self.connections), max_connections)
            transport.write(_busy_response())
            # Half-close and discard what the client still sends, briefly: closing at once
            # with its request unread would reset the connection and lose the answer.
            if transport.can_write_eof():
                transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_timer()  # (part of) a request head is pending: bound its wait
        else:
            self._cancel_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(_limits()[0], self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no request head in time: nothing to answer
