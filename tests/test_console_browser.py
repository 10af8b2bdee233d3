"""The console in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

The real service (`ledger serve`, SQLite, manual clock) runs a small simulated day
(simulation/driver.py, against the oracle); then a browser signs in with an auditor key,
searches a session of that day, checks its blocks and pools against `GET /v1/sessions/{id}`,
opens the patient's and the doctor's pages, moves the as-of picker and checks each balance
against the API's as-of answer. Screenshots of every page go to $LEDGER_TEST_ARTIFACTS
(default tests/artifacts/console/, ignored by git).

A missing browser (no /usr/bin/chromium, or no playwright) skips these tests on a developer's
machine, and fails them in CI (CI=true or LEDGER_REQUIRE_BROWSER=1): .ci/run installs it.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from simulation.crash import Service

CHROMIUM = os.environ.get("LEDGER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ADMIN_KEY, AUDITOR_KEY = "console-admin", "console-auditor"
ARTIFACTS = Path(os.environ.get("LEDGER_TEST_ARTIFACTS",
                                Path(__file__).parent / "artifacts" / "console"))
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.timeout(600)


def browser_required() -> bool:
    return bool(os.getenv("CI")) or os.getenv("LEDGER_REQUIRE_BROWSER") == "1"


def _missing(reason: str):
    if browser_required():
        pytest.fail(f"the browser tests need {reason} (CI installs it: .ci/run)")
    pytest.skip(f"no browser: {reason}")


@pytest.fixture(scope="module")
def playwright_browser():
    if not Path(CHROMIUM).exists():
        _missing(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package (pip install -e '.[test]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                    headless=True)
        yield browser
        browser.close()


# --------------------------------------------------------------------- the simulated day


class Day:
    """The running service after a simulated day, with the ids the tests look at."""

    def __init__(self, service: Service, session: dict) -> None:
        self.service, self.base = service, service.base_url
        self.session_id = session["session_id"]
        self.patient_id, self.doctor_id = session["patient_id"], session["doctor_id"]
        self.http = httpx.Client(base_url=self.base, timeout=60,
                                 headers={"Authorization": f"Bearer {AUDITOR_KEY}"})

    def get(self, path: str, **params) -> dict:
        response = self.http.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def day(tmp_path_factory):
    """`ledger serve` on SQLite with a manual clock, a small simulated day through it, and
    the session that was charged the most blocks (its patient and doctor)."""
    from rich.console import Console

    from simulation.driver import run_simulation

    work = tmp_path_factory.mktemp("console-day")
    url = f"sqlite:///{work / 'ledger.db'}"
    service = Service(url, work / "service.log", env={
        "LEDGER_API_KEYS": f"{ADMIN_KEY}:admin,{AUDITOR_KEY}:auditor",
        "LEDGER_CLOCK": "manual", "LEDGER_TICK_ENABLED": "false",
        "LEDGER_AUDIT_POLL_SECONDS": "0.2", "LEDGER_LOG_LEVEL": "warning",
        "LEDGER_WEBHOOK_ALLOW_HTTP_HOSTS": "127.0.0.1"})
    service.start()
    try:
        service.wait_ready()
        out = io.StringIO()
        report = run_simulation(seed=11, patients=12, doctors=3, sessions=40, practitioners=1,
                                consultations=4, base_url=service.base_url, database_url=url,
                                workdir=work / "sim", api_key=ADMIN_KEY,
                                console=Console(file=out, width=140))
        assert report.differences == [], out.getvalue()[-4000:]
        yield Day(service, most_charged_session(service, work / "events.jsonl"))
    finally:
        service.stop()


def most_charged_session(service: Service, path: Path) -> dict:
    """The Requested event of the settled session with the most charged blocks (the export
    of the log, read as an operator would: `ledger export`)."""
    done = service.cli("export", "-o", str(path))
    assert done.returncode == 0, done.stderr
    requested, charges, settled = {}, Counter(), set()
    for line in path.read_text().splitlines():
        event = json.loads(line)
        topic = event["topic"]
        if topic.endswith("Session.Requested"):
            requested[event["originator_id"]] = event
        elif topic.endswith("Session.AutoDeducted"):
            charges[event["originator_id"]] += 1
        elif topic.endswith("Session.Settled"):
            settled.add(event["originator_id"])
    ranked = [sid for sid, _ in charges.most_common() if sid in settled]
    assert ranked, "the simulated day charged no settled session"
    return requested[ranked[0]]


# ------------------------------------------------------------------------------- pages


@pytest.fixture(scope="module")
def signed_in(playwright_browser, day):
    """A browser page signed in with the auditor key."""
    context = playwright_browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(day.base + "/console/")
    page.fill("#api_key", AUDITOR_KEY)
    page.click("button[type=submit]")
    page.wait_for_url(day.base + "/console/")
    yield page
    context.close()


def shot(page, name: str, full_page: bool = True) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


def test_sign_in_refuses_a_wrong_key_then_accepts_an_auditor_key(playwright_browser, day):
    context = playwright_browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(day.base + f"/console/sessions/{day.session_id}")
    assert "/console/login" in page.url
    page.fill("#api_key", "not-a-key")
    with page.expect_response(lambda r: r.url.endswith("/console/login")) as answer:
        page.click("button[type=submit]")
    assert answer.value.status == 401
    assert page.locator("#login-error").is_visible()
    shot(page, "login-refused")
    page.fill("#api_key", AUDITOR_KEY)
    page.keyboard.press("Enter")  # the form works from the keyboard
    page.wait_for_url(day.base + f"/console/sessions/{day.session_id}")
    cookie = next(c for c in context.cookies() if c["name"] == "ledger_console")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert AUDITOR_KEY not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # not readable by scripts
    context.close()


def test_search_a_session_and_see_its_blocks_and_pools(signed_in, day):
    page = signed_in
    page.goto(day.base + "/console/")
    page.fill("#q", day.session_id)
    page.click("form.search button")
    page.wait_for_url(f"**/console/sessions/{day.session_id}")
    statement = day.get(f"/v1/sessions/{day.session_id}")["statement"]
    rows = page.locator("#blocks tbody tr")
    shown = [(int(rows.nth(i).get_attribute("data-block")), rows.nth(i).get_attribute(
        "data-status"), rows.nth(i).get_attribute("data-pool")) for i in range(rows.count())]
    assert shown == [(b["block"], b["status"], b["pool_id"]) for b in statement["blocks"]]
    assert page.locator("svg.timeline .bar").count() >= len(statement["blocks"])
    events = page.locator("#events tbody tr")
    assert events.nth(0).get_attribute("data-event") == "Requested"
    assert events.nth(events.count() - 1).get_attribute("data-event") == "Settled"
    first_time = page.locator("#blocks time").first
    assert first_time.get_attribute("title").endswith("(your local time)")  # local on hover
    shot(page, "session")
    shot(page, "session-top", full_page=False)  # what README.md shows (docs/img/)


def _as_of_instants(day, path: str, field) -> tuple[datetime, datetime]:
    """Two recorded instants of the account's statement over the day whose balances differ
    (by `field(balance)`): the movements with the largest and the smallest value."""
    clock = datetime.fromisoformat(day.get("/v1/clock")["now"])
    statement = day.get(path, **{"from": (clock - timedelta(days=3)).isoformat()})
    movements = statement["movements"] if "movements" in statement else [
        m for sec in statement["currencies"].values() for m in sec["movements"]]
    ranked = sorted(movements, key=lambda m: (field(m["balance"]), m["position"]))
    low, high = ranked[0], ranked[-1]
    assert field(low["balance"]) != field(high["balance"])
    return (datetime.fromisoformat(high["recorded_at"]),
            datetime.fromisoformat(low["recorded_at"]))


def _set_as_of(page, moment: datetime) -> None:
    page.fill("#as_of", moment.strftime("%Y-%m-%dT%H:%M:%S"))
    page.fill("#from", "")
    page.fill("#to", "")
    page.click("#apply")
    page.wait_for_load_state()


def test_patient_page_as_of_matches_the_api(signed_in, day):
    page = signed_in
    page.goto(day.base + f"/console/sessions/{day.session_id}")
    page.click(f"a[href='/console/patients/{day.patient_id}']")
    page.wait_for_url(f"**/console/patients/{day.patient_id}")
    now = day.get(f"/v1/patients/{day.patient_id}/balance")
    assert _units(page) == {b: v["available"] for b, v in now["buckets"].items()}
    shot(page, "patient")
    shot(page, "patient-top", full_page=False)
    first, second = _as_of_instants(day, f"/v1/patients/{day.patient_id}/statement",
                                    lambda b: b["available"])
    answers = []
    for moment in (first, second):
        _set_as_of(page, moment)
        api = day.get(f"/v1/patients/{day.patient_id}/balance", as_of=moment.isoformat())
        assert _units(page) == {b: v["available"] for b, v in api["buckets"].items()}
        answers.append(_units(page))
    assert answers[0] != answers[1]  # the page's balance changed with the as-of instant
    shot(page, "patient-as-of")


def _units(page) -> dict[str, int]:
    rows = page.locator("#balance tbody tr")
    return {rows.nth(i).get_attribute("data-bucket"): int(rows.nth(i).locator(
        "[data-field=available]").inner_text()) for i in range(rows.count())}


def test_doctor_page_as_of_matches_the_api(signed_in, day):
    page = signed_in
    page.goto(day.base + f"/console/sessions/{day.session_id}")
    page.click(f"a[href='/console/doctors/{day.doctor_id}']")
    page.wait_for_url(f"**/console/doctors/{day.doctor_id}")
    now = day.get(f"/v1/doctors/{day.doctor_id}/wallet")
    assert _wallets(page) == _api_wallets(now)
    shot(page, "doctor")
    shot(page, "doctor-top", full_page=False)
    first, second = _as_of_instants(day, f"/v1/doctors/{day.doctor_id}/statement",
                                    lambda b: b["credited"] - b["reversed"])
    answers = []
    for moment in (first, second):
        _set_as_of(page, moment)
        api = day.get(f"/v1/doctors/{day.doctor_id}/wallet", as_of=moment.isoformat())
        assert _wallets(page) == _api_wallets(api)
        answers.append(_wallets(page))
    assert answers[0] != answers[1]
    shot(page, "doctor-as-of")


WALLET_FIELDS = ("pending_minor", "available_minor", "held_minor", "withdrawn_minor")


def _wallets(page) -> dict[str, dict[str, int]]:
    rows = page.locator("#wallets tbody tr[data-currency]")
    out = {}
    for i in range(rows.count()):
        row = rows.nth(i)
        out[row.get_attribute("data-currency")] = {
            f: int(row.locator(f"[data-field={f}]").get_attribute("data-minor"))
            for f in WALLET_FIELDS}
    return out


def _api_wallets(answer: dict) -> dict[str, dict[str, int]]:
    return {w["currency"]: {f: w[f] for f in WALLET_FIELDS} for w in answer["wallets"]}


def test_audit_page_and_a_phone_width(playwright_browser, signed_in, day):
    page = signed_in
    page.goto(day.base + "/console/audit")
    digest = day.get("/v1/audit/digest")
    row = page.locator("#digest tr[data-chain=ledger]")
    assert int(row.locator("[data-field=position]").inner_text()) >= 1
    assert int(row.locator("[data-field=position]").inner_text()) <= digest["ledger"]["position"]
    shot(page, "audit")
    state = page.context.storage_state()
    phone = playwright_browser.new_context(viewport={"width": 390, "height": 844},
                                           storage_state=state, is_mobile=True)
    small = phone.new_page()
    small.goto(day.base + f"/console/sessions/{day.session_id}")
    overflow = small.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, "the page scrolls sideways at phone width (tables scroll inside)"
    small.keyboard.press("Tab")  # the first stop is the skip link
    assert small.evaluate("document.activeElement.className") == "skip"
    shot(small, "session-phone")
    phone.close()
