"""Open Inference Protocol v2 (REST) beside the native API: KServe and Triton clients work as they are.

Same worker, batching, limits, deadline header and metrics as /classify; errors in the protocol's
shape ``{"error": "..."}`` with the native API's status codes (and the same rejection counts).
The tensors and their parsing are in ``service/frontend/oip.py``; Triton's model configuration and statistics
extensions in ``service/frontend/triton.py``. The gRPC service (``service/frontend/grpc/``) shares ``check_model`` and
``infer_images`` with the infer route: one inference path for both transports.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from PIL import Image

from ...decode import limit_aspect
from ...protocol import EncodedImage, ImageResult, ModelCard
from .. import oip, triton
from ..access import Group, require
from ..errors import ApiError, NotReady, RequestTooManyPixels
from ..upload import RawImage, _check_content_length, _read_body
from .common import DeadlineDep, Prepared, Runtime, RuntimeDep, prepare_images, resolve_options, run_model

INLINE_ENCODE_UNITS = 8  # images x outputs encoded on the event loop; a larger answer is encoded in a thread


class V2Route(APIRoute):
    """Answers every error of its endpoint in the protocol's form, counted like the native ones."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                if exc.reason:
                    request.app.state.runtime.metrics.reject(exc.reason)
                return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)
            except RequestValidationError as exc:
                request.app.state.runtime.metrics.reject("invalid_request")
                where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                                  for e in exc.errors())
                return JSONResponse({"error": f"invalid request: {where}"}, 422)

        return handle


router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], route_class=V2Route)
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown model name or version"}}
# Access groups (service/frontend/access.py); health and model readiness stay open (probes).
METADATA, INFERENCE = [require(Group.METADATA)], [require(Group.INFERENCE)]


def served_model(rt: Runtime, name: str, version: str | None = None) -> ModelCard:
    """The model's card, if ``name`` (and ``version``) is the served model: 404 otherwise, 503 while loading."""
    card = rt.loaded()
    if name != card.name or version not in (None, oip.VERSION):
        served = f"{card.name!r} version {oip.VERSION!r}"
        raise oip.ModelNotFound(f"unknown model {name!r}" + (f" version {version!r}" if version else "")
                                + f"; this server serves {served}")
    return card


# -- server ---------------------------------------------------------------------------------------
@router.get("/health/live", summary="Server liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness (503 while loading or draining)")
async def ready(rt: RuntimeDep) -> dict[str, bool]:
    reason = rt.not_ready_reason()
    if reason:  # not rt.serving(): that would count a readiness poll during drain as a rejected request
        raise NotReady(reason)
    return {"ready": True}


@router.get("", dependencies=METADATA, summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "patchlife", "version": request.app.version, "extensions": oip.EXTENSIONS}


# -- model ----------------------------------------------------------------------------------------
@router.get("/models/stats", dependencies=METADATA,
            summary="Statistics of every model (Triton's statistics extension)")
async def all_statistics(rt: RuntimeDep) -> dict[str, Any]:
    if rt.card is None:
        return {"model_stats": []}
    return {"model_stats": [triton.model_statistics(rt.metrics, rt.card.name)]}


@router.get("/models/{name}/stats", dependencies=METADATA, responses=_NOT_FOUND,
            summary="Model statistics (Triton's statistics extension)")
@router.get("/models/{name}/versions/{version}/stats", dependencies=METADATA, responses=_NOT_FOUND,
            include_in_schema=False)
async def get_model_statistics(rt: RuntimeDep, name: str, version: str | None = None) -> dict[str, Any]:
    return {"model_stats": [triton.model_statistics(rt.metrics, served_model(rt, name, version).name)]}


@router.get("/models/{name}/config", dependencies=METADATA, responses=_NOT_FOUND,
            summary="Model configuration (Triton's model configuration extension)")
@router.get("/models/{name}/versions/{version}/config", dependencies=METADATA, responses=_NOT_FOUND,
            include_in_schema=False)
async def get_model_config(rt: RuntimeDep, name: str, version: str | None = None) -> dict[str, Any]:
    return triton.model_config(served_model(rt, name, version), rt.settings)


@router.get("/models/{name}", dependencies=METADATA, responses=_NOT_FOUND,
            summary="Model metadata: input and output tensors")
@router.get("/models/{name}/versions/{version}", dependencies=METADATA, responses=_NOT_FOUND,
            include_in_schema=False)
async def get_model_metadata(rt: RuntimeDep, name: str, version: str | None = None) -> dict[str, Any]:
    return oip.model_metadata(served_model(rt, name, version).info)


@router.get("/models/{name}/ready", responses=_NOT_FOUND, summary="Model readiness")
@router.get("/models/{name}/versions/{version}/ready", responses=_NOT_FOUND, include_in_schema=False)
async def model_ready(rt: RuntimeDep, name: str, version: str | None = None) -> dict[str, Any]:
    served_model(rt, name, version)
    reason = rt.not_ready_reason()
    if reason:
        raise NotReady(reason)
    return {"name": name, "ready": True}


