"""The crash test: SIGKILL the running service again and again while clients post, then prove
nothing acknowledged was lost and nothing was charged twice.

`run_crash_test(kills, store_url, …)` starts `ledger serve --workers N` (its own process group,
1-second ticks, settlement without grace) on a fresh store, lets `clients` threads post a
realistic stream (doctors, pools of 1–4 units, text/voice/video sessions with activity and
ends dated in the past, so ticks charge, exhaust, time out and settle while posts arrive;
single posts and batches; every post retried with the same event ids after a connection error
or a 503 — the client's only honest move when it cannot know what happened) and one admin
client posting ticks, and SIGKILLs the whole process group at random moments `kills` times,
restarting it each time. Afterwards, on the restarted service and the exported event log:
- every acknowledged event (a 200/201 answer, or 200/201 item of a batch) has its receipt;
- no (session, block) is charged twice, by the pools or by the sessions;
- no balance or wallet amount read over HTTP is negative;
- every patient's charged units read over HTTP equal the charges minus reversals in the log;
- `ledger replay --verify` passes (the read models equal a rebuild from the log).
Drives the service only from outside (HTTP and the `ledger` CLI), like the simulation.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "crash-admin"
KINDS = ("text", "voice", "video")
MAX_POST_ATTEMPTS = 120  # per post; with the backoff below about a minute at most
CLI_TIMEOUT_SECONDS = 300


# ------------------------------------------------------------------------- the service


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """`ledger serve` as a subprocess in its own process group (so one killpg ends the
    supervisor and every worker). `env` adds to/overrides the environment."""

    def __init__(self, database_url: str, log_path: Path, workers: int = 1,
                 env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.database_url, self.log_path, self.workers = database_url, log_path, workers
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "LEDGER_DATABASE_URL": database_url,
                    "LEDGER_API_KEYS": f"{ADMIN_KEY}:admin",
                    "PROMETHEUS_MULTIPROC_DIR": str(log_path.parent / "metrics"),
                    "PYTHONPATH": os.pathsep.join(
                        filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH")))),
                    **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "serve", "--workers", str(self.workers),
             "--port", str(self.port)], cwd=REPO_ROOT, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.starts += 1

    def wait_ready(self, timeout_seconds: float = 90, path: str = "/readyz") -> None:
        """Until `path` answers 200; raises RuntimeError if the process exits or time is up."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode}; see "
                                   f"{self.log_path}")
            try:
                if httpx.get(self.base_url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the service did not become ready; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL the whole process group (supervisor and workers) and reap it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL after 30 s."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run `ledger <args>` on the service's store, as an operator would."""
        return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=REPO_ROOT,
                              env={**self.env, "COLUMNS": "1000"}, capture_output=True,
                              text=True, timeout=CLI_TIMEOUT_SECONDS)


# ------------------------------------------------------------------------- the workload


