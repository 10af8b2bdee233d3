"""The README's curl examples work as written (issue 9 §4).

Every `curl …` command in a ```sh block of README.md is read with curl's own rules for the
options it uses (`-d` without a Content-Type header sends `application/x-www-form-urlencoded`,
as curl does) and sent, in README order, to the service with its development API keys and a
clock at the examples' date. Each must answer 2xx; an option this reader does not know fails the
test, so a new example cannot slip past it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import FakeClock
from runtime.asgi import create_app
from runtime.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES_AT = datetime(2026, 11, 21, 9, 5, tzinfo=timezone.utc)  # the examples' occurred_at + 5 min


@dataclass
class CurlRequest:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None


def curl_commands(markdown: str) -> list[str]:
    """Every curl command of the ```sh blocks: continuation lines joined, and a quoted body
    that spans lines kept whole."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, flags=re.S):
        lines = iter(block.replace("\\\n", " ").splitlines())
        for line in lines:
            if not line.lstrip().startswith("curl "):
                continue
            command = line.strip()
            while not _complete(command):
                command += "\n" + next(lines)
            commands.append(command)
    return commands


def _complete(command: str) -> bool:
    try:
        shlex.split(command)
    except ValueError:  # a quote still open: the body goes on on the next line
        return False
    return True


def parse_curl(command: str) -> CurlRequest:
    """The request curl would send for `command` (the subset of options the README uses)."""
    tokens = shlex.split(command)
    assert tokens[0] == "curl"
    method, url, headers, body = None, None, {}, None
    args = iter(tokens[1:])
    for token in args:
        if token in ("-s", "--silent", "-i", "--include"):
            continue
        if token.startswith("-X"):
            method = token[2:] or next(args)
        elif token in ("-H", "--header"):
            name, _, value = next(args).partition(":")
            headers[name.strip().lower()] = value.strip()
        elif token in ("-d", "--data"):
            body = next(args)
        elif token.startswith("-"):
            pytest.fail(f"the README uses a curl option this test cannot read: {token}")
        else:
            url = token
    if body is not None:
        headers.setdefault("content-type", "application/x-www-form-urlencoded")  # curl's default
    path = "/" + url.split("://")[-1].partition("/")[2]
    return CurlRequest(method or ("POST" if body is not None else "GET"), path, headers, body)


def test_the_readme_has_curl_examples_for_events_reads_and_ticks():
    paths = [parse_curl(c).path for c in curl_commands(README.read_text())]
    assert {"/v1/events", "/v1/ticks"} <= set(paths)
    assert any(p.startswith("/v1/doctors/") for p in paths)


def test_a_form_body_is_what_curl_sends_without_a_content_type():
    request = parse_curl("curl -s -XPOST -H 'Authorization: Bearer k' localhost:8000/v1/ticks "
                         "-d '{}'")
    assert (request.method, request.path) == ("POST", "/v1/ticks")
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"


def test_every_readme_curl_example_answers_2xx_as_written(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path}/readme.db", tick_enabled=False,
                        clock="manual",  # the development keys the README uses
                        webhook_delivery_enabled=False)  # its endpoint URL is an example
    with TestClient(create_app(settings, clock=FakeClock(EXAMPLES_AT))) as client:
        for command in curl_commands(README.read_text()):
            request = parse_curl(command)
            response = client.request(request.method, request.path, headers=request.headers,
                                      content=request.body)
            assert 200 <= response.status_code < 300, f"{command}\n→ {response.text}"
