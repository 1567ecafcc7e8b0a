"""The request pipeline both transports run (REST routes and gRPC): options, decoding, the model call,
and what an answer says of accuracy scaling.

    card = fe.serving() -> options = resolve_options(...) -> prepared = await prepare_images(raws, fe)
      -> results = await run_model(receive, fe.model, prepared.pixels, ...) -> encode

Where a step runs: on the event loop when it costs less than about 100 us, in the thread pool
otherwise. A round trip through the pool costs more than that bound's half on its own (``python -m
bench.loop_costs`` prints both), so an image's header is read here, from its first
``INLINE_HEADER_BYTES`` bytes, which also bounds what a crafted header can cost the loop; decoding
and preprocessing (0.8 ms for a 64-px PNG, more for anything larger) stay in the pool.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import torch
from PIL import Image

from .. import protocol
from ..decode import HeaderInfo, check_media_type, decode_stored, device_decodable, header_info, upright_rgb
from ..preprocess import Preprocessor, resize_side
from ..protocol import EncodedImage, ImageResult, ModelCard, ModelClient
from ..settings import Settings
from .decode_gate import DecodeBusy, decode_cost
from .errors import (
    ApiError,
    ClientDisconnected,
    DeadlineExceeded,
    DecodeOverloaded,
    InvalidRequest,
    RequestTooManyPixels,
    ShuttingDown,
    refusal,
)
from .explain import model_view
from .numbers import parse_float, parse_int
from .offload import in_thread
from .schemas import Budget, Classification, Label, Lifespans, Timings
from .state import FrontendState
from .upload import RawImage

DEADLINE_HEADER = "X-Request-Deadline-Ms"
# An image's header is read on the event loop from its first this many bytes (where the header of a
# photo without a large EXIF block or ICC profile ends: 13-40 us, against 55-90 us for a thread round trip),
# else in the thread pool from the whole file. Bounded so that a crafted header (a JPEG of empty
# markers costs Pillow 0.3 us a byte) holds the loop for at most about 0.6 ms.
INLINE_HEADER_BYTES = 2048
# Formats whose header reader fails on a cut file, never reads less: a TIFF's reader skips a tag whose
# values lie past the cut (with a warning) and would give another mode; GIF, BMP, WebP are rare uploads.
INLINE_HEADER_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG
Receive = Callable[[], Awaitable[Mapping[str, Any]]]  # an ASGI ``receive``


@dataclass(frozen=True)
class Options:
    top_k: int
    keep_rate: float | None
    min_keep_rate: float | None = None  # accuracy scaling's floor for this request (None: the server's)


def default_keep_rate(card: ModelCard | None, settings: Settings) -> float | None:
    """The keep rate a request without one runs at: the served schedule's (the card), else the setting."""
    rate = (card.info.get("schedule") or {}).get("keep_rate") if card is not None else None
    return float(rate) if isinstance(rate, int | float) else settings.keep_rate


def _pick(name: str, query: Any, body: dict[str, Any], parse: Callable[[Any], Any]) -> Any:
    """The option from the query or the body, parsed; 422 if both are given and differ."""
    from_query = None if query is None else parse(query)
    from_body = parse(body[name]) if body.get(name) is not None else None
    if from_query is not None and from_body is not None and from_query != from_body:
        raise InvalidRequest(f"{name} given twice with different values (query and body)")
    return from_query if from_query is not None else from_body


def resolve_options(top_k: Any, keep_rate: Any, body: dict[str, Any], settings: Settings,
                    min_keep_rate: Any = None, card: ModelCard | None = None) -> Options:
    """Merge query and body options, each read by the strict parser (422 naming the field and its range).
    ``min_keep_rate`` may not exceed the request's keep rate (its own, else the model's default, read
    from ``card``)."""
    k = _pick("top_k", top_k, body, lambda v: parse_int(v, "top_k", 1, settings.max_top_k))
    r = _pick("keep_rate", keep_rate, body, lambda v: parse_float(v, "keep_rate", 0.0, 1.0, low_open=True))
    floor = _pick("min_keep_rate", min_keep_rate, body,
                  lambda v: parse_float(v, "min_keep_rate", 0.0, 1.0, low_open=True))
    ceiling = r if r is not None else default_keep_rate(card, settings)
    if floor is not None and ceiling is not None and floor > ceiling:
        which = "keep_rate" if r is not None else "the model's default keep rate"
        raise InvalidRequest(f"min_keep_rate {floor:g} is above {which} {ceiling:g}: it must be <= it")
    return Options(min(5, settings.max_top_k) if k is None else k, r, floor)


# -- decoding ------------------------------------------------------------------------------------
EXPLAIN_VIEW_SIDE = 896  # the model's view kept for /explain is downsized to this (the PNG draws ~448)


@dataclass
class Prepared:
    pixels: list[torch.Tensor | EncodedImage]  # [3, H, W] each, preprocessed; or a JPEG the model process decodes
    decode_ms: list[float]
    views: list[Image.Image]            # /explain only: the model's view, downsized (the decode is dropped)


