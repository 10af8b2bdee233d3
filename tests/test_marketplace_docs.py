"""docs/marketplace.md's worked example is true: every curl call on the page is replayed, in
order, against the service (its real lifespan, a manual clock, the development API keys), and
each response must contain the JSON printed under the call (only the members shown).
"""

from __future__ import annotations

import json
import re
import shlex
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import FakeClock
from runtime.asgi import create_app
from runtime.settings import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "marketplace.md"
BLOCK = re.compile(r"```(sh|json)\n(.*?)```", re.S)


def calls(text: str) -> list[tuple[dict, object]]:
    """[(curl request, expected JSON or None)] in page order."""
    blocks = BLOCK.findall(text)
    out = []
    for k, (lang, body) in enumerate(blocks):
        if lang != "sh" or "curl " not in body:
            continue
        following = blocks[k + 1] if k + 1 < len(blocks) else None
        expected = json.loads(following[1]) if following and following[0] == "json" else None
        out.append((parse_curl(body), expected))
    return out


def parse_curl(command: str) -> dict:
    """method, path, headers and JSON body of one `curl -s …` command."""
    words = shlex.split(command.replace("\\\n", " "))
    request = {"method": None, "path": None, "headers": {}, "body": None}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-X":
            request["method"], i = words[i + 1], i + 1
        elif word == "-H":
            name, _, value = words[i + 1].partition(": ")
            request["headers"][name] = value
            i += 1
        elif word == "-d":
            request["body"], i = json.loads(words[i + 1]), i + 1
        elif word.startswith("localhost:8000"):
            request["path"] = word.removeprefix("localhost:8000")
        i += 1
    request["method"] = request["method"] or ("POST" if request["body"] is not None else "GET")
    return request


def contains(expected: object, actual: object, where: str = "") -> None:
    """Every member of `expected` is in `actual` with the same value (lists item by item)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not an object"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing in {actual!r}"
            contains(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), \
            f"{where}: {actual!r} vs {expected!r}"
        for n, (e, a) in enumerate(zip(expected, actual)):
            contains(e, a, f"{where}[{n}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.fixture
def client(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path}/example.db", tick_enabled=False,
                        clock="manual")  # the development keys, as on the page
    clock = FakeClock(datetime(2027, 3, 1, 7, 0, tzinfo=timezone.utc))
    with TestClient(create_app(settings, clock=clock)) as c:
        yield c


def test_the_worked_example_runs_as_written(client):
    steps = calls(DOC.read_text())
    assert len(steps) >= 20, "the worked example lost its calls"
    for n, (request, expected) in enumerate(steps):
        response = client.request(request["method"], request["path"],
                                  headers=request["headers"], json=request["body"])
        label = f"call {n + 1}: {request['method']} {request['path']}"
        assert response.status_code < 500, f"{label}: {response.text}"
        if expected is not None:
            contains(expected, response.json(), label)
        elif not (200 <= response.status_code < 300):
            pytest.fail(f"{label}: {response.status_code} {response.text}")
