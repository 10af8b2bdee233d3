"""The chainer: follows each event log, committed events only, and extends its hash chain.

Not on the write path: it runs after commits, like a projection (audit/follower.py runs it in
the service every `LEDGER_AUDIT_POLL_SECONDS`; `ledger audit digest` runs it before printing).
Per batch it reads up to PAGE stored events after its tracked position and not past the log's
safe head (audit/logs.py), computes their links (audit/chain.py), and writes the links plus the
new head in ONE transaction (audit/tracking.py: exactly once, even with several processes).
The service chains the ledger's log together with the history from one read of each page
(audit/service.py `follow_ledger`, through `extend` and `write`); `catch_up` chains alone.
"""

from __future__ import annotations

from typing import Any, Callable

from audit import tracking
from audit.bulk import insert_rows
from audit.chain import Head, empty_head, genesis, link_rows
from audit.logs import Log, Row
from audit.tracking import LostRace, Tracked

Progress = Callable[[int, int], None]


def tracking_name(chain: str) -> str:
    return f"chain:{chain}"


class Chainer:
    """The hash chain of one log, kept in `audit_chain` and `audit_tracking` of `store`."""

    def __init__(self, log: Log, store: Any) -> None:
        self.log, self.store = log, store
        self.name = tracking_name(log.chain)

    def head(self) -> Head:
        """The chain's head as stored (what a digest states)."""
        row = tracking.read(self.store, self.name)
        if row.position == 0:
            return empty_head(self.log.chain)
        return Head(self.log.chain, row.position, row.link or genesis(self.log.chain).hex(),
                    row.events, row.recorded_at)

    def catch_up(self, max_events: int = 100_000, progress: Progress | None = None,
                 safe: int | None = None) -> int:
        """Chain committed events up to the safe head (or `safe`, one the caller read);
        returns how many were chained.

        Bounded: at most `max_events` (rounded up to a page) per call. `progress(position,
        head)` after each batch. Another process chaining the same batch first is not an error:
        this call stops and the next one continues from the new head.
        """
        row, chained = tracking.read(self.store, self.name), 0
        if safe is None and self.log.head() > row.position:
            safe = self.log.safe_head()
        if safe is None or safe <= row.position:
            return 0
        for page in self.log.pages(row.position, safe):
            try:
                row = self._append(row, page)
            except LostRace:
                return chained
            chained += len(page)
            if progress is not None:
                progress(row.position, safe)
            if chained >= max_events:
                break
        return chained

    def _append(self, row: Tracked, page: list[Row]) -> Tracked:
        """Link `page` onto the chain at `row` and store links and head in one transaction."""
        new, links = self.extend(row, page)
        store = self.store
        with store.locked(), store.transaction():
            store.lock(self.name)
            self.write(row, new, links)
        return new

    def extend(self, row: Tracked, page: list[Row],
               recorded_at: Any = None) -> tuple[Tracked, list[tuple[str, int, bytes]]]:
        """(the chain's new head after `page`, its (chain, position, link) rows): `page`
        (non-empty, positions after `row.position`, in order) linked onto the chain at `row`,
        in memory. `recorded_at`: the last row's recorded time if the caller decoded it."""
        previous = bytes.fromhex(row.link) if row.link else genesis(self.log.chain)
        links = link_rows(previous, page)
        chain = self.log.chain
        new = Tracked(self.name, page[-1][0], links[-1].hex(), row.events + len(page),
                      recorded_at or self.log.recorded_at(page[-1]))
        return new, [(chain, stored[0], link) for stored, link in zip(page, links)]

    def write(self, old: Tracked, new: Tracked, links: list[tuple[str, int, bytes]]) -> None:
        """Inside the caller's transaction, holding this chain's lock: move the head from
        `old` to `new` (LostRace if another process moved it) and store the links."""
        tracking.advance(self.store, old, new)
        insert_links(self.store, links)

    def lag(self) -> int:
        """Positions between the chain's head and the log's visible head."""
        return max(0, self.log.head() - tracking.read(self.store, self.name).position)


def insert_links(store: Any, links: list[tuple[str, int, bytes]]) -> None:
    """Write (chain, position, link) rows."""
    insert_rows(store, "audit_chain", ("chain", "position", "link"), links)
