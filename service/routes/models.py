"""GET /v1/models: what is being served (name, backbone, schedule, classes, device, dtype)."""

from __future__ import annotations

from fastapi import APIRouter

from ..errors import NotReady
from ..schemas import ErrorResponse, ModelInfo
from .common import RuntimeDep

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelInfo, responses={503: {"model": ErrorResponse}},
            summary="The served model")
async def models(rt: RuntimeDep) -> ModelInfo:
    if rt.engine is None:
        raise NotReady("model is loading", headers={"Retry-After": "1"})
    info = rt.engine.info()
    info.setdefault("crop_pct", rt.engine.config.preprocess.get("crop_pct"))
    return ModelInfo.model_validate(info)
