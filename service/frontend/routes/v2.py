"""Open Inference Protocol v2 (REST) beside the native API: KServe and Triton clients work as they are.

Same worker, batching, limits, deadline header and metrics as /classify; errors in the protocol's
shape ``{"error": "..."}`` with the native API's status codes (and the same rejection counts).
The tensors and their parsing are in ``service/frontend/oip.py``; Triton's model configuration and statistics
extensions in ``service/frontend/triton.py``. The inference path itself (``check_model``, ``infer_images``)
is ``service/frontend/infer.py``, which the gRPC service (``service/frontend/grpc/``) runs too: one
inference path for both transports.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import oip, triton
from ..access import Group, require
from ..errors import ApiError, NotReady
from ..infer import check_model, infer_images, parse_body, served_model
from ..state import FrontendState
from ..upload import _check_content_length, _read_body
from .direct import DirectRoute, binds
from .params import DeadlineDep, FrontendDep

INLINE_ENCODE_UNITS = 8  # images x outputs encoded on the event loop; a larger answer is encoded in a thread


class V2Route(DirectRoute):
    """Answers every error of its endpoint in the protocol's form, counted like the native ones
    (inference is bound by hand: ``routes/direct.py``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                if exc.reason:
                    request.app.state.frontend.metrics.reject(exc.reason)
                return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)
            except RequestValidationError as exc:
                request.app.state.frontend.metrics.reject("invalid_request")
                where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                                  for e in exc.errors())
                return JSONResponse({"error": f"invalid request: {where}"}, 422)

        return handle


router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], route_class=V2Route)
# Inference on a router of its own, which the app matches before every other (service/frontend/app.py):
# FastAPI tries the routes of its included routers one by one, and this was the last of them.
infer_router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], route_class=V2Route)
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown model name or version"}}
# Access groups (service/frontend/access.py); health and model readiness stay open (probes).
METADATA, INFERENCE = [require(Group.METADATA)], [require(Group.INFERENCE)]


# -- server ---------------------------------------------------------------------------------------
@router.get("/health/live", summary="Server liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness (503 while loading or draining)")
async def ready(fe: FrontendDep) -> dict[str, bool]:
    reason = fe.not_ready_reason()
    if reason:  # not fe.serving(): that would count a readiness poll during drain as a rejected request
        raise NotReady(reason)
    return {"ready": True}


@router.get("", dependencies=METADATA, summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "patchlife", "version": request.app.version, "extensions": oip.EXTENSIONS}


# -- model ----------------------------------------------------------------------------------------
@router.get("/models/stats", dependencies=METADATA,
            summary="Statistics of every model (Triton's statistics extension)")
async def all_statistics(fe: FrontendDep) -> dict[str, Any]:
    if fe.card is None:
        return {"model_stats": []}
    return {"model_stats": [triton.model_statistics(fe.metrics, fe.card.name)]}


@router.get("/models/{name}/stats", dependencies=METADATA, responses=_NOT_FOUND,
            summary="Model statistics (Triton's statistics extension)")
@router.get("/models/{name}/versions/{version}/stats", dependencies=METADATA, responses=_NOT_FOUND,
            include_in_schema=False)
async def get_model_statistics(fe: FrontendDep, name: str, version: str | None = None) -> dict[str, Any]:
    return {"model_stats": [triton.model_statistics(fe.metrics, served_model(fe, name, version).name)]}


@router.get("/models/{name}/config", dependencies=METADATA, responses=_NOT_FOUND,
            summary="Model configuration (Triton's model configuration extension)")
@router.get("/models/{name}/versions/{version}/config", dependencies=METADATA, responses=_NOT_FOUND,
            include_in_schema=False)
async def get_model_config(fe: FrontendDep, name: str, version: str | None = None) -> dict[str, Any]:
    return triton.model_config(served_model(fe, name, version), fe.settings)


@router.get("/models/{name}", dependencies=METADATA, responses=_NOT_FOUND,
            summary="Model metadata: input and output tensors")
@router.get("/models/{name}/versions/{version}", dependencies=METADATA, responses=_NOT_FOUND,
            include_in_schema=False)
async def get_model_metadata(fe: FrontendDep, name: str, version: str | None = None) -> dict[str, Any]:
    return oip.model_metadata(served_model(fe, name, version).info)


@router.get("/models/{name}/ready", responses=_NOT_FOUND, summary="Model readiness")
@router.get("/models/{name}/versions/{version}/ready", responses=_NOT_FOUND, include_in_schema=False)
async def model_ready(fe: FrontendDep, name: str, version: str | None = None) -> dict[str, Any]:
    served_model(fe, name, version)
    reason = fe.not_ready_reason()
    if reason:
        raise NotReady(reason)
    return {"name": name, "ready": True}


async def _bind_infer(request: Request, fe: FrontendState, deadline: float) -> Response:
    """infer's parameters by hand (routes/direct.py): FastAPI reads the path the same way."""
    path = request.path_params
    return await infer(request, fe, deadline, path["name"], path.get("version"))


@infer_router.post("/models/{name}/infer", dependencies=INFERENCE, responses=_NOT_FOUND,
                   summary="Inference (binary tensor data extension)")
@infer_router.post("/models/{name}/versions/{version}/infer", dependencies=INFERENCE, responses=_NOT_FOUND,
                   include_in_schema=False)
@binds(_bind_infer, reads=("name", "version"))
async def infer(request: Request, fe: FrontendDep, deadline: DeadlineDep, name: str,
                version: str | None = None) -> Response:
    """Inputs ``images`` (BYTES [N], encoded) and/or ``pixels`` (UINT8 [N, H, W, 3]); parameters
    ``top_k``, ``keep_rate`` and ``min_keep_rate``; answer parameters ``keep_rate`` (the lowest served),
    ``scaled``, ``requested_keep_rate``; outputs ``probabilities``, ``labels``, ``lifespans``, ``budget``."""
    card = check_model(fe, name, version)
    oip.check_body_type(request.headers.get("content-type"))
    limits = fe.limits()
    _check_content_length(request, limits.max_body_bytes)
    body = await _read_body(request, limits.max_body_bytes, "request body (PATCHLIFE_MAX_REQUEST_BYTES)")
    header = request.headers.get(oip.HEADER_LENGTH)
    parsed = await parse_body(body, header, limits, fe.settings.max_image_pixels)
    done = await infer_images(fe, parsed, deadline, request.receive)
    t0 = time.perf_counter()
    encode = functools.partial(oip.encode_response, card.name, parsed.request, done.specs, done.results,
                               list(card.class_names), done.top_k)
    # a large answer (many images and outputs) takes a while to encode: off the event loop, which keeps
    # answering other requests (/healthz) meanwhile; a small one is cheaper encoded here than a thread hop
    large = len(done.results) * max(1, len(done.specs)) > INLINE_ENCODE_UNITS
    content, head_length = await anyio.to_thread.run_sync(encode) if large else encode()
    fe.metrics.encode_seconds.observe(time.perf_counter() - t0)
    if head_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={oip.HEADER_LENGTH: str(head_length)})
