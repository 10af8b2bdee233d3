"""`make bench`'s issue-10 harness (bench/targets.py) runs end to end in its smallest size.

No timing is asserted (timing lives in `make bench` only): every row prints a number, the
table has its raw-PostgreSQL and ratio columns, and every path of the targets table is there on
both stores. The harness itself checks that each generated store is genuine: the tick charges
every due block and `ledger replay --verify` passes on the replay store.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# bench/ is not an installed package (pyproject's packages): run from the checkout, as `make
# bench` does.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import targets  # noqa: E402

NUMBER = re.compile(r"^\d[\d,]*(\.\d+)? (events/s|blocks/s|ms)$")
RATIO = re.compile(r"^(\d+\.\d%|–)$")


def test_every_row_prints_a_number_beside_raw_postgres(pg_url, capsys):
    base_url = pg_url.split("?")[0]
    rows = targets.main(["--quick", "--seconds", "0.5", "--raw-seconds", "0.3", "--due", "12",
                         "--settled", "1", "--events", "400",
                         "--sqlite-paths", "http,tick,history,replay", "--postgres-url", base_url])
    table = capsys.readouterr().out.split("\n| store |", 1)[1].splitlines()
    header = [cell.strip() for cell in table[0].split("|")]
    assert header[:7] == ["path", "figure", "raw PostgreSQL", "ratio", "load 1m", "note", ""]
    body = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table[2:] if line]
    assert len(body) == len(rows)
    for store, path, figure, raw, ratio, load, _ in body:
        assert NUMBER.match(figure), (path, figure)
        assert RATIO.match(ratio), (path, ratio)
        assert raw == "–" or raw.endswith(" rows/s"), (path, raw)
        float(load)
    printed = {(store, path) for store, path, *_ in body}
    for store in ("postgres", "sqlite"):
        for path in ("HTTP batches of 100,  1 client(s)", "HTTP batches of 100,  4 client(s)",
                     "HTTP batches of 100, 16 client(s)", "HTTP single events, 16 clients",
                     "at half that rate: p99 latency", "tick, 12 due text sessions",
                     "with 12 settled sessions (1/patient)"):
            assert (store, path.strip()) in printed, (store, path)
    for store in ("postgres", "sqlite"):
        assert any(path.startswith("replay --verify") for where, path in printed
                   if where == store), store
    with_raw = [row for row in rows if row.raw]
    assert with_raw and all(row.raw > 0 and "%" in row.ratio for row in with_raw)


def test_a_child_that_ends_while_its_cpu_is_read_counts_zero(monkeypatch):
    """A PostgreSQL backend or a service's child may exit between the listing of the children
    and the read of its CPU times: the total skips it instead of failing the run (reading it
    from /proc by hand once failed this file's smoke run with ProcessLookupError)."""
    from types import SimpleNamespace

    import psutil

    from bench import http_load

    class Child:
        def __init__(self, pid: int, user: float, system: float, gone: bool = False) -> None:
            self.pid, self.times, self.gone = pid, (user, system), gone

        def cpu_times(self):
            if self.gone:
                raise psutil.NoSuchProcess(self.pid)
            return SimpleNamespace(user=self.times[0], system=self.times[1])

    class Parent:
        def __init__(self, pid: int) -> None:
            assert pid == 1

        def children(self):
            return [Child(102, 9.0, 9.0, gone=True), Child(101, 3.0, 1.0)]

    monkeypatch.setattr(http_load.psutil, "Process", Parent)
    assert http_load.children_cpu_seconds(1) == 4.0


def _events_in(url: str) -> int:
    from bench.stores import Clock
    from runtime.settings import Settings
    from runtime.wiring import build_ledger

    ledger = build_ledger(Settings(database_url=url), Clock())
    try:
        return int(ledger.recorder.max_notification_id() or 0)
    finally:
        ledger.close()


def test_each_tick_round_starts_from_the_generated_store_and_leaves_it_unchanged(pg_url, tmp_path):
    """The tick rows time several rounds on copies of one generated store (bench/copies.py):
    a round's writes stay in its copy, the next copy starts from the store as generated, and
    closing drops every template (and no copy outlives its round), on both stores."""
    from bench.copies import Templates
    from bench.stores import generate

    templates = Templates(pg_url.split("?")[0], tmp_path)
    made = []
    try:
        for store in ("postgres", "sqlite"):
            info = generate(templates.new(store), 3, 1, True)
            for _ in range(2):
                with templates.copy(info) as copy:
                    made.append(copy.url)
                    assert copy.url != info.url and copy.events == info.events
                    assert _events_in(copy.url) == info.events
                    rate, _, _ = targets.Bench.tick_on(_NoServerCpu(), copy.url, copy)
                    assert rate > 0 and _events_in(copy.url) > info.events  # the tick wrote
            assert _events_in(info.url) == info.events
            made.append(info.url)
    finally:
        templates.close()
    assert not list(tmp_path.glob("*.db*"))
    assert not [url for url in made
                if url.startswith("postgresql") and _database_exists(pg_url, url)]


class _NoServerCpu:
    server_cpu = None


def _database_exists(server_url: str, url: str) -> bool:
    """Whether the database of `url` exists on the server of `server_url`."""
    import psycopg

    from storage import postgres_conninfo, postgres_parts
    with psycopg.connect(postgres_conninfo(server_url), autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (postgres_parts(url)["dbname"],)).fetchone() is not None


def test_service_settings_reach_the_http_rows_service_and_name_its_rows(monkeypatch, tmp_path):
    """`--service-env LEDGER_AUDIT_ENABLED=false` (what an optional follower costs) is passed
    to the service the http rows start, and their row names say which settings they ran with;
    a pair that is not a LEDGER_ setting, or names one the bench sets per row, is refused."""
    from contextlib import contextmanager

    import pytest

    seen = []

    @contextmanager
    def fake_service(url, log_path, extra_env=None):
        seen.append(extra_env)
        yield None

    monkeypatch.setattr(targets, "service", fake_service)
    args = targets.parse(["--service-env", "LEDGER_AUDIT_ENABLED=false",
                          "--service-env", "LEDGER_WEBHOOK_DELIVERY_ENABLED=false"])
    bench = targets.Bench.__new__(targets.Bench)
    bench.args, bench.workdir = args, tmp_path
    with bench.serving("sqlite:///x.db"):
        pass
    assert seen == [{"LEDGER_AUDIT_ENABLED": "false", "LEDGER_WEBHOOK_DELIVERY_ENABLED": "false"}]
    assert bench._http_label("HTTP single events, 16 clients") == (
        "HTTP single events, 16 clients "
        "[LEDGER_AUDIT_ENABLED=false LEDGER_WEBHOOK_DELIVERY_ENABLED=false]")
    bench.args = targets.parse([])
    assert bench._http_label("HTTP single events, 16 clients") == "HTTP single events, 16 clients"
    for bad in ("AUDIT_ENABLED=false", "LEDGER_AUDIT_ENABLED", "LEDGER_=1",
                "LEDGER_PORT=9000", "LEDGER_DATABASE_URL=sqlite:///y.db"):
        with pytest.raises(SystemExit):
            targets.parse(["--service-env", bad])
