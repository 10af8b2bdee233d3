"""The request-body cap: a body larger than `max_body_bytes` answers 413 `payload_too_large`
before the application parses anything (applied by the front middleware, api/front.py).

A declared Content-Length over the cap is refused without reading the body; a chunked body is
read up to the cap (never further) and replayed to the application. The 413 closes the
connection (the rest of the body is never read). Provider webhooks keep their own lower cap.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import Message, Receive, Scope

from api.problems import PayloadTooLarge, error_response


async def read_body(receive: Receive, max_bytes: int) -> list[Message] | None:
    """The request's messages up to its last body part (or a disconnect), to be replayed;
    None as soon as the body exceeds `max_bytes` (what was read is dropped). Bounded: at most
    `max_bytes` of body is held."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        size += len(message.get("body", b""))
        if size > max_bytes:
            return None
        if not message.get("more_body", False):
            return messages


def payload_too_large_response(scope: Scope, max_bytes: int) -> JSONResponse:
    """413 `payload_too_large` (with `max_bytes`), closing the connection."""
    return error_response(PayloadTooLarge(
        f"request bodies are at most {max_bytes} bytes", max_bytes=max_bytes,
        headers={"Connection": "close"}), scope["path"])
