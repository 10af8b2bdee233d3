"""`import_legacy`: record the legacy database's history in the legacy log.

Phase 1 streams each legacy table (read-only snapshot, bounded batches, `legacy.source`) and
records one `LegacyRecord` per row, plus one `LegacyCredit`/`LegacyDebit` per wallet transaction.
Phase 2 records the inferred `LegacyCharge` facts and the wallet residuals (`legacy.facts`).
Every id is deterministic (`legacy.records`) and `save_batch` skips stored ids, so a second run
adds nothing and an interrupted run, started again, completes the same log in the same order.
Rows that cannot be interpreted go to the rejects report; the import goes on. See docs/legacy.md.
"""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from eventsourcing.persistence import IntegrityError

from legacy.log import LegacyLedger, open_legacy
from legacy.facts import (NO_SECOND_DEBIT, AllocationResult, Evidence, Pool, RequestRef,
                          WalletSums, allocate_charges, appointment_evidence,
                          call_session_evidence, match_second_debit, money_of,
                          text_appointment_evidence, text_session_evidence, transaction_fact,
                          wallet_residuals)
from legacy.history import BUCKETS, Fact
from legacy.items import ITEM_BUILDERS
from legacy.normalise import Context, Rejected, check_role
from legacy.records import LegacyFact, LegacyRecord, fact_aggregate_id, record_id
from legacy.stored import stored_ids
from legacy.source import TABLES, count_rows, probe_columns, snapshot, stream

FACTS = "facts"
Progress = Callable[[str, int, int], None]  # (table or "facts", rows done, rows in table)


@dataclass
class TableCount:
    """Rows of one table: read, recorded now, already in the log, rejected."""

    read: int = 0
    recorded: int = 0
    present: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class RejectedRow:
    table: str
    row_id: str | None
    reason: str


@dataclass
class ImportReport:
    """What one run did. `facts[kind]` counts facts recorded / already present by kind;
    `forgiven_units` is evidence no counter shows (B6 …), kept on its items, never charged."""

    tables: dict[str, TableCount] = field(default_factory=dict)
    facts: dict[str, TableCount] = field(default_factory=dict)
    rejects: list[RejectedRow] = field(default_factory=list)
    forgiven_units: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    elapsed_seconds: float = 0.0

    @property
    def rows_read(self) -> int:
        return sum(count.read for count in self.tables.values())

    @property
    def appended(self) -> int:
        """Aggregates this run added to the legacy log (0 on a repeated run)."""
        return (sum(c.recorded for c in self.tables.values())
                + sum(c.recorded for c in self.facts.values()))

    @property
    def rows_per_second(self) -> float:
        return self.rows_read / self.elapsed_seconds if self.elapsed_seconds else 0.0


@dataclass
class State:
    """What phase 2 needs from phase 1 (small per-row summaries, not the rows)."""

    ctx: Context = field(default_factory=Context)
    pools: dict[str, Pool] = field(default_factory=dict)
    access: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    appointments: dict[str, dict] = field(default_factory=dict)
    withdrawals: dict[tuple[str, int], list[RequestRef]] = field(default_factory=dict)
    second_debited: set[str] = field(default_factory=set)  # requests matched to a second debit
    evidence: list[Evidence] = field(default_factory=list)
    wallets: list[dict] = field(default_factory=list)
    sums: dict[str, WalletSums] = field(default_factory=lambda: defaultdict(WalletSums))
    # per doctor: the balance moved by rejected wallet_transactions rows, and their ids
    rejected_money: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rejected_rows: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def withdrawal_for(self, doctor_id: str, amount_minor: int,
                       at: datetime | None) -> tuple[str | None, tuple[str, ...]]:
        """(request, tied candidates) for a debit naming no withdrawal, at `at`: this doctor's
        requests of this amount, matched by time (`legacy.facts.match_second_debit`), each
        request at most once. Debits come in wallet_transactions id order, so the same source
        gives the same matches on every run."""
        matched, tied = match_second_debit(at, self.withdrawals.get((doctor_id, amount_minor), []),
                                           self.second_debited)
        if matched:
            self.second_debited.add(matched)
        return matched, tied


