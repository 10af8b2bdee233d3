"""`make bench`, the targets of issue 10: each path's figure beside raw PostgreSQL measured in
the same run, their ratio, and the machine's load average. docs/benchmarks.md explains each row.

Usage: python -m bench.targets [--quick] [--stores postgres,sqlite]
       [--paths http,tick,history,replay] [--sqlite-paths http,tick]
       [--seconds 20] [--raw-seconds 10] [--due 10000] [--settled 10] [--tick-rounds 3]
       [--events 1000000] [--postgres-url URL] [--service-env LEDGER_NAME=VALUE …]

Rows (per store; raw PostgreSQL always on the PostgreSQL server):
- http: the real service loaded over HTTP (bench/http_load.py) — batches of 100 with 1, 4
  and 16 clients; single events with 16 clients; single events paced at half that rate
  (p50/p99 latency). Raw: INSERTs of event-shaped rows with as many clients, in 100-row and
  1-row transactions (bench/raw_postgres.py).
- tick: `run_tick` in process on a generated store (bench/stores.py) with `--due` text sessions
  whose block 1 is due: blocks charged per second, the mean of `--tick-rounds` ticks, each on a
  fresh copy of one generated store (bench/copies.py). history: the same on a store whose
  patients also have `--settled` settled sessions each in their history, each round after one
  on the store without history, and the slowdown against those. Raw: 1-row transactions from
  1 thread.
- replay: `ledger replay --verify` as its own process on a generated store of about
  `--events` events: events/s (start-up included) and its peak RSS (VmHWM), beside the peak
  RSS on a store a tenth the size (flat memory). Raw: a full scan of the same events table.
`--service-env` runs the http rows' service with other settings (runtime/settings.py), e.g.
`LEDGER_AUDIT_ENABLED=false`: what an optional follower costs on this machine, beside the same
run's raw figures (docs/benchmarks.md, "The twelfth stop"). The row names say so.
Every store is a fresh PostgreSQL schema or SQLite file, dropped at the end of its row; the
tick rows' generated stores are databases (files) kept as templates until the run ends.
Notes give the CPU per event (per block) of the service, its followers' process and the
PostgreSQL server, and the server's CPU per raw row (docs/benchmarks.md, "Where each event's
CPU goes").
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from bench import raw_postgres
from bench.copies import Templates
from bench.http_load import (REPO_ROOT, Served, closed_loop, ledger_env, open_loop,
                              percentile, process_cpu_seconds, service)
from bench.stores import StoreInfo, generate, patients_for
from storage import is_postgres, postgres_parts

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def loadavg() -> str:
    """The 1, 5 and 15-minute load averages, as "a/b/c"."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def python_loop_seconds(steps: int = 10_000_000) -> float:
    """Seconds a plain Python loop of `steps` additions takes here now: a rough sign of the
    machine's speed for one core at the time of the run (this shared VM's varies from day to
    day; the service's CPU follows it only loosely: docs/benchmarks.md), so that absolute
    figures of different days can be read side by side."""
    started, total = time.perf_counter(), 0
    for i in range(steps):
        total += i
    return time.perf_counter() - started


STARTED = time.monotonic()


def say(line: str) -> None:
    """Progress, on stderr (the table goes to stdout), with the minutes:seconds since start."""
    minutes, seconds = divmod(int(time.monotonic() - STARTED), 60)
    print(f"{minutes:3d}:{seconds:02d} {line}", file=sys.stderr, flush=True)


@dataclass
class Row:
    """One line of the table: the project's figure and unit, the raw PostgreSQL figure of the
    same run (None: no raw counterpart), a note, and the 1-minute load average when measured."""

    store: str
    path: str
    value: float
    unit: str
    raw: float | None = None
    note: str = ""
    load: float = 0.0

    @property
    def ratio(self) -> str:
        return f"{self.value / self.raw:.1%}" if self.raw else "–"


