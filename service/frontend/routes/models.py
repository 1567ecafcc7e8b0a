"""GET /v1/models: what is being served (name, description, backbone, schedule, classes, device, dtype)."""

from __future__ import annotations

from fastapi import APIRouter

from ..errors import NotReady
from ..schemas import ErrorResponse, ModelInfo
from .common import RuntimeDep

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelInfo, responses={503: {"model": ErrorResponse}},
            summary="The served model and what it recognises")
async def models(rt: RuntimeDep) -> ModelInfo:
    if rt.engine is None:
        raise NotReady("model is loading")
    info = rt.engine.info()
    info["batching"] = {"bucket_grid": info.pop("buckets"), "mode": rt.settings.batching,
                        "cost_model": rt.worker.cost.describe() if rt.worker is not None else None}
    return ModelInfo.model_validate(info)
