"""The legacy page's model: the reconciliation of an imported legacy history, by bug class.

The same computation as `ledger reconcile` (legacy/reconcile: `load_history` of the legacy log,
then `reconcile` with the service's policy; pure, it changes nothing), summarised per bug class
with `legacy/report.py`'s figures, and each class's items. It reads the whole legacy log, so the
result is kept per process and computed again only when the legacy log's head moves (an import
or `ledger reconcile --apply` wrote to it).
"""

from __future__ import annotations

import threading
from typing import Any

from legacy.log import legacy_log_exists, open_legacy
from legacy.reconcile import reconcile
from legacy.replay import load_history
from legacy.report import bug_lines

ITEMS_PER_BUG = 500  # items listed per bug class on the page (the count says how many exist)
_lock = threading.Lock()


def legacy_page(state: Any) -> dict | None:
    """{"head", "items_checked", "differences", "bugs": [{"bug", "count", …, "rows", "more"}],
    "unmatched"}, or None when no legacy history was imported beside this ledger."""
    settings = state.settings
    if not legacy_log_exists(settings.database_url):
        return None
    with _lock:  # one reconciliation at a time per process; the cache is per head
        app = open_legacy(settings.database_url)
        try:
            head = int(app.recorder.max_notification_id() or 0)
            cached = getattr(state, "console_reconciliation", None)
            if cached is None or cached[0] != head:
                cached = (head, reconcile(load_history(app), settings.policy()))
                state.console_reconciliation = cached
        finally:
            app.close()
    head, rec = cached
    by_bug: dict[str, list] = {}
    for difference in rec.differences:
        by_bug.setdefault(difference.bug, []).append(difference)
    bugs = []
    for bug, count, units_over, units_under, paid_over, paid_under, blocked in bug_lines(rec):
        items = by_bug.get(bug, [])
        bugs.append({"bug": bug, "count": int(count), "units_over": units_over,
                     "units_under": units_under, "paid_over": paid_over,
                     "paid_under": paid_under, "blocked": blocked,
                     "rows": items[:ITEMS_PER_BUG], "more": max(0, len(items) - ITEMS_PER_BUG)})
    return {"head": head, "items_checked": rec.items_checked,
            "differences": len(rec.differences), "bugs": bugs,
            "unmatched": len(rec.accepted_unmatched)}
