"""The audit over HTTP and the command line: digest, as-of reads, statements (issue 12).

HTTP through the real lifespan (its background audit follower running) on SQLite and
PostgreSQL; the CLI through typer's runner on a SQLite store.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from conftest import T0, FakeClock
from ledger.application import Ledger
from runtime.cli import app as cli
from storage import persistence_env
from test_api import ADMIN, AUDITOR, BACKEND, assert_problem, make_settings, running_api


@pytest.fixture
def audited(tmp_path, store_url):
    """The API with a fast background audit follower, on SQLite and PostgreSQL."""
    yield from running_api(make_settings(tmp_path, database_url=store_url,
                                         audit_poll_seconds=0.05,
                                         withdrawal_minimums={"MWK": 0}))


def call_story(api, seen: list) -> None:
    """A doctor, a pool, a 25-minute call ticked through settlement, a withdrawal; `seen`
    collects (instant, live balance, live wallet) read before each clock move."""

    def move(to):
        seen.append((api.clock.now, read(api, "/v1/patients/p1/balance"),
                     read(api, "/v1/doctors/d1/wallet")))
        api.clock.set(to)

    api.doctor()
    api.grant(voice=4)
    move(T0 + timedelta(minutes=1))
    api.ok("session.requested", session_id="c1", kind="voice", patient_id="p1", doctor_id="d1")
    move(T0 + timedelta(minutes=2))
    api.ok("call.connected", session_id="c1")
    for minute in (5, 10, 15, 20, 25):
        move(T0 + timedelta(minutes=2 + minute, seconds=30))
        api.ok("session.activity", session_id="c1")
        api.tick()
    move(T0 + timedelta(minutes=28))
    api.ok("session.ended", session_id="c1", ended_by="patient")
    move(T0 + timedelta(minutes=40))
    api.tick()
    api.ok("withdrawal.requested", request_id="w1", doctor_id="d1", currency="MWK",
           amount_minor=100_000)
    seen.append((api.clock.now, read(api, "/v1/patients/p1/balance"),
                 read(api, "/v1/doctors/d1/wallet")))


def read(api, path: str, headers=BACKEND, **params):
    response = api.client.get(path, headers=headers, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_as_of_reads_answer_what_the_live_reads_answered_then(audited):
    api, seen = audited, []
    call_story(api, seen)
    assert len(seen) > 8
    for now, balance, wallet in seen:
        then = read(api, "/v1/patients/p1/balance", as_of=now.isoformat())
        assert {k: then[k] for k in balance} == balance
        then = read(api, "/v1/doctors/d1/wallet", as_of=now.isoformat())
        assert then["wallets"] == wallet["wallets"] and then["as_of"] == now.isoformat()


def test_as_of_refusals(audited):
    api = audited
    api.clock.set(T0 + timedelta(minutes=5))
    api.doctor()
    api.grant(voice=1)
    future = (api.clock.now + timedelta(seconds=1)).isoformat()
    get = api.client.get
    assert_problem(get("/v1/patients/p1/balance", params={"as_of": future}, headers=BACKEND),
                   422, "as_of_in_future")
    assert_problem(get("/v1/patients/p1/balance", params={"as_of": "yesterday"},
                       headers=BACKEND), 422, "validation_error")
    assert_problem(get("/v1/patients/p1/balance", params={"as_of": "2026-11-02T08:00:00"},
                       headers=BACKEND), 422, "validation_error")  # no zone
    before = (T0 + timedelta(minutes=4)).isoformat()
    assert_problem(get("/v1/patients/p1/balance", params={"as_of": before}, headers=BACKEND),
                   404, "unknown_patient")
    assert_problem(get("/v1/doctors/d1/wallet", params={"as_of": before}, headers=BACKEND),
                   404, "unknown_doctor")
    assert get("/v1/doctors/d1/wallet", params={"as_of": api.clock.now.isoformat()},
               headers=AUDITOR).json()["wallets"] == []


def test_digest_for_auditor_and_admin_only(audited):
    api = audited
    api.doctor()
    assert_problem(api.client.get("/v1/audit/digest", headers=BACKEND), 403, "forbidden")
    assert_problem(api.client.get("/v1/audit/digest"), 401, "unauthenticated")
    body = read(api, "/v1/audit/digest", headers=AUDITOR)
    assert body == read(api, "/v1/audit/digest", headers=ADMIN)
    assert body["format"] == "telehealth-ledger-digest/1"
    assert body["ledger"]["position"] == api.position()
    assert body["ledger"]["events"] == 2 and len(body["ledger"]["link"]) == 64
    assert body["ledger"]["recorded_at"] == T0.isoformat()
    assert "legacy" not in body  # no legacy log was imported


def test_the_background_follower_chains_and_folds_without_being_asked(audited):
    api = audited
    api.doctor()
    api.grant(voice=2)
    audit, head = api.client.app.state.audit, api.position()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (audit.digest().head("ledger").position < head
                                           or audit.history.position().position < head):
        time.sleep(0.05)
    assert audit.digest().head("ledger").position == head
    assert audit.history.position().position == head
    assert audit.lag() == {"chain:ledger": 0, "history": 0}


def test_statements_json_and_csv(audited):
    api, seen = audited, []
    call_story(api, seen)
    start, end = (T0 - timedelta(minutes=1)).isoformat(), api.clock.now.isoformat()
    statement = read(api, "/v1/patients/p1/statement", **{"from": start, "to": end})
    voice = statement["buckets"]["voice"]
    assert voice["opening"] == {"available": 0, "held": 0, "charged": 0}
    assert voice["closing"] == {"available": 1, "held": 0, "charged": 3}
    moves = [m for m in statement["movements"] if m["bucket"] == "voice"]
    assert [m["event"] for m in moves][:2] == ["Pool.Granted", "Pool.Held"]
    assert all(m["session_id"] == "c1" for m in moves[1:])
    assert {m["event"] for m in moves} == {"Pool.Granted", "Pool.Held", "Pool.Charged",
                                           "Pool.Released"}
    doctor = read(api, "/v1/doctors/d1/statement", **{"from": start, "to": end,
                                                      "currency": "MWK"})
    mwk = doctor["currencies"]["MWK"]
    assert mwk["closing"] == {"credited": 1_050_000, "reversed": 0, "pending": 0,
                              "available": 950_000, "held": 100_000, "withdrawn": 0}
    assert [m["event"] for m in mwk["movements"]] == [
        "Session.AutoDeducted", "Session.AutoDeducted", "Session.Settled",
        "Wallet.WithdrawalHeld"]
    response = api.client.get("/v1/patients/p1/statement", headers=AUDITOR,
                              params={"from": start, "to": end, "format": "csv"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    voice_rows = [r for r in rows if r["bucket"] == "voice"]
    assert voice_rows[0]["row"] == "opening" and voice_rows[-1]["row"] == "closing"
    assert voice_rows[-1]["charged"] == "3"
    assert len(voice_rows) == len(moves) + 2


def test_statement_refusals(audited):
    api = audited
    api.clock.set(T0 + timedelta(minutes=5))
    api.doctor()
    get = api.client.get
    now = api.clock.now.isoformat()
    assert_problem(get("/v1/patients/p1/statement", headers=BACKEND,
                       params={"from": now, "to": now}), 422, "validation_error")
    assert_problem(get("/v1/patients/p1/statement", headers=BACKEND,
                       params={"from": T0.isoformat(), "to": now}), 404, "unknown_patient")
    assert_problem(get("/v1/doctors/d9/statement", headers=BACKEND,
                       params={"from": T0.isoformat(), "to": now}), 404, "unknown_doctor")
    empty = get("/v1/doctors/d1/statement", headers=BACKEND, params={"from": T0.isoformat()})
    assert empty.status_code == 200 and empty.json()["currencies"] == {}  # no pay yet
    assert_problem(get("/v1/doctors/d1/statement", headers=BACKEND,
                       params={"from": T0.isoformat(), "to": "2026-12-31T00:00:00Z"}),
                   422, "as_of_in_future")
    assert_problem(get("/v1/doctors/d1/statement", headers=BACKEND,
                       params={"from": T0.isoformat(), "currency": "mwk"}),
                   422, "validation_error")
    assert_problem(get("/v1/doctors/d1/statement", headers=BACKEND), 422, "validation_error")


# ----------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_store(tmp_path, monkeypatch):
    """A SQLite store with a settled text session, and LEDGER_DATABASE_URL pointing at it."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("LEDGER_DATABASE_URL", url)
    clock = FakeClock(T0)
    ledger = Ledger(env=persistence_env(url), clock=clock)
    n = 0
    for at, type_, payload in [
        (0, "doctor.registered", {"doctor_id": "d1", "country": "MW"}),
        (0, "subscription.granted", {"payment_reference": "pay1", "owner_id": "p1",
                                     "starts_at": T0.isoformat(),
                                     "plan": {"name": "x", "price_minor": 1, "currency": "MWK",
                                              "units": {"text": 2}, "seats": 1,
                                              "duration_days": 30}}),
        (60, "session.requested", {"session_id": "t1", "kind": "text", "patient_id": "p1",
                                   "doctor_id": "d1"}),
        (90, "session.patient_message", {"session_id": "t1"}),
        (120, "text.activated", {"session_id": "t1"}),
        (600, "session.ended", {"session_id": "t1", "ended_by": "patient"})]:
        n += 1
        clock.set(T0 + timedelta(seconds=at))
        ledger.ingest(f"e{n}", type_, clock(), payload)
    clock.set(T0 + timedelta(minutes=30))
    ledger.tick(clock(), ["t1"])
    ledger.close()
    return tmp_path / "cli.db"


