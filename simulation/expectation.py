"""The notifications the simulated day must produce, predicted from the oracle, and the
comparison with what the webhook receiver got (docs/webhooks.md is the catalogue).

`ExpectingOracle` is the oracle (simulation/oracle.py) with its observation points filled in:
wherever the rules make the ledger record an event a webhook derives from, it notes the
notification the catalogue promises, keyed by what identifies it (a session's block, an end's
instant and reason, a patient's bucket and units, …). Like the oracle it imports nothing of the
service.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from simulation.marketplace_oracle import PRESENCE_EVENTS, MarketOracle
from simulation.oracle import KINDS, OPool, OSession, Oracle, Timings

CONSULTATION_POSTS = ("consultation.booked", "consultation.activated", "consultation.joined",
                      "consultation.ended", "consultation.cancelled", "consultation.declined",
                      "consultation.admin_cancelled", "consultation.refunded")


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


class ExpectingOracle(Oracle):
    """The oracle, noting the expected notifications in `expected` (type → Counter of keys)."""

    def __init__(self, timings: Timings = Timings(), threshold: int = 1) -> None:
        super().__init__(timings)
        self.threshold = threshold
        self.expected: dict[str, Counter] = defaultdict(Counter)

    def note(self, event_type: str, *key) -> None:
        self.expected[event_type][key] += 1

    # ---- sessions

    def noted_session(self, s: OSession, paid_until_before: datetime | None) -> None:
        if s.paid_until() != paid_until_before:
            self.note("session.paid_until_changed", s.sid, _iso(s.paid_until()))

    def noted_charge(self, s: OSession, block: int) -> None:
        self.note("session.block_charged", s.sid, block)

    def noted_end(self, s: OSession, first: bool) -> None:
        self.note("session.ended", s.sid, _iso(s.ended_at), s.end_reason)

    def noted_settlement(self, s: OSession, charged_now: int, reversed_blocks: list) -> None:
        self.note("session.settled", s.sid, s.units_owed, len(reversed_blocks))

    # ---- units, pools, withdrawals

    def available(self, patient: str, bucket: str) -> int:
        """Free units of the pools the patient owns or is an active member of (§4)."""
        total = 0
        for ref in self.patients.get(patient, {}).get("pools", []):
            pool = self.pools[ref]
            span = pool.members.get(patient)
            if patient == pool.owner or (span and span[1] is None):
                total += pool.free[bucket]
        return total

    def linked(self, pool: OPool) -> list[str]:
        active = [p for p, span in pool.members.items() if span[1] is None and p != pool.owner]
        return sorted({pool.owner, *active})

    def noted_units(self, pool: OPool, bucket: str, delta: int) -> None:
        if delta:
            for patient in self.linked(pool):
                after = self.available(patient, bucket)
                self._fall(patient, bucket, after - delta, after)

    def noted_unlink(self, pool: OPool, patient: str) -> None:
        for bucket in KINDS:
            after = self.available(patient, bucket)
            self._fall(patient, bucket, after + pool.free[bucket], after)

    def _fall(self, patient: str, bucket: str, before: int, after: int) -> None:
        if after < before and (before > self.threshold >= after or before > 0 == after):
            self.note("balance.low", patient, bucket, after)

    def noted_expiry(self, pool: OPool, forfeited: dict) -> None:
        self.note("pool.expired", pool.pid)

    def noted_withdrawal(self, status: str, doctor: str, currency: str, request: str,
                         amount: int) -> None:
        self.note(f"withdrawal.{status}", request, amount)


class ExpectingMarket(MarketOracle):
    """The marketplace oracle noting a priced consultation's lifecycle notifications into the
    unit oracle's `expected`: booked, activated, confirmed, started (the first join), closed
    (status, reason, captured or released), earning released, refunded — one per change the
    rules make, whichever post or tick made it."""

    def __init__(self, oracle: ExpectingOracle) -> None:
        super().__init__(oracle)
        self.note = oracle.note
        handlers = oracle.handlers
        for event_type in CONSULTATION_POSTS:
            handlers[event_type] = self._watching(handlers[event_type], "consultation_id")
        for event_type in PRESENCE_EVENTS:
            handlers[event_type] = self._watching(handlers[event_type], "session_id")

    def _watching(self, handler, key: str):
        def watched(at, p, now, event_type):
            return self._watch(p.get(key, ""), lambda: handler(at, p, now, event_type))
        return watched

    def _apply(self, c, action: str, as_of: datetime) -> dict:
        return self._watch(c.cid, lambda: super(ExpectingMarket, self)._apply(c, action, as_of))

    def _watch(self, cid: str, call):
        c = self.consultations.get(cid)
        before = (c.status, c.refund is not None, c.earning_at is not None) if c else None
        result = call()  # a refusal raises before anything changes: nothing is noted
        c = self.consultations.get(cid)
        if c is not None:
            self._changed(c, before)
        return result

    def _changed(self, c, before) -> None:
        status, refunded, released = before or (None, False, False)
        if c.status != status:
            if before is None:
                self.note("consultation.booked", c.cid)
            elif c.status in ("activated", "confirmed"):
                self.note(f"consultation.{c.status}", c.cid)
            elif c.status == "in_progress":
                self.note("consultation.started", c.cid)
            elif c.closed:
                self.note("consultation.closed", c.cid, c.status, c.close_reason,
                          "captured" if c.captured else "released")
        if c.refund is not None and not refunded:
            self.note("consultation.refunded", c.cid)
        if c.earning_at is not None and not released:
            self.note("consultation.earning_released", c.cid)


def received_key(event_type: str, data: dict) -> tuple:
    """The key of a received notification, comparable with ExpectingOracle's."""
    if event_type == "consultation.closed":
        return (data["consultation_id"], data["status"], data["reason"], data["money"])
    if event_type.startswith("consultation."):
        return (data["consultation_id"],)
    if event_type == "session.paid_until_changed":
        return (data["session_id"], data["paid_until"])
    if event_type == "session.block_charged":
        return (data["session_id"], data["block"])
    if event_type == "session.ended":
        return (data["session_id"], data["ended_at"], data["reason"])
    if event_type == "session.settled":
        return (data["session_id"], data["units_owed"], data["units_reversed"])
    if event_type == "balance.low":
        return (data["patient_id"], data["bucket"], data["units_available"])
    if event_type == "pool.expired":
        return (data["pool_id"],)
    return (data["request_id"], data["amount_minor"])


