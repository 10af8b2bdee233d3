"""Reconciliation adjustments as their own aggregates in the legacy log (never edit a fact).

One aggregate per adjustment, id uuid5 of its `adjustment_id` (deterministic from the item and
what it corrects, never the bug; a revision adds "#r<n>", `legacy.reconcile.plan_adjustments`),
so `ledger reconcile --apply` run twice records each correction once.
"""

from __future__ import annotations

from dataclasses import asdict
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from ledger.domain import NS
from legacy.history import Adjustment


class ReconciliationAdjustment(Aggregate):
    """Event: Recorded(adjustment: dict of `legacy.history.Adjustment` fields)."""

    @staticmethod
    def create_id(adjustment_id: str) -> UUID:
        return uuid5(NS, "legacy-adjustment:" + adjustment_id)

    @event("Recorded")
    def __init__(self, adjustment_id: str, adjustment: dict) -> None:
        self.adjustment_id = adjustment_id
        self.adjustment = adjustment

    @classmethod
    def of(cls, adjustment: Adjustment) -> "ReconciliationAdjustment":
        return cls(adjustment_id=adjustment.adjustment_id, adjustment=asdict(adjustment))

    def as_adjustment(self) -> Adjustment:
        return Adjustment(**self.adjustment)