def _prepare_pixels(pixels: list[np.ndarray], rt: Runtime) -> Prepared:
    """Raw ``[H, W, 3]`` uint8 images -> engine input, like decoded files (aspect rule included)."""
    total = sum(int(a.shape[0]) * int(a.shape[1]) for a in pixels)
    if total > rt.settings.max_request_pixels:
        raise RequestTooManyPixels(f"the request's images have {total} pixels together, over the limit of "
                                   f"{rt.settings.max_request_pixels} (PATCHLIFE_MAX_REQUEST_PIXELS)")
    out = Prepared([], [], [])
    for arr in pixels:
        t0 = time.perf_counter()
        image = limit_aspect(Image.fromarray(np.ascontiguousarray(arr), "RGB"))
        out.pixels.append(rt.preprocessor().pil(image))
        seconds = time.perf_counter() - t0
        rt.metrics.decode_seconds.observe(seconds)
        out.decode_ms.append(seconds * 1000.0)
    return out


async def _prepare(items: list[RawImage | np.ndarray], rt: Runtime,
                   deadline: float) -> list[torch.Tensor | EncodedImage]:
    """Each run of same-kind items through its path, order kept."""
    pixels: list[torch.Tensor | EncodedImage] = []
    start = 0
    while start < len(items):
        kind = isinstance(items[start], RawImage)
        end = start
        while end < len(items) and isinstance(items[end], RawImage) == kind:
            end += 1
        run = items[start:end]
        if kind:
            prepared = await prepare_images([r for r in run if isinstance(r, RawImage)], rt, deadline=deadline)
        else:
            arrays = [a for a in run if isinstance(a, np.ndarray)]
            prepared = await anyio.to_thread.run_sync(_prepare_pixels, arrays, rt)
        pixels.extend(prepared.pixels)
        start = end
    return pixels


def check_model(rt: Runtime, name: str, version: str | None) -> ModelCard:
    """Before an inference request is read: the server serves (503 otherwise) and ``name`` is its model (404)."""
    rt.serving()
    return served_model(rt, name, version)


@dataclass
class Inference:
    """What the worker answered, with the outputs asked for: both transports encode this."""

    specs: list[oip.OutputSpec]
    results: list[ImageResult]
    top_k: int


async def infer_images(rt: Runtime, parsed: oip.Images, deadline: float, request: Request | None) -> Inference:
    """Options and outputs from the request, decode, the worker call. ``request``: the HTTP request
    whose disconnect cancels the work (None for gRPC, whose cancelled call cancels this task)."""
    params = parsed.request.parameters or {}
    options = resolve_options(None, None, {k: params[k] for k in ("top_k", "keep_rate", "min_keep_rate")
                                           if k in params}, rt.settings, card=rt.card)
    specs = oip.requested_outputs(parsed.request, rt.settings.max_top_k)
    pixels = await _prepare(parsed.items, rt, deadline)
    results = await run_model(request, rt.model, pixels, options.keep_rate, deadline, options.min_keep_rate)
    return Inference(specs, results, options.top_k)


@router.post("/models/{name}/infer", dependencies=INFERENCE, responses=_NOT_FOUND,
             summary="Inference (binary tensor data extension)")
@router.post("/models/{name}/versions/{version}/infer", dependencies=INFERENCE, responses=_NOT_FOUND,
             include_in_schema=False)
async def infer(request: Request, rt: RuntimeDep, deadline: DeadlineDep, name: str,
                version: str | None = None) -> Response:
    """Inputs ``images`` (BYTES [N], encoded) and/or ``pixels`` (UINT8 [N, H, W, 3]); parameters
    ``top_k``, ``keep_rate`` and ``min_keep_rate``; answer parameters ``keep_rate`` (the lowest served),
    ``scaled``, ``requested_keep_rate``; outputs ``probabilities``, ``labels``, ``lifespans``, ``budget``."""
    card = check_model(rt, name, version)
    oip.check_body_type(request.headers.get("content-type"))
    limits = rt.limits()
    _check_content_length(request, limits.max_body_bytes)
    body = await _read_body(request, limits.max_body_bytes, "request body (PATCHLIFE_MAX_REQUEST_BYTES)")
    header = request.headers.get(oip.HEADER_LENGTH)
    parsed = await anyio.to_thread.run_sync(oip.parse_request, body, header, limits, rt.settings.max_image_pixels)
    done = await infer_images(rt, parsed, deadline, request)
    t0 = time.perf_counter()
    encode = functools.partial(oip.encode_response, card.name, parsed.request, done.specs, done.results,
                               list(card.class_names), done.top_k)
    # a large answer (many images and outputs) takes a while to encode: off the event loop, which keeps
    # answering other requests (/healthz) meanwhile; a small one is cheaper encoded here than a thread hop
    large = len(done.results) * max(1, len(done.specs)) > INLINE_ENCODE_UNITS
    content, head_length = await anyio.to_thread.run_sync(encode) if large else encode()
    rt.metrics.encode_seconds.observe(time.perf_counter() - t0)
    if head_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={oip.HEADER_LENGTH: str(head_length)})
