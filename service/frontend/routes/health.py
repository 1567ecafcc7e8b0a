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
    """200 once the model is loaded and warmed up; 503 before that, from the start of shutdown, and
    while the model cannot serve (its thread stopped, batches keep failing, a batch hangs), with why.
    The detail says what warm-up did: CUDA graphs captured, the cost model fitted."""
    status = rt.check_ready()  # raises NotReady / ShuttingDown; not counted as a rejected request
    return Status(status="ready", detail={"warmup_seconds": status.warmup_seconds, **status.detail})