def decode_one(raw: RawImage, pre: Preprocessor, max_pixels: int,
               keep_view: bool) -> tuple[torch.Tensor, Image.Image | None]:
    """Decode, preprocess in one resize (service/preprocess.py) and drop the full-resolution image;
    keep a small model view if asked. Thread pool only: 0.8 ms and up."""
    decoded = decode_stored(raw.data, max_pixels, min_side=resize_side(pre.config), source=raw.source)
    pixels = pre.model_input(decoded, raw.source)
    if not keep_view:
        return pixels, None
    view = model_view(upright_rgb(decoded, raw.source), pre.config["input_size"], pre.config.get("crop_pct"))
    view.thumbnail((EXPLAIN_VIEW_SIDE, EXPLAIN_VIEW_SIDE), Image.Resampling.BILINEAR)
    return pixels, view


def inline_header(raw: RawImage, max_image_pixels: int) -> HeaderInfo | None:
    """A JPEG's or PNG's header read from the image's first ``INLINE_HEADER_BYTES`` (cheap enough for the
    event loop), or None for another format, or when it is not all there or is wrong: the whole file's
    read then decides, and says what is wrong in the same words as ever."""
    if not raw.data.startswith(INLINE_HEADER_MAGIC):
        return None
    try:
        return header_info(raw.data[:INLINE_HEADER_BYTES], max_image_pixels, source=raw.source)
    except ApiError:
        return None


def _timed_header(raw: RawImage, max_image_pixels: int) -> tuple[HeaderInfo, float]:
    t0 = time.perf_counter()
    return header_info(raw.data, max_image_pixels, source=raw.source), time.perf_counter() - t0


def _remaining_headers(raws: list[RawImage], found: list[tuple[HeaderInfo, float] | None],
                       max_image_pixels: int) -> list[tuple[HeaderInfo, float]]:
    """Thread pool: the whole-file header reads of those the loop could not read."""
    return [f if f is not None else _timed_header(raw, max_image_pixels) for raw, f in zip(raws, found, strict=True)]


async def read_headers(raws: list[RawImage], max_image_pixels: int,
                       max_request_pixels: int) -> list[tuple[HeaderInfo, float]]:
    """Every image's header (no pixel decoded) and the seconds it took to read; 413 past the request's
    pixel budget. One thread round trip at most, and none when every header is near its file's start."""
    found: list[tuple[HeaderInfo, float] | None] = []
    for raw in raws:
        t0 = time.perf_counter()
        info = inline_header(raw, max_image_pixels)
        found.append(None if info is None else (info, time.perf_counter() - t0))
    headers = [f for f in found if f is not None]
    if len(headers) < len(raws):
        headers = await anyio.to_thread.run_sync(_remaining_headers, raws, found, max_image_pixels)
    pixels = sum(h.pixels for h, _ in headers)
    if pixels > max_request_pixels:
        raise RequestTooManyPixels(f"the request's images have {pixels} pixels together, over the limit of "
                                   f"{max_request_pixels} (PATCHLIFE_MAX_REQUEST_PIXELS); send fewer or smaller "
                                   "images per request")
    return headers


def _check_deadline(fe: FrontendState, now: float, deadline: float) -> None:
    if now >= deadline:
        fe.metrics.reject("deadline")
        raise DeadlineExceeded(f"the deadline passed while decoding the images ({DEADLINE_HEADER} or "
                               "PATCHLIFE_DEADLINE_MS)")


async def _decode_held(fe: FrontendState, raw: RawImage, header: HeaderInfo, keep_view: bool,
                       deadline: float | None) -> tuple[torch.Tensor, Image.Image | None, float]:
    """One image decoded in the pool while it holds its decode cost in the shared decode budget."""
    s, clock = fe.settings, fe.clock()
    cost = decode_cost(header.pixels, header.mode, header.format, header.transparent)
    wait_s = s.decode_wait_ms / 1000.0
    if fe.grace_over:
        fe.metrics.reject("shutdown")
        raise ShuttingDown("server is shutting down; retry on another instance")
    if deadline is not None:
        _check_deadline(fe, clock(), deadline)
        wait_s = min(wait_s, deadline - clock())
    try:
        async with fe.decode_gate.hold(cost, wait_s):
            t0 = time.perf_counter()
            pixels, view = await in_thread(decode_one, raw, fe.preprocessor(), s.max_image_pixels, keep_view)
            return pixels, view, time.perf_counter() - t0
    except DecodeBusy:
        if deadline is not None:
            _check_deadline(fe, clock() + 0.001, deadline)  # the wait was cut short by the deadline: 504
        retry = str(max(1, math.ceil(s.decode_wait_ms / 1000.0)))
        raise DecodeOverloaded(f"{raw.source}: too many images being decoded (PATCHLIFE_MAX_DECODE_PIXELS); "
                               "retry later", headers={"Retry-After": retry}) from None


