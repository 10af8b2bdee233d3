"""The simulated day: a tool that drives the ledger service from outside over HTTP.

`scenario` generates a realistic day, `oracle` is an independent model of billing-rules.md
(it imports nothing from the service), and `driver` starts the service, posts the day, ticks and
compares every answer with the oracle. Run it with `ledger simulate` or `make demo`.
"""
