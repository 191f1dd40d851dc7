"""What the routers share: the model service of the app, and noticing that a client has gone."""

from __future__ import annotations

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
