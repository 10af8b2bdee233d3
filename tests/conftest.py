"""Shared fixtures: a controllable clock, ledgers on POPO/SQLite/PostgreSQL, Hypothesis profiles.

PostgreSQL tests use LEDGER_TEST_POSTGRES_URL (default: the local server's `test` database),
each in a fresh schema dropped afterwards. Where PostgreSQL is unreachable they skip locally,
but fail when CI=true or LEDGER_REQUIRE_POSTGRES=1: a PostgreSQL test that skips in CI is a failure.
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, settings

from ledger.rules import Policy
from ledger.application import Ledger
from storage import persistence_env, postgres_conninfo

settings.register_profile("dev", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.getenv("HYPOTHESIS_PROFILE", "ci" if os.getenv("CI") else "dev"))

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=timezone.utc)
PG_URL = os.getenv("LEDGER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


class FakeClock:
    """A settable clock: call it for now; `advance(seconds)` or `set(moment)` to move it."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now

    def set(self, moment: datetime) -> datetime:
        self.now = moment
        return self.now


def postgres_required() -> bool:
    return bool(os.getenv("CI")) or os.getenv("LEDGER_REQUIRE_POSTGRES") == "1"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pg_url():
    """A postgresql:// URL with a fresh schema, dropped after the test."""
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:12]
    url = f"{PG_URL}?schema={schema}"
    try:
        conn = psycopg.connect(postgres_conninfo(url), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if postgres_required():
            pytest.fail(f"PostgreSQL is required here but unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    with conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        yield url
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def make_ledger(url: str | None, clock, policy: Policy = Policy()) -> Ledger:
    """A Ledger on POPO (url None), SQLite (sqlite:///path) or PostgreSQL (postgresql://…)."""
    env = {"PERSISTENCE_MODULE": "eventsourcing.popo"} if url is None else persistence_env(url)
    return Ledger(env=env, clock=clock, policy=policy)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """Parametrises a test over SQLite (a temp file) and PostgreSQL (a fresh schema)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_url")


_skipped_in_ci: list[str] = []
_unregistered_codes: list[str] = []


class _UnregisteredCodes(logging.Handler):
    """Collects every problem code the service returned without registering it
    (api/problems.py logs them on `api.error_codes`); any one fails the run."""

    def emit(self, record: logging.LogRecord) -> None:
        _unregistered_codes.append(record.getMessage())


def pytest_configure(config) -> None:
    logging.getLogger("api.error_codes").addHandler(_UnregisteredCodes(level=logging.ERROR))


def pytest_runtest_logreport(report) -> None:
    """In CI a skipped test (PostgreSQL or otherwise) is a failure: remember it."""
    if report.skipped and postgres_required():
        _skipped_in_ci.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _unregistered_codes:
        print(f"\n{len(_unregistered_codes)} problem(s) returned with an unregistered code:")
        for line in sorted(set(_unregistered_codes)):
            print(f"  {line}")
        session.exitstatus = 1
    if _skipped_in_ci:
        print(f"\n{len(_skipped_in_ci)} test(s) skipped where skipping is not allowed:")
        for nodeid in _skipped_in_ci:
            print(f"  {nodeid}")
        session.exitstatus = 1
