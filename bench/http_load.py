"""The write path measured from outside: the real service (`ledger serve`, one uvicorn worker,
its own fresh store, the scheduler's tick off) loaded by client threads over HTTP, each on
one kept-alive HTTP/1.1 connection (`http.client`, bodies by orjson: a quarter of httpx's CPU
per request; the load generator shares the machine's two cores with the service, its followers
and PostgreSQL, so what it spends is taken from what is measured).

The workload is a realistic mix of sessions over many patients. Each client owns its patients
and posts its own stream in order, window after window of WINDOW new patients:
doctor.registered and subscription.granted for each, then a text session each (requested,
text.activated, two session.activity, session.ended), then a voice session each (requested,
call.connected, two session.activity, session.ended), the sessions of a window interleaved
step by step: 12 events per patient. occurred_at values are a little before the service's
wall clock. Every event must be accepted (201); anything else is counted and reported.

- `closed_loop`: `clients` threads, each posting its next `batch` events (one event alone
  when batch == 1) as soon as the previous answer arrives, for `seconds`.
- `open_loop`: `lanes` threads pacing single events at a fixed total rate; request k of the
  run is scheduled at start + k / rate on lane k mod lanes, and its latency runs from that
  scheduled instant (a lane that falls behind sends late and the delay counts: no coordinated
  omission).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
import orjson
import psutil

from bench.together import run_together
from simulation.driver import kept_alive_request

REPO_ROOT = Path(__file__).resolve().parent.parent
KEY = "dev-backend"  # the default LEDGER_API_KEYS' backend key
WINDOW = 20  # patients whose sessions are interleaved in one client's stream


# --------------------------------------------------------------------------- the service


@dataclass
class Served:
    """A running service: its base URL and process id."""

    base_url: str
    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the service process has used so far."""
        return process_cpu_seconds(self.pid)

    def children_cpu_seconds(self) -> float:
        """The same for its live child processes (the followers' process, runtime/followers.py;
        uvicorn's workers when there are several)."""
        return children_cpu_seconds(self.pid)


def children_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the live children of `pid` (psutil); a child that ends
    while being read counts 0 here (once reaped, its parent's children times hold it)."""
    total = 0.0
    for child in psutil.Process(pid).children():
        try:
            total += _cpu(child.cpu_times())
        except psutil.NoSuchProcess:  # ended between the listing and the read
            pass
    return total


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its threads so far (psutil); raises
    psutil.NoSuchProcess once it is gone."""
    return _cpu(psutil.Process(pid).cpu_times())


def _cpu(times: Any) -> float:
    return times.user + times.system


def ledger_env(database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a `python -m runtime.cli …` child on `database_url`: this process's
    own, warnings-only logs, `settings` (LEDGER_… names), and the repository on PYTHONPATH."""
    return {**os.environ, "LEDGER_DATABASE_URL": database_url, "LEDGER_LOG_LEVEL": "warning",
            **settings, "PYTHONPATH": os.pathsep.join(filter(None, (
                str(REPO_ROOT), os.environ.get("PYTHONPATH"))))}


@contextmanager
def service(database_url: str, log_path: Path, extra_env: dict[str, str] | None = None
            ) -> Iterator[Served]:
    """`ledger serve` (one worker, tick off) on `database_url`; yields it once healthy; stopped
    with SIGINT (then SIGKILL after 15 s) afterwards."""
    port = _free_port()
    env = ledger_env(database_url, **{"LEDGER_TICK_ENABLED": "false", "LEDGER_PORT": str(port),
                                      **(extra_env or {})})
    env.pop("LEDGER_API_KEYS", None)  # the default keys: KEY is the backend's
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--port", str(port)],
                                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base_url, log_path)
        yield Served(base_url, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _wait_ready(proc: subprocess.Popen, base_url: str, log_path: Path,
                timeout_seconds: float = 90) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(base_url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the service did not become healthy; see {log_path}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the workload


def stream(prefix: str, base: datetime) -> Iterator[dict]:
    """One client's endless event stream (module docstring); ids start with `prefix`."""
    window, k = 0, 0
    while True:
        patients = [f"{prefix}p{window}_{i}" for i in range(WINDOW)]
        at = base + timedelta(seconds=window)
        for event_type, payload, offset in _window(patients, at):
            k += 1
            yield {"event_id": f"{prefix}e{k}", "type": event_type,
                   "occurred_at": (at + offset).isoformat(), "payload": payload}
        window += 1


def _window(patients: list[str], at: datetime) -> Iterator[tuple[str, dict, timedelta]]:
    zero = timedelta(0)
    for patient in patients:
        yield "doctor.registered", {"doctor_id": "d" + patient, "country": "MW"}, zero
        yield "subscription.granted", {
            "payment_reference": "pay" + patient, "owner_id": patient,
            "starts_at": (at - timedelta(days=1)).isoformat(),
            "plan": {"name": "Life Max", "price_minor": 15_900_000, "currency": "MWK",
                     "units": {"text": 10, "voice": 7, "video": 4}, "seats": 1,
                     "duration_days": 30}}, zero
    for kind, start in (("text", "text.activated"), ("voice", "call.connected")):
        shift = timedelta(minutes=10 if kind == "voice" else 0)
        steps = [("session.requested", lambda p: {"kind": kind, "patient_id": p,
                                                  "doctor_id": "d" + p}, timedelta(seconds=1)),
                 (start, lambda p: {}, timedelta(seconds=20)),
                 ("session.activity", lambda p: {}, timedelta(minutes=2)),
                 ("session.activity", lambda p: {}, timedelta(minutes=4)),
                 ("session.ended", lambda p: {"ended_by": "patient", "reason": "completed"},
                  timedelta(minutes=6))]
        for event_type, extra, offset in steps:
            for patient in patients:
                yield event_type, {"session_id": f"{patient}{kind}", **extra(patient)}, \
                    shift + offset


def base_instant() -> datetime:
    """occurred_at of a run's first events: an hour before now (within the accepted window,
    and every session of a run of minutes stays in the past)."""
    return datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)


# ----------------------------------------------------------------------------- the load


@dataclass
class Tally:
    """Events accepted, answers other than 201 (by status) and per-request latencies (s)."""

    accepted: int = 0
    other: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def add(self, statuses: list[int]) -> None:
        for status in statuses:
            if status == 201:
                self.accepted += 1
            else:
                self.other[status] = self.other.get(status, 0) + 1

    def merge(self, other: "Tally") -> None:
        self.accepted += other.accepted
        for status, count in other.other.items():
            self.other[status] = self.other.get(status, 0) + count
        self.latencies += other.latencies


class _Client:
    """One client's kept-alive HTTP/1.1 connection to the service (http.client reconnects by
    itself after the server closed it). A request is never sent twice: a transport error
    raises, as httpx would."""

    HEADERS = {"X-API-Key": KEY, "Content-Type": "application/json"}

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=120)

    def post(self, path: str, body: object) -> tuple[int, bytes]:
        """(status, response body) of POST `path` with `body` as JSON."""
        reply = kept_alive_request(self.conn, "POST", path, orjson.dumps(body), self.HEADERS,
                                   attempts=1)
        return reply.status_code, reply.content

    def __enter__(self) -> "_Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _post(client: _Client, events: list[dict]) -> list[int]:
    """POST one event (a list of one) or a batch; returns each event's status."""
    if len(events) == 1:
        return [client.post("/v1/events", events[0])[0]]
    status, body = client.post("/v1/events", {"events": events})
    if status != 200:
        return [status] * len(events)
    return [item["status"] for item in orjson.loads(body)["results"]]


