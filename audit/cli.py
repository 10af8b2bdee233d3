"""`ledger audit digest|verify|statement` and `ledger balances --as-of`, registered on the main
typer app by runtime/cli.py (which supplies `open_audit`: a context manager yielding an
AuditService on the configured store)."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn)
from rich.table import Table
from rich.text import Text

from audit.chain import DigestFormatError, parse_digest
from audit.service import AuditLagging, AuditService
from audit.statements import StatementTooLong, as_csv

OpenAudit = Callable[[], ContextManager[AuditService]]
CATCH_UP_CALLS = 1000  # bound on catch-up calls before a digest (each up to 100,000 events)


class RateColumn(ProgressColumn):
    """Events per second of a task."""

    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:,.0f} events/s" if task.speed else "", style="progress.data.speed")


def _progress(err: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    RateColumn(), TimeElapsedColumn(), console=err, transient=True)


def register(app: typer.Typer, console: Console, err: Console, parse_instant: Callable,
             open_audit: OpenAudit) -> None:
    """Add `audit` (digest, verify, statement) and `balances` to `app`."""
    audit_app = typer.Typer(no_args_is_help=True, help="Tamper evidence: hash-chain digests and "
                                                       "their verification (docs/audit.md).")
    app.add_typer(audit_app, name="audit")

    @audit_app.command("digest")
    def digest(output: Optional[Path] = typer.Option(None, "--output", "-o",
                                                     help="also write the digest to this file")) -> None:
        """Chain what is committed, then print the head of every chain (keep it elsewhere)."""
        with open_audit() as service, _progress(err) as progress:
            tasks: dict[str, Any] = {}

            def report(name: str, position: int, head: int) -> None:
                task = tasks.setdefault(name, progress.add_task(f"chaining {name}", total=head))
                progress.update(task, completed=position, total=head)

            for _ in range(CATCH_UP_CALLS):
                if not sum(service.catch_up(progress=report).values()):
                    break
            text = service.digest().to_json()
        console.print_json(text) if console.is_terminal else print(text)
        if output is not None:
            output.write_text(text + "\n", encoding="utf-8")
            err.print(f"digest written to {output}")

    @audit_app.command("verify")
    def verify(digests: list[Path] = typer.Option([], "--digest", "-d", exists=True,
                                                  dir_okay=False, help="a digest taken earlier "
                                                  "(repeatable): prove the log still extends it")) -> None:
        """Recompute every chain from position zero; exit 1 naming the first bad position."""
        try:
            parsed = [parse_digest(path.read_text(encoding="utf-8")) for path in digests]
        except DigestFormatError as exc:
            raise typer.BadParameter(str(exc), param_hint="--digest") from None
        with open_audit() as service, _progress(err) as progress:
            tasks: dict[str, Any] = {}

            def report(chain: str, position: int, head: int) -> None:
                task = tasks.setdefault(chain, progress.add_task(f"verifying {chain}", total=head))
                progress.update(task, completed=position, total=head)

            result = service.verify(parsed, progress=report)
        _print_verification(console, result)
        if not result.ok:
            raise typer.Exit(1)

    @audit_app.command("follow")
    def follow(poll: float = typer.Option(1.0, min=0.05, max=60, help="seconds between polls"),
               report_every: float = typer.Option(60.0, min=1, help="seconds between lag lines")) -> None:
        """Keep the chains and the as-of history caught up, in this process, until interrupted
        (run it once beside API workers started with LEDGER_AUDIT_ENABLED=false)."""
        import time

        from audit.follower import AuditFollower

        with open_audit() as service:
            follower = AuditFollower(service, poll).start()
            try:
                while True:  # until Ctrl-C / SIGTERM
                    time.sleep(report_every)
                    err.print(f"audit lag (positions): {service.lag()}")
            except KeyboardInterrupt:
                pass
            finally:
                follower.close()

    @audit_app.command("statement")
    def statement(patient: Optional[str] = typer.Option(None, help="a patient id"),
                  doctor: Optional[str] = typer.Option(None, help="a doctor id"),
                  start: str = typer.Option(..., "--from", help="recorded time, exclusive"),
                  end: Optional[str] = typer.Option(None, "--to", help="recorded time, "
                                                    "inclusive; default now"),
                  currency: Optional[str] = typer.Option(None, help="doctor: one currency"),
                  fmt: str = typer.Option("csv", "--format", help="csv or json")) -> None:
        """An account statement: opening, every movement, closing (recorded time)."""
        if (patient is None) == (doctor is None):
            raise typer.BadParameter("name exactly one of --patient and --doctor")
        start_at = parse_instant(start, "--from")
        end_at = parse_instant(end, "--to") or datetime.now(timezone.utc).replace(microsecond=0)
        if start_at >= end_at:
            raise typer.BadParameter("--from must be before --to")
        with open_audit() as service:
            try:
                result = (service.patient_statement(patient, start_at, end_at) if patient else
                          service.doctor_statement(doctor, start_at, end_at, currency))
            except (StatementTooLong, AuditLagging) as exc:
                err.print(f"[red]{exc}[/]")
                raise typer.Exit(1) from None
        if result is None:
            err.print(f"[red]no account for {patient or doctor} by {end_at.isoformat()}[/]")
            raise typer.Exit(1)
        sys.stdout.write(as_csv(result) if fmt == "csv" else json.dumps(result, indent=2) + "\n")

    @app.command("balances")
    def balances(as_of: Optional[str] = typer.Option(None, "--as-of", help="recorded time; "
                                                     "default now"),
                 patient: list[str] = typer.Option([], help="patient ids (default: all)"),
                 doctor: list[str] = typer.Option([], help="doctor ids (default: all)"),
                 fmt: str = typer.Option("table", "--format", help="table, csv or json")) -> None:
        """Balances and wallets as the ledger showed them at recorded time --as-of."""
        moment = parse_instant(as_of, "--as-of") or datetime.now(timezone.utc).replace(microsecond=0)
        with open_audit() as service:
            service.catch_up()
            if not patient and not doctor:
                patient, doctor = service.accounts_at(moment)
            rows = _balance_rows(service, moment, patient, doctor)
        _print_balances(console, moment, rows, fmt)


def _balance_rows(service: AuditService, moment: datetime, patients: list[str],
                  doctors: list[str]) -> list[tuple]:
    """(kind, id, account, field values…) for each patient bucket and doctor currency."""
    rows = []
    for patient_id in patients:
        balance = service.patient_balance(patient_id, moment)
        for bucket, values in (balance or {}).get("buckets", {}).items():
            rows.append(("patient", patient_id, bucket, values["available"],
                         values["usable_now"], values["held"], values["charged"], "", ""))
    for doctor_id in doctors:
        wallet = service.doctor_wallet(doctor_id, moment)
        for item in (wallet or {}).get("wallets", []):
            rows.append(("doctor", doctor_id, item["currency"], item["available_minor"], "",
                         item["held_minor"], "", item["pending_minor"], item["withdrawn_minor"]))
    return rows


HEADERS = ("kind", "id", "bucket/currency", "available", "usable_now", "held", "charged",
           "pending", "withdrawn")


def _print_balances(console: Console, moment: datetime, rows: list[tuple], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps({"as_of": moment.isoformat(),
                          "rows": [dict(zip(HEADERS, r)) for r in rows]}, indent=2))
        return
    if fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(HEADERS)
        writer.writerows(rows)
        return
    table = Table(title=f"balances as of {moment.isoformat()} (recorded time; units, minor units)")
    for header in HEADERS:
        table.add_column(header, justify="right" if header not in ("kind", "id") else "left")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    console.print(table)


def _print_verification(console: Console, result: Any) -> None:
    for chain in result.chains:
        status = "[green]ok[/]" if chain.ok else "[red]FAILED[/]"
        console.print(f"{chain.chain}: {chain.events} events recomputed up to position "
                      f"{chain.position}, head link {chain.link} {status}")
        if chain.unchained:
            console.print(f"  {chain.unchained} position(s) after the chain's head "
                          f"{chain.chained_position} are not chained yet (nothing to compare)")
        if chain.first_bad is not None:
            console.print(f"  [red]first bad {chain.first_bad.describe()}[/]")
        for check in chain.digests:
            mark = "[green]ok[/]" if check.ok else "[red]FAILED[/]"
            console.print(f"  digest at position {check.head.position}: {mark} {check.detail}")
    for error in result.errors:
        console.print(f"[red]{error}[/]")
    console.print("verified: the log extends every digest given and matches its chain"
                  if result.ok else "[red]verification FAILED[/]")
