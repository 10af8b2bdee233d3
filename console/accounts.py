"""The patient and doctor pages' models, built from the API's own read functions.

Balances and wallets are what `GET /v1/patients/{id}/balance` and `GET /v1/doctors/{id}/wallet`
answer (now from the projections, or `as_of` a recorded time from the audit history); the
statements are `GET …/statement` (audit/statements.py). The console calls those route functions
(api/routes.py, api/audit_routes.py) directly, so a page and the API cannot disagree. Their
errors (unknown account, an as-of in the future, the audit catching up) are LedgerErrors the
page shows with the API's status.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fastapi import Request
from markupsafe import Markup

from api.audit_routes import get_doctor_statement, get_patient_statement
from api.routes import get_doctor_wallet, get_patient_balance, wait_until_fresh
from console.charts import stacked_bars, steps_over_time
from console.format import major_number, parse_instant
from ledger.domain import Wallet
from ledger.rules import BUCKETS, utc_seconds

DEFAULT_PERIOD = timedelta(days=7)
PLOT_LEAD = timedelta(minutes=30)
POOL_PARTS = ("available", "held", "charged", "forfeited", "revoked")


@dataclass
class Period:
    """The statement period (from, to] and the as-of instant (None: now, live)."""

    as_of: datetime | None
    start: datetime
    end: datetime


def period(request: Request, as_of: datetime | None, start: datetime | None,
           end: datetime | None) -> Period:
    """Defaults: `to` is the as-of instant or the ledger's clock now; `from` is 7 days before."""
    now = utc_seconds(request.app.state.clock())
    end = end or as_of or now
    return Period(as_of=as_of, start=start or end - DEFAULT_PERIOD, end=end)


# ------------------------------------------------------------------------------ patient


def patient_page(request: Request, role: str, patient_id: str, when: Period) -> dict:
    """{"balance", "statement", "pools", "plots"}: raises the API's LedgerErrors."""
    state = request.app.state
    position = 0 if when.as_of else wait_until_fresh(request, ("balances",), None)
    balance = get_patient_balance(request, patient_id, role, projector=state.projector,
                                  clock=state.clock, ledger=state.ledger, position=position,
                                  as_of=when.as_of)
    statement = get_patient_statement(request, patient_id, role, when.start, when.end, "json")
    return {"balance": balance, "statement": statement,
            "plots": {"pools": pools_plot(balance), "balance": balance_plot(statement)}}


def pools_plot(balance: dict) -> Markup:
    """A bar per pool and bucket with units granted: available, held, charged, forfeited,
    revoked (usage per bucket, billing-rules.md §4, I6)."""
    labels, parts = [], {name: [] for name in POOL_PARTS}
    for pool in balance["pools"]:
        for bucket in BUCKETS:
            counts = pool["buckets"][bucket]
            if not counts["granted"]:
                continue
            labels.append(f"{pool['payment_reference']} · {bucket}")
            for name in POOL_PARTS:
                parts[name].append(counts[name])
    return stacked_bars("Units per pool and bucket", labels, parts, "units")


def _plot_start(statement_from: str, moments: list[datetime]) -> datetime:
    """Where a plot's time axis starts: the period's start, or shortly before its first
    movement when the period is much longer (the picture would be squeezed to the right)."""
    start = parse_instant(statement_from)
    if moments:
        start = max(start, min(moments) - PLOT_LEAD)
    return start


def balance_plot(statement: dict) -> Markup:
    """Available units per bucket over the statement period (recorded time)."""
    end = parse_instant(statement["to"])
    start = _plot_start(statement["from"], [parse_instant(m["recorded_at"])
                                            for m in statement["movements"]])
    series = {}
    for bucket in BUCKETS:
        section = statement["buckets"][bucket]
        points = [(start, section["opening"]["available"])]
        points += [(parse_instant(m["recorded_at"]), m["balance"]["available"])
                   for m in statement["movements"] if m["bucket"] == bucket]
        points.append((end, section["closing"]["available"]))
        if any(value for _, value in points) or len(points) > 2:
            series[f"{bucket}: available"] = points
    return steps_over_time("Available units over time", series, "units")


# ------------------------------------------------------------------------------- doctor


def doctor_page(request: Request, role: str, doctor_id: str, when: Period) -> dict:
    """{"wallet", "statement", "withdrawals", "plots"}: raises the API's LedgerErrors."""
    state = request.app.state
    position = 0 if when.as_of else wait_until_fresh(request, ("wallets",), None)
    wallet = get_doctor_wallet(request, doctor_id, role, projector=state.projector,
                               ledger=state.ledger, position=position, as_of=when.as_of)
    statement = get_doctor_statement(request, doctor_id, role, when.start, when.end, None,
                                     "json")
    return {"wallet": wallet, "statement": statement,
            "withdrawals": withdrawals(state.ledger, doctor_id, wallet, statement),
            "plots": {"earnings": earnings_plot(statement)}}


def withdrawals(ledger: Any, doctor_id: str, wallet: dict, statement: dict) -> list[dict]:
    """Every withdrawal of the doctor's wallets (the Wallet aggregates, now): request id,
    currency, amount, status (held, completed, rejected) and, when the statement period holds
    them, when it was held and finished (recorded time)."""
    moments: dict[str, dict[str, str]] = {}
    for section in statement["currencies"].values():
        for m in section["movements"]:
            if m.get("request_id"):
                kind = "held_at" if m["event"].endswith("WithdrawalHeld") else "finished_at"
                moments.setdefault(m["request_id"], {})[kind] = m["recorded_at"]
    out = []
    for currency in sorted({w["currency"] for w in wallet["wallets"]}):
        aggregate = ledger.load(Wallet.create_id(doctor_id, currency))
        for request_id, item in sorted((getattr(aggregate, "withdrawals", None) or {}).items()):
            out.append({"request_id": request_id, "currency": currency,
                        "amount_minor": item["amount_minor"], "status": item["status"],
                        **moments.get(request_id, {})})
    return out


def earnings_plot(statement: dict) -> Markup:
    """Per currency, earned (credited − reversed) and available over the period, in major
    units (recorded time)."""
    end = parse_instant(statement["to"])
    start = _plot_start(statement["from"], [
        parse_instant(m["recorded_at"]) for section in statement["currencies"].values()
        for m in section["movements"]])
    series = {}
    for currency, section in statement["currencies"].items():
        for field in ("earned", "available"):
            def value(balance: dict) -> float:
                minor = (balance["credited"] - balance["reversed"] if field == "earned"
                         else balance["available"])
                return major_number(minor, currency)
            points = [(start, value(section["opening"]))]
            points += [(parse_instant(m["recorded_at"]), value(m["balance"]))
                       for m in section["movements"]]
            points.append((end, value(section["closing"])))
            series[f"{currency} {field}"] = points
    return steps_over_time("Earnings over time", series, "major units")
