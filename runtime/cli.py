"""The `ledger` command: serve, tick, replay --verify, export, simulate, audit, balances (typer +
rich)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from runtime.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Event-sourced billing ledger for telehealth consultations.")
console = Console(stderr=False)
err = Console(stderr=True)


def _parse_instant(value: Optional[str]) -> Optional[datetime]:
    """An --as-of instant: ISO 8601 with a zone, within the ledger's instant window."""
    from ledger.input_rules import instant_problem

    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            raise typer.BadParameter("--as-of needs a timezone, e.g. 2026-11-21T10:00:00Z")
        moment = moment.astimezone(timezone.utc)
    except (ValueError, OverflowError) as exc:
        raise typer.BadParameter(f"--as-of {value!r} is not an instant: {exc}") from None
    if problem := instant_problem(moment):
        raise typer.BadParameter(f"--as-of: {problem}")
    return moment


@contextmanager
def _opened(settings: Settings):
    """(Ledger, Projector) on the configured store with the wall clock; closed afterwards."""
    from runtime.wiring import open_ledger
    from runtime.clock import SystemClock

    ledger, projector = open_ledger(settings, SystemClock())
    try:
        yield ledger, projector
    finally:
        projector.close()
        ledger.close()


@app.command()
def serve(host: Optional[str] = None, port: Optional[int] = None,
          workers: int = typer.Option(1, min=1, max=16, help="uvicorn worker processes")) -> None:
    """Run the HTTP API with its periodic tick (embedded SQLite unless LEDGER_DATABASE_URL).

    Waits for the database first (bounded by LEDGER_STARTUP_WAIT_SECONDS, each retry logged);
    exits with code 3 and one clear line if it never answers. Limits: docs/operations.md.
    """
    import os

    import structlog
    import uvicorn

    from observability import configure_logging
    from runtime.followers import FollowerProcess
    from runtime.server import PROTOCOL
    from runtime.wiring import StoreUnreachableAtStartup, wait_for_store
    from storage import probe_store, redacted_url

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    log = structlog.get_logger("ledger.serve")
    if workers > 1 and not settings.database_url.startswith("postgres"):
        log.warning("several workers on SQLite serialise their writes; use PostgreSQL")
    try:
        wait_for_store(settings, lambda: probe_store(settings.database_url,
                                                     settings.store_timeout_seconds),
                       what="reach the database")
    except StoreUnreachableAtStartup as exc:
        log.error("not starting", reason=str(exc))
        raise typer.Exit(3) from None
    in_child = settings.followers_in_child()
    if workers > 1 or in_child or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _prepare_multiprocess_metrics()  # the followers' child counts webhook deliveries
    log.info("serving", url=f"http://{host or settings.host}:{port or settings.port}",
             store=redacted_url(settings.database_url), workers=workers,
             tick_seconds=settings.tick_seconds if settings.tick_enabled else None,
             followers="process" if in_child else "inline")
    followers = FollowerProcess().start() if in_child else None
    try:
        uvicorn.run("runtime.asgi:create_request_app" if in_child else "runtime.asgi:create_app",
                    factory=True, host=host or settings.host, port=port or settings.port,
                    workers=workers, log_level=settings.log_level, http=PROTOCOL,
                    timeout_keep_alive=settings.keepalive_timeout_seconds,
                    timeout_graceful_shutdown=30, log_config=None, access_log=False)
    finally:
        if followers is not None:
            followers.stop()


@app.command()
def follow() -> None:
    """Run the followers until stopped (SIGINT/SIGTERM, or its parent gone): the projector,
    the webhook notifier (if LEDGER_WEBHOOK_DELIVERY_ENABLED) and the audit follower (if
    LEDGER_AUDIT_ENABLED). `ledger serve` starts one itself unless LEDGER_FOLLOWERS=inline
    (runtime/followers.py); exits with code 3 if the database never answers."""
    import threading

    from observability import configure_logging
    from runtime.followers import run_followers, stop_on_signals_and_orphaning
    from runtime.wiring import StoreUnreachableAtStartup

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    stop = threading.Event()
    stop_on_signals_and_orphaning(stop)
    try:
        run_followers(settings, stop)
    except StoreUnreachableAtStartup:
        raise typer.Exit(3) from None


