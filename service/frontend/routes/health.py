"""GET /healthz (the process answers and its model is alive) and GET /readyz (model loaded, warmed up, not
shutting down, serving)."""

from __future__ import annotations

from fastapi import APIRouter

from ..errors import ModelUnavailable
from ..schemas import ErrorResponse, Status
from .params import FrontendDep

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Status, response_model_exclude_none=True,
            responses={503: {"model": ErrorResponse}}, summary="Liveness")
async def healthz(fe: FrontendDep) -> Status:
    """200 while this process answers and its model can still serve again without a restart (loading, a
    short stall and an unhealthy batch are /readyz's business); 503 when the model process is gone or has
    been silent past PATCHLIFE_MODEL_STALL_EXIT_S: a liveness probe should restart the service."""
    status = fe.model.status()
    if not status.live:
        raise ModelUnavailable(f"the model cannot serve again without a restart: {status.problem}",
                               headers={"Retry-After": "5"})
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorResponse}}, summary="Readiness")
async def readyz(fe: FrontendDep) -> Status:
    """200 once the model is loaded and warmed up; 503 before that, from the start of shutdown, and
    while the model cannot serve (its thread stopped, batches keep failing, a batch hangs), with why.
    The detail says what warm-up did: CUDA graphs captured, the cost model fitted."""
    status = fe.check_ready()  # raises NotReady / ShuttingDown; not counted as a rejected request
    return Status(status="ready", detail={"warmup_seconds": status.warmup_seconds, **status.detail})
