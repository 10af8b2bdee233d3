"""Several API worker processes and several ticks at once, on PostgreSQL, over real HTTP.

`uvicorn --workers 3` serves the API from three processes on one schema, each running its own
scheduler (1-second ticks, advisory-lock leader); the test also posts end reports and admin
ticks from several threads at once, so requests land on different processes. Asserted over the
event log afterwards: every invariant check of test_invariants (no block charged twice, exact
totals, no overdraft, conservation, …), every settled session charged exactly what it owes,
and the family pool's last units went to exactly one session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import httpx
import psycopg
import pytest

from conftest import make_ledger
from ledger.domain import Pool
from scheduler.leader import lock_key
from storage import postgres_conninfo, postgres_parts
from test_billing import named, plan
from test_invariants import check_all, events_of

pytestmark = pytest.mark.postgres

ADMIN = {"Authorization": "Bearer mp-admin"}
CALLS = 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(pg_url, tmp_path):
    """Three uvicorn worker processes on `pg_url`; skew and grace 0 so settlement is immediate."""
    port = free_port()
    env = {**os.environ, "LEDGER_DATABASE_URL": pg_url, "LEDGER_API_KEYS": "mp-admin:admin",
           "LEDGER_TICK_SECONDS": "1", "LEDGER_SKEW_SECONDS": "0",
           "LEDGER_SETTLEMENT_GRACE_SECONDS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "runtime.asgi:create_app", "--factory",
                             "--workers", "3", "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "server.log").open("w"))
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=ADMIN, timeout=30)
    try:
        _wait_healthy(client, proc, tmp_path / "server.log")
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)


def _wait_healthy(client: httpx.Client, proc: subprocess.Popen, log) -> None:
    for _ in range(300):  # bounded: 30 s
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become healthy")


class Poster:
    """Posts events with fresh ids to whichever worker process accepts the connection."""

    def __init__(self, client: httpx.Client) -> None:
        self.client, self.n = client, 0

    def post(self, type_: str, at: datetime, event_id: str | None = None, **payload) -> httpx.Response:
        self.n += 1
        body = {"event_id": event_id or f"mp-{self.n}", "type": type_,
                "occurred_at": at.isoformat(), "payload": payload}
        return self.client.post("/v1/events", json=body)

    def ok(self, type_: str, at: datetime, **payload) -> dict:
        response = self.post(type_, at, **payload)
        assert response.status_code in (200, 201), response.text
        return response.json()


@pytest.fixture
def tick_lock(pg_url):
    """Holds the tick's leader lock so that no worker's scheduled tick runs until released:
    the setup posts past events, which a tick at wall-clock now would otherwise time out."""
    conn = psycopg.connect(postgres_conninfo(pg_url), autocommit=True)
    key = lock_key(postgres_parts(pg_url)["schema"])
    assert conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
    yield lambda: conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    conn.close()


def test_three_worker_processes_and_concurrent_ticks_charge_each_block_once(tick_lock, server,
                                                                           pg_url):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    start = now - timedelta(minutes=30)
    api = Poster(server)
    for k in range(CALLS):
        api.ok("doctor.registered", start, doctor_id=f"d{k}", country="MW" if k % 2 else "KE")
        api.ok("subscription.granted", start, payment_reference=f"pay{k}", owner_id=f"p{k}",
               plan=plan(voice=5), starts_at=start.isoformat())
    api.ok("doctor.registered", start, doctor_id="df1", country="MW")
    api.ok("doctor.registered", start, doctor_id="df2", country="ZM")
    api.ok("subscription.granted", start, payment_reference="family", owner_id="f1",
           plan=plan(voice=3, seats=3), starts_at=start.isoformat())
    api.ok("member.added", start, payment_reference="family", patient_id="f2")

    # Six 25-minute calls (owe 3 each) and two family calls racing for 3 units over 15 minutes.
    for k in range(CALLS):
        api.ok("session.requested", start, session_id=f"s{k}", kind="voice",
               patient_id=f"p{k}", doctor_id=f"d{k}")
        api.ok("call.connected", start, session_id=f"s{k}")
        for minute in (5, 10, 15, 20):
            api.ok("session.activity", start + timedelta(minutes=minute), session_id=f"s{k}")
    family = [("f1", "df1", "fam1"), ("f2", "df2", "fam2")]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda f: api.ok("session.requested", start, session_id=f[2], kind="voice",
                                       patient_id=f[0], doctor_id=f[1]), family))
        list(pool.map(lambda f: api.ok("call.connected", start, session_id=f[2]), family))

    # Ends (each posted twice, from different threads) and admin ticks, all at once, while a
    # worker's scheduled 1-second tick runs too.
    tick_lock()
    jobs = [lambda k=k: api.post("session.ended", start + timedelta(minutes=25), f"end-s{k}",
                                 session_id=f"s{k}", ended_by="doctor", reason="completed")
            for k in range(CALLS) for _ in range(2)]
    jobs += [lambda sid=sid: api.post("session.ended", start + timedelta(minutes=15), f"end-{sid}",
                                      session_id=sid, ended_by="patient", reason="completed")
             for _, _, sid in family]
    jobs += [lambda: server.post("/v1/ticks", json={"as_of": now.isoformat()})] * 12
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: job(), jobs))
    # Both family calls ran out of the pool's 3 units before their end reports (at 15
    # minutes) and the grace is 0: a tick that runs first ends and settles them, and a report
    # arriving after that is refused as settled, which is the right answer then.
    family_ends = answers[2 * CALLS:2 * CALLS + len(family)]
    others = answers[:2 * CALLS] + answers[2 * CALLS + len(family):]
    assert all(a.status_code in (200, 201) for a in others), [a.text for a in others
                                                               if a.status_code >= 300]
    assert all(a.status_code in (200, 201) or (a.status_code == 409 and a.json()["code"]
                                               == "session_settled") for a in family_ends), \
        [a.text for a in family_ends]
    _tick_until_settled(server, now, [f"s{k}" for k in range(CALLS)] + ["fam1", "fam2"])

    ledger = make_ledger(pg_url, lambda: now)
    try:
        events = events_of(ledger)
        check_all(events, ledger)
        settled = {e.originator_id: e for e in named(events, "Session.Settled")}
        assert len(settled) == CALLS + 2
        owed = sorted(e.units_owed for e in settled.values())
        assert owed == sorted([3] * CALLS + [1, 2])  # one family call ran out at 10 minutes
        family_pool = ledger.repository.get(Pool.create_id("family"))
        assert family_pool.free["voice"] == 0 and len(family_pool.charged) == 3
    finally:
        ledger.close()


def _tick_until_settled(client: httpx.Client, as_of: datetime, sessions: list[str]) -> None:
    for _ in range(60):  # bounded: the scheduled 1-second ticks also run meanwhile
        client.post("/v1/ticks", json={"as_of": as_of.isoformat()})
        states = {client.get(f"/v1/sessions/{sid}").json()["state"] for sid in sessions}
        if states == {"settled"}:
            return
        time.sleep(0.2)
    raise AssertionError(f"sessions not settled: {states}")
