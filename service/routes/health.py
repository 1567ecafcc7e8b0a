"""GET /healthz (the process answers) and GET /readyz (model loaded, warmed up, not shutting down)."""

from __future__ import annotations

from fastapi import APIRouter

from ..schemas import ErrorResponse, Status
from .common import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Status, response_model_exclude_none=True, summary="Liveness")
async def healthz() -> Status:
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorResponse}}, summary="Readiness")
async def readyz(rt: RuntimeDep) -> Status:
    """200 once the model is loaded and warmed up; 503 before that and from the start of shutdown."""
    engine, worker = rt.serving()  # raises NotReady / ShuttingDown
    return Status(status="ready", detail={"warmup_seconds": rt.warmup_seconds, "graphs": engine.runner.describe(),
                                          "cost_model": worker.cost.describe()})
