"""docs/audit.md says what runs: its worked examples are rebuilt here and every value it quotes
is checked, and the auditor's standard-library check it prints is executed against a store."""

from __future__ import annotations

import re
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from audit.chain import genesis, link, record
from audit.service import AuditService
from audit.statements import as_csv
from conftest import FakeClock
from ledger.application import Ledger
from projections import Projector
from scheduler.tick import run_tick
from storage import persistence_env, sqlite_path

DOC = (Path(__file__).resolve().parents[1] / "docs" / "audit.md").read_text(encoding="utf-8")
T = datetime(2026, 11, 21, 9, 0, tzinfo=timezone.utc)


def quoted(value: str) -> bool:
    return value in DOC


def readme_example(url: str) -> Ledger:
    """`evt-1` of the README, accepted when the clock read its instant."""
    clock = FakeClock(T)
    ledger = Ledger(env=persistence_env(url), clock=clock)
    ledger.ingest("evt-1", "doctor.registered", T, {"doctor_id": "doc-1", "country": "MW"})
    return ledger


def late_call(url: str) -> tuple[Ledger, Projector]:
    """The late call of docs/audit.md "As of"."""
    clock = FakeClock(T)
    ledger = Ledger(env=persistence_env(url), clock=clock)
    projector = Projector(ledger, url, ledger.policy)
    n = 0

    def post(at, type_, **payload):
        nonlocal n
        n += 1
        clock.set(max(clock.now, at))
        ledger.ingest(f"evt-{n}", type_, at, payload)

    def tick(at):
        clock.set(at)
        run_tick(ledger, projector, at)

    post(T, "doctor.registered", doctor_id="doc-1", country="MW")
    post(T, "subscription.granted", payment_reference="pay-1", owner_id="pat-1",
         starts_at=T.isoformat(), plan={"name": "Life", "price_minor": 1_500_000,
                                        "currency": "MWK",
                                        "units": {"text": 0, "voice": 4, "video": 0},
                                        "seats": 1, "duration_days": 30})
    post(T + timedelta(minutes=1), "session.requested", session_id="call-1", kind="voice",
         patient_id="pat-1", doctor_id="doc-1")
    post(T + timedelta(minutes=2), "call.connected", session_id="call-1")
    for minute in (5, 10, 15, 20):
        post(T + timedelta(minutes=2 + minute), "session.activity", session_id="call-1")
        tick(T + timedelta(minutes=2 + minute))
    tick(T + timedelta(minutes=24))
    clock.set(T + timedelta(minutes=30))
    ledger.ingest("evt-late", "session.ended", T + timedelta(minutes=9),
                  {"session_id": "call-1", "ended_by": "patient"})
    tick(T + timedelta(minutes=45))
    return ledger, projector


def test_the_worked_example_bytes_and_links(tmp_path):
    ledger = readme_example(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        first, second = ledger.recorder.select_notifications(1, 2)
        assert quoted(str(first.originator_id)) and quoted(first.topic)
        assert quoted(first.state.decode())
        canonical = record(first.id, first.originator_id, first.originator_version, first.topic,
                           first.state)
        assert len(canonical) == 292 and quoted("`record(e₁)` is 292 bytes")
        assert quoted(canonical[:8].hex()) and quoted(canonical[8:24].hex())
        assert quoted(canonical[32:36].hex()) and quoted(canonical[36:67].hex())
        assert quoted(f"{len(first.state)} bytes → `{canonical[67:71].hex()}`")
        link_1 = link(genesis("ledger"), first.id, first.originator_id, 1, first.topic,
                      first.state)
        link_2 = link(link_1, second.id, second.originator_id, 1, second.topic, second.state)
        for value in (genesis("ledger"), link_1, link_2):
            assert quoted(value.hex())
        audit = AuditService(ledger, f"sqlite:///{tmp_path / 'ledger.db'}")
        audit.catch_up()
        head = audit.digest().head("ledger")
        assert (head.position, head.link, head.events) == (2, link_2.hex(), 2)
        assert quoted(f'"recorded_at": "{head.recorded_at.isoformat()}"')
        audit.close()
    finally:
        ledger.close()


def test_the_auditors_check_in_the_doc_gives_the_digest(tmp_path):
    block = DOC.split("<!-- auditor-check")[1].split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(block, "docs/audit.md", "exec"), namespace)  # noqa: S102 - our own doc
    url = f"sqlite:///{tmp_path / 'late.db'}"
    ledger, projector = late_call(url)
    audit = AuditService(ledger, url)
    try:
        audit.catch_up()
        head = audit.digest().head("ledger")
        assert namespace["chain_head"](sqlite_path(url)) == (head.position, head.link,
                                                             head.events)
    finally:
        audit.close()
        projector.close()
        ledger.close()


