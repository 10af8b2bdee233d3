"""Domain and application service of the telehealth billing ledger (billing-rules.md)."""
