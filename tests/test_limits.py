"""Limits of the HTTP edge, on a real server (`ledger serve` or uvicorn with the service's
protocol): the body cap (413 problem+json, configurable, declared or chunked), the request-header
timeout, the keep-alive timeout, the bound on open connections, and a 500 that leaves the
connection usable for the client's next request.

No timing is asserted: a socket that the server closes reads b"" well before the test's own
socket timeout (several times the configured one); a server that never closes it fails.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import uvicorn

from conftest import T0, FakeClock
from runtime.asgi import create_app
from runtime.server import LedgerHttpProtocol, _limits
from runtime.settings import Settings
from simulation.crash import ADMIN_KEY, Service

HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
MAX_BODY = 4096
HEADER_TIMEOUT, KEEPALIVE_TIMEOUT, MAX_CONNECTIONS = 1, 1, 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("limits")
    service = Service(f"sqlite:///{workdir / 'ledger.db'}", workdir / "service.log",
                      env={"LEDGER_MAX_BODY_BYTES": str(MAX_BODY), "LEDGER_TICK_ENABLED": "false",
                           "LEDGER_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
                           "LEDGER_KEEPALIVE_TIMEOUT_SECONDS": str(KEEPALIVE_TIMEOUT),
                           "LEDGER_MAX_CONNECTIONS": str(MAX_CONNECTIONS)})
    service.start()
    service.wait_ready()
    yield service
    service.stop()


def connect(service: Service, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.port), timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (socket.timeout if it never does)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def doctor_event(event_id: str, padding: int = 0) -> dict:
    return {"event_id": event_id, "type": "doctor.registered", "occurred_at": T0.isoformat(),
            "payload": {"doctor_id": "d" + "x" * padding, "country": "MW"}}


def test_declared_body_over_the_cap_is_413_problem_and_nothing_is_read(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/events", body=b"{" + b" " * (10 * MAX_BODY) + b"}", headers=HEADERS)
    response = conn.getresponse()
    problem = json.loads(response.read())
    assert response.status == 413
    assert response.getheader("content-type") == "application/problem+json"
    assert problem["code"] == "payload_too_large" and problem["max_bytes"] == MAX_BODY
    assert response.getheader("connection") == "close"


def test_chunked_body_over_the_cap_is_413_and_a_body_under_it_is_served(server):
    def chunks(total: int):
        for _ in range(total // 1024):
            yield b" " * 1024
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/events", body=chunks(4 * MAX_BODY), headers=HEADERS,
                 encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["code"] == "payload_too_large"
    body = json.dumps(doctor_event("small-chunked")).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/events", body=iter([body[:10], body[10:]]), headers=HEADERS,
                 encode_chunked=True)
    assert conn.getresponse().status in (201, 422)  # parsed: under the cap
    conn.close()


def test_connection_without_complete_headers_is_closed_by_the_header_timeout(server):
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        assert read_all(sock) == b""


def test_silent_connection_is_closed_and_a_kept_alive_one_too(server):
    with connect(server) as silent:
        assert read_all(silent) == b""  # connected, sent nothing
    with connect(server) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_all(kept)  # answered, then closed by the keep-alive timeout
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}')


def test_connections_beyond_the_bound_are_answered_503_and_closed(server):
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # let the server accept them (not a timing assertion)
        with connect(server) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_all(extra)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
        assert json.loads(body)["code"] == "retry_later"
    finally:
        for sock in held:
            sock.close()
    for _ in range(50):  # the server notices the closes; then new connections are served
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                break
        except (ConnectionError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    else:
        raise AssertionError("the server did not serve new connections again")


# ------------------------------------------------------------------- a 500, then the next one


@pytest.fixture
def inprocess_server(tmp_path, monkeypatch):
    """The service's app under uvicorn with the service's protocol, in a thread."""
    monkeypatch.setenv("LEDGER_HEADER_TIMEOUT_SECONDS", "10")
    _limits.cache_clear()
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'ledger.db'}", tick_enabled=False,
                        api_keys=f"{ADMIN_KEY}:admin", log_level="warning")
    app = create_app(settings, clock=FakeClock(T0))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=LedgerHttpProtocol,
                            log_config=None, access_log=False, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield app, port
    server.should_exit = True
    thread.join(timeout=30)
    _limits.cache_clear()


def test_a_500_leaves_the_connection_usable_for_the_next_request(inprocess_server):
    app, port = inprocess_server

    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    app.state.ledger.session_with_events = boom
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/v1/sessions/s1", headers=HEADERS)
    failed = conn.getresponse()
    problem = json.loads(failed.read())
    assert failed.status == 500 and problem["code"] == "internal_error"
    assert "secret" not in json.dumps(problem)
    socket_used = conn.sock
    conn.request("POST", "/v1/events", body=json.dumps(doctor_event("after-500")), headers=HEADERS)
    served = conn.getresponse()
    assert served.status == 201, served.read()
    served.read()
    assert conn.sock is socket_used  # the same connection: not reset, not reopened
    conn.close()
