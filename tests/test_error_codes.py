"""One registry of every error code the service can return (issue 9 §4).

`ledger.errors.ERROR_CODES` is filled by every error type as its class is created. These tests
check that nothing escapes it: every error type of every module, every code a problem object is
built with in the source, the README table and the OpenAPI document. At run time
api/problems.py logs a code it does not find, and tests/conftest.py fails the whole run on such
a line, so every test that provokes a refusal also checks its code.
"""

from __future__ import annotations

import ast
import importlib
import logging
import pkgutil
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import conftest
from ledger.errors import ERROR_CODES, LedgerError, error_type, register_code
from runtime.asgi import create_app
from runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ledger", "storage", "projections", "audit", "api", "scheduler", "legacy", "runtime",
            "notifications")


def import_everything() -> None:
    """Import every module of the service, so that every error type exists."""
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, f"{package}."):
            importlib.import_module(info.name)


def all_error_types() -> list[type[LedgerError]]:
    found, todo = [], [LedgerError]
    while todo:  # bounded: the class tree
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def test_every_error_type_of_every_module_is_registered_with_its_status():
    import_everything()
    concrete = [t for t in all_error_types()
                if "code" in t.__dict__ and not t.code.startswith("test_")]  # ours below
    assert len(concrete) >= 40
    for error in concrete:
        assert error.code in ERROR_CODES, error
        assert error.status in ERROR_CODES[error.code].statuses, error
        assert ERROR_CODES[error.code].when, error


def literal_codes() -> set[str]:
    """Codes written as literals where problem objects are built: the first argument of
    `problem_body(...)` and the value of a "code" key in a dict, in every service module."""
    codes = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "problem_body" \
                        and node.args and isinstance(node.args[0], ast.Constant):
                    codes.add(node.args[0].value)
                if isinstance(node, ast.Dict):
                    for key, value in zip(node.keys, node.values):
                        if isinstance(key, ast.Constant) and key.value == "code" \
                                and isinstance(value, ast.Constant):
                            codes.add(value.value)
    return codes


def test_every_literal_problem_code_in_the_source_is_registered():
    import_everything()
    assert "validation_error" in literal_codes()
    assert literal_codes() <= set(ERROR_CODES)


def readme_table() -> dict[str, str]:
    """code → status cell of README's error-code table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- error-codes")[1].split("<!-- /error-codes -->")[0]
    return {m.group(2): m.group(1).strip()
            for m in re.finditer(r"^\|([^|]+)\| `([a-z_]+)` \|", table, flags=re.M)}


def test_the_readme_lists_exactly_the_registry_with_each_status():
    import_everything()
    table = readme_table()
    assert set(table) == set(ERROR_CODES)
    for code, entry in ERROR_CODES.items():
        if code != "http_error":  # whatever status the framework gave
            assert table[code] == " / ".join(map(str, entry.statuses)), code


def test_the_openapi_document_lists_every_code(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path}/c.db", tick_enabled=False)
    with TestClient(create_app(settings, clock=conftest.FakeClock())) as client:
        document = client.get("/openapi.json").json()
    problem = document["components"]["schemas"]["Problem"]
    assert problem["properties"]["code"]["enum"] == sorted(ERROR_CODES)
    description = document["info"]["description"]
    for code in ERROR_CODES:
        assert f"`{code}`" in description, code


def test_a_new_error_type_registers_itself_and_one_code_may_carry_two_statuses():
    Teapot = error_type("Teapot", "test_teapot", 418, "I'm a teapot", when="tests only")
    try:
        assert ERROR_CODES["test_teapot"].statuses == (418,)
        register_code("test_teapot", 409, "teapot", "also a conflict")
        assert ERROR_CODES["test_teapot"].statuses == (409, 418)
        assert issubclass(Teapot, LedgerError) and Teapot("x").status == 418
    finally:
        del ERROR_CODES["test_teapot"]


def test_an_unregistered_code_is_logged_as_an_error(caplog):
    from api.problems import problem_body, unregistered_log

    guard = [h for h in unregistered_log.handlers if isinstance(h, conftest._UnregisteredCodes)]
    for handler in guard:  # this test provokes the very line the guard fails the run on
        unregistered_log.removeHandler(handler)
    try:
        with caplog.at_level(logging.ERROR, logger="api.error_codes"):
            body = problem_body("not_a_registered_code", 400, "t", "d")
            problem_body("session_ended", 409, "t", "d")  # registered: nothing logged
    finally:
        for handler in guard:
            unregistered_log.addHandler(handler)
    assert body["code"] == "not_a_registered_code"
    assert [r.getMessage() for r in caplog.records] == [
        "problem code 'not_a_registered_code' (status 400) is not in the error-code registry "
        "(ledger/errors.py ERROR_CODES)"]


@pytest.mark.parametrize("status, code", [(404, "not_found"), (405, "method_not_allowed")])
def test_framework_refusals_use_registered_codes(tmp_path, status, code):
    settings = Settings(database_url=f"sqlite:///{tmp_path}/c.db", tick_enabled=False,
                        api_keys="k:admin")
    with TestClient(create_app(settings, clock=conftest.FakeClock())) as client:
        method = "GET" if status == 404 else "DELETE"
        path = "/v1/nothing" if status == 404 else "/v1/events"
        response = client.request(method, path, headers={"Authorization": "Bearer k"})
    assert response.status_code == status and response.json()["code"] == code
    assert status in ERROR_CODES[code].statuses
