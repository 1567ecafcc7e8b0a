"""GET /v1/models: what is being served (name, description, backbone, schedule, classes, device, dtype)."""

from __future__ import annotations

from fastapi import APIRouter

from ..access import Group, require
from ..schemas import ErrorResponse, ModelInfo
from .common import RuntimeDep

router = APIRouter(tags=["models"], dependencies=[require(Group.METADATA)])


@router.get("/v1/models", response_model=ModelInfo, responses={503: {"model": ErrorResponse}},
            summary="The served model and what it recognises")
async def models(rt: RuntimeDep) -> ModelInfo:
    info = dict(rt.loaded().info)
    detail = rt.model.status().detail
    if "graphs" in detail:  # known once warmed up
        info["graphs"] = detail["graphs"]
    info["batching"] = {"bucket_grid": info.pop("buckets"), "mode": rt.settings.batching,
                        "cost_model": detail.get("cost_model"),
                        "accuracy_scaling": detail.get("accuracy_scaling")}
    return ModelInfo.model_validate(info)
