"""`ledger simulate`: a realistic day driven against the running service, checked by an oracle.

The driver walks the simulated day in steps of the tick interval (60 s). At each step it moves
the service's manual clock to the step's end, posts every event the backend delivers during the
step (batches of at most 100, with duplicates, late deliveries, swaps within a batch and client
retries after a timeout) and runs the tick as of the step's end, repeating while the tick says
there is more. The oracle (service/oracle.py) is fed exactly the same operations in the same
order and predicts every post's outcome and every tick's work. After the day the clock runs on
past every settlement grace; then every session, patient and doctor is read over HTTP and
compared with the oracle, and the projections are replayed from zero (I7).

`run_simulation(...)` returns a SimulationReport; `ok` is false on any difference or a failed
replay.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx
import psutil

from simulation.expectation import ExpectingMarket, ExpectingOracle, WebhookComparison, compare
from simulation.marketplace import compare_marketplace, market_summary
from simulation.oracle import KINDS, Outcome, utc
from simulation.receiver import Receiver
from simulation.scenario import Delivery, Scenario, build_scenario, iso, next_midnight

ADMIN_KEY = "sim-admin"
STEP = timedelta(seconds=60)
BATCH = 100
MAX_TICK_CALLS = 50  # per step: bound on POST /v1/ticks while "more"
SETTLE_HORIZON = timedelta(hours=6)  # bound on the drain after the last delivery
REPO_ROOT = Path(__file__).resolve().parents[1]
REPLAY_TIMEOUT_SECONDS = 600  # bound on the replay audit subprocess
WEBHOOK_DRAIN_SECONDS = 180  # bound on waiting for the last webhooks after the day
PRINTED_DIFFERENCES = 500  # printed in full up to this many; all are in the report
# The events that open a session or a priced consultation: the backend waits for their answer
# and sends nothing more about one that was refused.
OPENING_TYPES = ("session.requested", "consultation.booked")
# Payload fields naming a party an event depends on (Driver.parties).
PARTY_KEYS = ("session_id", "consultation_id", "patient_id", "doctor_id", "practitioner_id",
              "owner_id", "payment_reference", "request_id")
COMPARE_WORKERS = 8  # parallel GETs of the comparison (each its own kept-alive connection)
COMPARED_RESULT_KEYS = ("state", "paid_until", "ended_at", "reason", "pool_id", "effective_end",
                        "seats_taken", "revoked", "status", "available_minor", "country")


@dataclass
class SimulationReport:
    differences: list[str]
    replay_ok: bool | None  # None: the replay audit could not run (no database URL)
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.differences and self.replay_ok is not False


# ------------------------------------------------------------------------- the service


class ServiceProcess:
    """`uvicorn runtime.asgi:create_app --factory` on a fresh SQLite file with a manual clock."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.db = workdir.resolve() / "ledger.db"
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(self.db) + suffix).unlink(missing_ok=True)
        self.database_url = f"sqlite:///{self.db}"
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir.resolve() / "service.log"
        env = {**os.environ, "LEDGER_DATABASE_URL": self.database_url, "LEDGER_CLOCK": "manual",
               "LEDGER_TICK_ENABLED": "false", "LEDGER_API_KEYS": f"{ADMIN_KEY}:admin",
               "LEDGER_WEBHOOK_ALLOW_HTTP_HOSTS": "127.0.0.1",
               "LEDGER_LOG_LEVEL": "warning",
               "PYTHONPATH": os.pathsep.join(
                   filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "runtime.asgi:create_app", "--factory", "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "warning", "--no-access-log"],
            cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_seconds: float = 60) -> None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode}; "
                                   f"see {self.log_path}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the service did not become healthy; see {self.log_path}")

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds the service process has used so far (psutil; None once
        it has exited or where it cannot be read)."""
        try:
            times = psutil.Process(self.proc.pid).cpu_times()
        except psutil.Error:
            return None
        return times.user + times.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceError(RuntimeError):
    """The service answered 5xx (or not as its contract says)."""


class Client:
    """The backend's and the operator's HTTP calls."""

    def __init__(self, base_url: str, key: str = ADMIN_KEY) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=httpx.Timeout(120.0), limits=httpx.Limits(
                                     max_connections=8, max_keepalive_connections=8))
        # The day's own requests (the clock, the posts, the ticks: three or more per simulated
        # minute, one at a time) go over one kept-alive http.client connection: about a
        # quarter of httpx's CPU per request, and the driver's CPU is on the day's critical
        # path (each request waits for the previous answer). The rest stays on httpx.
        parts = urlsplit(base_url)
        self.day = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=120)
        self.day_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.requests = 0
        self.transport_retries = 0  # requests sent again after a dropped connection
        self.last_retried = False  # whether the latest request needed that
        self.seconds: Counter = Counter()  # wall time per kind of call
        self._lock = threading.Lock()

    def _send(self, method: str, path: str, attempts: int = 3, **kwargs) -> httpx.Response:
        """One request; sent again (bounded) when a kept-alive connection was dropped, as
        after a 500. Event posts are idempotent by event id; the rest are reads, the clock
        (monotonic) and the tick (I9)."""
        self.last_retried = False
        for attempt in range(attempts):
            try:
                return self.http.request(method, path, **kwargs)
            except (httpx.TimeoutException, httpx.UnsupportedProtocol):
                raise
            except httpx.TransportError:
                if attempt == attempts - 1:
                    raise
                self.transport_retries += 1
                self.last_retried = True
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _exchange(self, method: str, path: str, body: object, attempts: int = 3,
                  raise_5xx: bool = True) -> "Reply":
        """One of the day's requests on its kept-alive connection (`day`), `body` as JSON;
        sent again (bounded), like `_send`, when the connection was dropped (after a 500, or
        kept-alive past the server's limit); a timeout raises. Counted and checked like
        `_check` does (ServiceError on a 5xx unless `raise_5xx` is false)."""
        self.last_retried = False
        started = time.monotonic()
        reply = kept_alive_request(self.day, method, path, json.dumps(body).encode(),
                                   self.day_headers, attempts, on_retry=self._retried)
        self.count(method, path, time.monotonic() - started)
        if raise_5xx and reply.status_code >= 500:
            raise ServiceError(f"{method} {path}: {reply.status_code} {reply.text[:500]}")
        return reply

    def _retried(self) -> None:
        self.transport_retries += 1
        self.last_retried = True

    def count(self, method: str, path: str, seconds: float) -> None:
        """Count one request and its wall time under its kind ("POST events")."""
        kind = path.split("/")[2] if path.startswith("/v1/") else "other"
        with self._lock:
            self.requests += 1
            self.seconds[f"{method} {kind}"] += seconds

    def _check(self, response: httpx.Response, raise_5xx: bool = True) -> httpx.Response:
        request = response.request
        self.count(request.method, request.url.path, response.elapsed.total_seconds())
        if raise_5xx and response.status_code >= 500:
            raise ServiceError(f"{response.request.method} {response.request.url.path}: "
                               f"{response.status_code} {response.text[:500]}")
        return response

    def clock(self) -> datetime:
        """The service clock; the simulation needs it manual (LEDGER_CLOCK=manual)."""
        r = self._check(self._send("GET", "/v1/clock"))
        if r.status_code != 200:
            raise RuntimeError(f"GET /v1/clock: {r.status_code} {r.text[:300]}")
        body = r.json()
        if not body.get("manual", False):
            raise RuntimeError("the service runs the system clock: start it with "
                               "LEDGER_CLOCK=manual and LEDGER_TICK_ENABLED=false")
        return utc(body["now"])

    def set_clock(self, now: datetime) -> None:
        r = self._exchange("PUT", "/v1/clock", {"now": iso(now)})
        if r.status_code != 200:
            raise RuntimeError(f"PUT /v1/clock: {r.status_code} {r.text[:300]}")

    def tick(self, as_of: datetime) -> dict:
        r = self._exchange("POST", "/v1/ticks", {"as_of": iso(as_of)})
        if r.status_code != 200:
            raise ServiceError(f"POST /v1/ticks: {r.status_code} {r.text[:300]}")
        return r.json()

    def post_batch(self, bodies: list[dict], timeout: httpx.Timeout | None = None) -> list[dict]:
        if timeout is not None:  # the deliberate client timeout: never re-sent here
            r = self._check(self._send("POST", "/v1/events", attempts=1,
                                       json={"events": bodies}, timeout=timeout))
        else:
            r = self._exchange("POST", "/v1/events", {"events": bodies})
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/events (batch): {r.status_code} {r.text[:500]}")
        return r.json()["results"]

    def post_one(self, body: dict) -> "Reply":
        """One event posted alone; its answer whatever the status (a 5xx included)."""
        return self._exchange("POST", "/v1/events", body, raise_5xx=False)

    def head(self) -> int:
        return int(self._check(self._send("GET", "/v1/projections")).json()["head"])

    def register_webhook(self, url: str) -> tuple[str | None, str]:
        """Register `url` for every notification type: (its secret, or None; why not)."""
        r = self._check(self._send("POST", "/v1/webhook-endpoints",
                                   json={"url": url, "description": "simulation receiver"}))
        if r.status_code != 201:
            return None, f"{r.status_code} {r.text[:300]}"
        return r.json()["secret"], ""

    def undelivered_webhooks(self) -> int:
        """Deliveries still pending or retrying (the first page of each is enough to know)."""
        total = 0
        for status in ("pending", "retrying"):
            r = self._check(self._send("GET", "/v1/webhook-deliveries",
                                       params={"status": status, "limit": 500}))
            total += len(r.json()["deliveries"]) if r.status_code == 200 else 1
        return total

    def get(self, path: str) -> httpx.Response:
        """A read; a 5xx is returned, not raised (the comparison reports it)."""
        return self._check(self._send("GET", path), raise_5xx=False)

    def close(self) -> None:
        self.http.close()
        self.day.close()


def kept_alive_request(conn: http.client.HTTPConnection, method: str, path: str,
                       body: bytes | None, headers: dict[str, str], attempts: int,
                       on_retry: Callable[[], None] | None = None) -> "Reply":
    """`method path` on a kept-alive connection; when the connection was dropped it is closed
    (http.client opens it again on the next request) and the request sent again, at most
    `attempts` times in all, `on_retry` told of each; a timeout raises."""
    for attempt in range(attempts):
        try:
            conn.request(method, path, body, headers)
            response = conn.getresponse()
            return Reply(response.status, response.read(), response.headers)
        except (http.client.HTTPException, ConnectionError):
            conn.close()
            if attempt == attempts - 1:
                raise
            if on_retry is not None:
                on_retry()
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


class Reply:
    """An answer as the driver reads it (the part of httpx.Response it uses)."""

    def __init__(self, status_code: int, content: bytes, headers: Any = None) -> None:
        self.status_code, self.content = status_code, content
        self.headers = headers if headers is not None else {}

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


class Reader:
    """The comparison's reads: thousands of GETs, each thread on its own kept-alive HTTP/1.1
    connection (http.client costs this process about a fifth of httpx's CPU per request, and
    the driver shares two cores with the service). Counts into `client`'s per-kind seconds
    and requests. A dropped connection is opened again and the GET sent again (bounded)."""

    def __init__(self, client: Client, base_url: str, key: str) -> None:
        parts = urlsplit(base_url)
        self.client, self.host, self.port = client, parts.hostname, parts.port or 80
        self.headers = {"Authorization": f"Bearer {key}"}
        self.local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            with self._lock:
                self._opened.append(conn)
        return conn

    def get(self, path: str, attempts: int = 3) -> Reply:
        started = time.monotonic()
        reply = kept_alive_request(self._connection(), "GET", path, None, self.headers, attempts)
        self.client.count("GET", path, time.monotonic() - started)
        return reply

    def map(self, paths: list[str], workers: int = COMPARE_WORKERS) -> list[Reply]:
        """GET every path (in parallel), answers in `paths` order."""
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(self.get, paths))

    def close(self) -> None:
        with self._lock:
            for conn in self._opened:
                conn.close()


# ------------------------------------------------------------------------------- driver


@dataclass
class Stats:
    posts: int = 0  # HTTP posts of events (batches and singles)
    events_posted: int = 0  # event deliveries sent, duplicates and retries included
    distinct_events: int = 0
    duplicates: int = 0
    late: int = 0
    singles: int = 0
    swaps: int = 0
    timeout_retries: int = 0
    timeout_applied: int = 0  # of those, how often the server had applied the first attempt
    dropped: int = 0  # events the backend no longer sent after a refusal
    ticks: int = 0
    tick_calls: int = 0
    tick_errors: int = 0
    refusals: Counter = field(default_factory=Counter)
    refusals_by_type: Counter = field(default_factory=Counter)
    tick_work: Counter = field(default_factory=Counter)


class Driver:
    def __init__(self, scenario: Scenario, client: Client, console=None) -> None:
        self.sc = scenario
        self.client = client
        self.oracle = ExpectingOracle()
        self.market = ExpectingMarket(self.oracle)  # priced consultations (§10), same receipts
        self.console = console
        self.rng = random.Random(scenario.seed * 7919 + 17)
        self.stats = Stats()
        self.differences: list[str] = []
        self.plans = {p.session_id: p for p in scenario.sessions}
        self.cancelled: set[str] = set()  # requests refused: the backend never started them
        self.closed: set[str] = set()  # the ledger said the session ended: only ends are sent
        self.seen: set[str] = set()
        self.opening_parties: dict[str, set[str]] = {}  # session -> parties of its opening
        self.late_ends: set[str] = set()  # sessions whose end report was delivered late
        self.now = scenario.setup_at
        forced = [scenario.day_start + timedelta(hours=h) for h in (9, 15, 20)]
        self.forced_retries = sorted(forced)

    def differ(self, message: str) -> None:
        self.differences.append(message)
        if self.console is not None and len(self.differences) <= 30:
            self.console.print(f"[red]DIFF[/red] {message}", highlight=False)

    # ---- the day

    def run(self, progress=None, task=None) -> None:
        deliveries = self.sc.deliveries
        i, t = 0, self.sc.setup_at
        stop_at = self.sc.last_delivery + SETTLE_HORIZON
        while t <= stop_at:
            self.now = t
            self.client.set_clock(t)
            batch: list[Delivery] = []
            while i < len(deliveries) and deliveries[i].at <= t:
                batch.append(deliveries[i])
                i += 1
            if batch:
                self.deliver(batch)
            self.tick(t)
            if progress is not None:
                progress.update(task, completed=min(i, len(deliveries)),
                                description=f"simulated {t:%Y-%m-%d %H:%M} UTC")
            if i >= len(deliveries) and not self.oracle.unsettled and not self.market.unsettled:
                break
            t += STEP
        for _ in range(3):  # nothing may be left: the ledger must agree
            t += STEP * 10
            self.now = t
            self.client.set_clock(t)
            self.tick(t)

    def deliver(self, batch: list[Delivery]) -> None:
        items = []
        for d in batch:
            if not self.still_sent(d):
                continue
            if d.event.withdraw_rule and d.event.payload["amount_minor"] == 0:
                self.resolve_withdrawal(d.event)
            items.append(d)
        self.swap(items)
        for wave in self.waves(items):
            wave = [d for d in wave if self.still_sent(d)]
            if len(wave) == 1 and wave[0].single:
                self.post_single(wave[0])
                continue
            for start in range(0, len(wave), BATCH):
                self.post_batch(wave[start:start + BATCH])

    def still_sent(self, d: Delivery) -> bool:
        """False (and counted as dropped) for an event the backend no longer sends: its session
        was refused, or the ledger said it ended and this is not an end report."""
        sid = d.event.session_id
        if sid in self.cancelled or (sid in self.closed and d.event.type != "session.ended"):
            self.stats.dropped += 1
            return False
        return True

    def waves(self, items: list[Delivery]) -> list[list[Delivery]]:
        """The step's events as successive posts ("waves"), each posted once the previous one
        is answered; array order is kept within a wave.

        An event goes into the first wave after every earlier event it depends on (same
        session, patient, doctor, practitioner, pool or request: `parties`), and after its
        session's opening event when that is in this step (the backend waits for the answer
        to a request before the session goes on). An event without a session (doctor, pool,
        wallet, price list, withdrawal) is a barrier: after everything before it, before
        everything after it; a single event (posted on its own) is a barrier posted alone.
        Sequential waves keep the ledger's order and the oracle's the same."""
        waves: list[list[Delivery]] = []
        last: dict[str, int] = {}  # party -> the latest wave holding an event about it
        opened: dict[str, int] = {}  # session -> the wave of its opening event
        floor = 0  # no event goes before a barrier
        for d in items:
            ev = d.event
            if d.single:
                waves.append([d])
                floor, last, opened = len(waves), {}, {}
                continue
            if ev.session_id is None:
                if len(waves) <= floor:
                    waves.append([])
                waves[-1].append(d)
                floor = len(waves) - 1
                continue
            parties = self.parties(ev)
            wave = max([floor, *(last.get(p, 0) for p in parties)])
            if ev.session_id in opened and ev.type not in OPENING_TYPES:
                wave = max(wave, opened[ev.session_id] + 1)
            elif ev.type in OPENING_TYPES:
                opened[ev.session_id] = wave
            while len(waves) <= wave:
                waves.append([])
            waves[wave].append(d)
            for p in parties:
                last[p] = wave
        return [w for w in waves if w]

    def parties(self, ev) -> set[str]:
        """Whom an event concerns: its ids, its session's (from the plan or the opening
        payload), and the pools its patients draw on (as the oracle knows them)."""
        ids = {f"{k}:{ev.payload[k]}" for k in PARTY_KEYS if k in ev.payload}
        ids.add(f"session:{ev.session_id}")
        if ev.type in OPENING_TYPES:
            self.opening_parties.setdefault(ev.session_id, set()).update(ids)
        ids |= self.opening_parties.get(ev.session_id, set())
        plan = self.plans.get(ev.session_id)
        if plan is not None:
            ids |= {f"patient_id:{plan.patient_id}", f"doctor_id:{plan.doctor_id}"}
        for party in [i for i in ids if i.startswith("patient_id:")]:
            patient = party.partition(":")[2]
            ids |= {f"payment_reference:{ref}"
                    for ref in self.oracle.patients.get(patient, {}).get("pools", ())}
        return ids

    def resolve_withdrawal(self, ev) -> None:
        """The doctor asks for a share of what their app shows as available (the oracle's)."""
        p = ev.payload
        available = self.oracle.available_minor(p["doctor_id"], p["currency"])
        minimum = 5_000_000 if p["currency"] == "MWK" else 7_000
        amount = {"all": available, "half": available // 2, "third": available // 3,
                  "over": available + 100, "below_min": minimum - 1}[ev.withdraw_rule]
        p["amount_minor"] = max(amount, minimum if ev.withdraw_rule != "below_min" else 1)

    def swap(self, items: list[Delivery]) -> None:
        """Swap a few adjacent, independent events (other sessions, patients and doctors)."""
        k = 0
        while k < len(items) - 1:
            a, b = items[k], items[k + 1]
            if self.rng.random() < 0.04 and self.independent(a, b):
                items[k], items[k + 1] = b, a
                self.stats.swaps += 1
                k += 2
            else:
                k += 1

    def independent(self, a: Delivery, b: Delivery) -> bool:
        pa, pb = self.plans.get(a.event.session_id), self.plans.get(b.event.session_id)
        if pa is None or pb is None or a.single or b.single or pa is pb:
            return False
        return pa.patient_id != pb.patient_id and pa.doctor_id != pb.doctor_id

    # ---- posting

    def count(self, d: Delivery) -> None:
        self.stats.events_posted += 1
        self.stats.duplicates += d.duplicate
        self.stats.late += bool(d.late_seconds) and not d.duplicate
        if d.late_seconds and d.event.type == "session.ended":
            self.late_ends.add(d.event.session_id)
        if d.event.event_id not in self.seen:
            self.seen.add(d.event.event_id)
            self.stats.distinct_events += 1

    def post_batch(self, run: list[Delivery]) -> None:
        if not run:
            return
        bodies = [d.event.body() for d in run]
        retry = self.should_retry()
        if retry:
            self.timed_out_post(run, bodies)
        self.stats.posts += 1
        results = self.client.post_batch(bodies)
        retry = retry or self.client.last_retried
        for d, body, result in zip(run, bodies, results):
            self.count(d)
            expected = self.oracle.post(body, self.now)
            got = _batch_outcome(result)
            self.check(d, expected, got, retried=retry)

    def should_retry(self) -> bool:
        if self.forced_retries and self.now >= self.forced_retries[0]:
            self.forced_retries.pop(0)
            return True
        return self.rng.random() < 0.003

    def timed_out_post(self, run: list[Delivery], bodies: list[dict]) -> None:
        """The client gives up waiting; the server may still apply the batch. Then retry."""
        self.stats.timeout_retries += 1
        before = self.client.head()
        try:
            self.client.post_batch(bodies, timeout=httpx.Timeout(10.0, read=0.001))
        except httpx.TransportError:  # timed out (or the connection dropped): retry below
            pass
        if self.settled_head() != before:  # the server applied the first attempt
            self.stats.timeout_applied += 1
            for body in bodies:
                self.oracle.post(body, self.now)
        self.stats.posts += 1

    def settled_head(self, quiet_seconds: float = 0.25, limit_seconds: float = 10.0) -> int:
        """The event log's head once it stopped moving: the abandoned request is done."""
        head, since = self.client.head(), time.monotonic()
        deadline = since + limit_seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now_head = self.client.head()
            if now_head != head:
                head, since = now_head, time.monotonic()
            elif time.monotonic() - since >= quiet_seconds:
                break
        return head

    def post_single(self, d: Delivery) -> None:
        self.stats.posts += 1
        self.stats.singles += 1
        body = d.event.body()
        response = self.client.post_one(body)
        self.count(d)
        expected = self.oracle.post(body, self.now)
        payload = response.json()
        if response.status_code in (200, 201):
            replayed = response.headers.get("Idempotent-Replayed") == "true"
            if replayed != (response.status_code == 200) and not self.client.last_retried:
                self.differ(f"{d.event.event_id}: status {response.status_code} with "
                            f"Idempotent-Replayed={response.headers.get('Idempotent-Replayed')}")
            got = Outcome(True, replayed=replayed, result=payload)
        else:
            got = Outcome(False, code=payload.get("code", f"http_{response.status_code}"))
        self.check(d, expected, got, retried=self.client.last_retried)

    def check(self, d: Delivery, expected: Outcome, got: Outcome, retried: bool = False) -> None:
        ev = d.event
        label = f"post {ev.event_id} {ev.type} {ev.session_id or ''} at {self.now:%H:%M}".rstrip()
        if not got.accepted:
            self.stats.refusals[got.code] += 1
            self.stats.refusals_by_type[f"{ev.type}: {got.code}"] += 1
            if ev.type in OPENING_TYPES and ev.session_id:  # refused: nothing follows
                self.cancelled.add(ev.session_id)
            elif got.code in ("session_ended", "session_settled") and ev.session_id:
                self.closed.add(ev.session_id)
        elif got.result and got.result.get("state") in ("ended", "settled") and ev.session_id:
            self.closed.add(ev.session_id)
        if expected.accepted != got.accepted or expected.code != got.code:
            want = "accepted" if expected.accepted else expected.code
            have = "accepted" if got.accepted else got.code
            self.differ(f"{label}: ledger {have}, oracle {want}")
            return
        if not got.accepted:
            return
        if expected.replayed != got.replayed and not retried:
            self.differ(f"{label}: ledger replayed={got.replayed}, "
                        f"oracle replayed={expected.replayed}")
        for key in COMPARED_RESULT_KEYS:
            if expected.result and key in expected.result:
                if (got.result or {}).get(key) != expected.result[key]:
                    self.differ(f"{label}: result {key} ledger {(got.result or {}).get(key)!r}, "
                                f"oracle {expected.result[key]!r}")

    # ---- ticks

    def tick(self, t: datetime) -> None:
        work = Counter()
        consultation_steps: list[dict] = []
        for _ in range(MAX_TICK_CALLS):
            try:
                report = self.client.tick(t)
            except ServiceError as exc:  # reported; the day goes on so the damage shows
                self.stats.tick_errors += 1
                if self.stats.tick_errors <= 20:
                    self.differ(f"tick {iso(t)}: {exc}")
                break
            self.stats.tick_calls += 1
            for name in ("charged", "ended", "settled", "expired"):
                work[name] += (report.get("counts") or {}).get(name, 0)
            consultation_steps += report.get("consultations") or []
            if not report.get("more"):
                break
        self.stats.ticks += 1
        predicted = self.oracle.tick(t)
        expected = {"charged": predicted.charged, "ended": predicted.ended,
                    "settled": predicted.settled, "expired": predicted.expired}
        self.stats.tick_work.update(work)
        if any(work[k] != v for k, v in expected.items()):
            self.differ(f"tick {iso(t)}: ledger {dict(work)}, oracle {expected}")
        predicted = self.market.tick(t)
        self.stats.tick_work["consultation steps"] += len(consultation_steps)
        key = lambda step: json.dumps(step, sort_keys=True)  # noqa: E731 - order within a tick is free
        if sorted(map(key, consultation_steps)) != sorted(map(key, predicted)):
            self.differ(f"tick {iso(t)}: consultations ledger {sorted(map(key, consultation_steps))}"
                        f", oracle {sorted(map(key, predicted))}")


def _batch_outcome(item: dict) -> Outcome:
    status = int(item.get("status", 0))
    if status in (200, 201):
        return Outcome(True, replayed=status == 200, result=item.get("result") or {})
    problem = item.get("problem") or {}
    return Outcome(False, code=problem.get("code", f"http_{status}"))


# ---------------------------------------------------------------------------- comparing


def compare_all(driver: Driver, reader: Reader) -> dict:
    """Read every session, patient and doctor over HTTP and compare with the oracle."""
    sc, oracle = driver.sc, driver.oracle
    now = driver.now
    sessions = reader.map([f"/v1/sessions/{s.session_id}" for s in sc.sessions])
    patients = reader.map([f"/v1/patients/{p}/balance" for p in sc.patients])
    doctors = reader.map([f"/v1/doctors/{d}/wallet" for d in sorted(sc.doctors)])
    for plan, response in zip(sc.sessions, sessions):
        compare_session(driver, plan.session_id, response)
    units = oracle.patient_units()
    for patient, response in zip(sc.patients, patients):
        compare_patient(driver, patient, response, now, units)
    money: dict[str, Counter] = {}
    for doctor, response in zip(sorted(sc.doctors), doctors):
        for wallet in compare_doctor(driver, doctor, response):
            money.setdefault(wallet["currency"], Counter()).update(
                {k: v for k, v in wallet.items() if k.endswith("_minor")})
    return {c: dict(v) for c, v in sorted(money.items())}


def compare_session(driver: Driver, sid: str, response: Reply) -> None:
    oracle = driver.oracle
    if sid not in oracle.sessions:
        if response.status_code != 404:
            driver.differ(f"session {sid}: ledger has it ({response.status_code}), "
                          "oracle refused it")
        return
    if response.status_code != 200:
        driver.differ(f"session {sid}: ledger {response.status_code}, oracle has it")
        return
    got, want = response.json(), oracle.session_facts(sid)
    statement = got.get("statement") or {}
    settlement = statement.get("settlement") or {}
    pay = statement.get("doctor_pay") or {}
    blocks = statement.get("blocks") or []
    have = {
        "state": got.get("state"), "started_at": got.get("started_at"),
        "ended_at": got.get("ended_at"), "end_reason": got.get("end_reason"),
        "paid_until": got.get("paid_until"),
        "charges": sorted(c["block"] for c in statement.get("charges", [])),
        "reversals": sorted(c["block"] for c in statement.get("reversals", [])),
        "holds": sorted(b["block"] for b in blocks if b.get("status") == "held"),
        "units_owed": settlement.get("units_owed"),
        "charge_pools": {c["block"]: c["pool_id"] for c in statement.get("charges", [])},
        "pay_per_unit_minor": pay.get("per_unit_minor"), "currency": pay.get("currency"),
    }
    for key, value in want.items():
        if have.get(key) != value:
            driver.differ(f"session {sid}: {key} ledger {have.get(key)!r}, oracle {value!r}")


def compare_patient(driver: Driver, patient: str, response: Reply, now: datetime,
                    all_units: dict) -> None:
    oracle = driver.oracle
    if response.status_code == 404 and not oracle.patients.get(patient, {}).get("pools"):
        if (response.json() or {}).get("code") != "unknown_patient":
            driver.differ(f"patient {patient}: 404 {response.text[:200]}")
        return  # a patient with no pool is unknown to the ledger (issue 9 §4)
    if response.status_code != 200:
        driver.differ(f"patient {patient}: balance {response.status_code}")
        return
    got = response.json()
    units = all_units.get(patient) or {b: {"held": 0, "charged": 0} for b in KINDS}
    refs = oracle.patients.get(patient, {}).get("pools", [])
    for bucket in KINDS:
        have = (got.get("buckets") or {}).get(bucket, {})
        want = {"held": units[bucket]["held"], "charged": units[bucket]["charged"],
                "usable_now": oracle.usable_now(patient, bucket, now),
                "available": sum(oracle.pools[r].free[bucket] for r in refs
                                 if _counts_as_available(oracle.pools[r], patient, now))}
        for key, value in want.items():
            if have.get(key) != value:
                driver.differ(f"patient {patient} {bucket}: {key} ledger {have.get(key)!r}, "
                              f"oracle {value!r}")
    pools_got = {p["pool_id"]: p for p in got.get("pools") or []}
    pools_want = {oracle.pools[r].pid: r for r in refs}
    if set(pools_got) != set(pools_want):
        driver.differ(f"patient {patient}: pools ledger {sorted(pools_got)}, "
                      f"oracle {sorted(pools_want)}")
    for pid, ref in pools_want.items():
        if pid not in pools_got:
            continue
        want = oracle.pool_numbers(ref)
        for bucket in KINDS:
            have = pools_got[pid]["buckets"].get(bucket, {})
            for key, value in want[bucket].items():
                if have.get(key) != value:
                    driver.differ(f"pool {ref} {bucket}: {key} ledger {have.get(key)!r}, "
                                  f"oracle {value!r}")


def _counts_as_available(pool, patient: str, now: datetime) -> bool:
    """`available` (§4): free units of the pools the patient may draw on, usable yet or not."""
    if pool.expired or pool.refunded:
        return False
    if patient == pool.owner:
        return True
    span = pool.members.get(patient)
    return bool(span) and (span[1] is None or now < span[1])


def compare_doctor(driver: Driver, doctor: str, response: httpx.Response | Reply) -> list[dict]:
    if response.status_code != 200:
        driver.differ(f"doctor {doctor}: wallet {response.status_code}")
        return []
    wallets = {w["currency"]: w for w in response.json().get("wallets") or []}
    want = driver.oracle.wallet_numbers(doctor)
    zero = {"pending_minor": 0, "available_minor": 0, "held_minor": 0, "withdrawn_minor": 0}
    for currency in sorted(set(wallets) | set(want)):
        have, expected = wallets.get(currency, {}), {**zero, **want.get(currency, {})}
        for key, value in expected.items():
            if have.get(key, 0) != value:
                driver.differ(f"doctor {doctor} {currency}: {key} ledger {have.get(key, 0)!r}, "
                              f"oracle {value!r}")
    return list(wallets.values())


# ---------------------------------------------------------------------------- summary


def summarize(driver: Driver, money: dict, wall_seconds: float) -> dict:
    oracle, stats = driver.oracle, driver.stats
    outcomes: dict[str, Counter] = {k: Counter() for k in KINDS}
    units = Counter()
    reversals = exhaustions = 0
    for plan in driver.sc.sessions:
        s = oracle.sessions.get(plan.session_id)
        if s is None:
            outcomes[plan.kind]["(refused)"] += 1
            continue
        outcomes[plan.kind][s.end_reason or s.state] += 1
        units[s.kind] += len(s.charges)
        reversals += len(s.reversals)
        exhaustions += s.end_reason == "balance_exhausted"
    reasons = Counter(r for k in outcomes.values() for r in k.elements())
    return {
        "scenario": driver.sc.describe(),
        "sessions_by_kind_and_outcome": {k: dict(sorted(v.items())) for k, v in outcomes.items()},
        "units_charged": dict(units), "reversals": reversals,
        "sessions_with_reversal": sum(1 for s in oracle.sessions.values() if s.reversals),
        "reversals_after_late_end": sum(
            1 for sid in driver.late_ends
            if sid in oracle.sessions and oracle.sessions[sid].reversals),
        "exhaustions": exhaustions,
        "exhausted_ever": sum(1 for s in oracle.sessions.values() if s.exhausted),
        "contentions": oracle.contentions,
        "timeouts": {r: reasons[r] for r in ("not_started", "doctor_no_response", "missed",
                                             "idle_timeout", "max_duration", "declined")},
        "refusals": dict(sorted(stats.refusals.items())),
        "refusals_by_event_type": dict(sorted(stats.refusals_by_type.items())),
        "money": money,
        "events_posted": stats.events_posted, "distinct_events": stats.distinct_events,
        "http_posts": stats.posts, "duplicates": stats.duplicates, "late": stats.late,
        "single_posts": stats.singles, "swaps": stats.swaps,
        "timeout_retries": stats.timeout_retries, "timeout_applied": stats.timeout_applied,
        "dropped_after_refusal": stats.dropped,
        "ticks": stats.ticks, "tick_calls": stats.tick_calls, "tick_errors": stats.tick_errors,
        "transport_retries": getattr(driver.client, "transport_retries", 0),
        "tick_work": dict(stats.tick_work),
        "wall_seconds": round(wall_seconds, 1),
        "http_seconds": {k: round(v, 1) for k, v in sorted(driver.client.seconds.items())}
        if hasattr(driver.client, "seconds") else {},
        "events_per_second": round(stats.events_posted / wall_seconds, 1) if wall_seconds else 0.0,
    }


def check_webhooks(driver: Driver, client: Client, receiver: Receiver,
                   console=None) -> WebhookComparison:
    """Wait (bounded) until the service has nothing left to deliver and the receiver has at
    least the expected number of notifications, then compare them with the expectation."""
    expected_total = sum(sum(c.values()) for c in driver.oracle.expected.values())
    deadline = time.monotonic() + WEBHOOK_DRAIN_SECONDS
    # The receiver polls every 50 ms; then the service must have nothing pending either (an
    # unexpected extra delivery would still be on its way), asked again every 50 ms.
    while receiver.wait_for(expected_total, timeout=max(0.0, deadline - time.monotonic())):
        if client.undelivered_webhooks() == 0 or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    result = compare(driver.oracle.expected, receiver.snapshot(), len(receiver.rejected))
    for line in result.differences():
        driver.differ(line)
    return result


def webhook_summary(result: WebhookComparison | None, note: str = "") -> dict:
    if result is None:
        return {"skipped": note}
    return {"by_type": {t: {k: v for k, v in r.items() if k != "examples"}
                        for t, r in result.rows.items()},
            "missing": result.missing, "unexpected": result.unexpected,
            "redeliveries": result.redeliveries, "out_of_order": len(result.out_of_order),
            "rejected": result.rejected}


def render_webhooks(console, webhooks: dict) -> None:
    from rich.table import Table

    if "skipped" in webhooks:
        console.print(f"Webhooks not checked: {webhooks['skipped']}")
        return
    table = Table(title="Webhook notifications by type (receiver vs the oracle's expectation)")
    for column in ("type", "expected", "delivered", "missing", "unexpected"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for event_type, row in webhooks["by_type"].items():
        table.add_row(event_type, *(str(row[k]) for k in ("expected", "delivered", "missing",
                                                          "unexpected")))
    table.add_row("total", *(str(sum(r[k] for r in webhooks["by_type"].values()))
                             for k in ("expected", "delivered", "missing", "unexpected")))
    console.print(table)
    console.print(f"webhooks: {webhooks['missing']} missing, {webhooks['unexpected']} "
                  f"unexpected, {webhooks['redeliveries']} redelivered with the same id, "
                  f"{webhooks['out_of_order']} out of order per session/patient/pool/wallet, "
                  f"{webhooks['rejected']} failed signature verification")


def render(console, summary: dict, differences: list[str], replay: dict) -> None:
    from rich.table import Table

    market = summary.get("marketplace") or {}
    if market.get("consultations_by_outcome"):
        table = Table(title="Priced consultations (§10)")
        table.add_column("outcome")
        table.add_column("count", justify="right")
        for outcome, n in market["consultations_by_outcome"].items():
            table.add_row(outcome, str(n))
        table.add_row("(booking refused)", str(market["consultations_refused"]))
        for earning, n in sorted(market["refunds"].items()):
            table.add_row(f"refunded, earning {earning}", str(n))
        for currency, a in market["accounts"].items():
            for key in ("captured_minor", "refunded_minor", "platform_minor",
                        "tax_payable_minor"):
                table.add_row(f"{currency} {key.removesuffix('_minor')}",
                              f"{a[key] / 100:,.2f}")
        console.print(table)

    table = Table(title="Sessions by kind and outcome")
    reasons = sorted({r for v in summary["sessions_by_kind_and_outcome"].values() for r in v})
    table.add_column("outcome")
    for kind in KINDS:
        table.add_column(kind, justify="right")
    for reason in reasons:
        table.add_row(reason, *(str(summary["sessions_by_kind_and_outcome"][k].get(reason, 0))
                                for k in KINDS))
    console.print(table)
    facts = Table(title="Simulation")
    facts.add_column("measure")
    facts.add_column("value", justify="right")
    rows = [
        ("units charged (text/voice/video)", "/".join(str(summary["units_charged"].get(k, 0))
                                                      for k in KINDS)),
        ("reversed units", summary["reversals"]),
        ("  after a late end report", summary["reversals_after_late_end"]),
        ("balance exhausted", summary["exhaustions"]),
        ("family-pool contentions", summary["contentions"]),
        *((f"refused: {code}", n) for code, n in summary["refusals"].items()),
        *((f"{cur} {k.removesuffix('_minor')}", f"{v / 100:,.2f}")
          for cur, m in summary["money"].items() for k, v in sorted(m.items())
          if k in ("pending_minor", "available_minor", "held_minor", "withdrawn_minor")),
        ("events posted (distinct)", f"{summary['events_posted']} ({summary['distinct_events']})"),
        ("HTTP posts", summary["http_posts"]), ("duplicates", summary["duplicates"]),
        ("late deliveries", summary["late"]), ("swapped in batch", summary["swaps"]),
        ("retries after a client timeout", summary["timeout_retries"]),
        ("ticks", summary["ticks"]),
        ("wall time", f"{summary['wall_seconds']} s"),
        *((f"  {name}", f"{seconds} s (CPU: this process "
                        f"{summary.get('driver_cpu_seconds', {}).get(name, '–')} s, service "
                        f"{summary.get('service_cpu_seconds', {}).get(name, '–')} s)")
          for name, seconds in summary.get("phase_seconds", {}).items()),
        *((f"  HTTP {name}", f"{seconds} s")
          for name, seconds in summary.get("http_seconds", {}).items()),
        ("events/s", summary["events_per_second"]),
        ("replay audit", replay.get("status", "")),
        ("differences", len(differences)),
    ]
    for name, value in rows:
        facts.add_row(str(name), str(value))
    console.print(facts)
    render_webhooks(console, summary.get("webhooks", {"skipped": "not run"}))


# ------------------------------------------------------------------------------ entry


class Phases:
    """Wall time, and the CPU of this process and of the service it started, per phase of a
    run (seconds), in the order the phases ended."""

    def __init__(self) -> None:
        self.service: ServiceProcess | None = None
        self.service_cpu_at_stop: float | None = None
        self.started = self._mark = time.monotonic()
        self._cpu_mark = time.process_time()
        self._service_mark = 0.0
        self.wall: dict[str, float] = {}
        self.driver_cpu: dict[str, float] = {}
        self.service_cpu: dict[str, float] = {}

    def end(self, name: str) -> None:
        now, cpu = time.monotonic(), time.process_time()
        self.wall[name], self._mark = now - self._mark, now
        self.driver_cpu[name], self._cpu_mark = cpu - self._cpu_mark, cpu
        service = self.service.cpu_seconds() if self.service is not None else None
        if service is None:  # stopped (or not ours): its last reading before the stop
            service = self.service_cpu_at_stop
        if service is not None:
            self.service_cpu[name], self._service_mark = service - self._service_mark, service

    def total(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> dict:
        rounded = lambda d: {k: round(v, 1) for k, v in d.items()}  # noqa: E731
        return {"phase_seconds": rounded(self.wall), "driver_cpu_seconds": rounded(self.driver_cpu),
                "service_cpu_seconds": rounded(self.service_cpu)}



def replay_audit(database_url: str) -> tuple[bool, dict]:
    """Run the auditor's `ledger replay --verify` on the service's database, from outside
    (a subprocess, as an operator would); (passed, {events, differences, notes})."""
    env = {**os.environ, "LEDGER_DATABASE_URL": database_url, "COLUMNS": "1000",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "replay", "--verify"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=REPLAY_TIMEOUT_SECONDS)
    lines = done.stdout.splitlines()
    replayed = next((line for line in lines if line.startswith("replayed ")), "")
    events = int(replayed.split()[1]) if replayed else None
    differences = [line.removeprefix("DIFF ").strip() for line in lines if line.startswith("DIFF")]
    notes = [] if done.returncode in (0, 1) else [done.stderr[-2000:]]
    return done.returncode == 0, {"events": events, "differences": differences[:20], "notes": notes}


def run_simulation(*, seed: int = 7, patients: int = 1000, doctors: int = 100,
                   sessions: int = 3000, practitioners: int = 30, consultations: int = 300,
                   base_url: str | None = None,
                   database_url: str | None = None, workdir: Path = Path("var/sim"),
                   console=None, api_key: str | None = None,
                   webhooks_checked: bool = True) -> SimulationReport:
    """Simulate one day against the service (started here unless `base_url` is given).

    `webhooks_checked=False`: no receiver is registered, so the service derives every
    notification (the outbox) but sends none, and none is compared (the day as it was before
    webhooks, for comparing times with older runs).

    A service given by `base_url` must run a manual clock with the in-process tick disabled
    (the driver ticks) and accept `api_key` (default `$LEDGER_SIM_API_KEY` or `sim-admin`) as
    an admin key; `database_url` (its database) enables the replay audit.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    service = None
    phases = Phases()
    if base_url is None:
        service = ServiceProcess(Path(workdir))
        base_url, database_url = service.base_url, service.database_url
        phases.service = service
    client = Client(base_url, api_key or os.environ.get("LEDGER_SIM_API_KEY", ADMIN_KEY))
    receiver, webhooks, webhook_note = Receiver(keep_alive=True), None, ""
    try:
        if service is not None:
            service.wait_ready()
        secret, webhook_note = (client.register_webhook(receiver.url) if webhooks_checked
                                else (None, "no receiver registered (--no-webhooks)"))
        if secret is not None:
            receiver.secrets.append(secret)
        day_start = next_midnight(client.clock())
        scenario = build_scenario(seed=seed, patients=patients, doctors=doctors,
                                  sessions=sessions, day_start=day_start,
                                  practitioners=practitioners, consultations=consultations)
        described = scenario.describe()
        console.print(f"Simulating {day_start:%Y-%m-%d} (seed {seed}): {described['patients']} "
                      f"patients, {described['doctors']} doctors, "
                      f"{described['sessions']} sessions, "
                      f"{described.get('consultations', 0)} priced consultations with "
                      f"{described.get('practitioners', 0)} practitioners, "
                      f"{described['events']} events + {described['duplicates']} duplicates "
                      f"against {base_url}")
        driver = Driver(scenario, client, console)
        phases.end("setup")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("setting up", total=len(scenario.deliveries))
            driver.run(progress, task)
        phases.end("day")
        console.print(f"Day done at {driver.now:%Y-%m-%d %H:%M} UTC; comparing every session, "
                      "patient and doctor")
        reader = Reader(client, base_url, api_key or os.environ.get("LEDGER_SIM_API_KEY",
                                                                   ADMIN_KEY))
        try:
            money = compare_all(driver, reader)
        finally:
            reader.close()
        accounts = compare_marketplace(driver, client)
        phases.end("compare")
        if secret is not None:
            webhooks = check_webhooks(driver, client, receiver, console)
            phases.end("webhooks")
    finally:
        receiver.close()
        client.close()
        if service is not None:
            phases.service_cpu_at_stop = service.cpu_seconds()
            service.stop()
    replay: dict = {"status": "skipped (no database URL)"}
    replay_ok: bool | None = None
    if database_url:
        replay_ok, details = replay_audit(database_url)
        replay = {"status": "ok" if replay_ok else "FAILED", **details}
        for diff in details["differences"]:
            console.print(f"[red]REPLAY[/red] {diff}", highlight=False)
    phases.end("replay")
    summary = summarize(driver, money, phases.total())
    summary.update(phases.summary())
    summary["marketplace"] = market_summary(driver, accounts)
    summary["replay"] = replay
    summary["webhooks"] = webhook_summary(webhooks, webhook_note)
    render(console, summary, driver.differences, replay)
    if driver.differences:
        for diff in driver.differences[30:PRINTED_DIFFERENCES]:
            console.print(f"[red]DIFF[/red] {diff}", highlight=False)
        hidden = len(driver.differences) - PRINTED_DIFFERENCES
        console.print(f"[red]{len(driver.differences)} differences[/red]"
                      + (f" ({hidden} not printed; see SimulationReport.differences)"
                         if hidden > 0 else ""))
    else:
        console.print("[green]No differences between the ledger and the oracle.[/green]")
    return SimulationReport(differences=driver.differences, replay_ok=replay_ok, summary=summary)


def main() -> int:  # pragma: no cover - `python -m simulation.driver`
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--doctors", type=int, default=100)
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--practitioners", type=int, default=30)
    parser.add_argument("--consultations", type=int, default=300)
    parser.add_argument("--base-url")
    parser.add_argument("--database-url")
    parser.add_argument("--workdir", type=Path, default=Path("var/sim"))
    parser.add_argument("--no-webhooks", action="store_true")
    args = parser.parse_args()
    report = run_simulation(seed=args.seed, patients=args.patients, doctors=args.doctors,
                            sessions=args.sessions, practitioners=args.practitioners,
                            consultations=args.consultations, base_url=args.base_url,
                            database_url=args.database_url, workdir=args.workdir,
                            webhooks_checked=not args.no_webhooks)
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
