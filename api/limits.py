"""The request-body cap: a body larger than `max_body_bytes` answers 413 `payload_too_large`
before the application parses anything.

A declared Content-Length over the cap is refused without reading the body; a chunked body is
read up to the cap (never further) and replayed to the application. The 413 closes the
connection (the rest of the body is never read). Provider webhooks keep their own lower cap.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import PayloadTooLarge, error_response


class BodyLimit:
    """ASGI middleware capping request bodies at `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None:
            if declared > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server stops at the declared length
            return
        messages, size = [], 0
        while True:  # chunked: buffer at most max_bytes, then replay
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(messages, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(PayloadTooLarge(
            f"request bodies are at most {self.max_bytes} bytes", max_bytes=self.max_bytes,
            headers={"Connection": "close"}), scope["path"])
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared Content-Length; a malformed one counts as too large (refused)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else 1 << 62
    return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
