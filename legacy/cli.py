"""`ledger import-legacy` and `ledger reconcile`, registered on the main typer app."""

from __future__ import annotations

from typing import Any, Callable

import typer
from rich.console import Console


def register(app: typer.Typer, console: Console, err: Console,
             load_settings: Callable[[], Any]) -> None:
    """Add the legacy commands to `app` (called by runtime.cli). `load_settings()` returns the
    service settings (`database_url`, `policy()`)."""
    from legacy import cli_import, cli_reconcile

    cli_import.register(app, console, err, load_settings)
    cli_reconcile.register(app, console, err, load_settings)
