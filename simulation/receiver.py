"""A webhook receiver for the simulation and the tests: verifies every delivery with the
`standardwebhooks` library (as a backend would) and records what it got.

It runs an HTTP server on loopback in a thread. `secrets` are the signing secrets it accepts
(a backend usually knows one; during a rotation it may hold the new one only). Deliveries whose
signature does not verify are answered 400 and counted in `rejected`. `mode` makes it misbehave
for the tests: `"fail"` answers 503, `"hang"` waits `hang_seconds` before answering, `"block"`
waits until `release` is set (at most `hang_seconds`), `"redirect"` answers 302 to another
path, `"big"` answers 200 with a 1 MiB body. `attempts` lists every request's
(webhook-id, status answered). `stop()` closes the port (connection refused) and `start()`
opens the same port again.

`keep_alive=True` answers HTTP/1.1 and keeps each connection open for the sender's next
delivery, as a production receiver would; the simulated day uses it (18,000 deliveries, each
a fresh TCP connection and a fresh thread otherwise). The default is HTTP/1.0, one delivery
per connection, so that `stop()` refuses the very next delivery (the tests rely on it; a
kept-alive connection would outlive the listening socket).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Received:
    """One verified delivery: its `webhook-id`, the parsed payload, and the arrival order."""

    webhook_id: str
    payload: dict
    seq: int

    @property
    def type(self) -> str:
        return self.payload["type"]

    @property
    def data(self) -> dict:
        return self.payload["data"]


class Receiver:
    """A loopback webhook receiver (see the module doc). Thread-safe."""

    def __init__(self, secrets: list[str] | None = None, port: int = 0, path: str = "/hook",
                 keep_alive: bool = False) -> None:
        self.secrets = list(secrets or [])
        self.keep_alive = keep_alive
        self.path = path
        self.mode = "ok"
        self.hang_seconds = 5.0
        self.received: list[Received] = []
        self.rejected: list[str] = []
        self.attempts: list[tuple[str, int]] = []
        self.requests = 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._webhooks: dict[str, Webhook] = {}  # secret -> its verifier (decoded once)
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}{self.path}"

    def start(self) -> None:
        """Listen (again) on the same port."""
        if self._server is not None:
            return
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if self.keep_alive else "HTTP/1.0"
            # The status line and headers, then the body, are two writes: on a kept-alive
            # connection Nagle's algorithm would hold the body for the sender's delayed ACK
            # (about 40 ms a delivery).
            disable_nagle_algorithm = True

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = min(int(self.headers.get("content-length") or 0), MAX_BODY)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receiver.handle(body, headers)
                reply = b"x" * MAX_BODY if receiver.mode == "big" else b"ok"
                self.send_response(status)
                if status == 302:
                    self.send_header("location", receiver.path + "/elsewhere")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                try:
                    self.wfile.write(reply)
                except OSError:  # the sender stopped reading (it caps what it reads)
                    pass

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="webhook-receiver",
                         daemon=True).start()

    def stop(self) -> None:
        """Close the port: deliveries are refused until `start()`."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def handle(self, body: bytes, headers: dict[str, str]) -> int:
        with self._lock:
            self.requests += 1
            mode = self.mode
        status = self._answer(mode, body, headers)
        with self._lock:
            self.attempts.append((headers.get("webhook-id", "?"), status))
        return status

    def _answer(self, mode: str, body: bytes, headers: dict[str, str]) -> int:
        if mode == "hang":
            time.sleep(self.hang_seconds)
        elif mode == "block":
            self.release.wait(self.hang_seconds)
        if mode == "fail":
            return 503
        if mode == "redirect":
            return 302
        payload = self.verify(body, headers)
        if payload is None:
            with self._lock:
                self.rejected.append(headers.get("webhook-id", "?"))
            return 400
        with self._lock:
            self.received.append(Received(headers["webhook-id"], payload, len(self.received)))
        return 200

    def verify(self, body: bytes, headers: dict[str, str]) -> dict | None:
        """The payload if one of `secrets` verifies the signature (Standard Webhooks), else None."""
        for secret in list(self.secrets):
            webhook = self._webhooks.get(secret)
            if webhook is None:
                webhook = self._webhooks[secret] = Webhook(secret)
            try:
                return webhook.verify(body, headers)
            except WebhookVerificationError:
                continue
        return None

    # --------------------------------------------------------------------------- reading

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def distinct(self) -> dict[str, Received]:
        """The first arrival of each webhook-id."""
        out: dict[str, Received] = {}
        for item in self.snapshot():
            out.setdefault(item.webhook_id, item)
        return out

    def wait_for(self, count: int, timeout: float = 30.0) -> bool:
        """Wait until `count` distinct webhook-ids arrived (bounded by `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.distinct()) >= count:
                return True
            time.sleep(0.05)
        return len(self.distinct()) >= count

    def close(self) -> None:
        self.stop()
