"""Limits on what one HTTP request may make the server hold: body size, identifier lists.

``BodyLimit`` wraps the whole app, so every route has it. A body is refused
with 413 before any of it is read when its Content-Length says it is too
large; a chunked body (no length) is counted while it streams in and stopped
at the limit. Callers without valid credentials get a small limit
(``[server] max_anonymous_body``: a login is tiny); only an authenticated
caller may send up to ``[server] max_body``. The credentials are checked here,
before the body is read, only when a body could be over the small limit.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from mi2b2.api.deps import SESSION_COOKIE
from mi2b2.services.context import ServiceContext

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


def _size(limit: int) -> str:
    for unit, factor in (("MiB", 2**20), ("KiB", 2**10)):
        if limit >= factor and limit % factor == 0:
            return f"{limit // factor} {unit}"
    return f"{limit} bytes"


class BodyLimit:
    def __init__(self, app: ASGIApp, context: ServiceContext) -> None:
        self.app = app
        self.context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = self.context.config.server  # read per request: a reloaded configuration applies at once
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared_text = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        try:
            declared = int(declared_text) if declared_text is not None else None
        except ValueError:
            declared = -1
        if declared is not None and declared < 0:
            await _answer(send, 400, "Content-Length is not a number of bytes")
            return
        if declared is not None and declared > server.max_body:
            await _too_large(send, f"the request body is {declared} bytes; the most this server accepts is "
                                   f"{_size(server.max_body)} ([server] max_body)")
            return
        limit = server.max_anonymous_body
        if (chunked or (declared or 0) > limit) and await self._authenticated(scope, headers):
            limit = server.max_body
        if declared is not None and declared > limit:
            await _too_large(send, _anonymous_message(limit))
            return
        if not chunked:  # the HTTP server delivers no more than Content-Length said, checked above
            await self.app(scope, receive, send)
            return

        received = 0
        refused = False
        started = False

        async def counted() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    raise _BodyTooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if refused:  # whatever the app made of the interrupted body, the answer is 413
                return
            started = True
            await send(message)

        with contextlib.suppress(_BodyTooLarge):  # raised in `counted`, the app may let it through
            await self.app(scope, counted, guarded)
        if refused and not started:
            text = (_anonymous_message(limit) if limit < server.max_body else
                    f"the request body is over the {_size(limit)} this server accepts ([server] max_body)")
            await _too_large(send, text)

    async def _authenticated(self, scope: Scope, headers: dict[str, str]) -> bool:
        secret = _credential(headers)
        if not secret:
            return False
        client = scope.get("client")
        host = client[0] if client else ""
        principal = await anyio.to_thread.run_sync(self.context.accounts.authenticate, secret, host)
        return principal is not None


def _credential(headers: dict[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    for cookie in headers.get("cookie", "").split(";"):
        name, _, value = cookie.strip().partition("=")
        if name == SESSION_COOKIE:
            return value
    return None


def _anonymous_message(limit: int) -> str:
    return (f"the request body is over the {_size(limit)} accepted without valid credentials "
            "([server] max_anonymous_body); log in or send 'Authorization: Bearer <token>'")


async def _too_large(send: Send, text: str) -> None:
    await _answer(send, 413, text, "PayloadTooLarge")


async def _answer(send: Send, status: int, text: str, kind: str = "InvalidInput") -> None:
    body = json.dumps({"error": text, "kind": kind}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