def closed_loop(base_url: str, clients: int, batch: int, seconds: float) -> tuple[float, Tally]:
    """(events accepted per second, tally) of `clients` closed-loop clients (module docstring)."""
    run, base = uuid.uuid4().hex[:6], base_instant()
    tallies = [Tally() for _ in range(clients)]
    deadline = [0.0]

    def client(index: int, ready: threading.Barrier) -> None:
        events = stream(f"{run}c{index}", base)
        with _Client(base_url) as http:
            ready.wait()
            while time.perf_counter() < deadline[0]:
                chunk = [next(events) for _ in range(batch)]
                started = time.perf_counter()
                tallies[index].add(_post(http, chunk))
                tallies[index].latencies.append(time.perf_counter() - started)

    def arm() -> float:
        deadline[0] = time.perf_counter() + seconds
        return time.perf_counter()

    elapsed = run_together(clients, client, arm)
    return _rate(tallies, elapsed)


def open_loop(base_url: str, lanes: int, rate: float, seconds: float) -> tuple[float, Tally]:
    """(events accepted per second, tally with latencies from the scheduled instants) of
    single events paced at `rate` per second over `lanes` threads (module docstring)."""
    run, base = uuid.uuid4().hex[:6], base_instant()
    rate = max(rate, 1.0)  # a closed loop that accepted nothing still paces something
    total_requests = max(lanes, int(rate * seconds))
    tallies = [Tally() for _ in range(lanes)]
    start = [0.0]

    def lane(index: int, ready: threading.Barrier) -> None:
        events = stream(f"{run}l{index}", base)
        with _Client(base_url) as http:
            ready.wait()
            for k in range(index, total_requests, lanes):
                scheduled = start[0] + k / rate
                pause = scheduled - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                tallies[index].add(_post(http, [next(events)]))
                tallies[index].latencies.append(time.perf_counter() - scheduled)

    def arm() -> float:
        start[0] = time.perf_counter() + 0.05
        return start[0]

    elapsed = run_together(lanes, lane, arm)
    return _rate(tallies, elapsed)


def _rate(tallies: list[Tally], elapsed: float) -> tuple[float, Tally]:
    """(events accepted per second over `elapsed` seconds, the threads' tallies merged)."""
    total = Tally()
    for tally in tallies:
        total.merge(tally)
    return total.accepted / elapsed, total


def percentile(values: list[float], fraction: float) -> float:
    """The `fraction` quantile of `values` (nearest rank); 0.0 if empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
