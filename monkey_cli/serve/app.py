"""`create_app`: the FastAPI application around one `ModelService`.

The model is loaded once, in a background thread started with the app, so the server answers `/health`
(503 "loading") while it loads. Every error leaves as JSON in OpenAI's shape: our own (`APIError`), the
framework's (validation, unknown routes, wrong methods, oversized bodies) and unexpected ones (a 500 that
names nothing internal; the details go to the server's log, the traceback only with --verbose).
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from monkey_cli import __version__
from monkey_cli.serve.errors import APIError, bad_request, too_large, too_slow
from monkey_cli.serve.middleware import (
    AccessLogMiddleware,
    AdmissionMiddleware,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    CrossSiteMiddleware,
    HostMiddleware,
    SecurityHeadersMiddleware,
    host_names,
)
from monkey_cli.serve.routers import chat, documents, extract, health, models, web
from monkey_cli.serve.service import ClientGone, ModelService

log = logging.getLogger("monkey_cli.serve")


def create_app(
    service: ModelService,
    *,
    on_load_failure: Callable[[BaseException], None] | None = None,
    verbose: bool = False,
) -> FastAPI:
    """The app serving `service`'s model; it loads the model at startup unless it is loaded already.
    `on_load_failure(exc)` is told when loading fails (the server then stops)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service.state == "loading":
            threading.Thread(
                target=_load, args=(service, on_load_failure), name="monkey-load", daemon=True
            ).start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="monkey serve",
        version=__version__,
        summary="Monkey (CVPR 2024) over an OpenAI-compatible API",
        lifespan=lifespan,
        docs_url=None,  # the interactive docs load their scripts from a CDN; /openapi.json stays
        redoc_url=None,
    )
    app.state.service = service
    for router in (chat.router, documents.router, extract.router, models.router, health.router, web.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(packages=[("monkey_cli.serve", "static")]), name="static")
    _install_error_handlers(app, service, verbose)
    _install_middleware(app, service)
    return app


def _install_middleware(app: FastAPI, service: ModelService) -> None:
    """The last added runs first: the access log, security headers, Host, CORS (for allowed origins),
    cross-site refusal, the key, the queue limit, the body's size and pace."""
    settings = service.settings
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes, timeout=settings.body_timeout)
    app.add_middleware(AdmissionMiddleware, service=service)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(CrossSiteMiddleware, allowed_origins=settings.allowed_origins)
    if settings.allowed_origins:  # the allowed pages may also read the answers (and send JSON, after asking)
        from starlette.middleware.cors import CORSMiddleware

        origins = [origin.rstrip("/") for origin in settings.allowed_origins]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    names = host_names(settings.host, settings.allowed_hosts)
    app.add_middleware(HostMiddleware, names=names, any_host="*" in settings.allowed_hosts)
    app.add_middleware(SecurityHeadersMiddleware)
    if settings.access_log:  # outermost: every request is logged with the status it finally got
        app.add_middleware(AccessLogMiddleware)


def _load(service: ModelService, on_failure: Callable[[BaseException], None] | None) -> None:
    try:
        service.load()
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which stops with it
        if on_failure is not None:
            on_failure(exc)
        return
    monkey = service.monkey
    log.info(
        "monkey serve: ready: %s (--quant %s on %s, %d decode slots)",
        service.model_name,
        monkey.quant,
        service.health().get("device"),
        monkey.batch_size,
    )


def _install_error_handlers(app: FastAPI, service: ModelService, verbose: bool) -> None:
    limit = service.settings.max_upload_bytes

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return _json(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return _json(_validation_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 413:
            return _json(too_large(limit))
        if exc.status_code == 408:
            return _json(too_slow(service.settings.body_timeout))
        if exc.status_code == 404:
            return _json(APIError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found"))
        if exc.status_code == 405:
            error = APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
            return _json(error)
        return _json(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        log.info("a client left before its answer was ready: its request was dropped")
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed the request"

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected %s in %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
        if verbose:
            traceback.print_exception(exc)
        return _json(APIError(500, "internal error (see the server's log)", code="internal_error"))


def _json(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers or None)


def _validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 in OpenAI's words from pydantic's most specific error: where it is (`param`) and what is wrong."""
    if not errors:
        return bad_request("invalid request")
    first = max(errors, key=lambda error: len(error.get("loc", ())))  # in a union, the branch that got furthest
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON: {reason}".rstrip(": "), code="invalid_json")
    # Union branches show up in the location as type names ("list[tagged-union[...]]"): not the client's words.
    where = [str(part) for part in first.get("loc", ()) if part != "body" and "[" not in str(part)]
    # A tagged union's branch shows up as its tag, which is also its field's name here ("json_schema.json_schema")
    where = [part for i, part in enumerate(where) if i == 0 or part != where[i - 1]]
    if not where:
        return bad_request("the request body must be a JSON object (Content-Type: application/json)")
    param = ".".join(where)
    message = "missing" if first.get("type") == "missing" else first.get("msg", "invalid")
    message = message.removeprefix("Value error, ")  # our own validators' words, without pydantic's label
    return bad_request(f"{param}: {message}", param)
