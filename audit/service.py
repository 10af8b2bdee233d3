"""`AuditService`: the audit of one ledger store, as plain functions (no HTTP needed).

It holds the audit tables (in the ledger's database, audit/schema.py), the logs (the ledger's,
and the legacy log once it exists), one Chainer per log and the History. Everything the API,
the CLI and a future console ask goes through here:

- `catch_up()`: chain and fold what is committed (the background follower calls it);
- `digest()`: the heads of every chain (audit/chain.py `Digest`);
- `verify(digests, progress)`: recompute every chain from zero (audit/verify.py);
- `patient_balance(id, T)`, `doctor_wallet(id, T)`: as of recorded time T (audit/asof.py);
- `patient_statement(id, from, to)`, `doctor_statement(id, from, to, currency)`
  (audit/statements.py).

Reads first bring the history up to the log's safe head (bounded); if it is still behind and
the answer could miss an event recorded by T, they raise AuditLagging instead of answering.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_right
from datetime import datetime, timezone
from typing import Any, Callable

from audit import asof, statements, tracking
from audit.bulk import tune
from audit.chain import Digest
from audit.chainer import Chainer
from audit.history import NAME, TOPIC_SET, History
from audit.logs import PAGE, Log, Row
from audit.tracking import LostRace, Tracked
from audit.verify import VerifyReport, verify
from ledger.errors import error_type
from projections.store import open_store

READ_CATCH_UP_EVENTS = 20_000  # events a read may fold before answering
LEGACY_RECHECK_SECONDS = 30.0  # how often to look again for a legacy log not imported yet


AuditLagging = error_type(
    "AuditLagging", "audit_lagging", 503, "The audit history is catching up; retry",
    when="an as-of read or a statement whose instant the audit history has not reached yet "
         "(it is catching up with the log): retry (`Retry-After`)")


class AuditService:
    """The audit of the ledger application `ledger` stored at `database_url`.

    `legacy_log()` returns the legacy log's application, or None while there is none (it is
    asked again at each catch-up, so a log imported later is chained from then on). Thread-safe.
    """

    def __init__(self, ledger: Any, database_url: str,
                 legacy_log: Callable[[], Any | None] | None = None) -> None:
        # Asynchronous commits (`derived`): the chain reads its position and link at every
        # catch-up, the history keeps its cached accounts only while its tracking row is where
        # it left it (History.begin); docs/design.md, Asynchronous commits for derived rows.
        self.store = tune(open_store(database_url, derived=True))
        tracking.create_tables(self.store)
        self.ledger_log = Log("ledger", ledger)
        self._legacy_opener = legacy_log
        self._legacy: Log | None = None
        self._legacy_checked = float("-inf")
        self.chainers = {"ledger": Chainer(self.ledger_log, self.store)}
        self.history = History(self.ledger_log, self.store)
        self._lock = threading.RLock()  # one catch-up at a time in this process

    # ------------------------------------------------------------------------ following

    def logs(self) -> list[Log]:
        """The ledger's log, and the legacy log if it exists."""
        recheck = time.monotonic() - self._legacy_checked >= LEGACY_RECHECK_SECONDS
        if self._legacy is None and self._legacy_opener is not None and recheck:
            self._legacy_checked = time.monotonic()
            app = self._legacy_opener()
            if app is not None:
                self._legacy = Log("legacy", app)
                self.chainers["legacy"] = Chainer(self._legacy, self.store)
        return [self.ledger_log] + ([self._legacy] if self._legacy else [])

    def catch_up(self, max_events: int = 100_000, progress: Callable | None = None,
                 history: bool = True) -> dict:
        """Chain every log and (if `history`) fold the history up to their safe heads (bounded
        per call); returns {"chain:ledger": n, "chain:legacy": n, "history": n} events applied."""
        with self._lock:
            done, folded = {}, 0
            for log in self.logs():
                safe = self._safe_head(log)
                if log.chain == "ledger" and history:
                    done["chain:ledger"], folded = follow_ledger(
                        self.chainers["ledger"], self.history, max_events, safe, progress)
                    continue
                done[f"chain:{log.chain}"] = self.chainers[log.chain].catch_up(
                    max_events, progress=(lambda p, h, c=log.chain: progress(c, p, h))
                    if progress else None, safe=safe)
            if history:
                done["history"] = folded
            return done

    def _safe_head(self, log: Log) -> int | None:
        """The log's safe head, read once per catch-up for its chain and the history; the
        visible head's cheap check first (nothing new: no wait for writers in flight). When
        writers in flight outlast the wait, the followers' own position: no progress now."""
        behind = tracking.read(self.store, f"chain:{log.chain}").position
        if log.chain == "ledger":
            behind = min(behind, self.history.position().position)
        if log.head() <= behind:
            return behind
        safe = log.safe_head()
        return behind if safe is None else safe

    def lag(self) -> dict[str, int]:
        """Positions between each follower and its log's visible head."""
        out = {f"chain:{log.chain}": self.chainers[log.chain].lag() for log in self.logs()}
        out["history"] = max(0, self.ledger_log.head() - self.history.position().position)
        return out

    # ------------------------------------------------------------------------------ chain

    def digest(self) -> Digest:
        """The head of every chain as stored now (catch up first for the latest)."""
        return Digest(tuple(self.chainers[log.chain].head() for log in self.logs()))

    def verify(self, digests: list[Digest] = (), progress: Callable | None = None) -> VerifyReport:
        """Recompute every chain from position zero against stored links and `digests`."""
        return verify(self.logs(), self.store, list(digests), progress)

    # ---------------------------------------------------------------------------- as of

    def fresh_for(self, as_of: datetime) -> None:
        """Fold what is committed (bounded); raise AuditLagging if events recorded by `as_of`
        may still be unfolded."""
        with self._lock:
            safe = self.ledger_log.safe_head()
            self.history.catch_up(READ_CATCH_UP_EVENTS, safe=safe)
            row = self.history.position()
        if safe is None or row.position < safe:
            if row.recorded_at is None or row.recorded_at <= as_of:
                raise AuditLagging(f"the audit history is at position {row.position} of "
                                   f"{safe if safe is not None else self.ledger_log.head()}")

    def patient_balance(self, patient_id: str, as_of: datetime) -> dict | None:
        """As of recorded time `as_of` (audit/asof.py); None if the patient held no pool."""
        self.fresh_for(as_of)
        return asof.patient_balance_as_of(self.store, patient_id, as_of)

    def doctor_wallet(self, doctor_id: str, as_of: datetime) -> dict | None:
        """As of recorded time `as_of` (audit/asof.py); None if unknown then."""
        self.fresh_for(as_of)
        return asof.doctor_wallet_as_of(self.store, doctor_id, as_of)

    def patient_statement(self, patient_id: str, start: datetime, end: datetime) -> dict | None:
        """Opening, movements and closing in (start, end] (audit/statements.py)."""
        self.fresh_for(end)
        return statements.patient_statement(self.store, patient_id, start, end)

    def doctor_statement(self, doctor_id: str, start: datetime, end: datetime,
                         currency: str | None = None) -> dict | None:
        """Per currency: opening, movements and closing in (start, end]."""
        self.fresh_for(end)
        return statements.doctor_statement(self.store, doctor_id, start, end, currency)

    def accounts_at(self, as_of: datetime, limit: int = 100_000) -> tuple[list[str], list[str]]:
        """(patient ids, doctor ids) with an account recorded by `as_of`, in id order."""
        at = self.store.ts(as_of)
        with self.store.locked():
            patients = self.store.query("SELECT DISTINCT patient_id FROM audit_members WHERE "
                                        "recorded_at <= ? ORDER BY patient_id LIMIT ?",
                                        (at, limit))
            doctors = self.store.query("SELECT DISTINCT doctor_id FROM audit_wallet_currencies "
                                       "WHERE recorded_at <= ? ORDER BY doctor_id LIMIT ?",
                                       (at, limit))
        return [r[0] for r in patients], [r[0] for r in doctors]

    def close(self) -> None:
        self.store.close()
        if self._legacy is not None:
            self._legacy.app.close()


