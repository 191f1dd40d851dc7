"""What every request passes before it reaches a route: the API key, the queue limit, the body size limit.

All are plain ASGI middleware (nothing is buffered, streams stay streams) and answer with a JSON error in
OpenAI's shape, before a byte of the body is read: a client without the key cannot make the server read an
upload, and a busy server does not hold more uploads in memory than its queue allows. The size limit
refuses a declared Content-Length at once and stops a body that turns out larger while it is read.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monkey_cli.serve.errors import APIError, too_large

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.serve.service import ModelService

# The web page's own files hold no data: a browser loads them without a key, and the page asks for it.
PUBLIC_PATHS = ("/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)


class BodyTooLarge(HTTPException):
    """Raised while a body is read, through the framework's body parsing, to the error handlers (413)."""

    def __init__(self) -> None:
        super().__init__(status_code=413)


class ApiKeyMiddleware:
    """401 for any request (but the web page's files) without `Authorization: Bearer KEY`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_public(scope["path"]) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the key the server was "
            "started with (--api-key or MONKEY_API_KEY)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                # compare_digest takes the same time wherever the first difference is
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class AdmissionMiddleware:
    """429 at once when `service.settings.max_queue` requests for the model (every POST: chat completions,
    documents, previews) are in progress, counted from their arrival until their answer is sent (a stream
    included). All of it runs on the event loop: the count needs no lock."""

    def __init__(self, app: ASGIApp, service: ModelService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        service, limit = self.service, self.service.settings.max_queue
        if service.in_progress >= limit:
            error = APIError(
                429,
                f"the server is busy: {service.in_progress} requests are in progress, its limit (--max-queue); "
                "retry shortly",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
            await JSONResponse(error.body(), status_code=429, headers=error.headers)(scope, receive, send)
            return
        service.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            service.in_progress -= 1


class BodyLimitMiddleware:
    """413 for a request body over `limit` bytes, declared (Content-Length) or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            error = too_large(self.limit)
            await JSONResponse(error.body(), status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge
            return message

        await self.app(scope, limited, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
