"""GET /: the web page. Plain HTML, CSS and JavaScript shipped in the package (`static/`), no build step and
nothing from another origin: its Content-Security-Policy (set on every response, `/static/...` included, by
`middleware.SecurityHeadersMiddleware`) lets it load only from this server."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    return HTMLResponse(_index())


@router.get("/favicon.ico")
async def favicon() -> Response:
    """No icon (the page names none): an empty answer rather than a 404 in the browser's console."""
    return Response(status_code=204)


@lru_cache(maxsize=1)
def _index() -> str:
    return (resources.files("monkey_cli.serve") / "static" / "index.html").read_text(encoding="utf-8")
