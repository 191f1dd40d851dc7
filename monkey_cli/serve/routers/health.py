"""GET /health: whether the model is loaded (200 ready, 503 loading or failed), the queue and what the engine
has done (its batching is visible here: busiest_step, vision_passes, prefix_reuses, ...)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from monkey_cli.serve.routers.common import Service
from monkey_cli.serve.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(service: Service) -> JSONResponse:
    body = Health.model_validate(service.health())
    return JSONResponse(body.model_dump(), status_code=200 if body.status == "ready" else 503)
