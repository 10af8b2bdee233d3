"""The aggregates of the legacy log: one per imported legacy row, one per legacy fact.

Ids are uuid5 of the legacy table and row id (or of the fact id, itself derived from legacy table
and row ids), so importing the same source twice adds nothing: `LegacyLedger.save_new` skips ids
already stored, and an interrupted import resumes where it stopped.

- `LegacyRecord` — event `Imported(table, row_id, item)`: the row as the importer normalised it
  (`item` has the fields of the matching `legacy.history` dataclass; see `legacy.normalise`).
- `LegacyFact` — created by exactly one of `LegacyCharge`, `LegacyCredit`, `LegacyDebit`, whose
  attributes are the fields of `legacy.history.Fact` (flat, so the stored JSON reads as the fact).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from datetime import datetime
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from ledger.domain import NS
from legacy.history import Fact

FACT_KINDS = ("LegacyCharge", "LegacyCredit", "LegacyDebit")


def record_id(table: str, row_id: int | str) -> UUID:
    """The id of the `LegacyRecord` of row `row_id` of legacy table `table`."""
    return uuid5(NS, f"legacy:{table}:{row_id}")


def fact_aggregate_id(fact_id: str) -> UUID:
    """The id of the `LegacyFact` recording `fact_id` (e.g. "wallet_transactions:55")."""
    return uuid5(NS, f"legacy-fact:{fact_id}")


class LegacyRecord(Aggregate):
    """One legacy row, normalised. Never changes after import (the legacy DB is history)."""

    @staticmethod
    def create_id(table: str, row_id: int) -> UUID:
        return record_id(table, row_id)

    @event("Imported")
    def __init__(self, table: str, row_id: int, item: dict) -> None:
        self.table = table
        self.row_id = row_id
        self.item = item


class LegacyFact(Aggregate):
    """One legacy movement (I10: recorded as it happened, never recomputed)."""

    class Recorded(Aggregate.Created):
        """Base of the three fact events; its fields are those of `legacy.history.Fact`."""

        fact_id: str
        kind: str
        subject: str
        at: datetime | None
        source: str
        patient_id: str | None
        doctor_id: str | None
        bucket: str | None
        units: int
        subscription_key: str | None
        amount_minor: int
        currency: str | None
        affects_total_earned: bool
        detail: dict
        affects_balance: bool
        affects_total_withdrawn: bool

        def apply(self, aggregate: "LegacyFact") -> None:
            aggregate.fact = fact_of_event(self)

    class LegacyCharge(Recorded):
        """Units taken off a subscription counter."""

    class LegacyCredit(Recorded):
        """Money credited to a doctor's wallet."""

    class LegacyDebit(Recorded):
        """Money debited from a doctor's wallet."""

    def __init__(self) -> None:
        self.fact: Fact | None = None  # set by the creation event's apply()

    @classmethod
    def of(cls, fact: Fact) -> "LegacyFact":
        """The aggregate recording `fact`; raises ValueError on an unknown `fact.kind`."""
        if fact.kind not in FACT_KINDS:
            raise ValueError(f"unknown legacy fact kind {fact.kind!r}")
        return cls._create(getattr(cls, fact.kind), id=fact_aggregate_id(fact.fact_id),
                           **asdict(fact))


FACT_FIELDS = tuple(f.name for f in fields(Fact))


def fact_of_event(domain_event) -> Fact:
    """The `Fact` a `LegacyFact` creation event carries."""
    return Fact(**{name: getattr(domain_event, name) for name in FACT_FIELDS})
