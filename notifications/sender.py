"""One webhook POST over a kept-alive HTTP/1.1 connection (the standard library's
`http.client`), for the dispatcher's worker threads.

Why not httpx: on the loopback receiver of `make demo` an httpx request cost about 1.5 ms of
CPU (request and response models, header normalisation, cookie extraction, the pool's
bookkeeping), http.client about 0.3 ms; a delivery is one small POST whose answer is only
its status, so none of that is needed. What the delivery rules need is kept: redirects are
never followed (http.client has no such feature), at most `cap` bytes of a response are read,
every connect and socket read or write is bounded by `timeout` and the body read as a whole
too, no proxy comes from the environment, HTTPS verifies certificates against certifi's
bundle (httpx's default). Connections are reused per origin (at most `max_idle` idle ones
kept); one whose response was not read to its end, or that said `Connection: close`, is
closed. A request on a reused connection that the peer had closed meanwhile (it answered
nothing) is sent once more on a fresh connection: at least once permits it (same
webhook-id).
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

STALE_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                ConnectionAbortedError)


@dataclass(frozen=True)
class Attempt:
    """What one HTTP attempt gave: `status_code` (None if no answer), a short `error`, the
    response body's first bytes, and a Retry-After in seconds if the endpoint sent one."""

    status_code: int | None
    error: str | None
    response: str
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class Sender:
    """POSTs to webhook URLs; thread-safe (each connection serves one request at a time)."""

    def __init__(self, timeout: float, cap: int, max_idle: int, user_agent: str) -> None:
        self.timeout, self.cap, self.max_idle = timeout, cap, max_idle
        self.user_agent = user_agent
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        """POST `body` to `url` with `headers` (+ User-Agent); never raises for the
        endpoint's faults (a refused connection, a timeout, a broken answer: an Attempt
        without a status)."""
        parts = urlsplit(url)
        origin = (parts.scheme, parts.hostname or "",
                  parts.port or (443 if parts.scheme == "https" else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {**headers, "User-Agent": self.user_agent}
        try:
            conn, reused = self._connection(origin)
            try:
                return self._exchange(conn, origin, target, body, headers)
            except STALE_ERRORS:
                if not reused:
                    raise
                fresh = self._fresh(origin)  # the peer closed it while it was idle
                return self._exchange(fresh, origin, target, body, headers)
        except TimeoutError:
            return Attempt(None, f"timed out after {self.timeout:g} s", "")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return Attempt(None, f"{type(exc).__name__}: {str(exc)[:200]}", "")

    def _exchange(self, conn: http.client.HTTPConnection, origin: tuple[str, str, int],
                  target: str, body: bytes, headers: dict[str, str]) -> Attempt:
        started = time.monotonic()
        try:
            conn.request("POST", target, body=body, headers=headers)
            response = conn.getresponse()
            excerpt, whole = self._read_capped(response, started)
            response.close()  # detaches it from the connection (else the next one fails)
        except BaseException:
            conn.close()
            raise
        if whole and not response.will_close:
            self._keep(origin, conn)
        else:
            conn.close()
        code = response.status
        return Attempt(code, None if 200 <= code < 300 else f"HTTP {code}", excerpt,
                       _retry_after(code, response.getheader("retry-after")))

    def _read_capped(self, response: http.client.HTTPResponse,
                     started: float) -> tuple[str, bool]:
        """(at most `cap` bytes of the body as text, whether the body was read to its end),
        within the request's time bound; bounded by `cap` reads."""
        data = b""
        for _ in range(self.cap + 1):
            chunk = response.read1(self.cap + 1 - len(data)) if len(data) <= self.cap else b""
            if not chunk:
                break
            data += chunk
            if len(data) > self.cap or time.monotonic() - started > self.timeout:
                break
        # read1 leaves a response whose Content-Length is reached open (length 0)
        whole = len(data) <= self.cap and (response.isclosed() or response.length == 0)
        return data[:self.cap].decode("utf-8", "replace").replace("\x00", ""), whole

    # ------------------------------------------------------------------------ connections

    def _connection(self, origin: tuple[str, str, int]) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                return idle.pop(), True
        return self._fresh(origin), False

    def _fresh(self, origin: tuple[str, str, int]) -> http.client.HTTPConnection:
        scheme, host, port = origin
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=self._context())
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _keep(self, origin: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def _context(self) -> ssl.SSLContext:
        if self._tls is None:
            import certifi  # httpx's trust store, installed with it

            self._tls = ssl.create_default_context(cafile=certifi.where())
        return self._tls

    def close(self) -> None:
        """Close every idle connection (those in use close when their request ends)."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def _retry_after(status: int, value: str | None) -> float | None:
    """Seconds of a numeric Retry-After on a 429 or 503, else None."""
    if status not in (429, 503) or value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
