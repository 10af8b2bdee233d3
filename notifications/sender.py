"""One webhook POST over a kept-alive connection (urllib3's connection pools), for the
dispatcher's worker threads.

Why urllib3 and not httpx: on the loopback receiver of `make demo` an httpx request cost about
1.5 ms of CPU (request and response models, header normalisation, cookie extraction, the
pool's bookkeeping); a delivery is one small POST whose answer is only its status, so none of
that is needed, and a well-kept pool (urllib3, below requests) does the rest. What the delivery
rules need is kept: redirects are never followed (the 3xx is the answer), at most `cap` bytes
of a response are read, every connect and socket read is bounded by `timeout` and the body
read as a whole too, no proxy comes from the environment (a PoolManager reads none), HTTPS
verifies certificates against certifi's bundle (httpx's default). Connections are reused per
origin (at most `max_idle` kept each, at most MAX_ORIGINS origins); a response not read to
its end closes its connection. A pooled connection the peer closed while idle is replaced
before the request is sent (urllib3 checks it); a request is never sent twice by the pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import certifi
import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError
from urllib3.exceptions import TimeoutError as PoolTimeout

MAX_ORIGINS = 256  # endpoints' origins with kept connections (least recently used dropped)
NO_RETRY = urllib3.Retry(total=0, redirect=0, raise_on_redirect=False, raise_on_status=False)


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
    """POSTs to webhook URLs; thread-safe (urllib3's pools hand a connection to one request
    at a time). `timeout` seconds, `cap` bytes of a response kept, `max_idle` connections
    kept per origin."""

    def __init__(self, timeout: float, cap: int, max_idle: int, user_agent: str) -> None:
        self.timeout, self.cap, self.user_agent = timeout, cap, user_agent
        self._pools = urllib3.PoolManager(
            num_pools=MAX_ORIGINS, maxsize=max_idle, block=False, retries=NO_RETRY,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        """POST `body` to `url` with `headers` (+ User-Agent); never raises for the
        endpoint's faults (a refused connection, a timeout, a broken answer: an Attempt
        without a status)."""
        started = time.monotonic()
        try:
            response = self._pools.request(
                "POST", url, body=body, headers={**headers, "User-Agent": self.user_agent},
                preload_content=False, redirect=False)
            whole = False  # a read that raises leaves the rest unread
            try:
                excerpt, whole = self._read_capped(response, started)
            finally:
                if not whole:
                    response.close()  # unread bytes would corrupt the next exchange
                response.release_conn()
        except MaxRetryError as exc:
            return self._failed(exc.reason or exc)
        except (HTTPError, OSError, ValueError) as exc:
            return self._failed(exc)
        code = response.status
        return Attempt(code, None if 200 <= code < 300 else f"HTTP {code}", excerpt,
                       _retry_after(code, response.headers.get("retry-after")))

    def _failed(self, exc: BaseException) -> Attempt:
        if isinstance(exc, (PoolTimeout, TimeoutError)):
            return Attempt(None, f"timed out after {self.timeout:g} s", "")
        return Attempt(None, f"{type(exc).__name__}: {str(exc)[:200]}", "")

    def _read_capped(self, response: urllib3.BaseHTTPResponse,
                     started: float) -> tuple[str, bool]:
        """(at most `cap` bytes of the body as text, whether the body was read to its end),
        within the request's time bound; bounded by `cap` reads."""
        data, ended = b"", False
        for _ in range(self.cap + 1):
            chunk = response.read1(self.cap + 1 - len(data))
            if not chunk:
                ended = True
                break
            data += chunk
            if len(data) > self.cap or time.monotonic() - started > self.timeout:
                break
        return data[:self.cap].decode("utf-8", "replace").replace("\x00", ""), ended

    def close(self) -> None:
        """Close every kept connection (those in use close when their request ends)."""
        self._pools.clear()


def _retry_after(status: int, value: str | None) -> float | None:
    """Seconds of a numeric Retry-After on a 429 or 503, else None."""
    if status not in (429, 503) or value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