def iso(moment: datetime) -> str:
    """RFC 3339 UTC with a Z, whole seconds."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def story(rng: random.Random, client: int, number: int, now: datetime) -> list[dict]:
    """One patient's consultation as backend events, dated in the past so the ticks have blocks
    to charge: a doctor, a pool of 1–4 units per bucket, a session with activity and an end."""
    tag = f"c{client}-{number}"
    doctor, patient, session = f"doc-c{client}-{number % 5}", f"pat-{tag}", f"ses-{tag}"
    kind = rng.choice(KINDS)
    age_minutes = rng.randint(20, 50)
    start = now - timedelta(minutes=age_minutes)
    units = {bucket: rng.randint(1, 4) for bucket in KINDS}
    plan = {"name": "Crash", "price_minor": 1000, "currency": "MWK", "units": units, "seats": 1,
            "duration_days": 30}
    events = [
        ("doctor.registered", start - timedelta(days=1),
         {"doctor_id": doctor, "country": rng.choice(["MW", "KE", "ZM"])}),
        ("subscription.granted", start - timedelta(days=1),
         {"payment_reference": f"pay-{tag}", "owner_id": patient, "plan": plan,
          "starts_at": iso(start - timedelta(days=1))}),
        ("session.requested", start, {"session_id": session, "kind": kind, "patient_id": patient,
                                      "doctor_id": doctor}),
        ("text.activated" if kind == "text" else "call.connected", start + timedelta(minutes=1),
         {"session_id": session}),
    ]
    minutes = rng.randint(3, age_minutes)  # never in the future
    for minute in range(4, minutes, 4):
        events.append(("session.activity", start + timedelta(minutes=minute), {"session_id": session}))
    if rng.random() < 0.9:  # some ends are never reported: the idle timeout ends those
        events.append(("session.ended", start + timedelta(minutes=minutes),
                       {"session_id": session, "ended_by": rng.choice(["patient", "doctor"]),
                        "reason": "completed"}))
    return [{"event_id": f"{tag}-{i}-{type_}", "type": type_, "occurred_at": iso(at),
             "payload": payload} for i, (type_, at, payload) in enumerate(events)]


@dataclass
class Tally:
    """What the clients saw (thread-safe through `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    posted: set[str] = field(default_factory=set)
    acknowledged: set[str] = field(default_factory=set)
    refused: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    retries: int = 0
    gave_up: int = 0
    patients: set[str] = field(default_factory=set)
    doctors: set[str] = field(default_factory=set)


class Poster:
    """One backend client: posts with retries, remembers what was acknowledged."""

    def __init__(self, base_url: str, tally: Tally, rng: random.Random) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=15,
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        self.tally, self.rng = tally, rng

    def send(self, events: list[dict]) -> None:
        with self.tally.lock:
            self.tally.posted.update(e["event_id"] for e in events)
            for e in events:
                self.tally.patients.update(v for k, v in e["payload"].items() if k == "patient_id")
                self.tally.doctors.update(v for k, v in e["payload"].items() if k == "doctor_id")
        body = events[0] if len(events) == 1 else {"events": events}
        response = self._post(body)
        if response is None:
            return
        items = (response.json()["results"] if len(events) > 1 and response.status_code == 200
                 else [{"event_id": events[0]["event_id"], "status": response.status_code,
                        "problem": response.json() if response.status_code >= 400 else None}])
        with self.tally.lock:
            for item in items:
                if item["status"] in (200, 201):
                    self.tally.acknowledged.add(item["event_id"])
                elif item["status"] >= 500:
                    self.tally.server_errors.append(f"{item['event_id']}: {item['status']} "
                                                    f"{(item.get('problem') or {}).get('code')}")
                else:
                    self.tally.refused[(item.get("problem") or {}).get("code", "?")] += 1

    def _post(self, body: dict) -> httpx.Response | None:
        delay = 0.05
        for attempt in range(MAX_POST_ATTEMPTS):
            try:
                response = self.http.post("/v1/events", json=body)
            except httpx.TransportError:
                response = None  # killed mid-request: unknown outcome, retry the same ids
            if response is not None and response.status_code != 503:
                if response.status_code >= 500:
                    with self.tally.lock:
                        self.tally.server_errors.append(f"{response.status_code}: {response.text[:200]}")
                return response
            with self.tally.lock:
                self.tally.retries += 1
            time.sleep(delay * (0.5 + self.rng.random()))
            delay = min(delay * 2, 1.0)
        with self.tally.lock:
            self.tally.gave_up += 1
        return None

    def close(self) -> None:
        self.http.close()


def client_loop(number: int, base_url: str, tally: Tally, seed: int, stop: threading.Event) -> None:
    """One backend client posting stories (half as one batch, half event by event) until `stop`."""
    rng = random.Random(seed * 1000 + number)
    poster = Poster(base_url, tally, rng)
    try:
        for story_number in range(100_000):  # bounded; ends at `stop`
            if stop.is_set():
                return
            events = story(rng, number, story_number, datetime.now(timezone.utc))
            if rng.random() < 0.5:
                poster.send(events)  # one batch, applied in array order
            else:
                for event in events:
                    poster.send([event])
    finally:
        poster.close()


def ticker_loop(base_url: str, stop: threading.Event) -> None:
    """Admin ticks racing the scheduled ones; errors during a kill are expected and ignored."""
    with httpx.Client(base_url=base_url, timeout=15,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        while not stop.wait(0.3):
            try:
                http.post("/v1/ticks", json={})
            except httpx.TransportError:
                pass


# ---------------------------------------------------------------------------- checking


@dataclass
class CrashReport:
    """What the crash test saw and found; `ok` when nothing was lost, doubled or negative, no
    5xx was answered and the replay audit passed."""

    store: str
    kills: int
    workers: int
    posted: int = 0
    acknowledged: int = 0
    refused: dict = field(default_factory=dict)
    retries: int = 0
    gave_up: int = 0
    server_errors: list[str] = field(default_factory=list)
    events_in_log: int = 0
    blocks_charged: int = 0
    sessions_settled: int = 0
    lost: list[str] = field(default_factory=list)
    double_charges: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    charged_mismatch: list[str] = field(default_factory=list)
    replay_ok: bool = False
    replay_output: str = ""
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.acknowledged > 0 and not self.lost and not self.double_charges
                and not self.negative and not self.charged_mismatch and self.replay_ok
                and not self.server_errors)

    def lines(self) -> list[str]:
        return [
            f"crash test on {self.store}: {self.kills} SIGKILLs of {self.workers} worker(s) "
            f"in {self.wall_seconds:.0f} s",
            f"events posted {self.posted}, acknowledged {self.acknowledged}, refused "
            f"{sum(self.refused.values())} {dict(self.refused)}, client retries {self.retries}, "
            f"gave up {self.gave_up}, 5xx answers {len(self.server_errors)}",
            f"events in the log {self.events_in_log} ({self.blocks_charged} blocks charged, "
            f"{self.sessions_settled} sessions settled); acknowledged but lost {len(self.lost)}; "
            f"(session, block) charged twice {len(self.double_charges)}; negative amounts "
            f"{len(self.negative)}; HTTP charged ≠ log {len(self.charged_mismatch)}; "
            f"replay --verify {'ok' if self.replay_ok else 'FAILED'}",
            *(f"  {kind}: {item}" for kind, items in (
                ("lost", self.lost), ("double charge", self.double_charges),
                ("negative", self.negative), ("charged", self.charged_mismatch),
                ("5xx", self.server_errors)) for item in items[:10]),
            "OK" if self.ok else "FAILED",
        ]


def check(service: Service, tally: Tally, report: CrashReport, workdir: Path) -> None:
    """Fill `report` from the exported log, the HTTP balances and wallets, and replay --verify."""
    export = workdir / "events.jsonl"
    done = service.cli("export", "-o", str(export))
    if done.returncode != 0:
        raise RuntimeError(f"ledger export failed: {done.stderr[-2000:]}")
    records = [json.loads(line) for line in export.read_text().splitlines() if line.strip()]
    report.events_in_log = len(records)
    report.blocks_charged = sum(r["topic"].endswith(":Pool.Charged") for r in records)
    report.sessions_settled = sum(r["topic"].endswith(":Session.Settled") for r in records)
    receipts = {r["event_id"] for r in records if r["topic"].endswith(":Receipt.Recorded")}
    report.lost = sorted(tally.acknowledged - receipts)
    report.double_charges = double_charges(records)
    charged_in_log = net_charges(records)
    with httpx.Client(base_url=service.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        for patient in sorted(tally.patients):
            balance = http.get(f"/v1/patients/{patient}/balance").raise_for_status().json()
            report.negative += [f"{patient} {path}={value}" for path, value in numbers(balance)
                                if value < 0]
            for bucket, counts in balance["buckets"].items():
                expected = charged_in_log.get((patient, bucket), 0)
                if counts["charged"] != expected:
                    report.charged_mismatch.append(
                        f"{patient} {bucket}: HTTP charged {counts['charged']}, log {expected}")
        for doctor in sorted(tally.doctors):
            wallet = http.get(f"/v1/doctors/{doctor}/wallet").raise_for_status().json()
            report.negative += [f"{doctor} {path}={value}" for path, value in numbers(wallet)
                                if value < 0]
    done = service.cli("replay", "--verify")
    report.replay_ok, report.replay_output = done.returncode == 0, (done.stdout + done.stderr)[-2000:]


def double_charges(records: list[dict]) -> list[str]:
    """(session, block) charged more than once: by Pool.Charged (minus nothing: a reversal
    returns a charge, it never allows a second one) and by Session.AutoDeducted."""
    by_pool = Counter((r["session_id"], r["block"]) for r in records
                      if r["topic"].endswith(":Pool.Charged"))
    by_session = Counter((r["originator_id"], r["n"]) for r in records
                         if r["topic"].endswith(":Session.AutoDeducted"))
    return ([f"pool charge {key} x{n}" for key, n in by_pool.items() if n > 1]
            + [f"session deduction {key} x{n}" for key, n in by_session.items() if n > 1])


def net_charges(records: list[dict]) -> Counter:
    """Charged units per (patient, bucket): Pool.Charged minus Pool.Reversed."""
    net: Counter = Counter()
    for r in records:
        if r["topic"].endswith(":Pool.Charged"):
            net[(r["patient_id"], r["bucket"])] += 1
        elif r["topic"].endswith(":Pool.Reversed"):
            net[(r["patient_id"], r["bucket"])] -= 1
    return net


def numbers(value, path: str = ""):
    """Every (path, int) in a JSON document (booleans excluded)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, f"{path}[{index}]")


# ---------------------------------------------------------------------------------- entry


def postgres_store(base_url: str) -> tuple[str, str]:
    """(URL with a fresh schema, schema) on the PostgreSQL database of `base_url`."""
    schema = "crash_" + uuid.uuid4().hex[:10]
    separator = "&" if "?" in base_url else "?"
    return f"{base_url}{separator}schema={schema}", schema


def drop_schema(url: str, schema: str) -> None:
    """Drop the crash test's schema (only after a passing run: a failing one is kept to inspect)."""
    import psycopg

    conninfo = url.split("?")[0]
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def emptied(workdir: Path) -> Path:
    """`workdir`, created if missing, with whatever an earlier run left in it removed: its
    store, logs and the workers' metrics directory (so `make crash-test` can run again)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in workdir.iterdir():
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    return workdir


def run_crash_test(kills: int = 20, store: str = "sqlite", workers: int = 2, clients: int = 4,
                   seed: int = 1, workdir: Path = Path("var/crash"),
                   postgres_url: str = "postgresql://postgres@127.0.0.1:5432/test",
                   min_up_seconds: float = 0.5, max_up_seconds: float = 3.0,
                   progress=print) -> CrashReport:
    """Run the crash test on `store` ("sqlite" or "postgres"); returns the report (`.ok`).
    Bounded: `kills` cycles of at most max_up_seconds + a restart each, then the checks."""
    started = time.monotonic()
    workdir = emptied(Path(workdir).resolve() / store)
    schema = None
    if store == "postgres":
        url, schema = postgres_store(postgres_url)
    else:
        url = f"sqlite:///{workdir / 'ledger.db'}"
    service = Service(url, workdir / "service.log", workers=workers,
                      env={"LEDGER_TICK_SECONDS": "1", "LEDGER_SKEW_SECONDS": "0",
                           "LEDGER_SETTLEMENT_GRACE_SECONDS": "0", "LEDGER_STORE_TIMEOUT_SECONDS": "2"})
    report, tally, stop = CrashReport(store, kills, workers), Tally(), threading.Event()
    rng = random.Random(seed)
    service.start()
    service.wait_ready()
    threads = [threading.Thread(target=client_loop, args=(n, service.base_url, tally, seed, stop))
               for n in range(clients)]
    threads.append(threading.Thread(target=ticker_loop, args=(service.base_url, stop)))
    for thread in threads:
        thread.start()
    try:
        for number in range(1, kills + 1):
            time.sleep(rng.uniform(min_up_seconds, max_up_seconds))
            service.kill()
            progress(f"kill {number}/{kills}: {len(tally.acknowledged)} events acknowledged so far")
            service.start()
            service.wait_ready()
        time.sleep(max_up_seconds)  # a last stretch of posts on the final start
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    try:
        settle(service)
        check(service, tally, report, workdir)
    finally:
        service.stop()
    report.posted, report.acknowledged = len(tally.posted), len(tally.acknowledged)
    report.refused, report.retries, report.gave_up = dict(tally.refused), tally.retries, tally.gave_up
    report.server_errors = tally.server_errors
    report.wall_seconds = time.monotonic() - started
    if schema is not None and report.ok:
        drop_schema(url, schema)
    return report


def settle(service: Service, rounds: int = 20) -> None:
    """Tick until nothing more is due (bounded), so the checks see a quiet ledger."""
    with httpx.Client(base_url=service.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        for _ in range(rounds):
            answer = http.post("/v1/ticks", json={}).raise_for_status().json()
            if not answer["more"]:
                return
