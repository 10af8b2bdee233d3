"""How fast the service answers while its database is unreachable, and how fast it recovers
(`python -m bench.outage`; timing lives here, never in a pass/fail test).

`ledger serve` (1 worker) on PostgreSQL behind a TCP proxy; after a warm-up the proxy is
killed and the seconds to answer are measured for: the first write (its pooled connections are
dead), the following writes and reads (the availability gate is closed), /readyz; then the
proxy is restored and the seconds until /readyz and a write succeed again are measured. Prints
one line per figure with the load average at start and end.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from simulation.crash import ADMIN_KEY, Service
from simulation.tcp_proxy import TcpProxy

PG = os.environ.get("LEDGER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


def body(event_id: str) -> dict:
    now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    return {"event_id": event_id, "type": "doctor.registered", "occurred_at": now,
            "payload": {"doctor_id": event_id, "country": "MW"}}


def timed(call) -> tuple[float, int]:
    started = time.perf_counter()
    status = call().status_code
    return time.perf_counter() - started, status


def main() -> None:
    print(f"load average at start: {os.getloadavg()}")
    proxy = TcpProxy(("127.0.0.1", 5432))
    schema = "bench_outage_" + str(os.getpid())
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={schema}"
    service = Service(url, Path(tempfile.mkdtemp()) / "service.log",
                      env={"LEDGER_STORE_TIMEOUT_SECONDS": "3", "LEDGER_TICK_SECONDS": "1"})
    service.start()
    try:
        service.wait_ready()
        http = httpx.Client(base_url=service.base_url, headers=HEADERS, timeout=120)
        for n in range(50):  # warm the pool
            http.post("/v1/events", json=body(f"warm{n}"))
        proxy.kill()
        first = timed(lambda: http.post("/v1/events", json=body("x0")))
        writes = [timed(lambda n=n: http.post("/v1/events", json=body(f"x{n}"))) for n in range(1, 21)]
        reads = [timed(lambda: http.get("/v1/patients/p1/balance")) for _ in range(20)]
        ready = timed(lambda: http.get("/readyz"))
        print(f"first write after the kill: {first[0]:.3f} s (status {first[1]})")
        print(f"next 20 writes: median {statistics.median(w[0] for w in writes):.4f} s, "
              f"max {max(w[0] for w in writes):.3f} s, statuses {sorted({w[1] for w in writes})}")
        print(f"20 reads: median {statistics.median(r[0] for r in reads):.4f} s, "
              f"max {max(r[0] for r in reads):.3f} s, statuses {sorted({r[1] for r in reads})}")
        print(f"/readyz: {ready[0]:.3f} s (status {ready[1]})")
        proxy.restore()
        restored = time.perf_counter()
        while http.get("/readyz").status_code != 200:
            time.sleep(0.05)
        print(f"ready again {time.perf_counter() - restored:.2f} s after the restore")
        status = http.post("/v1/events", json=body("after")).status_code
        print(f"first write after recovery: status {status}")
    finally:
        service.stop()
        proxy.kill()
        import psycopg
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