def follow_ledger(chainer: Chainer, history: History, max_events: int, safe: int | None,
                  progress: Callable | None = None) -> tuple[int, int]:
    """Chain and fold the ledger's log up to `safe` from ONE read: each page of stored events
    (from the lower of the two positions) is linked onto the chain and its folded topics
    decoded once and folded into the history; both tracking rows move, the links and the
    history rows are written, in one transaction. Returns (events chained, events folded).

    Bounded: pages of PAGE rows until `max_events` rows are read. A page another process
    applied first (LostRace on either row) rolls back both and ends the call; the next call
    resumes from the stored rows (each at its own position).
    """
    store, log = history.store, history.log
    chain_row, history_row = tracking.read(store, chainer.name), history.position()
    start = min(chain_row.position, history_row.position)
    if safe is None or safe <= start:
        return 0, 0
    history.begin(history_row)
    chained = folded = read = 0
    for page in log.pages(start, safe):
        end = page[-1][0] if len(page) >= PAGE else safe
        try:
            chain_row, history_row, counts = _follow_page(
                chainer, history, chain_row, history_row, page, end)
        except LostRace:
            return chained, folded
        chained, folded, read = chained + counts[0], folded + counts[1], read + len(page)
        if progress is not None:
            progress("ledger", chain_row.position, safe)
            progress("history", history_row.position, safe)
        if read >= max_events:
            break
    return chained, folded


def _follow_page(chainer: Chainer, history: History, chain_row: Tracked,
                 history_row: Tracked, page: list[Row], end: int
                 ) -> tuple[Tracked, Tracked, tuple[int, int]]:
    """One page of `follow_ledger`: (new chain row, new history row, (chained, folded))."""
    log, store = history.log, history.store
    to_chain = page[bisect_right(page, chain_row.position, key=_position):]
    decoded = {stored[0]: log.decode(stored) for stored in page
               if stored[0] > history_row.position and stored[3] in TOPIC_SET}
    try:
        new_history = history.fold(history_row, list(decoded.items()), end) \
            if end > history_row.position else history_row
        new_chain, links = chainer.extend(chain_row, to_chain, _recorded_at(
            decoded.get(to_chain[-1][0]))) if to_chain else (chain_row, [])
        with store.locked(), store.transaction():
            for name in sorted({chainer.name, NAME}):  # the locks in one order everywhere
                store.lock(name)
            if new_chain is not chain_row:
                chainer.write(chain_row, new_chain, links)
            if new_history is not history_row:
                history.write(history_row, new_history)
    except BaseException:
        history.forget()
        raise
    history.trim()
    return new_chain, new_history, (len(to_chain), len(decoded))


def _position(stored: Row) -> int:
    return stored[0]


def _recorded_at(event: Any) -> Any:
    return None if event is None else event.timestamp.astimezone(timezone.utc)
