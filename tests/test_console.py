"""The auditor console over HTTP (no browser): sign-in, cookie, CSRF, pages against the API.

The app runs with its real lifespan on SQLite (test_api.py's harness) behind an https base
URL, so the Secure session cookie travels as in a browser. Browser tests: test_console_browser.py.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from html import unescape

import pytest
from fastapi.testclient import TestClient

from conftest import T0, FakeClock
from console.format import major, time_tag
from console.signin import COOKIE
from runtime.asgi import create_app
from test_api import ADMIN, AUDITOR, Api, make_settings
from test_audit_api import call_story

ORIGIN = {"Origin": "https://testserver"}


def running_console(tmp_path, **overrides):
    settings = make_settings(tmp_path, audit_poll_seconds=0.05, withdrawal_minimums={"MWK": 0},
                             **overrides)
    clock = FakeClock(T0)
    with TestClient(create_app(settings, clock=clock), base_url="https://testserver",
                    follow_redirects=False) as client:
        yield Api(client, clock)


@pytest.fixture
def console(tmp_path):
    yield from running_console(tmp_path)


@pytest.fixture
def store_console(tmp_path, store_url):
    """The console on SQLite and on PostgreSQL (log positions are read per store)."""
    yield from running_console(tmp_path, database_url=store_url)


def sign_in(api: Api, key: str = "k-auditor"):
    return api.client.post("/console/login", data={"api_key": key, "next": "/console/"},
                           headers=ORIGIN)


def cells(html: str, table_id: str) -> list[list[str]]:
    """The text of each body row's cells of `<table id=table_id>`."""
    table = re.search(rf'<table id="{table_id}".*?</table>', html, re.S).group(0)
    body = re.search(r"<tbody>(.*?)</tbody>", table, re.S).group(1)
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)
    return [[unescape(re.sub(r"<[^>]+>", "", c)).strip()
             for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)] for row in rows]


# ------------------------------------------------------------------------------ sign in


def test_pages_redirect_to_the_sign_in_form(console):
    response = console.client.get("/console/sessions/c1")
    assert response.status_code == 303
    assert response.headers["location"] == "/console/login?next=%2Fconsole%2Fsessions%2Fc1"
    form = console.client.get("/console/login")
    assert form.status_code == 200 and 'name="api_key"' in form.text
    assert form.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in form.headers["content-security-policy"]


@pytest.mark.parametrize("key", ["wrong", "k-backend", ""])
def test_a_key_that_is_not_auditor_or_admin_gets_the_form_again_with_401(console, key):
    response = sign_in(console, key)
    assert response.status_code == 401
    assert 'role="alert"' in response.text and 'name="api_key"' in response.text
    assert COOKIE not in response.headers.get("set-cookie", "")


@pytest.mark.parametrize("key", ["k-auditor", "k-admin"])
def test_signing_in_sets_a_signed_http_only_strict_cookie_without_the_key(console, key):
    response = sign_in(console, key)
    assert response.status_code == 303 and response.headers["location"] == "/console/"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/console"):
        assert attribute.lower() in cookie.lower()
    assert key not in cookie
    assert console.client.get("/console/").status_code == 200


def test_a_forged_or_foreign_cookie_is_not_a_session(console):
    console.client.cookies.set(COOKIE, "eyJmcCI6ImFiYyJ9.forged.sig", domain="testserver",
                               path="/console")
    assert console.client.get("/console/").status_code == 303


def test_sign_in_and_out_refuse_other_origins(console):
    for headers in ({}, {"Origin": "https://evil.example"}, {"Referer": "https://evil.example/x"}):
        response = console.client.post("/console/login", data={"api_key": "k-auditor"},
                                       headers=headers)
        assert response.status_code == 403, headers
        assert COOKIE not in response.headers.get("set-cookie", "")
    assert sign_in(console).status_code == 303
    assert console.client.post("/console/logout").status_code == 403
    assert console.client.get("/console/").status_code == 200
    out = console.client.post("/console/logout", headers=ORIGIN)
    assert out.status_code == 303
    assert console.client.get("/console/").status_code == 303