class Bench:
    """Runs the rows the options select, collecting them; owns the run's stores."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.rows: list[Row] = []
        self.templates = Templates(args.postgres_url, workdir)
        self.stores: dict[tuple[str, int], StoreInfo] = {}  # (store, settled) -> template
        self.tick_rates: dict[str, float] = {}  # store -> the tick row's mean blocks/s
        # The PostgreSQL server's CPU so far (None: not on this host): beside the service's,
        # so that a row's whole cost per event shows, and the raw rows' beside it.
        self.server_cpu = raw_postgres.server_cpu(args.postgres_url)

    def close(self) -> None:
        """Drop the generated stores kept as templates."""
        self.templates.close()

    def add(self, row: Row) -> Row:
        row.load = os.getloadavg()[0]
        self.rows.append(row)
        say(f"  → {row.store} {row.path}: {row.value:,.1f} {row.unit} (raw {row.raw or 0:,.0f}, "
            f"ratio {row.ratio}) {row.note}")
        return row

    @contextmanager
    def fresh_store(self, store: str) -> Iterator[str]:
        """A new empty store's URL: a PostgreSQL schema or a SQLite file of this run; dropped
        afterwards."""
        if store == "postgres":
            schema = "bench_t_" + uuid.uuid4().hex[:8]
            try:
                yield f"{self.args.postgres_url}?schema={schema}"
            finally:
                drop_schema(self.args.postgres_url, schema)
        else:
            path = self.workdir / f"{uuid.uuid4().hex[:8]}.db"
            try:
                yield f"sqlite:///{path}"
            finally:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)

    def raw_insert(self, clients: int, rows_per_transaction: int) -> tuple[float, str]:
        """(raw PostgreSQL rows/s for this shape, a note of the server's CPU per row), measured
        now (next to the row it goes with, so both see the same load)."""
        say(f"  raw PostgreSQL: {clients} client(s), {rows_per_transaction}-row transactions")
        (rate, rows), server = _with_server_cpu(
            self.server_cpu, raw_postgres.insert_rate, self.args.postgres_url, clients,
            rows_per_transaction, self.args.raw_seconds)
        note = (f"; raw: PostgreSQL server CPU {server / rows * 1000:.3f} ms/row"
                if server is not None and rows else "")
        return rate, note

    # --------------------------------------------------------------------------- http

    def http(self, store: str) -> None:
        seconds = self.args.seconds
        for clients in (1, 4, 16):
            say(f"[{store}] HTTP batches of 100, {clients} client(s), {seconds:g} s")
            with self.fresh_store(store) as url, self.serving(url) as served:
                (rate, tally), cpu = _with_cpu(served, self._server_cpu(store), closed_loop,
                                               served.base_url, clients, 100, seconds)
            raw, raw_note = self.raw_insert(clients, 100)
            self.add(Row(store, self._http_label(f"HTTP batches of 100, {clients:2d} client(s)"),
                         rate, "events/s", raw, _cpu_note(cpu, tally) + raw_note + _refusals(tally)))
        say(f"[{store}] HTTP single events, 16 clients, {seconds:g} s; then paced at half")
        with self.fresh_store(store) as url, self.serving(url) as served:
            (rate, tally), cpu = _with_cpu(served, self._server_cpu(store), closed_loop,
                                           served.base_url, 16, 1, seconds)
            raw, raw_note = self.raw_insert(16, 1)
            self.add(Row(store, self._http_label("HTTP single events, 16 clients"), rate,
                         "events/s", raw, _cpu_note(cpu, tally) + raw_note + _refusals(tally)))
            paced, tally = open_loop(served.base_url, 16, rate / 2, seconds)
        p50, p99 = percentile(tally.latencies, 0.5), percentile(tally.latencies, 0.99)
        self.add(Row(store, "  at half that rate: p99 latency", p99 * 1000, "ms", None,
                     f"p50 {p50 * 1000:.1f} ms; paced {rate / 2:,.0f}/s, achieved {paced:,.0f}/s"
                     f"{_refusals(tally)}"))

    def _server_cpu(self, store: str) -> Callable[[], float] | None:
        return self.server_cpu if store == "postgres" else None

    @contextmanager
    def serving(self, url: str) -> Iterator[Served]:
        """The service on `url` with the run's `--service-env` settings, while in use."""
        with service(url, self.workdir / "service.log", self.args.service_env) as served:
            yield served

    def _http_label(self, label: str) -> str:
        """A http row's name, with the `--service-env` settings it ran with, if any."""
        settings = " ".join(f"{k}={v}" for k, v in self.args.service_env.items())
        return f"{label} [{settings}]" if settings else label

    # --------------------------------------------------------------------------- tick

    def tick(self, store: str) -> None:
        due = self.args.due
        say(f"[{store}] tick: generating {due:,} due text sessions")
        fresh = self.generated(store, 0)
        runs = [self.tick_round(fresh) for _ in range(self.args.tick_rounds)]
        rate, cpu = _means(runs)
        self.tick_rates[store] = rate
        raw, raw_note = self.raw_insert(1, 1)
        self.add(Row(store, f"tick, {due:,} due text sessions", rate, "blocks/s", raw,
                     f"CPU {cpu:.1f} ms/block; {_rounds(runs)}; last: {runs[-1][2]}{raw_note}"))

    def history(self, store: str) -> None:
        """The tick on the store with history, `--tick-rounds` times; when the tick row has
        run (its store is kept), each round follows one on the store without history, so the
        slowdown compares ticks run side by side (the machine's speed drifts within minutes)."""
        due, settled = self.args.due, self.args.settled
        say(f"[{store}] tick: generating {due:,} due text sessions with {due * settled:,} "
            "settled ones in history")
        history, fresh = self.generated(store, settled), self.stores.get((store, 0))
        runs: list[tuple[float, float, str]] = []
        fresh_runs: list[tuple[float, float, str]] = []
        for _ in range(self.args.tick_rounds):
            if fresh is not None:
                fresh_runs.append(self.tick_round(fresh))
            runs.append(self.tick_round(history))
        rate, cpu = _means(runs)
        change = ""
        if fresh_runs:
            fresh_rate, fresh_cpu = _means(fresh_runs)
            change = (f"{rate / fresh_rate - 1:+.0%} vs without history in alternate rounds "
                      f"({fresh_rate:,.1f} blocks/s, {_rounds(fresh_runs)}; CPU "
                      f"{cpu / fresh_cpu - 1:+.0%}); {rate / self.tick_rates[store] - 1:+.0%} "
                      "vs the tick row's rounds; ")
        raw, raw_note = self.raw_insert(1, 1)
        self.add(Row(store, f"  with {due * settled:,} settled sessions ({settled}/patient)",
                     rate, "blocks/s", raw,
                     f"{change}CPU {cpu:.1f} ms/block; {_rounds(runs)}; {history.events:,} events "
                     f"in the store; last: {runs[-1][2]}{raw_note}"))

    def generated(self, store: str, settled: int) -> StoreInfo:
        """The generated tick store (`--due` due sessions, `settled` settled ones per patient
        in history) of this store kind, generated on first use and kept as a template
        (bench/copies.py) until the run ends."""
        if (store, settled) not in self.stores:
            info = generate(self.templates.new(store), self.args.due, settled, True, say)
            say(f"  generated {info.events:,} events in {info.seconds:.0f} s")
            self.stores[(store, settled)] = info
        return self.stores[(store, settled)]

    def tick_round(self, template: StoreInfo) -> tuple[float, float, str]:
        """`tick_on` a fresh copy of a generated store (so every round starts from it)."""
        with self.templates.copy(template) as info:
            return self.tick_on(info.url, info)

    def tick_on(self, url: str, info: StoreInfo) -> tuple[float, float, str]:
        """(blocks charged per second, CPU ms of this process per block, a note) by one
        `run_tick` at the store's `as_of`, with the views kept by the followers as in the
        service: on PostgreSQL a `ledger follow` process (projector only), on SQLite the
        projector's background thread in this process. The projections are caught up first
        (not timed); the note gives the followers' CPU per block and when the views reflected
        the tick."""
        from projections import Projector
        from runtime.settings import Settings
        from runtime.wiring import build_ledger
        from scheduler.tick import run_tick
        from bench.stores import Clock

        say("  catching up projections")
        settings, clock = Settings(database_url=url), Clock()
        clock.at(info.as_of)
        ledger = build_ledger(settings, clock)
        projector = Projector(ledger, url, settings.policy())
        try:
            catch_up(projector)
            with _followers(url, projector, settings.projection_poll_seconds) as followers_cpu:
                say(f"  ticking {info.due:,} due sessions")
                started, cpu, followed = time.perf_counter(), time.process_time(), followers_cpu()
                report, server = _with_server_cpu(self.server_cpu if is_postgres(url) else None,
                                                  run_tick, ledger, projector, info.as_of)
                elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
                projector.wait_for(int(ledger.recorder.max_notification_id() or 0), (), 600)
                current, followed = time.perf_counter() - started, followers_cpu() - followed
        finally:
            projector.close()
            ledger.close()
        blocks = sum(1 for step in report.steps if step["action"] == "charge")
        if blocks != info.due or report.failed or report.more:
            raise RuntimeError(f"the tick charged {blocks} of {info.due} due blocks "
                               f"(failed {report.failed[:3]}, more {report.more})")
        where = "followers' process" if is_postgres(url) else "projector thread, included"
        note = (f"{where} CPU {followed / blocks * 1000:.1f} ms/block; "
                + (f"PostgreSQL server CPU {server / blocks * 1000:.1f} ms/block while ticking; "
                   if server is not None else "")
                + f"views current {current:.1f} s after the start ({elapsed:.1f} s ticking)")
        return blocks / elapsed, cpu / blocks * 1000, note

    # ------------------------------------------------------------------------- replay

    def replay(self, store: str) -> None:
        settled, events = self.args.settled, self.args.events
        say(f"[{store}] replay: peak RSS on a store a tenth the size first")
        _, _, _, small_rss_mb, small = self.replay_store(store, events // 10, settled, raw=False)
        (seconds, cpu, raw, rss_mb, info) = self.replay_store(store, events, settled, raw=True)
        self.add(Row(store, f"replay --verify, {info.events:,} events", info.events / seconds,
                     "events/s", raw, f"peak RSS {rss_mb:.0f} MB (on {small.events:,} events: "
                     f"{small_rss_mb:.0f} MB); {seconds:.1f} s incl. start-up; CPU {cpu:.1f} s"))

    def replay_store(self, store: str, events: int, settled: int, raw: bool
                     ) -> tuple[float, float, float | None, float, StoreInfo]:
        """(seconds, CPU seconds, raw scan rows/s or None, peak RSS MB, the store) of
        `ledger replay --verify` on a fresh store of about `events` events."""
        patients = patients_for(events, settled)
        say(f"  generating ~{events:,} events ({patients:,} patients × {settled} settled "
            "sessions)")
        with self.fresh_store(store) as url:
            info = generate(url, patients, settled, False, say)
            say(f"  generated {info.events:,} events in {info.seconds:.0f} s; catching up "
                "the live projections")
            live_catch_up(url)
            scan = None
            if is_postgres(url):
                schema = postgres_parts(url)["schema"]
                raw_postgres.vacuum(self.args.postgres_url, schema, info.table)
                if raw:
                    _, scan = raw_postgres.scan_rate(self.args.postgres_url, schema, info.table)
            say("  ledger replay --verify (own process)")
            seconds, cpu, rss_mb = replay_verify_process(url)
        return seconds, cpu, scan, rss_mb, info


@contextmanager
def _followers(url: str, projector, poll_seconds: float) -> Iterator[Callable[[], float]]:
    """The views' followers as `ledger serve` runs them by default, for the duration: on
    PostgreSQL a `ledger follow` process (its projector only: webhooks and audit off, as the
    tick row always was), elsewhere `projector`'s own background thread. Yields a function
    giving the CPU seconds of the followers' process so far (0 for the thread: this process's
    CPU includes it)."""
    if not is_postgres(url):
        projector.start(poll_seconds)
        yield lambda: 0.0
        return
    env = ledger_env(url, LEDGER_WEBHOOK_DELIVERY_ENABLED="false", LEDGER_AUDIT_ENABLED="false")
    child = subprocess.Popen([sys.executable, "-m", "runtime.cli", "follow"], cwd=REPO_ROOT,
                             env=env)
    last = [0.0]

    def cpu() -> float:
        if child.poll() is None:
            last[0] = process_cpu_seconds(child.pid)
        return last[0]

    try:
        _settle(cpu)  # its start-up (imports, connections) is not the tick's work
        yield cpu
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)


def _settle(cpu: Callable[[], float], seconds: float = 60.0) -> None:
    """Wait, at most `seconds`, until a process's CPU (`cpu()`) stops rising: idle for two
    consecutive quarter-seconds."""
    quiet, before = 0, cpu()
    for _ in range(int(seconds / 0.25)):
        time.sleep(0.25)
        now = cpu()
        quiet = quiet + 1 if now - before < 0.01 else 0
        if quiet >= 2:
            return
        before = now


def catch_up(projector) -> int:
    """Bring `projector` fully up to date; returns the events applied."""
    applied = 0
    while (step := projector.catch_up(max_events=1_000_000)) > 0:
        applied += step
    return applied


def live_catch_up(url: str) -> None:
    from projections import Projector
    from runtime.settings import Settings
    from runtime.wiring import build_ledger
    from bench.stores import Clock

    settings = Settings(database_url=url)
    ledger = build_ledger(settings, Clock())
    projector = Projector(ledger, url, settings.policy())
    try:
        catch_up(projector)
    finally:
        projector.close()
        ledger.close()


def replay_verify_process(url: str) -> tuple[float, float, float]:
    """(seconds, CPU seconds, peak RSS in MB) of `ledger replay --verify` as its own process;
    it must pass."""
    # VmHWM, not ru_maxrss: Linux carries the forking parent's peak into ru_maxrss across exec.
    code = ("import sys\nfrom runtime.cli import main\n"
            "sys.argv = ['ledger', 'replay', '--verify']\n"
            "try:\n    main()\nexcept SystemExit as done:\n    code = done.code\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "print(hwm.split()[1], file=sys.stderr)\n")
    started, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "LEDGER_DATABASE_URL": url}, check=False)
    elapsed, cpu = time.perf_counter() - started, _children_cpu() - cpu
    if " 0 differ" not in done.stdout:
        raise RuntimeError("replay --verify did not pass on the generated store:\n"
                           + done.stdout[-2000:] + done.stderr[-2000:])
    return elapsed, cpu, int(done.stderr.strip().splitlines()[-1]) / 1024


