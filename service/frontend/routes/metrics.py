"""GET /metrics: Prometheus text exposition of the service's own registry."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from ...metrics import CONTENT_TYPE
from .common import RuntimeDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(rt: RuntimeDep) -> Response:
    return Response(rt.metrics.exposition(), media_type=CONTENT_TYPE)
