"""Request bodies are capped before they are buffered (SPEC 10): a JSON 413, at once.

Two layers, one table of caps (`body_cap_for`):
- `BodyLimitMiddleware`, in front of Django's ASGI handler: refuses a declared Content-Length over
  the cap without reading a byte, and stops reading an undeclared (chunked) body as soon as the
  running total passes the cap. Django is then told the client went away, so it never handles a
  partial body as if it were whole. This is the whole story under a server that streams bodies.
- daphne does not stream: Twisted reads the whole body into a temporary file before daphne calls
  the application, and daphne then queues all of it as `http.request` messages at once (a 300 MiB
  body cost the process 300 MiB). core.transport applies the same caps inside daphne, while the
  body arrives.
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from django.conf import settings

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def body_cap_for(path: str, *, default_cap: int | None = None, caps: Mapping[str, int] | None = None) -> int:
    """The most bytes a request body to `path` may have: its row in CHAT_REQUEST_BODY_CAPS (exact
    path) or CHAT_MAX_REQUEST_BYTES."""
    caps = settings.CHAT_REQUEST_BODY_CAPS if caps is None else caps
    return caps.get(path, settings.CHAT_MAX_REQUEST_BYTES if default_cap is None else default_cap)


def too_large_body(cap: int) -> bytes:
    return json.dumps(
        {"detail": f"Request body too large: at most {cap} bytes here.", "code": "request_too_large"}
    ).encode()


def bad_length_body() -> bytes:
    return json.dumps({"detail": "Malformed Content-Length header.", "code": "bad_request"}).encode()


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, default_cap: int | None = None, caps: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.default_cap = default_cap
        self.caps = caps

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = body_cap_for(scope["path"], default_cap=self.default_cap, caps=self.caps)
        declared = [value for name, value in scope["headers"] if name.lower() == b"content-length"]
        if declared:
            if not all(value.strip().isdigit() for value in declared) or len(set(declared)) > 1:
                return await _answer(send, 400, bad_length_body())
            if int(declared[0]) > cap:
                return await _answer(send, 413, too_large_body(cap))

        received = 0
        refused = False

        async def capped_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    refused = True
                    await _answer(send, 413, too_large_body(cap))
                    # The app sees a client that went away (Django: RequestAborted), not a short body.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, capped_receive, guarded_send)


async def _answer(send, status: int, body: bytes) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})
