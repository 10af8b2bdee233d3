"""The rules' pools (billing-rules.md §4): one pool per payment reference with its active
members (a later grant under the same reference is a B24 row), a pool per unknown subscription a
charge names (B25), and the block-by-block draw that gives each item the units its patient's
pools pay (`_allocate`, §3 exhaustion).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ledger.rules import block_end
from legacy.history import LegacyHistory, Subscription
from legacy.reconcile.matching import _OPEN_END, _OPEN_START, _Facts, _Item, _t
from legacy.reconcile.model import Difference, Key


@dataclass
class _Pool:
    key: str
    owner: str
    holders: set[str]
    starts: datetime
    ends: datetime
    granted: dict[str, int]
    free: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.free = dict(self.granted)  # what is left as the rules draw on it


def _effective_end(sub: Subscription) -> datetime:
    """starts_at + duration (+7 days for a 30-day plan, §4); legacy end_date if unknown."""
    if sub.starts_at is not None and sub.plan_duration_days:
        extra = 7 if sub.plan_duration_days == 30 else 0
        return _t(sub.starts_at) + timedelta(days=sub.plan_duration_days + extra)
    return _t(sub.ends_at) or _OPEN_END


def _pools(history: LegacyHistory, facts: _Facts) -> tuple[list[_Pool], list[Difference]]:
    """One pool per payment reference (the first grant; later ones are B24 rows), with its
    active members; plus a pool per unknown subscription a charge names (deleted rows, B25),
    holding exactly the units legacy took from it."""
    groups: dict[str, list[Subscription]] = defaultdict(list)
    for sub in history.subscriptions.values():
        groups[sub.payment_reference or sub.key].append(sub)
    pools, dups, by_sub = [], [], {}
    for ref, subs in sorted(groups.items()):
        first, *rest = sorted(subs, key=lambda s: (_t(s.starts_at) or _OPEN_START, s.key))
        pool = _Pool(first.key, first.owner_id, {s.owner_id for s in subs},
                     _t(first.starts_at) or _OPEN_START, _effective_end(first), dict(first.granted))
        pools.append(pool)
        by_sub.update((s.key, pool) for s in subs)
        dups.extend(_b24_rows(ref, first, rest))
    for member in history.members.values():
        if member.status == "active" and member.subscription_key in by_sub:
            by_sub[member.subscription_key].holders.add(member.patient_id)
    pools.extend(_unknown_pools(history, facts))
    return pools, dups


def _unknown_pools(history: LegacyHistory, facts: _Facts) -> list[_Pool]:
    free: dict[Key, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for charges in facts.charges.values():
        for f in charges:
            if f.subscription_key not in history.subscriptions and f.patient_id:
                free[(f.subscription_key or "none", f.patient_id)][f.bucket or "text"] += f.units
    return [_Pool(f"unknown:{sub}:{patient}", patient, {patient}, _OPEN_START, _OPEN_END, dict(units))
            for (sub, patient), units in sorted(free.items())]


def _b24_rows(ref: str, first: Subscription, rest: list[Subscription]) -> list[Difference]:
    """B24: every later grant under one payment reference is over-granted (§4: one pool)."""
    rows = []
    for sub in rest:
        for bucket, n in sorted(sub.granted.items()):
            if n:
                rows.append(Difference(
                    sub.key, "subscription", "B24", sub.owner_id, None, bucket, -n, 0, None, 0, 0,
                    f"{sub.key}: payment {ref} was granted twice ({first.key} and {sub.key}); "
                    f"the second grant's {n} {bucket} unit(s) are over-granted (B24)."))
    return rows


def _draw_one(pools: list[_Pool], bucket: str, instant: datetime) -> str | None:
    """Take one unit of `bucket` for a block starting at `instant` from the first of `pools`
    (sorted soonest-expiring first, §4) usable then (starts ≤ instant < effective end, a free
    unit left); returns the pool's owner, or None when no pool is usable (exhaustion)."""
    for pool in pools:  # bounded: the holder's pools
        if pool.starts <= instant < pool.ends and pool.free.get(bucket, 0) > 0:
            pool.free[bucket] -= 1
            return pool.owner
    return None


def _allocate(items: list[_Item], pools: list[_Pool]) -> None:
    """Give each item the units its patient's pools pay, block by block as the ledger holds
    them (`ledger.billing.try_hold`): block k (k ≥ 0) is judged at its own start
    `block_end(start, k)`, from the usable pool that expires first (§4). The first block with
    no usable pool ends the item there (§3 exhaustion): `exhausted_at`, no later block drawn.

    Blocks of all items are drawn in the order of their start instants (ties: billable start,
    subject), so overlapping sessions of one pool share it as they would have live. Unmatched
    charges (e.g. the importer's "unattributed" consumption, dated at the pool's start) do not
    draw: they are kept as legacy recorded them and must not cut sessions short.
    """
    by_holder: dict[str, list[_Pool]] = defaultdict(list)
    for pool in sorted(pools, key=lambda p: (p.ends, p.starts, p.key)):
        for holder in sorted(pool.holders):
            by_holder[holder].append(pool)
    work = {i.subject: i for i in items if i.start is not None and i.owed > 0}
    queue = [(i.start, i.start, i.subject) for i in work.values()]
    heapq.heapify(queue)
    while queue:  # bounded: each item pushes at most `owed` entries, one per block
        instant, start, subject = heapq.heappop(queue)
        item = work[subject]
        owner = _draw_one(by_holder.get(item.patient_id, []), item.bucket, instant)
        if owner is None:
            item.exhausted_at = instant
            continue
        item.drawn[owner] = item.drawn.get(owner, 0) + 1
        item.rules_units += 1
        if item.rules_units < item.owed:
            heapq.heappush(queue, (block_end(start, item.rules_units), start, subject))


def _granted(pools: list[_Pool]) -> dict[Key, int]:
    """Units granted per (owner, bucket), one pool per payment reference; unknown pools excluded
    (their units are the legacy charges themselves, not a grant the history shows)."""
    out = defaultdict(int)
    for pool in pools:
        if not pool.key.startswith("unknown:"):
            for bucket, n in pool.granted.items():
                out[(pool.owner, bucket)] += n
    return dict(out)