def test_the_next_page_is_a_console_path_only(console):
    response = console.client.post("/console/login", headers=ORIGIN, data={
        "api_key": "k-auditor", "next": "https://evil.example/"})
    assert response.headers["location"] == "/console/"


def test_the_key_is_never_logged(console, caplog):
    caplog.set_level(logging.DEBUG)
    sign_in(console, "k-auditor")
    sign_in(console, "wrong-key-123")
    console.client.get("/console/")
    assert "k-auditor" not in caplog.text and "wrong-key-123" not in caplog.text


# -------------------------------------------------------------------------------- pages


def test_session_page_shows_the_statement_blocks_and_pools(store_console):
    console = store_console
    call_story(console, [])
    sign_in(console)
    resource = console.client.get("/v1/sessions/c1", headers=AUDITOR).json()
    page = console.client.get("/console/sessions/c1")
    assert page.status_code == 200
    rows = cells(page.text, "blocks")
    expected = resource["statement"]["blocks"]
    assert [(int(r[0]), r[3], r[5]) for r in rows] == [
        (b["block"], b["status"], b["pool_id"]) for b in expected]
    assert all(r[4] == "pay1" for r in rows)  # the payment reference of the pool
    events = cells(page.text, "events")
    names = [r[4] for r in events]
    assert names[0] == "Requested" and "Connected" in names and names[-1] == "Settled"
    positions = [int(r[1]) for r in events]  # every event has its log position, in order
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    # The request and the end were posted by the backend: their event ids are shown.
    by_name = {r[4]: r for r in events}
    assert by_name["Requested"][6].startswith("ev-")
    assert by_name["Settled"][6] == "tick"
    assert "<svg class=\"timeline\"" in page.text


def test_patient_and_doctor_pages_agree_with_the_api_now_and_as_of(console):
    seen: list = []
    call_story(console, seen)
    sign_in(console)
    for moment in (seen[2][0], seen[-1][0]):
        at = moment.strftime("%Y-%m-%dT%H:%M:%S")
        api = console.client.get("/v1/patients/p1/balance", headers=AUDITOR,
                                 params={"as_of": moment.isoformat()}).json()
        page = console.client.get("/console/patients/p1", params={"as_of": at})
        assert page.status_code == 200, page.text
        shown = {r[0]: [int(v) for v in r[1:]] for r in cells(page.text, "balance")}
        assert shown == {b: [v["available"], v["usable_now"], v["held"], v["charged"]]
                         for b, v in api["buckets"].items()}
        wallet = console.client.get("/v1/doctors/d1/wallet", headers=ADMIN,
                                    params={"as_of": moment.isoformat()}).json()
        page = console.client.get("/console/doctors/d1", params={"as_of": at})
        assert page.status_code == 200, page.text
        shown = {r[0]: r[1:] for r in cells(page.text, "wallets") if len(r) > 1}
        assert shown == {w["currency"]: [major(w[f], w["currency"]) for f in (
            "pending_minor", "available_minor", "held_minor", "withdrawn_minor",
            "credited_minor", "reversed_minor")] for w in wallet["wallets"]}
    withdrawals = cells(console.client.get("/console/doctors/d1").text, "withdrawals")
    assert withdrawals == [["w1", "1,000.00 MWK", "held", "2026-11-02 08:40:00 UTC", "—"]]


