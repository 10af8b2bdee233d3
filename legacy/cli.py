"""`ledger import-legacy` and `ledger reconcile`, registered on the main typer app."""

from __future__ import annotations

import typer
from rich.console import Console


def register(app: typer.Typer, console: Console, err: Console) -> None:
    """Add the legacy commands to `app` (called by service.cli)."""
    from legacy import cli_import, cli_reconcile

    cli_import.register(app, console, err)
    cli_reconcile.register(app, console, err)
