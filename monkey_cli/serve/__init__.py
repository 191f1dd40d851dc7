"""`monkey serve`: one loaded model shared by many clients over HTTP.

An OpenAI-compatible API (`/v1/chat/completions` with structured outputs, `/v1/models`), the CLI's records
over HTTP (`/v1/documents`, `/v1/extract`) and a web page (`/`), all served by one process from one model
(FastAPI + uvicorn, the optional `serve` extra). Every request goes through one queue into the engine's
continuous batching (`monkey_cli.engine.EngineLoop`), so concurrent clients share the device instead of
waiting for each other.

Modules: `settings` (what the server is started with), `service` (the bridge to the engine: queue, limits,
timeouts, cancellation), `uploads` (data URLs and uploaded bytes -> pages, as the CLI reads them), `schemas`
(OpenAI's request, response and error shapes), `completions` (what a chat request asks of the model: the
turns rule, choices, response formats, stop strings, log-probabilities), `errors`, `middleware` (API key,
body size), `routers/*` (chat, documents, extract, models, health, web), `app` (`create_app`), `server` (the
socket and uvicorn), `static/` (the web page: no build step, no CDN). Only `settings` is light; the rest
imports FastAPI.
"""

from __future__ import annotations

from monkey_cli.serve.settings import ServeSettings

__all__ = ["ServeSettings"]