def _means(runs: list[tuple[float, float, str]]) -> tuple[float, float]:
    """(mean blocks/s, mean CPU ms per block) of `tick_on` rounds."""
    return (sum(rate for rate, _, _ in runs) / len(runs),
            sum(cpu for _, cpu, _ in runs) / len(runs))


def _rounds(runs: list[tuple[float, float, str]]) -> str:
    """The rounds' rates, in order: "rounds 2,747 / 3,041 / 2,869 blocks/s"."""
    return "rounds " + " / ".join(f"{rate:,.0f}" for rate, _, _ in runs) + " blocks/s"


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _with_cpu(served: Served, server_cpu: Callable[[], float] | None, measure: Callable,
              *args) -> tuple[object, tuple[float, float, float | None]]:
    """(what `measure(*args)` returns, (the service process's CPU seconds meanwhile, its
    child processes' — the followers' —, the PostgreSQL server's: None without `server_cpu`))."""
    before = served.cpu_seconds(), served.children_cpu_seconds()
    result, server = _with_server_cpu(server_cpu, measure, *args)
    return result, (served.cpu_seconds() - before[0],
                    max(0.0, served.children_cpu_seconds() - before[1]), server)


def _with_server_cpu(server_cpu: Callable[[], float] | None, measure: Callable,
                     *args) -> tuple[object, float | None]:
    """(what `measure(*args)` returns, the PostgreSQL server's CPU seconds meanwhile, or None
    without `server_cpu`)."""
    if server_cpu is None:
        return measure(*args), None
    before = server_cpu()
    result = measure(*args)
    return result, server_cpu() - before