def test_cli_digest_then_verify_then_tamper(cli_store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["audit", "digest", "-o", str(tmp_path / "d.json")])
    assert result.exit_code == 0, result.output
    digest = json.loads((tmp_path / "d.json").read_text())
    assert digest["ledger"]["events"] == digest["ledger"]["position"] > 10
    result = runner.invoke(cli, ["audit", "verify", "--digest", str(tmp_path / "d.json")])
    assert result.exit_code == 0, result.output
    assert "extends the digest" in result.output
    with sqlite3.connect(cli_store) as conn:
        state = bytearray(conn.execute("SELECT state FROM stored_events WHERE rowid = 7")
                          .fetchone()[0])
        state[5] ^= 1
        conn.execute("UPDATE stored_events SET state = ? WHERE rowid = 7", (bytes(state),))
    result = runner.invoke(cli, ["audit", "verify", "--digest", str(tmp_path / "d.json")])
    assert result.exit_code == 1
    assert "first bad position 7" in " ".join(result.output.split())


def test_cli_verify_refuses_a_malformed_digest(cli_store, tmp_path):
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    result = CliRunner().invoke(cli, ["audit", "verify", "--digest", str(tmp_path / "bad.json")])
    assert result.exit_code == 2 and "digest" in result.output


def test_cli_balances_as_of_and_statement(cli_store):
    runner = CliRunner()
    before = runner.invoke(cli, ["balances", "--as-of", (T0 + timedelta(minutes=5)).isoformat(),
                                 "--format", "csv"])
    assert before.exit_code == 0, before.output
    rows = {(r["id"], r["bucket/currency"]): r for r in csv.DictReader(io.StringIO(before.output))}
    assert rows[("p1", "text")]["held"] == "2" and rows[("p1", "text")]["available"] == "0"
    after = runner.invoke(cli, ["balances", "--as-of", (T0 + timedelta(minutes=30)).isoformat(),
                                "--format", "json"])
    data = json.loads(after.output)
    text = next(r for r in data["rows"] if r["id"] == "p1" and r["bucket/currency"] == "text")
    assert (text["available"], text["held"], text["charged"]) == (1, 0, 1)
    assert any(r["id"] == "d1" and r["available"] == 350_000 for r in data["rows"])
    statement = runner.invoke(cli, ["audit", "statement", "--doctor", "d1", "--from",
                                    T0.isoformat(), "--to",
                                    (T0 + timedelta(minutes=30)).isoformat()])
    assert statement.exit_code == 0, statement.output
    assert statement.output.splitlines()[-1].startswith("closing,MWK")
    wrong = runner.invoke(cli, ["balances", "--as-of", "2026-11-02T08:00:00"])
    assert wrong.exit_code == 2 and "timezone" in wrong.output