def _prepare_multiprocess_metrics() -> None:
    """Several workers share metrics through prometheus-client's multiprocess directory: the
    operator's PROMETHEUS_MULTIPROC_DIR, else a fresh temporary one; emptied at start (samples
    of a previous run would otherwise be added to this one's)."""
    import atexit
    import os
    import shutil
    import tempfile

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        directory = tempfile.mkdtemp(prefix="ledger-metrics-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    Path(directory).mkdir(parents=True, exist_ok=True)
    for entry in Path(directory).glob("*.db"):
        entry.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory


@app.command()
def tick(as_of: Optional[str] = typer.Option(None, "--as-of", help="ISO 8601 instant; default now"),
         debug: bool = typer.Option(False, "--debug", help="print every decision")) -> None:
    """Run one tick and print what it charged, ended, settled and expired."""
    from scheduler.tick import catch_up_views, run_tick

    settings = Settings()
    with _opened(settings) as (ledger, projector):
        report = run_tick(ledger, projector, _parse_instant(as_of) or ledger.clock())
        catch_up_views(projector)  # no follower may run beside a command: views show the tick
    table = Table(title=f"tick as of {report.as_of.isoformat()}")
    for column in ("charged", "ended", "settled", "expired", "failed", "conflicts", "more"):
        table.add_column(column, justify="right")
    table.add_row(str(len(report.charged)), str(len(report.ended)), str(len(report.settled)),
                  str(len(report.expired)), str(len(report.failed)), str(report.conflicts),
                  str(report.more))
    console.print(table)
    for line in report.failed:
        err.print(f"[red]failed[/]   {line}")
    if debug:
        for name in ("charged", "ended", "settled", "expired"):
            for line in getattr(report, name):
                console.print(f"{name:8} {line}")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def notify(once: bool = typer.Option(False, "--once", help="derive what is committed, send what "
                                                          "is due, wait for it, and exit")) -> None:
    """Derive and send the webhooks (docs/webhooks.md) until stopped (SIGINT/SIGTERM): for a
    deployment whose API processes run with LEDGER_WEBHOOK_DELIVERY_ENABLED=false. Any number
    may run at once on one database."""
    import signal
    import threading

    import structlog

    from observability import configure_logging
    from runtime.wiring import open_notifier

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    log = structlog.get_logger("ledger.notify")
    with _opened(settings) as (ledger, _):
        notifier = open_notifier(settings, ledger)
        try:
            if once:
                notifier.drain()
            else:
                stop = threading.Event()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, lambda *_: stop.set())
                notifier.start()
                log.info("notifying", position=notifier.deriver.position())
                stop.wait()
        finally:
            notifier.close()
    err.print("notifier stopped")


@app.command()
def replay(verify: bool = typer.Option(True, "--verify/--no-verify",
                                       help="compare the rebuilt projections with the live ones")) -> None:
    """Rebuild every projection from position zero into a scratch store and compare."""
    from rich.progress import Progress

    from projections import replay_verify

    settings = Settings()
    with _opened(settings) as (ledger, projector), \
            Progress(console=err, transient=True) as progress:
        task = progress.add_task("replaying", total=None)
        report = replay_verify(ledger, settings.database_url, settings.policy(),
                               progress=lambda done, total: progress.update(
                                   task, completed=done, total=total))
    console.print(f"replayed {report.events} events; compared {report.accounts} accounts; "
                  f"{len(report.differences)} differ")
    for line in report.differences:
        console.print(f"[red]DIFF[/] {line}")
    if verify and not report.ok:
        raise typer.Exit(1)