def test_pages_show_the_apis_refusals(console):
    call_story(console, [])
    sign_in(console)
    future = (console.clock() + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    response = console.client.get("/console/patients/p1", params={"as_of": future})
    assert response.status_code == 422 and "as_of_in_future" in response.text
    assert console.client.get("/console/patients/nobody").status_code == 404
    assert console.client.get("/console/sessions/nope").status_code == 404
    assert console.client.get("/console/patients/p1", params={"as_of": "x"}).status_code == 422


@pytest.mark.parametrize("text, target", [
    ("c1", "/console/sessions/c1"), ("p1", "/console/patients/p1"),
    ("d1", "/console/doctors/d1"), ("ev-1", "/console/events/ev-1")])
def test_search_goes_to_the_one_match(console, text, target):
    call_story(console, [])
    sign_in(console)
    response = console.client.get("/console/search", params={"q": text})
    assert response.status_code == 303 and response.headers["location"] == target
    assert console.client.get(target).status_code == 200


def test_search_by_payment_reference_and_no_match(console):
    call_story(console, [])
    sign_in(console)
    response = console.client.get("/console/search", params={"q": "pay1", "kind": "payment"})
    assert response.status_code == 303
    assert response.headers["location"].startswith("/console/patients/p1#pool-")
    assert console.client.get("/console/search", params={"q": "zzz"}).status_code == 404
    bad = console.client.get("/console/search", params={"q": "a b"})
    assert bad.status_code == 404 and 'role="alert"' in bad.text


def test_audit_page_shows_the_digest(console):
    call_story(console, [])
    sign_in(console)
    page = console.client.get("/console/audit")
    assert page.status_code == 200
    digest = console.client.get("/v1/audit/digest", headers=AUDITOR).json()
    rows = {r[0]: r for r in cells(page.text, "digest")}
    assert int(rows["ledger"][1]) == digest["ledger"]["position"]
    assert rows["ledger"][4] == digest["ledger"]["link"]


# ---------------------------------------------------------------------------- formatting


@pytest.mark.parametrize("minor, currency, text", [
    (350_000, "MWK", "3,500.00 MWK"), (7_000, "USD", "70.00 USD"), (-5, "KES", "-0.05 KES"),
    (1_200, "UGX", "1,200 UGX"), (1_234, "KWD", "1.234 KWD"), (0, "INR", "0.00 INR")])
def test_money_in_major_units_with_the_code(minor, currency, text):
    assert major(minor, currency) == text


def test_times_are_utc_with_a_machine_readable_datetime():
    tag = str(time_tag(T0))
    assert tag == ('<time datetime="2026-11-02T08:00:00Z" title="2026-11-02 08:00:00 UTC">'
                   "2026-11-02 08:00:00 UTC</time>")


# ------------------------------------------------------------------------------- legacy


def test_without_a_legacy_history_the_legacy_page_says_so(console):
    sign_in(console)
    assert 'id="legacy-link"' not in console.client.get("/console/audit").text
    page = console.client.get("/console/legacy")
    assert page.status_code == 200 and "No legacy history was imported" in page.text


@pytest.mark.postgres
def test_legacy_page_shows_the_reconciliation_by_bug_class(tmp_path, pg_url):
    import psycopg
    from psycopg import sql

    from legacy.fixtures import build_legacy_database
    from legacy.importer import import_legacy
    from legacy.log import open_legacy
    from legacy.reconcile import reconcile
    from legacy.replay import load_history
    from storage import postgres_conninfo, postgres_parts

    conninfo = postgres_conninfo(pg_url)
    source = postgres_parts(pg_url)["schema"] + "_src"
    build_legacy_database(conninfo, source)
    try:
        import_legacy(f"{pg_url.split('?')[0]}?schema={source}", pg_url)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(source)))
    app = open_legacy(pg_url)
    try:
        expected = reconcile(load_history(app)).by_bug()
    finally:
        app.close()
    assert expected, "the fixture has one scenario per legacy bug"
    settings = make_settings(tmp_path, database_url=pg_url)
    with TestClient(create_app(settings, clock=FakeClock(T0)), base_url="https://testserver",
                    follow_redirects=False) as client:
        api = Api(client, FakeClock(T0))
        sign_in(api)
        assert 'id="legacy-link"' in client.get("/console/audit").text
        page = client.get("/console/legacy")
        assert page.status_code == 200, page.text
        shown = {r[0]: int(r[1]) for r in cells(page.text, "bugs")}
        assert shown == {bug: t["count"] for bug, t in expected.items()}
        for bug, totals in expected.items():
            assert f'id="bug-{bug}"' in page.text
            table = re.search(rf'<table class="items" data-bug="{bug}".*?</table>', page.text,
                              re.S).group(0)
            assert table.count("<tr>") - 1 == min(totals["count"], 500)  # header row excluded
