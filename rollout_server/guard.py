"""What every request passes before the app reads it: the API key, then the body's size.

A pure ASGI middleware, so a request without the key is refused (401) before one byte of its body
is read, and a body over `max_body_bytes` is refused (413) by its Content-Length, or, sent chunked,
as soon as it grows past the bound. Bodies under a streamed path prefix (adapter uploads) are not
read here: they are refused by their Content-Length over that prefix's own bound, and the route
bounds what it reads as it streams to disk. /health stays public; /docs, /redoc and /openapi.json do not.
The samples page (/ui) also takes the key as `?key=`: a browser sends no Authorization header when
it navigates.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import GrpoError, PayloadTooLargeError, UnauthorizedError

PUBLIC_PATHS = frozenset({"/health"})
QUERY_KEY_PATHS = frozenset({"/ui"})
"""Pages a browser opens: they take the key as the query parameter `key` too."""


class RequestGuard:
    """Checks the `Authorization: Bearer <api_key>` header (when a key is set), then reads the body
    up to `max_body_bytes` and hands it on; refusals answer `error_body(path, status, message,
    type)` with `status[type]`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        status: Mapping[type[Exception], int],
        error_body: Callable[[str, int, str, type[Exception]], dict[str, Any]],
        streamed: Mapping[str, int] | None = None,
    ) -> None:
        """`streamed`: path prefixes whose bodies the route streams, each with its largest body."""
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.streamed = dict(streamed or {})
        self.status = status
        self.error_body = error_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_key(scope)
            if (bound := self._streamed_bound(scope["path"])) is not None:
                _check_declared_length(scope, bound, "max_upload_bytes")
                await self.app(scope, receive, send)
                return
            body = await self._read_body(scope, receive)
        except (UnauthorizedError, PayloadTooLargeError) as e:
            await self._refuse(e, scope, receive, send)
            return
        if body is None:
            return  # the client left mid-body: nobody to answer
        await self.app(scope, _replay(body, receive), send)

    def _check_key(self, scope: Scope) -> None:
        query_key = _take_query_key(scope) if scope["path"] in QUERY_KEY_PATHS else None
        if self.api_key is None or scope["path"] in PUBLIC_PATHS:
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(token, self.api_key.encode()):
            return
        if query_key is not None and secrets.compare_digest(query_key, self.api_key.encode()):
            return
        how = "open it as ?key=<ROLLOUT_API_KEY>, or " if scope["path"] in QUERY_KEY_PATHS else ""
        raise UnauthorizedError(f"missing or wrong API key ({how}send 'Authorization: Bearer <ROLLOUT_API_KEY>')")

    def _streamed_bound(self, path: str) -> int | None:
        return next((bound for prefix, bound in self.streamed.items() if path.startswith(prefix)), None)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None if the client disconnected first."""
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large(f"its Content-Length is {int(declared)} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(f"it grew past {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, why: str) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"request body refused: {why}, over the server's max_body_bytes={self.max_body_bytes}"
        )

    async def _refuse(self, error: GrpoError, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(error, UnauthorizedError) else None
        status = self.status[type(error)]
        body = self.error_body(scope["path"], status, str(error), type(error))
        response = JSONResponse(body, status_code=status, headers=headers)
        await response(scope, receive, send)


def _check_declared_length(scope: Scope, bound: int, setting: str) -> None:
    """PayloadTooLargeError if the request's Content-Length is over `bound` (the server's `setting`)."""
    declared = dict(scope["headers"]).get(b"content-length", b"")
    if declared.isdigit() and int(declared) > bound:
        raise PayloadTooLargeError(
            f"request body refused: its Content-Length is {int(declared)} bytes, over the server's {setting}={bound}"
        )


def _take_query_key(scope: Scope) -> bytes | None:
    """The query parameter `key` (its last value), removed from the scope's query string: uvicorn's
    access log prints the query string of this same scope, and must not print the key."""
    pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
    keys = [value for name, value in pairs if name == "key"]
    if not keys:
        return None
    scope["query_string"] = urlencode([(name, value) for name, value in pairs if name != "key"]).encode()
    return keys[-1].encode()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body already read, then what the client sends next."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
