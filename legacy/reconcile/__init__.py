"""Reconcile the legacy history against the ledger's rules, item by item, and classify every
difference by the legacy bug it matches.

What legacy did comes only from the imported facts (never recomputed, I10); what is owed comes
from `ledger.rules.units_owed` and `ledger.tariff.rate_at` applied to the same event times.
Rules: billing-rules.md §2 (units), §3 (end, exhaustion), §4 (pools), §5 (pay), §7 (withdrawals),
§8 (timeouts), §9 (appointments). Bugs: legacy-system.md §3 (formulas) and §5 (H1 … B34).

Sign conventions (every Difference): `units_*` are units taken from the patient (a grant counts
as negative units taken, B24); `paid_*_minor` is money put into the doctor's wallet (a
withdrawal counts as negative, B22). `units_over = legacy − rules` (> 0: the patient was
over-charged), `paid_over = legacy − rules` (> 0: the doctor was over-paid).

Units are judged per pool owner (balances fold per owner, §4); the rules draw block by block,
each block judged at its own start like `ledger.billing.try_hold`. Corrections
(`plan_adjustments`) are keyed by what they correct, never by the bug, and a changed correction is
recorded as a revision holding only the difference.

Modules (each imports only those listed before it):
- `model`: `Difference`, `Reconciliation`, `format_money`, `BUGS`;
- `matching`: legacy facts indexed by item, the rules' view of each item, its tariff rate, and
  unattributed units matched to sessions (T5);
- `pools`: the rules' pools (§4) and the block-by-block draw on them;
- `classify`: an item's bug and its difference rows;
- `wallets`: withdrawal (B22), residual (B18) and blocked-earnings (B23) rows;
- `corrections`: `plan_adjustments`, `changed_adjustments`, `apply_adjustments`;
- `orchestration`: `reconcile`.
"""

from legacy.reconcile.corrections import (REVISION, AdjustmentKey, apply_adjustments,
                                          changed_adjustments, plan_adjustments)
from legacy.reconcile.matching import END_EVIDENCE_TOLERANCE_SECONDS, RESIDUAL
from legacy.reconcile.model import BUGS, Difference, Key, Reconciliation, format_money
from legacy.reconcile.orchestration import reconcile
from legacy.reconcile.wallets import MADE_WITHDRAWAL

__all__ = ["BUGS", "END_EVIDENCE_TOLERANCE_SECONDS", "MADE_WITHDRAWAL", "RESIDUAL", "REVISION",
           "AdjustmentKey", "Difference", "Key", "Reconciliation", "apply_adjustments",
           "changed_adjustments", "format_money", "plan_adjustments", "reconcile"]
