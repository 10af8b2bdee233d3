"""The `ledger import-legacy` command: import, then prove the replay matches the source."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer, console: Console, err: Console,
             load_settings: Callable[[], Any]) -> None:
    """Add the command to `app`."""

    @app.command("import-legacy")
    def import_legacy_command(
            dsn: str = typer.Option(..., "--dsn", help="the legacy PostgreSQL database: libpq "
                                    "string or postgresql:// URL (?schema=name allowed)"),
            batch_size: int = typer.Option(500, "--batch-size", min=1, max=10_000,
                                           help="rows per read and per saved batch"),
            rejects: Path = typer.Option(Path("var/legacy-rejects.csv"), "--rejects",
                                         help="rejected rows with their reasons (.csv or .json)"),
    ) -> None:
        """Record the legacy database's history as legacy facts (read-only; re-runnable)."""
        from legacy.log import open_legacy
        from legacy.importer import import_legacy
        from legacy.replay import load_history, verify_against_source

        url = load_settings().database_url
        report = _run_with_progress(import_legacy, dsn, url, batch_size, rejects, err)
        console.print(report_table(report))
        for note in report.notes:
            err.print(f"[yellow]note[/] {note}")
        if report.rejects:
            err.print(f"[yellow]{len(report.rejects)} row(s) rejected[/], see {rejects}")
        legacy = open_legacy(url)
        try:
            problems = verify_against_source(dsn, load_history(legacy))
        finally:
            legacy.close()
        for line in problems:
            console.print(f"[red]DIFF[/] {line}")
        if problems:
            err.print(f"[red]replay does not match the source: {len(problems)} difference(s)[/]")
            raise typer.Exit(1)
        console.print("replay matches the source: every subscription counter and wallet exact")


def _run_with_progress(import_legacy, dsn: str, url: str, batch_size: int, rejects: Path,
                       err: Console):
    """import_legacy with one rich progress bar per table."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(),
                  console=err, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(table: str, done: int, total: int) -> None:
            if table not in tasks:
                tasks[table] = bar.add_task(table, total=total)
            bar.update(tasks[table], completed=done, total=total)

        return import_legacy(dsn, url, batch_size=batch_size, progress=progress,
                             rejects_path=rejects)


def report_table(report) -> Table:
    """The ImportReport as a rich table: rows per legacy table, then facts per kind."""
    table = Table(title=f"legacy import: {report.rows_read} rows in "
                        f"{report.elapsed_seconds:.1f} s ({report.rows_per_second:,.0f} rows/s)")
    for column in ("table", "read", "recorded", "already present", "rejected"):
        table.add_column(column, justify="left" if column == "table" else "right")
    for name, count in report.tables.items():
        table.add_row(name, str(count.read), str(count.recorded), str(count.present),
                      str(count.rejected))
    for kind, count in report.facts.items():
        table.add_row(f"[bold]{kind}[/]", str(count.read), str(count.recorded),
                      str(count.present), "")
    forgiven = sum(report.forgiven_units.values())
    if forgiven:
        table.caption = f"{forgiven} unit(s) recorded by sessions but never deducted (forgiven)"
    return table
