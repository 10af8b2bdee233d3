"""The hash chain (issue 12 §1): every stored event of both logs chained in position order;
digests; `verify` finds every kind of tampering at its position, on SQLite and PostgreSQL.

Logs are built through the ledger (`Ledger.ingest`) and the legacy log (`LegacyLedger.save`);
tampering is done with raw SQL on the stored events, as an attacker with database access would.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from datetime import timedelta

import psycopg
import pytest

from audit.chain import genesis, link, link_rows, parse_digest, record
from audit.service import AuditService
from ledger.application import Ledger
from legacy.adjustments import ReconciliationAdjustment
from legacy.log import legacy_store_url, open_legacy
from storage import is_postgres, persistence_env, postgres_conninfo, postgres_parts, sqlite_path


class Logbook:
    """A ledger (and a legacy log) on `url`, its AuditService, and raw access to `chain`'s
    stored events for tampering."""

    def __init__(self, url: str, clock, chain: str) -> None:
        self.url, self.clock, self.chain, self.n = url, clock, chain, 0
        self.ledger = Ledger(env=persistence_env(url), clock=clock)
        self.legacy = open_legacy(url) if chain == "legacy" else None
        self.audit = AuditService(self.ledger, url, legacy_log=lambda: self.legacy)

    def write(self, count: int) -> None:
        """`count` more events in the chain's log."""
        for _ in range(count):
            self.n += 1
            if self.chain == "ledger":
                self.clock.advance(1)
                self.ledger.ingest(f"e{self.n}", "doctor.registered", self.clock(),
                                   {"doctor_id": f"d{self.n}", "country": "MW"})
            else:
                self.legacy.save(ReconciliationAdjustment(adjustment_id=f"a{self.n}",
                                                          adjustment={"n": self.n}))

    def digest(self):
        self.audit.catch_up()
        return self.audit.digest()

    def verify(self, digests=()):
        report = self.audit.verify(list(digests))
        return next(c for c in report.chains if c.chain == self.chain), report

    def positions(self) -> list[int]:
        return [row[0] for row in self.sql(f"SELECT {self.col} FROM {self.table} "
                                           f"ORDER BY {self.col}")]

    # ------------------------------------------------------------------- raw stored events

    @property
    def pg(self) -> bool:
        return is_postgres(self.url)

    @property
    def table(self) -> str:
        if not self.pg:
            return "stored_events"
        return f'"{postgres_parts(self.url)["schema"]}".{self.chain}_events'

    @property
    def col(self) -> str:
        return "notification_id" if self.pg else "rowid"

    def sql(self, statement: str, params: tuple = ()) -> list:
        if self.pg:
            with psycopg.connect(postgres_conninfo(self.url), autocommit=True) as conn:
                cursor = conn.execute(statement.replace("?", "%s"), params)
                return cursor.fetchall() if cursor.description else []
        path = sqlite_path(self.url if self.chain == "ledger" else legacy_store_url(self.url))
        with sqlite3.connect(path) as conn:
            return conn.execute(statement, params).fetchall()

    def row(self, position: int) -> tuple:
        return self.sql(f"SELECT originator_id, originator_version, topic, state FROM "
                        f"{self.table} WHERE {self.col} = ?", (position,))[0]

    def change_byte(self, position: int) -> None:
        state = bytearray(self.row(position)[3])
        state[len(state) // 2] ^= 0x01
        self.sql(f"UPDATE {self.table} SET state = ? WHERE {self.col} = ?",
                 (bytes(state), position))

    def delete(self, position: int) -> None:
        self.sql(f"DELETE FROM {self.table} WHERE {self.col} = ?", (position,))

    def move(self, old: int, new: int) -> None:
        self.sql(f"UPDATE {self.table} SET {self.col} = ? WHERE {self.col} = ?", (new, old))

    def insert(self, position: int, like: int) -> None:
        """Store a copy of the event at `like` (under a new originator id) at `position`."""
        _, version, topic, state = self.row(like)
        new_id = uuid.uuid4() if self.pg else uuid.uuid4().hex
        self.sql(f"INSERT INTO {self.table} ({self.col}, originator_id, originator_version, "
                 f"topic, state) VALUES (?, ?, ?, ?, ?)", (position, new_id, version, topic, state))

    def insert_shifting(self, position: int) -> None:
        """Insert an event at `position`, moving every later one up by one (in a dense log)."""
        for p in sorted((p for p in self.positions() if p >= position), reverse=True):
            self.move(p, p + 1)
        self.insert(position, like=position + 1)

    def swap(self, first: int, second: int) -> None:
        self.move(first, -1)
        self.move(second, first)
        self.move(-1, second)

    def truncate(self, position: int) -> None:
        self.sql(f"DELETE FROM {self.table} WHERE {self.col} >= ?", (position,))

    def close(self) -> None:
        self.audit.close()
        self.ledger.close()
        if self.legacy is not None:
            self.legacy.close()


@pytest.fixture(params=["ledger", "legacy"])
def book(request, store_url, clock):
    book = Logbook(store_url, clock, request.param)
    yield book
    book.close()


def three_rounds(book: Logbook) -> list:
    """Write three rounds of events, taking a digest after each; returns the digests."""
    digests = []
    for count in (4, 5, 6):
        book.write(count)
        digests.append(book.digest())
    return digests


# ---------------------------------------------------------------------------------- chain


def test_the_chain_is_sha256_of_the_previous_link_and_the_canonical_record():
    """The documented construction (docs/audit.md) with a record worked by hand."""
    originator = uuid.UUID("12345678-1234-5678-1234-567812345678")
    expected = ((7).to_bytes(8, "big") + originator.bytes + (2).to_bytes(8, "big")
                + (5).to_bytes(4, "big") + b"a:B.C" + (2).to_bytes(4, "big") + b"{}")
    assert record(7, originator, 2, "a:B.C", b"{}") == expected
    assert record(7, originator.hex, 2, "a:B.C", b"{}") == expected  # SQLite stores the hex
    import hashlib
    zero = hashlib.sha256(b"telehealth-ledger audit chain v1 ledger").digest()
    assert genesis("ledger") == zero != genesis("legacy")
    assert link(zero, 7, originator, 2, "a:B.C", b"{}") == hashlib.sha256(zero + expected).digest()


def test_every_event_of_the_log_is_chained_once_in_position_order(book):
    book.write(7)
    digest = book.digest()
    head = digest.head(book.chain)
    positions = book.positions()
    assert head.position == positions[-1] and head.events == len(positions)
    stored = book.audit.store.query("SELECT position FROM audit_chain WHERE chain = ? "
                                    "ORDER BY position", (book.chain,))
    assert [r[0] for r in stored] == positions
    # Recompute independently from the raw rows: the head link is the digest's.
    previous = genesis(book.chain)
    for position in positions:
        originator, version, topic, state = book.row(position)
        previous = link(previous, position, originator, version, topic, bytes(state))
    assert previous.hex() == head.link
    assert book.audit.catch_up()[f"chain:{book.chain}"] == 0  # nothing chained twice


def test_an_untouched_log_verifies_against_every_digest_taken_along_the_way(book):
    digests = three_rounds(book)
    assert [d.head(book.chain).position for d in digests] == sorted(
        {d.head(book.chain).position for d in digests})
    report, whole = book.verify(digests)
    assert whole.ok and report.ok and report.first_bad is None
    assert [c.ok for c in report.digests] == [True, True, True]
    assert report.events == len(book.positions())


def test_a_digest_round_trips_through_its_json(book):
    digest = three_rounds(book)[-1]
    text = digest.to_json()
    assert len(text) < 600  # small enough to paste
    assert parse_digest(text) == digest


# ------------------------------------------------------------------------------ tampering


def _middle(book: Logbook, digests: list) -> int:
    """A position after the first digest and up to the second (round 2)."""
    first, second = (d.head(book.chain).position for d in digests[:2])
    return next(p for p in book.positions() if first < p <= second)


def _assert_found_at(book: Logbook, digests: list, position: int, reason: str) -> None:
    report, whole = book.verify(digests)
    assert not whole.ok
    assert report.first_bad is not None and report.first_bad.position == position, \
        report.first_bad
    assert reason in report.first_bad.reason
    # The digest taken before the bad position still verifies; those at or after it do not.
    assert [c.ok for c in report.digests] == [d.head(book.chain).position < position
                                              for d in digests]


def test_a_changed_byte_is_found_at_its_position(book):
    digests = three_rounds(book)
    position = _middle(book, digests)
    book.change_byte(position)
    _assert_found_at(book, digests, position, "differs")
    report, _ = book.verify(digests)
    assert report.first_bad.topic == book.row(position)[2]  # names the event stored there


def test_a_deleted_event_is_found_at_its_position(book):
    digests = three_rounds(book)
    position = _middle(book, digests)
    book.delete(position)
    _assert_found_at(book, digests, position, "missing")


def test_an_inserted_event_is_found_at_its_position(book):
    digests = three_rounds(book)
    position = _middle(book, digests)
    book.insert_shifting(position)
    _assert_found_at(book, digests, position, "differs")


def test_two_reordered_events_are_found_at_the_first(book):
    digests = three_rounds(book)
    position = _middle(book, digests)
    book.swap(position, position + 3)
    _assert_found_at(book, digests, position, "differs")


def test_a_truncated_tail_is_found_at_its_first_missing_position(book):
    digests = three_rounds(book)
    position = _middle(book, digests)
    book.truncate(position)
    _assert_found_at(book, digests, position, "missing")
    report, _ = book.verify(digests)
    assert "the log ends at position" in report.digests[-1].detail


def test_a_rewrite_of_events_and_stored_links_is_still_caught_by_an_earlier_digest(book):
    """An attacker who changes an event and recomputes every stored link after it leaves
    the log consistent with its chain table; a digest kept elsewhere still disagrees."""
    digests = three_rounds(book)
    position = _middle(book, digests)
    book.change_byte(position)
    book.audit.store.execute("DELETE FROM audit_chain WHERE chain = ? AND position >= ?",
                             (book.chain, position))
    book.audit.store.execute("UPDATE audit_tracking SET position = ?, events = ?, link = ? "
                             "WHERE name = ?", *_rewound(book, position))
    book.audit.catch_up()
    report, whole = book.verify(digests)
    assert report.first_bad is None  # consistent with the rewritten chain table …
    assert not whole.ok  # … but not with the digests taken before the rewrite
    assert [c.ok for c in report.digests] == [True, False, False]


def _rewound(book: Logbook, position: int) -> tuple:
    before = [p for p in book.positions() if p < position]
    rows = book.audit.store.query("SELECT link FROM audit_chain WHERE chain = ? AND "
                                  "position = ?", (book.chain, before[-1]))
    return ((before[-1], len(before), bytes(rows[0][0]).hex(), f"chain:{book.chain}"),)


# ------------------------------------------------------------- gaps and late commits (PG)


def test_gaps_in_positions_are_chained_over_and_an_event_inserted_into_one_is_found(pg_url,
                                                                                    clock):
    book = Logbook(pg_url, clock, "ledger")
    try:
        book.write(3)
        gap = int(book.sql("SELECT nextval(pg_get_serial_sequence(?, 'notification_id'))",
                           (book.table,))[0][0])  # an id drawn and never used: a gap
        book.write(3)
        digest = book.digest()
        assert gap not in book.positions() and digest.head("ledger").events == 12
        assert book.verify([digest])[1].ok
        book.insert(gap, like=gap - 1)
        report, whole = book.verify([digest])
        assert report.first_bad.position == gap and "not in the chain" in report.first_bad.reason
        assert not whole.ok
    finally:
        book.close()


def test_the_chainer_waits_for_a_lower_position_still_being_written(pg_url, clock):
    """Two raw writers that do not serialise (no table lock): the one holding the lower
    position commits last. The chainer must not pass it while it is in flight."""
    book = Logbook(pg_url, clock, "ledger")
    slow = psycopg.connect(postgres_conninfo(pg_url))
    try:
        book.write(2)
        book.digest()
        originator, version, topic, state = book.row(1)
        insert = (f"INSERT INTO {book.table} (originator_id, originator_version, topic, state) "
                  "VALUES (%s, %s, %s, %s) RETURNING notification_id")
        low = slow.execute(insert, (uuid.uuid4(), 1, topic, state)).fetchone()[0]
        with psycopg.connect(postgres_conninfo(pg_url), autocommit=True) as fast:
            high = fast.execute(insert, (uuid.uuid4(), 1, topic, state)).fetchone()[0]
        assert low < high and high in book.positions() and low not in book.positions()
        log = book.audit.ledger_log
        assert log.safe_head(wait_seconds=0.2) is None  # a writer below the head is in flight
        waiting = threading.Thread(target=book.audit.catch_up)
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()  # still waiting for the slow writer
        assert book.audit.digest().head("ledger").position < low
        slow.commit()
        waiting.join(20)
        book.audit.catch_up()
        digest = book.audit.digest()
        assert digest.head("ledger").position == high and digest.head("ledger").events == 6
        assert book.verify([digest])[1].ok
    finally:
        slow.close()  # rolls back if the test failed while the slow writer was open
        book.close()


def test_concurrent_chainers_in_several_processes_chain_each_event_once(pg_url, clock):
    book = Logbook(pg_url, clock, "ledger")
    others = [AuditService(book.ledger, pg_url) for _ in range(3)]
    try:
        book.write(40)
        threads = [threading.Thread(target=s.catch_up) for s in [book.audit, *others]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        rows = book.audit.store.query("SELECT count(*), count(DISTINCT position) FROM "
                                      "audit_chain WHERE chain = 'ledger'")
        assert rows[0] == (80, 80)
        assert book.verify([book.digest()])[1].ok
    finally:
        for service in others:
            service.close()
        book.close()


def test_the_chain_is_the_same_on_both_stores(tmp_path, pg_url, clock):
    """Positions, ids and stored bytes are equal on SQLite and PostgreSQL for the same
    commands, so the chain is too: an auditor's check does not depend on the store."""
    heads = []
    for url in (f"sqlite:///{tmp_path / 'same.db'}", pg_url):
        clock.set(clock.now - timedelta(seconds=clock.now.second))
        book = Logbook(url, type(clock)(), "ledger")
        try:
            book.write(5)
            heads.append(book.digest().head("ledger"))
        finally:
            book.close()
    assert heads[0].link == heads[1].link and heads[0].position == heads[1].position


# ------------------------------------------------- one read for the chain and the history


def test_link_rows_is_link_of_each_row_in_turn():
    """The inline record of `link_rows` is `record`'s, for UUID/bytes rows and for the hex
    text a SQLite row may hold."""
    originator = uuid.UUID("12345678-1234-5678-1234-567812345678")
    rows = [(3, originator, 1, "a:B.C", b"{}"), (9, originator.hex, 2, "a:B.Ü", "{\"x\":1}"),
            (12, uuid.uuid4(), 3, "t", b"\x00" * 300)]
    previous, expected = genesis("ledger"), []
    for row in rows:
        previous = link(previous, *row)
        expected.append(previous)
    assert link_rows(genesis("ledger"), rows) == expected


def _history_rows(book: Logbook) -> tuple:
    return book.audit.store.query("SELECT count(*), count(DISTINCT position) FROM audit_events")[0]


def test_chain_and_history_from_one_read_each_resume_from_their_own_position(store_url, clock):
    """The chain ahead of the history, then the history ahead of the chain: one catch-up
    brings both to the head, each event chained and folded once."""
    book = Logbook(store_url, clock, "ledger")
    try:
        book.write(4)
        assert book.audit.catch_up(history=False)["chain:ledger"] > 0  # the chain only
        book.write(3)
        book.audit.fresh_for(clock())  # the history only, past the chain
        history = book.audit.history.position().position
        assert history > book.audit.chainers["ledger"].head().position
        book.write(2)
        done = book.audit.catch_up()
        positions = book.positions()
        assert book.audit.history.position().position >= positions[-1]
        assert book.audit.digest().head("ledger").events == len(positions)
        assert done["history"] == 2 and _history_rows(book) == (9, 9)  # doctor.registered
        assert book.verify([book.audit.digest()])[1].ok
    finally:
        book.close()


def test_a_page_that_fails_writes_neither_the_links_nor_the_history(store_url, clock,
                                                                   monkeypatch):
    """Both tracking rows move in the page's one transaction: a failure after the links are
    written rolls them back with it, and the next catch-up resumes without gaps or doubles."""
    book = Logbook(store_url, clock, "ledger")
    try:
        book.write(3)
        book.audit.catch_up()
        chained = len(book.positions())
        book.write(4)
        history = book.audit.history

        def broken(old, new):
            raise RuntimeError("the connection dropped mid-page")

        monkeypatch.setattr(history, "write", broken)
        with pytest.raises(RuntimeError):
            book.audit.catch_up()
        assert book.audit.digest().head("ledger").events == chained
        assert _history_rows(book) == (3, 3)
        monkeypatch.undo()
        book.audit.catch_up()
        assert book.audit.digest().head("ledger").events == len(book.positions())
        assert _history_rows(book) == (7, 7)
        assert book.verify([book.audit.digest()])[1].ok
    finally:
        book.close()
