"""The database lost and restored under a running service, through a TCP proxy the test kills.

`ledger serve` runs on PostgreSQL reached only through `TcpProxy`. While the proxy is down:
writes and reads answer 503 `retry_later` with Retry-After (problem+json), never a hang or a
500 (the HTTP client's timeout is ten times the configured bound, so a hang fails the test);
/readyz says not ready and why; the scheduled tick logs "skipped". After the proxy is restored
everything works again without a restart, and the event refused during the outage is accepted
when retried with the same id. Connections dropped while the database still answers (a server
restart) are replaced without refusing anything. Start-up with the database down waits with logged retries and
starts once it is back, or gives up with a clear message and exit code 3.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from conftest import PG_URL
from simulation.crash import ADMIN_KEY, Service
from storage import postgres_parts
from simulation.tcp_proxy import TcpProxy

pytestmark = pytest.mark.postgres

HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
STORE_TIMEOUT_SECONDS = 2
CLIENT_TIMEOUT_SECONDS = 10 * STORE_TIMEOUT_SECONDS  # a hang, not a slow answer, fails


def proxied_url(proxy: TcpProxy, pg_url: str) -> str:
    parts = postgres_parts(pg_url)
    return (f"postgresql://{parts['user']}@127.0.0.1:{proxy.port}/{parts['dbname']}"
            f"?schema={parts['schema']}")


def event(event_id: str, doctor: str = "d1") -> dict:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    return {"event_id": event_id, "type": "doctor.registered", "occurred_at": now.isoformat(),
            "payload": {"doctor_id": doctor, "country": "MW"}}


def log_lines(path: Path) -> list[dict]:
    lines = []
    for raw in path.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            pass
    return lines


def wait_until(predicate, what: str, attempts: int = 200, pause: float = 0.1):
    """Poll `predicate` (bounded: attempts × pause); returns its first truthy value."""
    for _ in range(attempts):
        value = predicate()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def proxy():
    parts = postgres_parts(PG_URL)
    proxy = TcpProxy((parts["host"], int(parts["port"])))
    yield proxy
    proxy.kill()


@pytest.fixture
def service(proxy, pg_url, tmp_path):
    service = Service(proxied_url(proxy, pg_url), tmp_path / "service.log", workers=1,
                      env={"LEDGER_TICK_SECONDS": "1", "LEDGER_RETRY_AFTER_SECONDS": "3",
                           "LEDGER_STORE_TIMEOUT_SECONDS": str(STORE_TIMEOUT_SECONDS),
                           "LEDGER_STARTUP_WAIT_SECONDS": "60"})
    yield service
    service.stop()


def assert_retry_later(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "retry_later"
    assert response.headers["retry-after"] == "3"


def test_outage_answers_503_retry_later_fast_and_recovers_without_restart(proxy, service):
    service.start()
    service.wait_ready()
    http = httpx.Client(base_url=service.base_url, headers=HEADERS, timeout=CLIENT_TIMEOUT_SECONDS)
    before, during = event("before"), event("during")
    assert http.post("/v1/events", json=before).status_code == 201

    proxy.kill()
    assert_retry_later(http.post("/v1/events", json=during))
    assert_retry_later(http.post("/v1/events", json={"events": [event("b1"), event("b2", "d2")]}))
    assert_retry_later(http.get("/v1/sessions/s1"))
    assert_retry_later(http.get("/v1/patients/p1/balance"))
    assert_retry_later(http.post("/v1/ticks", json={}))
    ready = http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["code"] == "not_ready"
    assert ready.json()["checks"]["store"] == {"ok": False, "reason": "event store unreachable"}
    wait_until(lambda: any(line.get("event") == "tick" and line.get("outcome") == "skipped"
                           for line in log_lines(service.log_path)), "a skipped tick")

    proxy.restore()
    wait_until(lambda: http.get("/readyz").status_code == 200, "readiness after the restore")
    assert http.post("/v1/events", json=during).status_code == 201  # the retry lands
    replay = http.post("/v1/events", json=before)
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert http.get("/v1/doctors/d1/wallet").status_code == 200
    wait_until(lambda: any(line.get("event") == "tick" and line.get("outcome") == "ok"
                           and line["timestamp"] > _last_skip(service.log_path)
                           for line in log_lines(service.log_path)), "a tick after the restore")
    assert service.proc.poll() is None  # the same process throughout
    lines = log_lines(service.log_path)
    assert not [line for line in lines if line.get("status") == 500]
    assert service.starts == 1


def test_connections_dropped_by_a_database_restart_are_replaced_without_a_refusal(proxy, service):
    service.start()
    service.wait_ready()
    http = httpx.Client(base_url=service.base_url, headers=HEADERS, timeout=CLIENT_TIMEOUT_SECONDS)
    for n in range(10):  # several pooled connections
        assert http.post("/v1/events", json=event(f"warm{n}", f"d{n}")).status_code == 201
    proxy.drop_connections()  # every pooled connection dies; the database still answers
    assert http.post("/v1/events", json=event("after-restart", "dx")).status_code == 201
    assert http.get("/v1/doctors/dx/wallet").status_code == 200
    assert http.get("/readyz").status_code == 200


def _last_skip(path: Path) -> str:
    skips = [line["timestamp"] for line in log_lines(path)
             if line.get("event") == "tick" and line.get("outcome") == "skipped"]
    return max(skips)


def test_startup_waits_for_the_database_with_logged_retries(proxy, service):
    proxy.kill()
    service.start()
    wait_until(lambda: sum(line.get("event") == "store unreachable; retrying"
                           for line in log_lines(service.log_path)) >= 2, "two logged retries",
               attempts=300)
    proxy.restore()
    service.wait_ready()
    retries = [line for line in log_lines(service.log_path)
               if line.get("event") == "store unreachable; retrying"]
    assert all(line["level"] == "warning" and line["attempt"] >= 1 and line["error"]
               for line in retries)
    assert "Traceback" not in service.log_path.read_text()


def test_startup_gives_up_with_a_clear_message_and_exit_code_3(proxy, pg_url, tmp_path):
    proxy.kill()
    service = Service(proxied_url(proxy, pg_url), tmp_path / "service.log",
                      env={"LEDGER_STARTUP_WAIT_SECONDS": "1"})
    service.start()
    assert service.proc.wait(timeout=60) == 3
    text = service.log_path.read_text()
    assert "Traceback" not in text
    final = [line for line in log_lines(service.log_path) if line.get("event") == "not starting"]
    assert len(final) == 1 and "did not answer within 1 s" in final[0]["reason"]
