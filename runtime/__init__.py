"""Composition root of the ledger service: settings, clocks, wiring, the ASGI factory and the
`ledger` CLI. Only entry points import it (uvicorn, the console script, tests, bench)."""
