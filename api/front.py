"""The HTTP front: one pure-ASGI middleware for what every request goes through, and the
direct route of `POST /v1/events`.

`Front` does, in this order, what four stacked middlewares did (each with its own coroutine
layer, `send` wrapper and pass over the headers; a third of the service's CPU per single
event, docs/design.md "Write path"):
1. observation (api/observe.py): the request id (`X-Request-ID` or a fresh one, returned on
   every answer), the request's record for the routes, metrics and its log line;
2. unexpected errors (api/problems.py `unexpected_error_response`): any exception no handler
   took becomes 503 `retry_later` (store unreachable) or 500 `internal_error`, without
   re-raising, so the connection stays usable;
3. the body cap (api/limits.py): 413 `payload_too_large` before anything parses the body;
4. authentication (api/auth.py): 401 `unauthenticated` under `/v1` without a known API key;
   the role goes to `scope["state"]["role"]`.
Every answer, from these steps or from the application, passes through the one `send` of
step 1. The headers are read once per request (`RequestHead`).

The direct route: `POST /v1/events` with `Content-Type: application/json` (exactly), no query
string and a body within the cap is handed, body read, to `direct(scope, body, send)`
(api/routes.py `post_events_direct`), which answers it as the FastAPI route would, without
the router, the dependency resolution and the JSON decoding into dicts; it declines (returns
False) for anything it does not answer exactly like the route (another role, invalid body,
service not ready), and the request then goes to the application with its body replayed.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import key_from_headers, role_of, unauthenticated_response
from api.limits import payload_too_large_response, read_body
from api.observe import REQUEST_ID_HEADER, Observation, RequestRecord, request_id_of
from api.problems import unexpected_error_response

Direct = Callable[[Scope, bytes, Send], Awaitable[bool]]
DIRECT_PATH = "/v1/events"
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RequestHead:
    """The headers the front reads, from one pass over `scope["headers"]`: the first
    `X-Request-ID`, `Content-Length` and `Content-Type`, the last `Authorization` and
    `X-API-Key` (values decoded as latin-1; names are lower case in ASGI)."""

    __slots__ = ("request_id", "content_length", "content_type", "authorization", "api_key")

    def __init__(self, headers: Any) -> None:
        self.request_id = self.content_length = self.content_type = None
        self.authorization = self.api_key = None
        for name, value in headers:
            name = name.lower()
            if name == REQUEST_ID_HEADER:
                if self.request_id is None:
                    self.request_id = value.decode("latin-1")
            elif name == b"content-length":
                if self.content_length is None:
                    self.content_length = value
            elif name == b"content-type":
                if self.content_type is None:
                    self.content_type = value
            elif name == b"authorization":
                self.authorization = value.decode("latin-1")
            elif name == b"x-api-key":
                self.api_key = value.decode("latin-1")

    def declared_length(self) -> int | None:
        """The declared Content-Length; a malformed one counts as too large (refused)."""
        if self.content_length is None:
            return None
        return int(self.content_length) if self.content_length.isdigit() else 1 << 62


class Front:
    """The front middleware (module docstring). `keys`: API key → role; `max_bytes`: the
    body cap; `retry_after_seconds`: Retry-After of a 503 for an unreachable store;
    `observation`: metrics and logs (api/observe.py); `direct`: the direct route of
    `POST /v1/events`, or None; `prefix`: the paths that need an API key."""

    def __init__(self, app: ASGIApp, *, keys: dict[str, str], max_bytes: int,
                 retry_after_seconds: int, observation: Observation,
                 direct: Direct | None = None, prefix: str = "/v1") -> None:
        self.app, self.keys, self.max_bytes = app, keys, max_bytes
        self.retry_after_seconds, self.observation = retry_after_seconds, observation
        self.direct, self.prefix = direct, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = RequestHead(scope.get("headers", ()))
        request_id = request_id_of(head.request_id)
        record = RequestRecord(metrics=self.observation.metrics)
        answer = {"status": 500, "started": False, "route": None}
        request_id_header = (REQUEST_ID_HEADER, request_id.encode())

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"], answer["started"] = message["status"], True
                message["headers"] = [*message.get("headers", []), request_id_header]
            await send(message)

        tokens = self.observation.enter(record, request_id)
        started = time.perf_counter()
        try:
            try:
                await self._answer(scope, receive, observed_send, head, answer)
            except Exception as exc:  # noqa: BLE001 - this is the last place to answer it
                if answer["started"]:
                    raise  # half a response is out: only closing the connection is honest
                response = unexpected_error_response(scope, exc, self.retry_after_seconds)
                await response(scope, receive, observed_send)
            finally:
                self.observation.finish(scope, record, answer["status"],
                                        time.perf_counter() - started, answer["route"])
        finally:
            self.observation.leave(tokens)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, head: RequestHead,
                      answer: dict) -> None:
        """Steps 3 and 4, then the direct route or the application."""
        messages: list[Message] | None = None  # the body, once read
        if scope["method"] not in _NO_BODY_METHODS:
            declared = head.declared_length()
            if declared is not None and declared > self.max_bytes:
                await payload_too_large_response(scope, self.max_bytes)(scope, receive, send)
                return
            if declared is None:  # chunked: read up to the cap (never further), then replay
                messages = await read_body(receive, self.max_bytes)
                if messages is None:
                    await payload_too_large_response(scope, self.max_bytes)(
                        scope, receive, send)
                    return
        if scope["path"].startswith(self.prefix):
            role = role_of(key_from_headers(head.authorization, head.api_key), self.keys)
            if role is None:
                await unauthenticated_response(scope)(scope, receive, send)
                return
            scope.setdefault("state", {})["role"] = role
        if self._is_direct(scope, head):
            if messages is None:  # declared within the cap: the server stops at it
                messages = await read_body(receive, self.max_bytes)
                if messages is None:  # more than declared: refused as a chunked body is
                    await payload_too_large_response(scope, self.max_bytes)(
                        scope, receive, send)
                    return
            answer["route"] = DIRECT_PATH  # the route's metrics label, also if it raises
            if await self.direct(  # type: ignore[misc]
                    scope, b"".join(m.get("body", b"") for m in messages), send):
                return
            answer["route"] = None  # declined: the application's routing says
        await self.app(scope, receive if messages is None else _replay(messages, receive), send)

    def _is_direct(self, scope: Scope, head: RequestHead) -> bool:
        return (self.direct is not None and scope["path"] == DIRECT_PATH
                and scope["method"] == "POST" and head.content_type == b"application/json"
                and not scope.get("query_string"))


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that hands out `messages` first (a body already read), then the server's."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