def import_legacy(dsn: str, ledger_url: str, batch_size: int = 500,
                  progress: Progress | None = None,
                  rejects_path: str | Path | None = None) -> ImportReport:
    """Import the legacy database at `dsn` into the legacy log beside the ledger at
    `ledger_url`; returns the counts. `progress(table, done, total)` is called after every
    saved batch (an exception from it stops the import; running it again resumes).
    `rejects_path` (.csv, else JSON) receives the rejected rows with their reasons.
    Raises psycopg.Error when the source cannot be read, ValueError on a batch_size outside
    1..100000; what was saved before stays saved (a re-run resumes)."""
    app = open_legacy(ledger_url)
    report, state = ImportReport(), State()
    started = time.monotonic()
    try:
        with snapshot(dsn) as conn:
            present = probe_columns(conn)
            for table in TABLES:
                _import_table(conn, app, table, present, batch_size, state, report, progress)
        _record_facts(app, state, batch_size, report, progress)
    finally:
        report.elapsed_seconds = time.monotonic() - started
        app.close()
    if rejects_path is not None:
        write_rejects(report.rejects, Path(rejects_path))
    return report


def _import_table(conn, app: LegacyLedger, table: str, present: dict[str, set[str]],
                  batch_size: int, state: State, report: ImportReport,
                  progress: Progress | None) -> None:
    """Stream one table into the log in batches; a missing table is noted, not an error."""
    count = report.tables.setdefault(table, TableCount())
    if table not in present:
        report.notes.append(f"table {table} is missing in the source: nothing read")
        return
    total = count_rows(conn, table)
    for rows in stream(conn, table, present[table], batch_size):
        specs = [spec for row in rows for spec in _specs(table, row, state, report)]
        saved = sum(save_batch(app, specs))
        count.read += len(rows)
        count.recorded += saved
        count.present += len(specs) - saved
        if progress is not None:
            progress(table, count.read, total)


def _specs(table: str, row: dict, state: State, report: ImportReport) -> list:
    """What records one row: a Fact (wallet_transactions) or a (table, row_id, item) triple;
    [] and a reject when the row cannot be interpreted."""
    try:
        if table == "wallet_transactions":
            return [_transaction(row, state)]
        item = ITEM_BUILDERS[table](row, state.ctx)
    except Rejected as exc:
        report.rejects.append(RejectedRow(table, _row_id(row), str(exc)))
        report.tables[table].rejected += 1
        if table == "wallet_transactions":
            _note_rejected_money(row, state)
        return []
    _observe(table, item, state)
    return [(table, _row_id(row), item)]


def _note_rejected_money(row: dict, state: State) -> None:
    """What a rejected transaction row moved in its doctor's balance (when its type and amount
    can be read), so that the wallet's residual keeps it apart from B18's (wallet_residuals)."""
    try:
        kind, amount = money_of(row)
    except Rejected:
        return  # its amount cannot be known: it stays in the balance residual
    doctor_id = str(row.get("doctor_id"))
    state.rejected_money[doctor_id] += amount if kind == "LegacyCredit" else -amount
    state.rejected_rows[doctor_id].append(f"wallet_transactions:{_row_id(row)}")


def _row_id(row: dict) -> str | None:
    return None if row.get("id") is None else str(row["id"])


def _transaction(row: dict, state: State) -> Fact:
    """The credit/debit fact of a wallet_transactions row; remembers its sums and, for an
    appointment credit, the unit A2 deducted with it (evidence)."""
    doctor_id = None if row.get("doctor_id") is None else str(row["doctor_id"])
    if doctor_id is not None:
        check_role(state.ctx, doctor_id, "doctor", "doctor_id")
    fact = transaction_fact(row, state.ctx.doctor_currency.get(doctor_id, "USD"),
                            state.withdrawal_for)
    state.sums[fact.doctor_id].add(fact)
    evidence = appointment_evidence(fact, state.appointments.get(fact.subject))
    if evidence is not None:
        state.evidence.append(evidence)
    return fact


