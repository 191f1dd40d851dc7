"""What every request passes before it reaches a route, outermost first: the access log, the security headers
of every response, the Host header (DNS rebinding), cross-site requests (CSRF), the API key, the queue limit,
and the body's size and pace.

All are plain ASGI middleware (nothing is buffered, streams stay streams) and answer with a JSON error in
OpenAI's shape, before a byte of the body is read: a client without the key cannot make the server read an
upload, and a busy server does not hold more uploads in memory than its queue allows. The size limit
refuses a declared Content-Length at once and stops a body that turns out larger while it is read; the
body's deadline stops a body that comes too slowly (or not at all), so that slow clients cannot hold the
queue's places.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monkey_cli.serve.errors import APIError, too_large
from monkey_cli.serve.settings import MIN_BODY_RATE, WILDCARD_HOSTS

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.serve.service import ModelService

log = logging.getLogger("monkey_cli.serve")

# Every response: the web page may load scripts, styles and data from this server only (images also from
# data: URLs, its previews); no response is sniffed into another type, framed, or leaks a referrer.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Methods that change something (run the model): a browser sends them cross-site without asking first.
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# The web page's own files hold no data: a browser loads them without a key, and the page asks for it.
PUBLIC_PATHS = ("/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
# Answered without the key too, with less: liveness only (routers/health.py reads `key_accepted`).
LIVENESS_PATH = "/health"
_KEY_STATE = "monkey_api_key_accepted"


class BodyTooLarge(HTTPException):
    """Raised while a body is read, through the framework's body parsing, to the error handlers (413)."""

    def __init__(self) -> None:
        super().__init__(status_code=413)


class BodyTooSlow(HTTPException):
    """Raised while a body is read when it did not arrive in time (408), like BodyTooLarge."""

    def __init__(self) -> None:
        super().__init__(status_code=408)


async def _refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(error.body(), status_code=error.status, headers=error.headers or None)(scope, receive, send)


class SecurityHeadersMiddleware:
    """SECURITY_HEADERS on every response (the page, its static files, the API), unless a route set its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._headers = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in self._headers if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


class AccessLogMiddleware:
    """One line per request in the server's log (stderr), when its response is over: method, path, status,
    milliseconds and the response body's bytes (`POST /v1/documents 200 1840 ms 2312 bytes`). Never the query
    string (a client may put a secret there), a header (the key) or a body; the path is cut at 200
    characters, and the log's handler shows control characters as escapes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None
        sent = 0

        async def counted(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            status = status or 500  # the framework's outermost handler answers it with a 500
            raise
        except BaseException:  # cancelled: the client left, or the server stops
            status = status or 499
            raise
        finally:
            path = scope.get("path", "")
            shown = path if len(path) <= 200 else path[:200] + "..."
            milliseconds = (time.perf_counter() - started) * 1000
            log.info("%s %s %s %.0f ms %d bytes", scope.get("method", "-"), shown, status or "-", milliseconds, sent)


def host_names(host: str, allowed: Iterable[str]) -> frozenset[str]:
    """The names a request's Host header may carry (besides IP addresses, always accepted): `localhost`,
    `host` (the address listened on) and `allowed`; with a wildcard `host` (0.0.0.0), this machine's name."""
    names = {"localhost", _bare_host(host)}
    if host in WILDCARD_HOSTS:
        names.add(socket.gethostname().lower())
    names.update(_bare_host(name) for name in allowed)
    return frozenset(name for name in names if name)


def _bare_host(value: str) -> str:
    """`Host` without its port, lower case, without a final dot: `[::1]:8000` -> `::1`, `Evil.example.:80` ->
    `evil.example`."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class HostMiddleware:
    """403 for a request whose Host header names something else than this server (DNS rebinding: a web page
    whose name was made to resolve to 127.0.0.1 reads the server as its own origin). IP addresses are always
    accepted (a page's origin is then that address itself), names only when they are this server's."""

    def __init__(self, app: ASGIApp, names: frozenset[str], any_host: bool = False) -> None:
        self.app = app
        self.names = names
        self.any_host = any_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any_host:
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("host")
        host = _bare_host(given) if given is not None else None
        if host is None or host in self.names or _is_ip(host):  # no Host at all: HTTP/1.0, not a browser
            await self.app(scope, receive, send)
            return
        log.info("refused a request for Host %r (not one of this server's names; see --allowed-hosts)", given[:100])
        error = APIError(
            403,
            f"this server does not answer to the name {given[:100]!r}: use localhost, an IP address or the "
            "--host it was started with (or start it with --allowed-hosts NAME)",
            code="host_not_allowed",
        )
        await _refuse(error, scope, receive, send)


class CrossSiteMiddleware:
    """403 for a state-changing request (POST) a browser sends from another site's page (CSRF): one whose
    Sec-Fetch-Site says `cross-site` or `same-site` (another port of this machine is the same site), or,
    from a browser without Fetch metadata, whose Origin is not this server's, unless that origin is allowed
    (`allowed_origins`, "*" any). Clients that are not browsers (curl, OpenAI's clients) send neither."""

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = frozenset(origin.strip().rstrip("/").lower() for origin in allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in STATE_CHANGING or "*" in self.allowed:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None and origin.strip().rstrip("/").lower() in self.allowed:
            await self.app(scope, receive, send)
            return
        site = (headers.get("sec-fetch-site") or "").strip().lower()
        foreign = not site and origin is not None and not _same_origin(origin, headers)  # no Fetch metadata
        if site in ("cross-site", "same-site") or foreign:
            log.info("refused a cross-site %s %s from origin %r (see --allowed-origins)", scope["method"],
                     scope["path"], (origin or "")[:100])  # fmt: skip
            error = APIError(
                403,
                f"cross-site requests are refused: a page of {(origin or 'another site')[:100]} may not use this "
                "server (start it with --allowed-origins ORIGIN to allow one)",
                code="cross_site_refused",
            )
            await _refuse(error, scope, receive, send)
            return
        await self.app(scope, receive, send)


def _same_origin(origin: str, headers: Headers) -> bool:
    """Whether `origin` (scheme://host:port) names the server the request was sent to (its Host header)."""
    scheme, separator, rest = origin.strip().lower().partition("://")
    host = headers.get("host", "").strip().lower()
    return bool(separator) and scheme in ("http", "https") and rest.rstrip("/") == host


class ApiKeyMiddleware:
    """401 for any request (but the web page's files) without `Authorization: Bearer KEY`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == LIVENESS_PATH:
            scope.setdefault("state", {})[_KEY_STATE] = self._authorized(scope)
            await self.app(scope, receive, send)
            return
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
        await _refuse(error, scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                # compare_digest takes the same time wherever the first difference is
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def key_accepted(scope: Scope) -> bool:
    """Whether a request to LIVENESS_PATH carried the server's key (always, for a server without one)."""
    return bool(scope.get("state", {}).get(_KEY_STATE, True))


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
    """413 for a request body over `limit` bytes, declared (Content-Length) or streamed; 408 for a body that
    has not arrived `timeout` seconds after the request (plus a second per MIN_BODY_RATE bytes received, so
    a large upload on a slow link still gets in, while a trickle does not hold its place in the queue)."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            error = too_large(self.limit)
            await JSONResponse(error.body(), status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return
        clock = asyncio.get_running_loop().time
        started = clock()
        received = 0
        complete = False

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: what is left to receive is the disconnect, whenever it comes
                return await receive()
            remaining = started + self.timeout + received / MIN_BODY_RATE - clock()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except TimeoutError:
                raise BodyTooSlow from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge
                complete = not message.get("more_body", False)
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