@dataclass
class WebhookComparison:
    """Per type: expected, delivered (distinct webhook-ids), missing, unexpected; receipts of
    an id already received (redeliveries, same id), order violations per ordering key, and
    deliveries whose signature did not verify."""

    rows: dict[str, dict] = field(default_factory=dict)
    redeliveries: int = 0
    out_of_order: list[str] = field(default_factory=list)
    rejected: int = 0

    @property
    def missing(self) -> int:
        return sum(r["missing"] for r in self.rows.values())

    @property
    def unexpected(self) -> int:
        return sum(r["unexpected"] for r in self.rows.values())

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.out_of_order or self.rejected)

    def differences(self, limit: int = 50) -> list[str]:
        out = [f"webhooks {t}: {r['missing']} missing, {r['unexpected']} unexpected "
               f"(e.g. {r['examples']})" for t, r in sorted(self.rows.items())
               if r["missing"] or r["unexpected"]]
        out += [f"webhooks out of order: {line}" for line in self.out_of_order[:limit]]
        if self.rejected:
            out.append(f"webhooks: {self.rejected} deliveries failed signature verification")
        return out


def compare(expected: dict[str, Counter], received: list, rejected: int = 0) -> WebhookComparison:
    """Compare the expectation with the receiver's arrivals (simulation/receiver.Received)."""
    got: dict[str, Counter] = defaultdict(Counter)
    first: dict[str, object] = {}
    last_position: dict[str, int] = {}
    result = WebhookComparison(rejected=rejected)
    for item in received:
        if item.webhook_id in first:
            result.redeliveries += 1
            continue
        first[item.webhook_id] = item
        got[item.type][received_key(item.type, item.data)] += 1
        key = _ordering_key(item.type, item.data)
        if item.payload["position"] < last_position.get(key, 0):
            result.out_of_order.append(f"{key}: position {item.payload['position']} after "
                                       f"{last_position[key]}")
        last_position[key] = max(last_position.get(key, 0), item.payload["position"])
    for event_type in sorted(set(expected) | set(got)):
        want, have = expected.get(event_type, Counter()), got.get(event_type, Counter())
        missing, unexpected = want - have, have - want
        examples = [("missing", k) for k in list(missing)[:2]] + \
                   [("unexpected", k) for k in list(unexpected)[:2]]
        result.rows[event_type] = {"expected": sum(want.values()),
                                   "delivered": sum(have.values()),
                                   "missing": sum(missing.values()),
                                   "unexpected": sum(unexpected.values()), "examples": examples}
    return result


def _ordering_key(event_type: str, data: dict) -> str:
    if event_type.startswith("consultation."):
        return f"consultation:{data['consultation_id']}"
    if event_type.startswith("session."):
        return f"session:{data['session_id']}"
    if event_type == "balance.low":
        return f"patient:{data['patient_id']}"
    if event_type == "pool.expired":
        return f"pool:{data['pool_id']}"
    return f"wallet:{data['doctor_id']}:{data['currency']}"