async def prepare_images(raws: list[RawImage], fe: FrontendState, keep_view: bool = False,
                         deadline: float | None = None) -> Prepared:
    """Decode + preprocess each image in a worker thread, one at a time per request, each holding its
    decode cost (service/frontend/decode_gate.py, from its header) in the shared decode budget while it
    decodes. A request whose ``deadline`` (worker clock) passes stops decoding: 504. Where the model
    process decodes JPEGs on its device (``card.decodes_jpeg``), a JPEG it can decode is passed on
    undecoded once its header passed the limits (its decode time is the header's); /explain
    (``keep_view``) decodes here, as it draws the model's view."""
    s = fe.settings
    pass_on = fe.loaded().decodes_jpeg and not keep_view
    fe.preprocessor()  # 503 while loading, before any work
    for raw in raws:
        check_media_type(raw.content_type, raw.source)
    headers = await read_headers(raws, s.max_image_pixels, s.max_request_pixels)
    out = Prepared([], [], [])
    for raw, (header, header_s) in zip(raws, headers, strict=True):
        if pass_on and device_decodable(header.format, header.mode):
            fe.metrics.decode_seconds.observe(header_s)
            out.pixels.append(EncodedImage(bytes(raw.data), raw.source))
            out.decode_ms.append(header_s * 1000.0)
            continue
        pixels, view, seconds = await _decode_held(fe, raw, header, keep_view, deadline)
        fe.metrics.decode_seconds.observe(seconds)
        out.pixels.append(pixels)
        out.decode_ms.append(seconds * 1000.0)
        if view is not None:
            out.views.append(view)
    return out


# -- the model call ------------------------------------------------------------------------------
async def _disconnected(receive: Receive) -> None:
    """Return when the client goes away. The body is already read, so the next ASGI message the
    server can send us is ``http.disconnect``: awaiting it costs nothing and reacts at once."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_model(receive: Receive | None, model: ModelClient, pixels: list[torch.Tensor | EncodedImage],
                    keep_rate: float | None, deadline: float, min_keep_rate: float | None = None) -> list[ImageResult]:
    """``model.submit`` raced against the client's disconnect (``receive``: the HTTP request's ASGI
    receive); worker errors -> API errors. Without ``receive`` (gRPC) nothing is raced: a cancelled
    call cancels the awaiting task itself."""
    submit = asyncio.ensure_future(model.submit(pixels, keep_rate, deadline)) if min_keep_rate is None else \
        asyncio.ensure_future(model.submit(pixels, keep_rate, deadline, min_keep_rate))
    gone = asyncio.ensure_future(_disconnected(receive)) if receive is not None else \
        asyncio.get_running_loop().create_future()
    try:
        await asyncio.wait({submit, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not submit.done():  # client gone (or we were cancelled): the worker drops the queued work
            submit.cancel()
            await asyncio.gather(submit, return_exceptions=True)
    if submit.cancelled():
        raise ClientDisconnected("client disconnected before the answer was ready")
    try:
        return submit.result()
    except protocol.WorkerError as exc:  # one table by kind (errors.REFUSALS): 503, 504, 400 ...
        raise refusal(exc, f"({DEADLINE_HEADER} or PATCHLIFE_DEADLINE_MS)") from None


# -- encoding ------------------------------------------------------------------------------------
def requested_rate(result: ImageResult) -> float:
    """The keep rate the image asked for (its served rate unless accuracy scaling lowered it)."""
    return result.keep_rate if result.requested_keep_rate is None else result.requested_keep_rate


def scaling_headers(results: Sequence[ImageResult]) -> dict[str, str]:
    """What accuracy scaling did to a request, as response headers (the /explain PNG has no JSON body):
    the lowest keep rate served, whether any image was scaled, and the rate asked for."""
    served = min(r.keep_rate for r in results)
    return {"X-Patchlife-Keep-Rate": f"{served:g}",
            "X-Patchlife-Scaled": "true" if any(r.scaled for r in results) else "false",
            "X-Patchlife-Requested-Keep-Rate": f"{max(requested_rate(r) for r in results):g}"}


def classification(result: ImageResult, decode_ms: float, card: ModelCard, top_k: int) -> Classification:
    probs = result.probs
    values, indices = torch.topk(probs, k=min(top_k, probs.numel()))
    names = card.class_names
    labels = [Label(label=names[i] if i < len(names) else str(i), index=i, probability=round(p, 6))
              for p, i in zip(values.tolist(), indices.tolist(), strict=True)]
    rows, cols = result.lives.shape
    lives = result.lives.double().mul(1e4).round().div(1e4).tolist()
    dense = card.dense_gflops
    budget = Budget(patch_counts=list(result.budget), counts_run=list(result.counts), gflops=result.gflops,
                    dense_gflops=dense, fraction_of_dense=result.gflops / dense if dense > 0 else 1.0,
                    keep_rate=result.keep_rate, scaled=result.scaled,
                    requested_keep_rate=requested_rate(result))
    timings = Timings(decode=round(decode_ms, 3), queue=round(result.queue_ms, 3),
                      compute=round(result.compute_ms, 3))
    return Classification(labels=labels, lifespans=Lifespans(rows=rows, cols=cols, values=lives),
                          budget=budget, timings_ms=timings)
