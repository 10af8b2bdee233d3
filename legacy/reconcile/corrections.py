"""The corrections that make every balance what the rules give: planned from a
`Reconciliation` (`plan_adjustments`), keyed by what they correct, never by the bug; a changed
correction is recorded as a revision holding only the difference (`changed_adjustments` names
them); `apply_adjustments` records them in the legacy log (`legacy.adjustments`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from legacy.history import Adjustment, LegacyHistory
from legacy.reconcile.model import Reconciliation


AdjustmentKey = tuple[str, str, str | None, str | None]
REVISION = "#r"  # adjustment_id suffix of a revision: "<base id>#r<n>", n ≥ 1


def plan_adjustments(rec: Reconciliation, history: LegacyHistory | None = None) -> list[Adjustment]:
    """The corrections that make every balance what the rules give, sorted by id.

    Without `history`: the target of every correction, one per (subject, what), ids
    f"{subject}:units-{bucket}" (+ f"-{account_id}" when the units are a pool owner's other
    than the patient) and f"{subject}:pay-{currency}", deterministic and free of the bug name,
    so that a relabelled item (B3 → B12 after a policy change) keeps its ids. Units:
    +units_over back to `account_id or patient_id`; money: −paid_over to the doctor (rows
    sharing an id are summed). B23 rows carry none.

    With `history`: only what is still missing beside the adjustments it holds, matched by
    what they correct (`_target_key`: subject, units/pay, bucket/currency, owner/doctor), not
    by id or bug. Nothing recorded → the target itself; recorded with another total (facts,
    rules or classification changed) → the difference alone, as a revision
    f"{base}{REVISION}{n}" carrying the current bug ("reversed" when no correction is owed
    any more). Folding facts + every adjustment then gives `rec.rules_balances()`.
    """
    targets = _targets(rec)
    if history is None:
        return sorted(targets.values(), key=lambda a: a.adjustment_id)
    recorded, ids = _recorded(history), {a.adjustment_id for a in history.adjustments}
    out = []
    for key in sorted(set(targets) | set(recorded), key=lambda k: tuple(map(str, k))):
        target, before = targets.get(key), recorded.get(key, [])
        delta = _amount(target) - sum(map(_amount, before))
        if delta and not before:
            out.append(target)
        elif delta:
            out.append(_revision(target, before, delta, ids))
    return sorted(out, key=lambda a: a.adjustment_id)


def _targets(rec: Reconciliation) -> dict[AdjustmentKey, Adjustment]:
    """Target adjustment per key from the difference rows (rows sharing a key summed)."""
    out: dict[AdjustmentKey, Adjustment] = {}
    for d in rec.differences:
        if d.units_over and d.bucket:
            owner = f"-{d.account_id}" if d.account_id else ""
            _add(out, Adjustment(f"{d.subject}:units-{d.bucket}{owner}", d.subject, d.bug,
                                 patient_id=d.account_id or d.patient_id, bucket=d.bucket,
                                 units=d.units_over))
        if d.paid_over and d.currency:
            _add(out, Adjustment(f"{d.subject}:pay-{d.currency}", d.subject, d.bug,
                                 doctor_id=d.doctor_id, amount_minor=-d.paid_over,
                                 currency=d.currency))
    return {key: a for key, a in out.items() if _amount(a)}


def _add(out: dict[AdjustmentKey, Adjustment], adjustment: Adjustment) -> None:
    key = _target_key(adjustment)
    same = out.get(key)
    if same is not None:
        adjustment = replace(same, units=same.units + adjustment.units,
                             amount_minor=same.amount_minor + adjustment.amount_minor)
    out[key] = adjustment


def _target_key(a: Adjustment) -> AdjustmentKey:
    """What an adjustment corrects, whatever its id or bug: (subject, "pay", currency, doctor)
    for money, (subject, "units", bucket, owner) for units."""
    if a.currency is not None:
        return (a.subject, "pay", a.currency, a.doctor_id)
    return (a.subject, "units", a.bucket, a.patient_id)


def _amount(a: Adjustment | None) -> int:
    """The signed amount an adjustment moves (units or minor units); 0 for None."""
    if a is None:
        return 0
    return a.amount_minor if a.currency is not None else a.units


def _recorded(history: LegacyHistory) -> dict[AdjustmentKey, list[Adjustment]]:
    """The recorded adjustments by key, in log order."""
    out: dict[AdjustmentKey, list[Adjustment]] = defaultdict(list)
    for a in history.adjustments:
        out[_target_key(a)].append(a)
    return dict(out)


def _revision(target: Adjustment | None, before: list[Adjustment], delta: int,
              ids: set[str]) -> Adjustment:
    """The difference `delta` as a new adjustment: id f"{base}#r{n}" with the first n ≥ 1 not
    recorded (base: the target's id, else the first recorded id without its suffix)."""
    template = target or replace(before[0], bug="reversed")
    base = target.adjustment_id if target else before[0].adjustment_id.split(REVISION)[0]
    n = next(n for n in range(1, len(ids) + 2) if f"{base}{REVISION}{n}" not in ids)
    amounts = {"amount_minor": delta} if template.currency is not None else {"units": delta}
    return replace(template, adjustment_id=f"{base}{REVISION}{n}", **amounts)


def changed_adjustments(planned: list[Adjustment], history: LegacyHistory) -> list[str]:
    """Ids of targets (`plan_adjustments(rec)`, without history) whose key the history already
    holds with another total, plus the first id of keys recorded but no longer owed: the facts,
    the rules or the classification changed since. `plan_adjustments(rec, history)` records the
    difference as a revision; these are what the command warns about."""
    recorded, targets = _recorded(history), {_target_key(a): a for a in planned}
    changed = [a.adjustment_id for key, a in targets.items()
               if key in recorded and _amount(a) != sum(map(_amount, recorded[key]))]
    changed += [before[0].adjustment_id for key, before in recorded.items()
                if key not in targets and sum(map(_amount, before))]
    return sorted(changed)


def apply_adjustments(app, adjustments: list[Adjustment]) -> int:
    """Record each adjustment as its own ReconciliationAdjustment in the legacy log; returns how
    many were new (0 on a second run: ids are uuid5 of adjustment_id)."""
    from legacy.adjustments import ReconciliationAdjustment

    return app.save_new([ReconciliationAdjustment.of(a) for a in adjustments])
