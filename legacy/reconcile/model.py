"""The result model of a reconciliation: `Difference` (one row per subject and bug),
`Reconciliation` (the rows plus the rules' totals that state the corrected balances) and
`format_money`.

Sign conventions (every Difference): `units_*` are units taken from the patient (a grant counts
as negative units taken, B24); `paid_*_minor` is money put into the doctor's wallet (a
withdrawal counts as negative, B22). `units_over = legacy − rules` (> 0: the patient was
over-charged), `paid_over = legacy − rules` (> 0: the doctor was over-paid).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


# Classes of difference, legacy-system.md §5 (H1 … B26) plus A2: an appointment legacy billed
# itself (§3.4), which the rules never bill (billing-rules §9, I10).
BUGS = ("H1", "H2", "B3", "B4", "B5", "B6", "B7", "B9", "B12", "B13", "B14", "B16", "B17",
        "B18", "B19", "B22", "B23", "B24", "B26", "A2", "unexplained")
Key = tuple[str, str]


def format_money(minor: int, currency: str | None) -> str:
    """Minor units as major units with thousands separators: 700000, "MWK" → "7,000.00 MWK".

    MWK and USD both have 2 decimal places (billing-rules.md preamble).
    """
    sign = "-" if minor < 0 else ""
    major, cents = divmod(abs(minor), 100)
    return f"{sign}{major:,}.{cents:02d} {currency or ''}".rstrip()


@dataclass(frozen=True)
class Difference:
    """One difference between legacy and the rules for one subject (item key).

    `bucket` is None for money-only rows; `currency` None for units-only rows; `blocked_minor`
    is the B23 amount a doctor could not withdraw (no money difference), `refused_minor` the
    amount of one withdrawal request legacy refused for it (a row of its own, subject the
    request); `account_id` is the
    owner of the pools the row's units belong to when it is not the patient (a family-plan
    member draws on the owner's pool, §4), so corrections land where the units were taken. An
    item whose units came from pools of several owners has one row per owner (units that
    owner's, the item's money on the first row only).
    """

    subject: str
    item_type: str
    bug: str
    patient_id: str | None
    doctor_id: str | None
    bucket: str | None
    units_legacy: int
    units_rules: int
    currency: str | None
    paid_legacy_minor: int
    paid_rules_minor: int
    explanation: str
    blocked_minor: int = 0
    account_id: str | None = None  # whose units these are (pool owner); None: patient_id
    refused_minor: int = 0  # B23: the amount of a withdrawal request legacy refused

    @property
    def units_over(self) -> int:
        """Units legacy took beyond the rules (negative: under-charged)."""
        return self.units_legacy - self.units_rules

    @property
    def paid_over(self) -> int:
        """Minor units legacy put in the wallet beyond the rules (negative: under-paid)."""
        return self.paid_legacy_minor - self.paid_rules_minor

    def as_dict(self) -> dict:
        """Fields plus the two derived amounts (the CSV/JSON row shape)."""
        row = {name: getattr(self, name) for name in self.__dataclass_fields__}
        row.update(units_over=self.units_over, paid_over_minor=self.paid_over)
        return row

    @classmethod
    def from_dict(cls, row: dict) -> "Difference":
        """Inverse of `as_dict` (derived keys ignored; a field added later takes its default)."""
        return cls(**{name: row[name] for name in cls.__dataclass_fields__ if name in row})


@dataclass
class Reconciliation:
    """Differences plus the rules' totals needed to state the corrected balances.

    `granted`: (patient, bucket) → units granted, one pool per payment reference (§4), owner's.
    `rules_units`: (pool owner, bucket) → units the rules take (items, per owner drawn on, +
    accepted unmatched charges).
    `rules_money`: (doctor, currency) → rules pay + accepted unmatched credits − debits −
    withdrawals made once (§5, §7). `accepted_unmatched`: subjects of facts with no item to
    judge them by (kept as legacy recorded them).
    """

    differences: list[Difference]
    items_checked: int
    accepted_unmatched: list[str] = field(default_factory=list)
    granted: dict[Key, int] = field(default_factory=dict)
    rules_units: dict[Key, int] = field(default_factory=dict)
    rules_money: dict[Key, int] = field(default_factory=dict)

    def rules_balances(self) -> tuple[dict[Key, int], dict[Key, int]]:
        """(patient units per (patient, bucket), doctor money per (doctor, currency)) by the rules."""
        units = defaultdict(int)
        for key, n in self.granted.items():
            units[key] += n
        for key, n in self.rules_units.items():
            units[key] -= n
        return dict(units), dict(self.rules_money)

    def by_bug(self) -> dict[str, dict]:
        """bug → {count, units_over, units_under, paid_over: {cur: n}, paid_under: {cur: n}, blocked}."""
        out: dict[str, dict] = {}
        for d in self.differences:
            t = out.setdefault(d.bug, {"count": 0, "units_over": 0, "units_under": 0,
                                       "paid_over": {}, "paid_under": {}, "blocked": {}})
            t["count"] += 1
            _split(t, "units_over", "units_under", d.units_over)
            if d.currency and d.paid_over:
                side = "paid_over" if d.paid_over > 0 else "paid_under"
                t[side][d.currency] = t[side].get(d.currency, 0) + abs(d.paid_over)
            if d.currency and d.blocked_minor:
                t["blocked"][d.currency] = t["blocked"].get(d.currency, 0) + d.blocked_minor
        return {bug: out[bug] for bug in BUGS if bug in out}

    def per_patient(self) -> dict[Key, dict]:
        """(patient, bucket) → {over, under}: units over- and under-charged (under as a positive)."""
        out: dict[Key, dict] = {}
        for d in self.differences:
            if d.patient_id and d.bucket and d.units_over:
                t = out.setdefault((d.patient_id, d.bucket), {"over": 0, "under": 0})
                _split(t, "over", "under", d.units_over)
        return dict(sorted(out.items()))

    def per_doctor(self) -> dict[Key, dict]:
        """(doctor, currency) → {over, under, withdrawal_over_debit, blocked} in minor units.

        Withdrawals double-debited (B22) are kept apart from pay: they are not earnings.
        """
        out: dict[Key, dict] = {}
        for d in self.differences:
            if not (d.doctor_id and d.currency) or not (d.paid_over or d.blocked_minor):
                continue
            t = out.setdefault((d.doctor_id, d.currency),
                               {"over": 0, "under": 0, "withdrawal_over_debit": 0, "blocked": 0})
            if d.item_type == "withdrawal":
                t["withdrawal_over_debit"] -= d.paid_over  # paid_over < 0 when debited twice
            else:
                _split(t, "over", "under", d.paid_over)
            t["blocked"] += d.blocked_minor
        return dict(sorted(out.items()))


def _split(totals: dict, over: str, under: str, amount: int) -> None:
    if amount > 0:
        totals[over] += amount
    elif amount < 0:
        totals[under] -= amount
