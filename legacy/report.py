"""Reconciliation reports: differences.csv, differences.json and a readable summary.md.

Shapes: one CSV row / JSON object per Difference (`Difference.as_dict`: fields plus `units_over`
and `paid_over_minor`, money in integer minor units); summary.md in major units with the
currency code ("7,000.00 MWK"). Source: the issue's §2 (`ledger reconcile`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from legacy.reconcile import Difference, Reconciliation, format_money

COLUMNS = tuple(Difference.__dataclass_fields__) + ("units_over", "paid_over_minor")


def write_reports(rec: Reconciliation, out_dir: Path | str) -> dict[str, Path]:
    """Write the three reports into `out_dir` (created if missing); returns name → path.

    Overwrites earlier reports in the same directory. Raises OSError if it cannot write.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "differences.csv", "json": out / "differences.json",
             "summary": out / "summary.md"}
    _write_csv(rec, paths["csv"])
    paths["json"].write_text(json.dumps(as_json(rec), indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")
    paths["summary"].write_text(summary_markdown(rec), encoding="utf-8")
    return paths


def _write_csv(rec: Reconciliation, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for d in rec.differences:
            writer.writerow(d.as_dict())


def as_json(rec: Reconciliation) -> dict:
    """The JSON document: differences plus the summary totals (keys joined as "a|b")."""
    return {
        "items_checked": rec.items_checked,
        "differences": [d.as_dict() for d in rec.differences],
        "by_bug": rec.by_bug(),
        "patients": {f"{p}|{b}": t for (p, b), t in rec.per_patient().items()},
        "doctors": {f"{d}|{c}": t for (d, c), t in rec.per_doctor().items()},
        "accepted_unmatched": rec.accepted_unmatched,
    }


def _money(amounts: dict[str, int]) -> str:
    return ", ".join(format_money(n, c) for c, n in sorted(amounts.items()) if n) or "–"


def bug_lines(rec: Reconciliation) -> list[tuple[str, ...]]:
    """(bug, count, units over, units under, money over, money under, blocked) as text, BUGS order."""
    return [(bug, str(t["count"]), str(t["units_over"]), str(t["units_under"]),
             _money(t["paid_over"]), _money(t["paid_under"]), _money(t["blocked"]))
            for bug, t in rec.by_bug().items()]


def doctor_lines(rec: Reconciliation) -> list[tuple[str, ...]]:
    """(doctor, currency, over-paid, under-paid, withdrawal over-debit, blocked) as text."""
    return [(doctor, currency, format_money(t["over"], currency), format_money(t["under"], currency),
             format_money(t["withdrawal_over_debit"], currency), format_money(t["blocked"], currency))
            for (doctor, currency), t in rec.per_doctor().items()]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    if not rows:
        return ["(none)", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def summary_markdown(rec: Reconciliation) -> str:
    """The readable summary: per bug class, per patient (units), per doctor per currency (money)."""
    lines = ["# Legacy reconciliation", "",
             f"{rec.items_checked} items checked, {len(rec.differences)} differences; "
             f"{len(rec.accepted_unmatched)} unmatched subjects kept as legacy recorded them.", "",
             "## Per bug class", ""]
    lines += _table(("bug", "count", "units over", "units under", "paid over", "paid under", "blocked"),
                    bug_lines(rec))
    lines += ["## Per patient (units)", ""]
    lines += _table(("patient", "bucket", "over-charged", "under-charged"),
                    [(p, b, str(t["over"]), str(t["under"])) for (p, b), t in rec.per_patient().items()])
    lines += ["Units a duplicate grant gave (B24) count as under-charged: the patient holds units the "
              "rules never granted.", ""]
    lines += ["## Per doctor and currency (money)", ""]
    lines += _table(("doctor", "currency", "over-paid", "under-paid", "withdrawal over-debit",
                     "blocked (B23)"), doctor_lines(rec))
    lines += ["Blocked (B23) is what legacy's 'verified earnings' rule kept a doctor from withdrawing; "
              "it is no money difference and gets no adjustment.", ""]
    refused = [d for d in rec.differences if d.refused_minor]
    if refused:
        lines += ["## Withdrawal requests legacy refused (B23)", ""]
        lines += _table(("request", "doctor", "amount"),
                        [(d.subject, d.doctor_id or "", format_money(d.refused_minor, d.currency))
                         for d in refused])
    unexplained = [d for d in rec.differences if d.bug == "unexplained"]
    if unexplained:
        lines += ["## Unexplained", ""] + [f"- {d.explanation}" for d in unexplained[:200]]
        if len(unexplained) > 200:
            lines.append(f"- … and {len(unexplained) - 200} more (see differences.csv)")
        lines.append("")
    return "\n".join(lines)

