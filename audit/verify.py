"""`ledger audit verify`: recompute every chain from position zero and check it.

For each log, streaming page by page (memory flat): recompute link_n for every stored event
and compare it with

- the link stored when that position was chained (`audit_chain`): the first position where they
  differ, or where an event is missing (deleted, or the tail truncated) or present without
  having been chained (inserted), is the first bad position, named with its event;
- every digest given (`--digest FILE`): the log extends a digest when the recomputed link after
  the digest's position, and the number of events up to it, equal the digest's. A digest is the
  proof that does not depend on this database: an attacker who rewrote events *and* the stored
  links is still caught by any digest taken before the rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from audit.chain import Digest, Head, genesis, link_notification
from audit.chainer import tracking_name
from audit.logs import PAGE, Log
from audit import tracking

Progress = Callable[[str, int, int], None]  # (chain, position, head)


@dataclass(frozen=True)
class BadPosition:
    """The first position where the log and its chain disagree, and the event stored there."""

    position: int
    reason: str
    originator_id: str | None = None
    originator_version: int | None = None
    topic: str | None = None

    def describe(self) -> str:
        event = (f"event {self.topic} of {self.originator_id} v{self.originator_version}"
                 if self.topic else "no event")
        return f"position {self.position} ({event}): {self.reason}"


@dataclass(frozen=True)
class DigestCheck:
    """Whether the log extends one digest head."""

    head: Head
    ok: bool
    detail: str


@dataclass
class ChainReport:
    """Outcome for one chain: events recomputed, the recomputed head, what failed."""

    chain: str
    events: int = 0
    position: int = 0
    link: str = ""
    chained_position: int = 0  # the stored chain's head when verification started
    first_bad: BadPosition | None = None
    digests: list[DigestCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_bad is None and all(d.ok for d in self.digests)

    @property
    def unchained(self) -> int:
        """Positions past the stored chain's head (recomputed, nothing stored to compare)."""
        return max(0, self.position - self.chained_position)


@dataclass
class VerifyReport:
    chains: list[ChainReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # e.g. a digest naming an absent log

    @property
    def ok(self) -> bool:
        return not self.errors and all(c.ok for c in self.chains)

    @property
    def events(self) -> int:
        return sum(c.events for c in self.chains)


def verify(logs: list[Log], store: Any, digests: list[Digest] = (),
           progress: Progress | None = None) -> VerifyReport:
    """Recompute each log's chain from zero against stored links and `digests`."""
    report = VerifyReport()
    names = {log.chain for log in logs}
    for digest in digests:
        for head in digest.heads:
            if head.chain not in names:
                report.errors.append(f"digest names chain {head.chain!r}, whose log is absent")
    for log in logs:
        heads = sorted((h for d in digests for h in d.heads if h.chain == log.chain),
                       key=lambda h: h.position)
        report.chains.append(verify_chain(log, store, heads, progress))
    return report


def verify_chain(log: Log, store: Any, heads: list[Head],
                 progress: Progress | None = None) -> ChainReport:
    """Recompute one chain (see the module docstring); `heads`: digest heads by position."""
    chained = tracking.read(store, tracking_name(log.chain))
    report = ChainReport(log.chain, chained_position=chained.position)
    stop = max(log.head(), chained.position)
    pending = list(heads)
    previous = genesis(log.chain)
    for position, event, stored in _merged(log, store, chained.position, stop):
        pending = _check_digests(report, pending, previous, below=position)
        if event is None:
            _first_bad(report, BadPosition(position, "missing: the chain recorded an event "
                                                     "here (deleted, or the tail truncated)"))
            continue
        try:
            previous = link_notification(previous, event)
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. an id that is no UUID
            _first_bad(report, _bad(event, f"cannot be read as a stored event: {exc}"))
        report.events += 1
        report.position = position
        if stored is not None and stored != previous:
            _first_bad(report, _bad(event, "differs from the event chained at this position "
                                           "(changed, or the events before it were)"))
        elif stored is None and position <= chained.position:
            _first_bad(report, _bad(event, "not in the chain: stored after its neighbours were "
                                           "chained (inserted)"))
        if progress is not None and report.events % PAGE == 0:
            progress(log.chain, position, stop)
    report.link = previous.hex()
    _check_digests(report, pending, previous, below=None)
    if progress is not None:
        progress(log.chain, stop, stop)
    return report


def _bad(event: Any, reason: str) -> BadPosition:
    return BadPosition(event.id, reason, str(event.originator_id), event.originator_version,
                       event.topic)


def _first_bad(report: ChainReport, bad: BadPosition) -> None:
    if report.first_bad is None:
        report.first_bad = bad


def _check_digests(report: ChainReport, pending: list[Head], link: bytes,
                   below: int | None) -> list[Head]:
    """Check every pending head whose position is < `below` (all when None) against the link
    and count recomputed so far; returns the heads still pending."""
    while pending and (below is None or pending[0].position < below):
        head = pending.pop(0)
        if head.position > report.position and below is None:
            detail = (f"the log ends at position {report.position}, before the digest's "
                      f"position {head.position}")
            ok = False
        elif link.hex() != head.link or report.events != head.events:
            detail = (f"at position {head.position} the log gives link {link.hex()[:16]}… after "
                      f"{report.events} events; the digest states {head.link[:16]}… after "
                      f"{head.events}")
            ok = False
        else:
            detail = f"extends the digest at position {head.position}"
            ok = True
        report.digests.append(DigestCheck(head, ok, detail))
    return pending


def _merged(log: Log, store: Any, chained: int, stop: int) -> Iterator[tuple[int, Any, bytes]]:
    """(position, stored event or None, stored link or None) for every position that has an
    event (up to `stop`) or a stored link (up to `chained`), in position order."""
    events, links = _events(log, stop), _links(store, log.chain, chained)
    event, stored = next(events, None), next(links, None)
    while event is not None or stored is not None:
        event_position = event.id if event is not None else None
        link_position = stored[0] if stored is not None else None
        if link_position is None or (event_position is not None and event_position < link_position):
            yield event_position, event, None
            event = next(events, None)
        elif event_position is None or link_position < event_position:
            yield link_position, None, stored[1]
            stored = next(links, None)
        else:
            yield event_position, event, stored[1]
            event, stored = next(events, None), next(links, None)


def _events(log: Log, stop: int) -> Iterator[Any]:
    for page in log.pages(0, stop):
        yield from page


def _links(store: Any, chain: str, stop: int) -> Iterator[tuple[int, bytes]]:
    """Stored (position, link) of `chain` up to `stop`, page by page."""
    after = 0
    for _ in range(stop // PAGE + 2):
        with store.locked():
            rows = store.query("SELECT position, link FROM audit_chain WHERE chain = ? AND "
                               "position > ? AND position <= ? ORDER BY position LIMIT ?",
                               (chain, after, stop, PAGE))
        for position, link in rows:
            yield int(position), bytes(link)
        if len(rows) < PAGE:
            return
        after = int(rows[-1][0])
