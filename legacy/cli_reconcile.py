"""The `ledger reconcile` command: compare the imported legacy history with the rules, write the
reports, print the summary, and with `--apply` record the corrections as adjustment events.

Source: the issue's §2; rules billing-rules.md; bugs legacy-system.md §5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer, console: Console, err: Console,
             load_settings: Callable[[], Any]) -> None:
    """Add `reconcile` to `app`."""

    @app.command()
    def reconcile(out: Path = typer.Option(Path("var/reconcile"), "--out",
                                           help="directory for differences.csv/.json and summary.md"),
                  apply: bool = typer.Option(False, "--apply",
                                             help="record the corrections as adjustment events "
                                                  "(idempotent)")) -> None:
        """Reconcile the imported legacy history against the billing rules."""
        from legacy.log import open_legacy
        from legacy.reconcile import reconcile as run
        from legacy.replay import load_history
        from legacy.report import bug_lines, doctor_lines, write_reports

        settings = load_settings()
        legacy = open_legacy(settings.database_url)
        try:
            history = load_history(legacy)
            rec = run(history, settings.policy())
            paths = write_reports(rec, out)
            _print_summary(console, rec, bug_lines(rec), doctor_lines(rec))
            console.print("reports: " + ", ".join(str(p) for p in paths.values()))
            if apply:
                _apply(console, err, legacy, rec, history)
        finally:
            legacy.close()


def _apply(console: Console, err: Console, legacy, rec, history) -> None:
    """Record what is still missing (`plan_adjustments(rec, history)`: new corrections, and
    revisions of corrections recorded earlier with another amount), warning about the latter."""
    from legacy.reconcile import apply_adjustments, changed_adjustments, plan_adjustments

    targets = plan_adjustments(rec)
    changed = changed_adjustments(targets, history)
    planned = plan_adjustments(rec, history)
    new = apply_adjustments(legacy, planned)
    console.print(apply_summary(new, len(targets)))
    if changed:
        err.print(f"[yellow]{len(changed)} adjustment(s) were recorded earlier with other amounts "
                  f"(facts, rules or classification changed since): only the difference was "
                  f"recorded, as a revision (id suffix #r<n>), e.g. {changed[0]}[/]")


def apply_summary(recorded: int, corrections: int) -> str:
    """The line `--apply` prints: what this run recorded, and how many of the corrections owed
    the legacy log already held (recorded by an earlier run), never a count of ids skipped."""
    earlier = max(0, corrections - recorded)
    held = "" if not earlier else f"; all {earlier} were recorded by an earlier --apply" \
        if not recorded else f"; the other {earlier} were recorded by an earlier --apply"
    return f"adjustments: {recorded} recorded ({corrections} corrections in all{held})"


def _print_summary(console: Console, rec, bugs: list[tuple[str, ...]],
                   doctors: list[tuple[str, ...]]) -> None:
    """Rich tables: per bug class, then per doctor and currency."""
    console.print(f"{rec.items_checked} items checked, {len(rec.differences)} differences")
    table = Table(title="differences per bug class")
    for column in ("bug", "count", "units over", "units under", "paid over", "paid under", "blocked"):
        table.add_column(column, justify="left" if column == "bug" else "right")
    for row in bugs:
        table.add_row(*row)
    console.print(table)
    if doctors:
        table = Table(title="doctors (per currency)")
        for column in ("doctor", "currency", "over-paid", "under-paid", "withdrawal over-debit", "blocked"):
            table.add_column(column, justify="left" if column in ("doctor", "currency") else "right")
        for row in doctors:
            table.add_row(*row)
        console.print(table)
