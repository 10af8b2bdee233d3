"""The `ledger import-legacy` command (to be written)."""

from __future__ import annotations

import typer
from rich.console import Console


def register(app: typer.Typer, console: Console, err: Console) -> None:
    """Add the command to `app`."""