@app.command()
def export(output: Optional[Path] = typer.Option(None, "--output", "-o",
                                                 help="file to write; default stdout")) -> None:
    """Write the whole event log as JSON lines, in ledger order."""
    from projections import export_events

    settings = Settings()
    with _opened(settings) as (ledger, _):
        if output is None:
            count = export_events(ledger, sys.stdout)
        else:
            with output.open("w", encoding="utf-8") as out:
                count = export_events(ledger, out)
    err.print(f"exported {count} events")


@app.command()
def simulate(seed: int = 7, patients: int = typer.Option(1000, min=1, max=100_000),
             doctors: int = typer.Option(100, min=1, max=10_000),
             sessions: int = typer.Option(3000, min=1, max=200_000),
             practitioners: int = typer.Option(30, min=0, max=10_000,
                                               help="marketplace practitioners (§10)"),
             consultations: int = typer.Option(300, min=0, max=100_000,
                                               help="priced consultations booked (§10)"),
             workdir: Path = Path("var/sim"),
             url: Optional[str] = typer.Option(None, help="drive an already running service"),
             webhooks: bool = typer.Option(True, help="register a receiver and check every "
                                                      "notification against the oracle")) -> None:
    """Simulate a day of both platforms (unit-billed sessions, priced consultations) against
    the service and check it against ground truth."""
    from simulation.driver import run_simulation

    report = run_simulation(seed=seed, patients=patients, doctors=doctors, sessions=sessions,
                            practitioners=practitioners, consultations=consultations,
                            base_url=url, workdir=workdir, console=console,
                            webhooks_checked=webhooks)
    if not report.ok:
        raise typer.Exit(1)


@app.command("crash-test")
def crash_test(kills: int = typer.Option(20, min=1, max=1000, help="SIGKILLs of the service"),
               store: str = typer.Option("sqlite", help="sqlite or postgres"),
               workers: int = typer.Option(2, min=1, max=8),
               clients: int = typer.Option(4, min=1, max=32),
               seed: int = 1, workdir: Path = Path("var/crash"),
               postgres_url: str = typer.Option(
                   "postgresql://postgres@127.0.0.1:5432/test",
                   help="database for --store postgres (a fresh schema is used, dropped if ok)")) -> None:
    """Kill the service with SIGKILL N times under load; check nothing acknowledged was lost,
    nothing charged twice, no negative balance, and replay --verify (docs/operations.md)."""
    from simulation.crash import run_crash_test

    if store not in ("sqlite", "postgres"):
        raise typer.BadParameter("--store is sqlite or postgres")
    report = run_crash_test(kills=kills, store=store, workers=workers, clients=clients, seed=seed,
                            workdir=workdir, postgres_url=postgres_url,
                            progress=lambda line: err.print(line))
    for line in report.lines():
        console.print(line)
    if not report.ok:
        raise typer.Exit(1)


@contextmanager
def _audit_opened():
    """An AuditService on the configured store (no background follower); closed afterwards."""
    from runtime.clock import SystemClock
    from runtime.wiring import build_ledger, open_audit

    settings = Settings()
    ledger = build_ledger(settings, SystemClock())
    try:
        service, _ = open_audit(settings, ledger, follow=False)
        try:
            yield service
        finally:
            service.close()
    finally:
        ledger.close()


def _audit_instant(value: Optional[str], name: str) -> Optional[datetime]:
    """An instant option of the audit commands, named in its error."""
    try:
        return _parse_instant(value)
    except typer.BadParameter as exc:
        raise typer.BadParameter(str(exc).replace("--as-of", name), param_hint=name) from None


def _register_commands() -> None:
    """Commands kept beside the code they drive: `import-legacy` and `reconcile` (legacy/),
    `audit …` and `balances` (audit/)."""
    from audit.cli import register as register_audit
    from legacy.cli import register

    register(app, console, err, Settings)
    register_audit(app, console, err, _audit_instant, _audit_opened)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
