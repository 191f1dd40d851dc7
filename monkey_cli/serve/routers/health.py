"""GET /health: whether the model is loaded (200 ready, 503 loading or failed), the queue and what the engine
has done (its batching is visible here: busiest_step, vision_passes, prefix_reuses, ...).

A server with an API key answers liveness to anyone (a load balancer's probe needs no key): without the key
the body is only `{"status", "key_required": true}`; the details (the model, the queue, the engine's
counters) stay behind the key.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from monkey_cli.serve.middleware import key_accepted
from monkey_cli.serve.routers.common import Service
from monkey_cli.serve.schemas import Health, Liveness

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health | Liveness, responses={503: {"model": Health | Liveness}})
async def health(request: Request, service: Service) -> JSONResponse:
    status = 200 if service.state == "ready" else 503
    if not key_accepted(request.scope):
        return JSONResponse(Liveness(status=service.state).model_dump(), status_code=status)
    body = Health.model_validate(service.health())
    return JSONResponse(body.model_dump(), status_code=200 if body.status == "ready" else 503)
