"""GET /v1/models: the one loaded model, as OpenAI lists models."""

from __future__ import annotations

from fastapi import APIRouter

from monkey_cli.serve.errors import APIError
from monkey_cli.serve.routers.common import Service
from monkey_cli.serve.schemas import ERROR_RESPONSES, ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(service: Service) -> ModelList:
    service.ready()
    return ModelList(data=[_card(service)])


@router.get("/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(model_id: str, service: Service) -> ModelCard:
    service.ready()
    if model_id != service.model_name:
        raise APIError(404, f"no model {model_id!r} here: this server serves {service.model_name!r}",
                       param="model", code="model_not_found")
    return _card(service)


def _card(service: Service) -> ModelCard:
    return ModelCard(id=service.model_name, created=service.created)
