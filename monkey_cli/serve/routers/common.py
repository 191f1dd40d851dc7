"""What the routers share: the model service of the app, who a client is, and noticing that it has gone."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Depends, Request

from monkey_cli.serve.service import ModelService


def get_service(request: Request) -> ModelService:
    return request.app.state.service


Service = Annotated[ModelService, Depends(get_service)]


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the request body has been read by then, so every message left
    on the channel is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def client_identity(request: Request) -> str:
    """Who sends `request`, for what clients may share: its address and the key it gave (hashed), so that the
    vision features of an image are reused for the same client's follow-up questions, but never serve (or
    reveal, by a faster answer) another client's image."""
    host = request.client.host if request.client else ""
    key = request.headers.get("authorization", "")
    return hashlib.sha256(f"{host}\0{key}".encode()).hexdigest()[:32]
