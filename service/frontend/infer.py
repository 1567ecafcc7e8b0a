"""Open Inference Protocol v2 inference, as both transports run it (REST ``routes/v2.py``, gRPC
``grpc/server.py``): the model check, the body's parse, preparing encoded images and raw pixels,
and the model call. The tensors and their parsing are ``service/frontend/oip.py``'s.

Where a step runs (the rule of ``service/frontend/pipeline.py``): a small binary request is parsed on
the event loop (14-20 us for one 224-px UINT8 image, against 55-90 us for a thread round trip); a larger body,
or a JSON header large enough to hold its data as JSON numbers, is parsed in the thread pool, and so
is every preprocessing of raw pixels (about 1 ms an image).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
import numpy as np
import torch
from PIL import Image

from ..decode import limit_aspect
from ..protocol import EncodedImage, ImageResult, ModelCard
from . import oip
from .errors import RequestTooManyPixels
from .offload import in_thread
from .pipeline import Prepared, Receive, prepare_images, resolve_options, run_model
from .state import FrontendState
from .upload import RawImage, UploadLimits

INLINE_PARSE_HEAD_BYTES = 4096      # a JSON header up to this is parsed on the loop (pydantic, in C) ...
INLINE_PARSE_BODY_BYTES = 256 * 1024  # ... when the whole body (copied twice by the parse) is this or less


def served_model(fe: FrontendState, name: str, version: str | None = None) -> ModelCard:
    """The model's card, if ``name`` (and ``version``) is the served model: 404 otherwise, 503 while loading."""
    card = fe.loaded()
    if name != card.name or version not in (None, oip.VERSION):
        served = f"{card.name!r} version {oip.VERSION!r}"
        raise oip.ModelNotFound(f"unknown model {name!r}" + (f" version {version!r}" if version else "")
                                + f"; this server serves {served}")
    return card


def check_model(fe: FrontendState, name: str, version: str | None) -> ModelCard:
    """Before an inference request is read: the server serves (503 otherwise) and ``name`` is its model (404)."""
    fe.serving()
    return served_model(fe, name, version)


def parsed_inline(body_bytes: int, head_bytes: int) -> bool:
    """Whether a v2 body this large, with a JSON header this large, is parsed on the event loop."""
    return body_bytes <= INLINE_PARSE_BODY_BYTES and head_bytes <= INLINE_PARSE_HEAD_BYTES


async def parse_body(body: bytes, header_length: str | None, limits: UploadLimits, max_pixels: int) -> oip.Images:
    """``oip.parse_request``, on the loop or in the pool by :func:`parsed_inline` (a header length that
    is not a number is parsed in the pool, which says what is wrong with it)."""
    try:
        head = len(body) if header_length is None else int(header_length)
    except ValueError:
        head = len(body)
    if parsed_inline(len(body), head):
        return oip.parse_request(body, header_length, limits, max_pixels)
    return await anyio.to_thread.run_sync(oip.parse_request, body, header_length, limits, max_pixels)


def pixels_image(arr: np.ndarray) -> Image.Image:
    """A raw ``[H, W, 3]`` uint8 array as the upright image a decode would give (aspect rule included)."""
    return limit_aspect(Image.fromarray(np.ascontiguousarray(arr), "RGB"))


def prepare_pixels(pixels: list[np.ndarray], fe: FrontendState) -> Prepared:
    """Thread pool: raw ``[H, W, 3]`` uint8 images -> engine input, like decoded files."""
    total = sum(int(a.shape[0]) * int(a.shape[1]) for a in pixels)
    if total > fe.settings.max_request_pixels:
        raise RequestTooManyPixels(f"the request's images have {total} pixels together, over the limit of "
                                   f"{fe.settings.max_request_pixels} (PATCHLIFE_MAX_REQUEST_PIXELS)")
    out = Prepared([], [], [])
    for arr in pixels:
        t0 = time.perf_counter()
        out.pixels.append(fe.preprocessor().upright(pixels_image(arr)))
        seconds = time.perf_counter() - t0
        fe.metrics.decode_seconds.observe(seconds)
        out.decode_ms.append(seconds * 1000.0)
    return out


async def _prepare(items: list[RawImage | np.ndarray], fe: FrontendState,
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
            prepared = await prepare_images([r for r in run if isinstance(r, RawImage)], fe, deadline=deadline)
        else:
            arrays = [a for a in run if isinstance(a, np.ndarray)]
            prepared = await in_thread(prepare_pixels, arrays, fe)
        pixels.extend(prepared.pixels)
        start = end
    return pixels


@dataclass
class Inference:
    """What the worker answered, with the outputs asked for: both transports encode this."""

    specs: list[oip.OutputSpec]
    results: list[ImageResult]
    top_k: int


async def infer_images(fe: FrontendState, parsed: oip.Images, deadline: float, receive: Receive | None) -> Inference:
    """Options and outputs from the request, decode, the worker call. ``receive``: the HTTP request's
    ASGI receive, whose disconnect cancels the work (None for gRPC, whose cancelled call cancels this task)."""
    params = parsed.request.parameters or {}
    options = resolve_options(None, None, {k: params[k] for k in ("top_k", "keep_rate", "min_keep_rate")
                                           if k in params}, fe.settings, card=fe.card)
    specs = oip.requested_outputs(parsed.request, fe.settings.max_top_k)
    pixels = await _prepare(parsed.items, fe, deadline)
    results = await run_model(receive, fe.model, pixels, options.keep_rate, deadline, options.min_keep_rate)
    return Inference(specs, results, options.top_k)