def _observe(table: str, item: dict, state: State) -> None:
    """Keep what phase 2 needs from an accepted item."""
    if table == "subscriptions":
        consumed = {b: item["granted"][b] - item["remaining"][b] for b in BUCKETS}
        state.pools[item["key"]] = Pool(item["key"], item["owner_id"], item["starts_at"],
                                        consumed)
        state.access[item["owner_id"]].add(item["key"])
    elif table == "subscription_members" and item["status"] == "active":
        state.access[item["patient_id"]].add(item["subscription_key"])
    elif table == "appointments":
        state.appointments[item["key"]] = {"patient_id": item["patient_id"],
                                           "kind": item["kind"]}
    elif table == "withdrawal_requests" and item["status"] not in NO_SECOND_DEBIT:
        key = (item["doctor_id"], item["amount_minor"])
        state.withdrawals.setdefault(key, []).append(
            RequestRef(item["key"], item["paid_at"] or item["requested_at"]))
    elif table == "doctor_wallets":
        state.wallets.append(item)
    else:
        _observe_evidence(table, item, state)


def _observe_evidence(table: str, item: dict, state: State) -> None:
    collect = {"text_sessions": text_session_evidence, "call_sessions": call_session_evidence,
               "text_appointment_sessions": text_appointment_evidence}.get(table)
    evidence = collect(item) if collect else None
    if evidence is not None:
        state.evidence.append(evidence)


def _record_facts(app: LegacyLedger, state: State, batch_size: int, report: ImportReport,
                  progress: Progress | None) -> None:
    """Phase 2: inferred charges, then wallet residuals, saved in bounded batches."""
    allocation: AllocationResult = allocate_charges(state.pools, state.access, state.evidence)
    report.forgiven_units = dict(allocation.forgiven)
    facts = list(allocation.charges)
    for wallet in state.wallets:
        doctor = wallet["doctor_id"]
        facts.extend(wallet_residuals(wallet, state.sums[doctor], state.rejected_money[doctor],
                                      tuple(state.rejected_rows[doctor])))
    for start in range(0, len(facts), batch_size):
        batch = facts[start:start + batch_size]
        for fact, saved in zip(batch, save_batch(app, batch)):
            count = report.facts.setdefault(fact.kind, TableCount())
            count.read += 1
            count.recorded += saved
            count.present += not saved
        if progress is not None:
            progress(FACTS, start + len(batch), len(facts))


def _aggregate(spec):
    if isinstance(spec, Fact):
        return LegacyFact.of(spec)
    table, row_id, item = spec
    return LegacyRecord(table=table, row_id=row_id, item=item)


def _aggregate_id(spec):
    return fact_aggregate_id(spec.fact_id) if isinstance(spec, Fact) else record_id(*spec[:2])


def save_batch(app: LegacyLedger, specs: list) -> list[bool]:
    """Save the aggregates of `specs` not stored yet, in one transaction; per spec, whether it
    was saved now. The stored ids are asked for in bulk (`legacy.stored`); if a concurrent run
    stores some meanwhile, the library raises IntegrityError having written nothing, and the
    batch goes through `save_new`, which skips stored ids one by one (the flags may then
    over-count)."""
    stored = stored_ids(app, [_aggregate_id(spec) for spec in specs])
    fresh = [spec for spec in specs if _aggregate_id(spec) not in stored]
    if fresh:
        try:
            app.save(*map(_aggregate, fresh))
        except IntegrityError:
            # save() drained the aggregates' pending events: build them again
            app.save_new(map(_aggregate, fresh))
    return [_aggregate_id(spec) not in stored for spec in specs]


def write_rejects(rejects: list[RejectedRow], path: Path) -> None:
    """The rejects report: CSV (table,row_id,reason) when `path` ends in .csv, else JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("table", "row_id", "reason"))
            writer.writerows((r.table, r.row_id, r.reason) for r in rejects)
        return
    path.write_text(json.dumps([asdict(r) for r in rejects], indent=2))