def _cpu_note(cpu_seconds: tuple[float, float, float | None], tally) -> str:
    """The service's CPU per accepted event: steadier than the rate on a loaded machine; the
    followers' process and the PostgreSQL server apart (the request path's CPU, then what
    else each event costs the machine)."""
    events = max(1, tally.accepted)
    service, followers, server = cpu_seconds
    note = f"service CPU {service / events * 1000:.2f} ms/event"
    others = ([f"followers' process {followers / events * 1000:.2f}"] if followers else []) + (
        [f"PostgreSQL server {server / events * 1000:.2f}"] if server is not None else [])
    if others:
        note += f" (+ {', '.join(others)})"
    return note


def _refusals(tally) -> str:
    return f"; NOT ACCEPTED: {tally.other}" if tally.other else ""


def drop_schema(base_url: str, schema: str) -> None:
    import psycopg

    from storage import postgres_conninfo
    with psycopg.connect(postgres_conninfo(base_url), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}_replay" CASCADE')


def render(rows: list[Row]) -> str:
    """The table (markdown, so docs/benchmarks.md can hold it as printed)."""
    lines = ["| store | path | figure | raw PostgreSQL | ratio | load 1m | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        raw = f"{r.raw:,.0f} rows/s" if r.raw else "–"
        lines.append(f"| {r.store} | {r.path.strip()} | {r.value:,.1f} {r.unit} | {raw} | "
                     f"{r.ratio} | {r.load:.2f} | {r.note} |")
    return "\n".join(lines)


QUICK = {"seconds": 2.0, "raw_seconds": 1.0, "due": 200, "settled": 2, "events": 5_000,
         "tick_rounds": 1}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smallest sizes and 2-s runs: a smoke run (also BENCH_QUICK=1)")
    parser.add_argument("--stores", default="postgres,sqlite")
    parser.add_argument("--paths", default="http,tick,history,replay")
    parser.add_argument("--sqlite-paths", default="http,tick",
                        help="of those, the paths also run on SQLite (default: not the large "
                             "stores, to keep `make bench` near 20 minutes)")
    parser.add_argument("--seconds", type=float, default=20.0, help="per HTTP row")
    parser.add_argument("--raw-seconds", type=float, default=5.0, help="per raw insert figure")
    parser.add_argument("--due", type=int, default=10_000, help="due text sessions of the tick")
    parser.add_argument("--tick-rounds", type=int, default=3,
                        help="ticks timed per tick row, each on a copy of one generated store "
                             "(the history row alternates them with the store without history)")
    parser.add_argument("--settled", type=int, default=10,
                        help="settled sessions per patient in the history stores")
    parser.add_argument("--events", type=int, default=1_000_000, help="events of the replay store")
    parser.add_argument("--postgres-url", default=PG_URL)
    parser.add_argument("--service-env", action="append", default=[], metavar="LEDGER_NAME=VALUE",
                        help="a setting of the http rows' service (repeatable)")
    args = parser.parse_args(argv)
    if args.tick_rounds < 1:
        parser.error("--tick-rounds must be at least 1")
    try:
        args.service_env = service_env(args.service_env)
    except ValueError as exc:
        parser.error(str(exc))
    if args.quick or os.environ.get("BENCH_QUICK") == "1":
        for name, value in QUICK.items():
            if parser.get_default(name) == getattr(args, name):
                setattr(args, name, value)
    return args


PATHS = ("http", "tick", "history", "replay")


_BENCH_OWNS = ("LEDGER_DATABASE_URL", "LEDGER_PORT")  # set per row by the bench


def service_env(pairs: list[str]) -> dict[str, str]:
    """{name: value} of `--service-env` pairs; raises ValueError for one that is not
    `LEDGER_NAME=VALUE` (only the service's own settings are passed on) or names a setting
    the bench sets per row (the store, the port)."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("LEDGER_") or not name[7:]:
            raise ValueError(f"--service-env {pair!r}: expected LEDGER_NAME=VALUE")
        if name in _BENCH_OWNS:
            raise ValueError(f"--service-env {name}: the bench sets it for each row")
        env[name] = value
    return env


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the selected rows; print the table (also what was measured before a failure)."""
    args = parse(argv)
    paths = [p for p in args.paths.split(",") if p]
    if unknown := set(paths) - set(PATHS):
        raise SystemExit(f"unknown --paths {sorted(unknown)}; choose from {PATHS}")
    started, start_load = time.perf_counter(), loadavg()
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so every row's `finally` drops its
    # schema and stops its service (Python's default for SIGTERM skips them)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    start_loop = python_loop_seconds()
    say(f"bench.targets: load average at start {start_load}; a 10M-step Python loop "
        f"{start_loop:.2f} s")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            for store in [s for s in args.stores.split(",") if s]:
                for path in paths:
                    if store == "postgres" or path in args.sqlite_paths.split(","):
                        getattr(bench, path)(store)
        finally:
            bench.close()
            print(f"\nbench.targets: load average at start {start_load}, at end {loadavg()}; "
                  f"{time.perf_counter() - started:.0f} s; {os.cpu_count()} cores; a 10M-step "
                  f"Python loop {start_loop:.2f} s at the start, {python_loop_seconds():.2f} s "
                  "at the end")
            print(render(bench.rows))
    return bench.rows


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
