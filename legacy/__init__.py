"""Legacy history: import the legacy Laravel database as replayable facts, replay it, reconcile it.

Rules: legacy-system.md (what the old system did), billing-rules.md (what is owed), I10.
"""
