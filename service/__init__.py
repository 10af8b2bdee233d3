"""Composition root of the ledger service: settings, clocks, wiring, CLI and the simulation."""