def test_the_late_call_as_quoted(store_url):
    """Digest, as-of answers and statement rows of the late call, on SQLite and PostgreSQL."""
    ledger, projector = late_call(store_url)
    audit = AuditService(ledger, store_url)
    try:
        audit.catch_up()
        head = audit.digest().head("ledger")
        assert head.position == 41 and quoted(f"position 41, link `{head.link}`")
        for minute, expected in ((25, "voice\": {\"available\": 0, \"usable_now\": 0, "
                                      "\"held\": 2, \"charged\": 2}"),
                                 (45, "voice\": {\"available\": 3, \"usable_now\": 3, "
                                      "\"held\": 0, \"charged\": 1}")):
            answer = audit.patient_balance("pat-1", T + timedelta(minutes=minute))
            voice = answer["buckets"]["voice"]
            assert expected == ("voice\": {" + ", ".join(f'"{k}": {v}' for k, v in voice.items())
                                + "}") and quoted(expected)
            assert quoted(f'"position": {answer["position"]}')
        late = audit.patient_balance("pat-1", T + timedelta(minutes=25))["ended_later"][0]
        assert quoted(f'"ended_at": "{late["ended_at"]}"')
        assert quoted(f'"recorded_at": "{late["recorded_at"]}", "position": {late["position"]}')
        csv_text = as_csv(audit.patient_statement("pat-1", T + timedelta(minutes=25),
                                                  T + timedelta(minutes=45)))
        for row in csv_text.splitlines():
            cells = row.split(",")
            if cells[1] != "voice":
                continue
            trimmed = ",".join(cells[i] for i in (0, 1, 2, 3, 5, 8, 10, 12, 13, 14, 15, 16, 17))
            assert quoted(trimmed), trimmed
    finally:
        audit.close()
        projector.close()
        ledger.close()


def test_the_verification_output_after_a_flipped_byte(tmp_path):
    url = f"sqlite:///{tmp_path / 'late.db'}"
    ledger, projector = late_call(url)
    audit = AuditService(ledger, url)
    try:
        audit.catch_up()
        digest = audit.digest()
        with sqlite3.connect(sqlite_path(url)) as conn:
            state = bytearray(conn.execute("SELECT state FROM stored_events WHERE rowid = 13")
                              .fetchone()[0])
            state[len(state) // 2] ^= 1
            conn.execute("UPDATE stored_events SET state = ? WHERE rowid = 13", (bytes(state),))
        chain = audit.verify([digest]).chains[0]
        assert chain.first_bad.position == 13 and quoted(chain.first_bad.topic)
        assert quoted(chain.link) and quoted(chain.first_bad.originator_id)
        assert quoted(f"{chain.first_bad.originator_id} v{chain.first_bad.originator_version}")
    finally:
        audit.close()
        projector.close()
        ledger.close()


@pytest.mark.parametrize("name", ["as_of_in_future", "statement_too_long", "audit_lagging"])
def test_the_doc_names_the_audit_codes(name):
    assert re.search(rf"`{name}`", DOC)
