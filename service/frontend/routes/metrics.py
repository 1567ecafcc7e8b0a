"""GET /metrics: Prometheus text exposition of the service: this process's registry, or with API
processes the aggregate of every process's files (any API process answers for the whole service)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ...metrics import CONTENT_TYPE
from ..access import Group, require
from .params import FrontendDep

router = APIRouter(tags=["metrics"], dependencies=[require(Group.METRICS)])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(fe: FrontendDep) -> Response:
    if fe.metrics.shared_dir is None:
        return Response(fe.metrics.exposition(), media_type=CONTENT_TYPE)
    # Merging the directory reads every process's files (tens of ms): off the event loop.
    return Response(await run_in_threadpool(fe.metrics.exposition), media_type=CONTENT_TYPE)
