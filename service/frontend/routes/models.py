"""GET /v1/models: what is being served (name, description, backbone, schedule, classes, device, dtype)."""

from __future__ import annotations

from fastapi import APIRouter

from ..access import Group, require
from ..schemas import ErrorResponse, ModelInfo
from .params import FrontendDep

router = APIRouter(tags=["models"], dependencies=[require(Group.METADATA)])


@router.get("/v1/models", response_model=ModelInfo, responses={503: {"model": ErrorResponse}},
            summary="The served model and what it recognises")
async def models(fe: FrontendDep) -> ModelInfo:
    info = dict(fe.loaded().info)
    detail = fe.model.status().detail
    if "graphs" in detail:  # known once warmed up
        info["graphs"] = detail["graphs"]
    info["batching"] = {"bucket_grid": info.pop("buckets"), "mode": fe.settings.batching,
                        "cost_model": detail.get("cost_model"),
                        "accuracy_scaling": detail.get("accuracy_scaling")}
    return ModelInfo.model_validate(info)
