"""Dependencies that only read `app.state`, run on the event loop."""

from __future__ import annotations

from typing import Any, Callable

from fastapi import Depends, Request


def state_dependency(get: Callable[[Request], Any]) -> Any:
    """`Depends` on `get(request)` run on the event loop: `get` only reads app.state (it may
    raise a LedgerError), and a sync dependency would cost a hop to the thread pool (a thread
    handoff) on every request."""

    async def dependency(request: Request) -> Any:
        return get(request)

    return Depends(dependency)
