"""What /classify and /explain share: the runtime, request options, decoding, and the worker call.

Routes stay thin: ``serving()`` -> ``read_payload`` -> ``resolve_options`` -> ``prepare_images``
-> ``run_model`` -> encode.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
import torch
from fastapi import Depends, Header, Query, Request
from PIL import Image

from ... import protocol
from ...decode import HeaderInfo, check_media_type, decode_stored, device_decodable, header_info, upright_rgb
from ...metrics import Metrics
from ...preprocess import Preprocessor, resize_side
from ...protocol import EncodedImage, ImageResult, Lifecycle, ModelCard, ModelClient, ModelStatus
from ...settings import Settings
from ..access import Keys
from ..bodyread import DEADLINE_KEY
from ..context import ARRIVAL_KEY, InFlight
from ..decode_gate import DecodeBusy, DecodeGate, decode_capacity, decode_cost
from ..errors import (
    ClientDisconnected,
    DeadlineExceeded,
    DecodeOverloaded,
    InvalidRequest,
    NotReady,
    RequestTooManyPixels,
    ShuttingDown,
    refusal,
)
from ..explain import model_view
from ..numbers import parse_float, parse_int
from ..schemas import Budget, Classification, Label, Lifespans, Timings
from ..upload import RawImage, UploadLimits

DEADLINE_HEADER = "X-Request-Deadline-Ms"


@dataclass
class Runtime:
    """Everything the routes need, held in ``app.state.runtime``: the model behind its typed handle
    (:class:`~service.protocol.ModelClient`, in this process or another) and this front end's own
    lifecycle (one state; see :class:`~service.protocol.Lifecycle`). The card is set by the lifespan."""

    settings: Settings
    metrics: Metrics
    model: ModelClient
    card: ModelCard | None = None
    state: Lifecycle = Lifecycle.LOADING
    startup_error: str | None = None
    shared_ports: bool = False  # one of several API processes on the same ports
    in_flight: InFlight = field(default_factory=InFlight)
    decode_gate: DecodeGate = field(init=False)
    keys: Keys = field(init=False)  # the access keys' digests (service/frontend/access.py)
    _preprocessor: Preprocessor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.decode_gate = DecodeGate(decode_capacity(self.settings.max_decode_pixels))
        self.keys = Keys.from_settings(self.settings)

    @property
    def draining(self) -> bool:
        """New requests are refused (503, Connection: close)."""
        return Lifecycle.DRAINING <= self.state <= Lifecycle.STOPPED

    @property
    def grace_over(self) -> bool:
        """The drain's grace ended: requests still decoding or uploading stop (503)."""
        return Lifecycle.GRACE_OVER <= self.state <= Lifecycle.STOPPED

    def advance(self, state: Lifecycle) -> None:
        """Move forward only: a late event (a warm-up ending during the drain) never undoes a later state."""
        if state > self.state:
            self.state = state

    def preprocessor(self) -> Preprocessor:
        if self._preprocessor is None:
            self._preprocessor = Preprocessor(self.loaded().preprocess)
        return self._preprocessor

    def loaded(self) -> ModelCard:
        """The card, or 503 while the model is loading."""
        if self.card is None:
            raise NotReady("model is loading")
        return self.card

    def not_ready_reason(self) -> str | None:
        """Why /readyz says 503 (None when ready): loading, failed, shutting down, or a model that cannot
        serve (its thread died, batches keep failing, a batch hangs, its process is gone)."""
        if self.state >= Lifecycle.STOPPING and self.state != Lifecycle.FAILED:
            return "server is shutting down"
        if self.state != Lifecycle.READY:
            return f"model failed to start: {self.startup_error}" if self.startup_error else "model is loading"
        return self.model.status().problem

    def check_ready(self) -> ModelStatus:
        """Raise what /readyz answers (NotReady, ShuttingDown) unless the model can serve."""
        if self.state >= Lifecycle.STOPPING and self.state != Lifecycle.FAILED:
            raise ShuttingDown("server is shutting down; retry on another instance")
        if self.state != Lifecycle.READY:
            msg = f"model failed to start: {self.startup_error}" if self.startup_error else \
                "model is loading or warming up; retry shortly"
            raise NotReady(msg)
        status = self.model.status()
        if status.problem is not None:
            raise NotReady(f"model unavailable: {status.problem}", headers={"Retry-After": "5"})
        return status

    def serving(self) -> ModelCard:
        """For inference routes: requests are served until the drain, even while /readyz says 503
        (stopping, or an unhealthy model whose batches answer 503 themselves)."""
        if self.draining:  # the model never sees this request: count it here
            self.metrics.reject("shutdown")
            raise ShuttingDown("server is shutting down; retry on another instance")
        if self.card is None or self.state not in (Lifecycle.READY, Lifecycle.STOPPING):
            raise NotReady("model is loading or warming up; retry shortly" if self.startup_error is None else
                           f"model failed to start: {self.startup_error}")
        return self.card

    def clock(self) -> Callable[[], float]:
        return self.model.clock

    def limits(self, max_images: int | None = None) -> UploadLimits:
        s = self.settings
        return UploadLimits(s.max_upload_bytes, s.max_request_bytes, max_images or s.max_images_per_request)


async def get_runtime(request: Request) -> Runtime:
    """``async``: plain ``def`` dependencies run in the thread pool, queued behind image decodes."""
    return request.app.state.runtime  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


MAX_DEADLINE_MS = 3_600_000


def documented_as(**schema: Any) -> Callable[[dict[str, Any]], None]:
    """``json_schema_extra`` that replaces a ``str`` parameter's schema by what it accepts: the value
    is read as text by service/frontend/numbers.py, the clients (and Schemathesis) see the number it must be."""

    def replace(out: dict[str, Any]) -> None:
        title = out.get("title")
        out.clear()
        out.update(schema, **({"title": title} if title else {}))

    return replace


async def request_deadline(request: Request, rt: RuntimeDep, x_request_deadline_ms: Annotated[str | None, Header(
        description="Per-request deadline in ms (default PATCHLIFE_DEADLINE_MS), 0 < ms <= 3600000; it covers "
                    "reading the body too. A request not started by then is answered 504.",
        json_schema_extra=documented_as(type="number", exclusiveMinimum=0, maximum=MAX_DEADLINE_MS))] = None,
        ) -> float:
    """The request's deadline on the worker clock, counted from its arrival (stamped by
    ``RequestContextMiddleware`` before anything else ran). Also stored in the scope on the monotonic
    clock, where the body reader (``service/frontend/bodyread.py``) stops waiting for the client."""
    ms = rt.settings.deadline_ms if x_request_deadline_ms is None else \
        parse_float(x_request_deadline_ms, DEADLINE_HEADER, 0.0, MAX_DEADLINE_MS, low_open=True)
    arrival = request.scope.get(ARRIVAL_KEY)
    now = time.monotonic()
    waited = max(0.0, now - arrival) if arrival is not None else 0.0
    request.scope[DEADLINE_KEY] = now - waited + ms / 1000.0
    return rt.clock()() - waited + ms / 1000.0


DeadlineDep = Annotated[float, Depends(request_deadline)]
# Typed str so that one parser (service/frontend/numbers.py) reads query, form, JSON and header numbers alike;
# the schema still says what is accepted.
TopKQuery = Annotated[str | None, Query(description="Labels per image, 1..PATCHLIFE_MAX_TOP_K (default 5); "
                                                    "also accepted as a form/JSON field.",
                                        json_schema_extra=documented_as(type="integer", minimum=1))]
KeepRateQuery = Annotated[str | None, Query(description="Keep rate for this request, 0 < r <= 1 "
                                                        "(default: the model's); also a form/JSON field.",
                                            json_schema_extra=documented_as(type="number", exclusiveMinimum=0,
                                                                            maximum=1))]
MinKeepRateQuery = Annotated[str | None, Query(description="Lowest keep rate accuracy scaling may run this request "
                                                           "at under load, 0 < r <= keep_rate (default: the "
                                                           "server's floor; none below an explicit keep_rate); "
                                                           "also a form/JSON field.",
                                               json_schema_extra=documented_as(type="number", exclusiveMinimum=0,
                                                                               maximum=1))]


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


def _decode_one(raw: RawImage, pre: Preprocessor, max_pixels: int,
                keep_view: bool) -> tuple[torch.Tensor, Image.Image | None]:
    """Decode, preprocess in one resize (service/preprocess.py) and drop the full-resolution image;
    keep a small model view if asked."""
    decoded = decode_stored(raw.data, max_pixels, min_side=resize_side(pre.config), source=raw.source)
    pixels = pre.model_input(decoded, raw.source)
    if not keep_view:
        return pixels, None
    view = model_view(upright_rgb(decoded, raw.source), pre.config["input_size"], pre.config.get("crop_pct"))
    view.thumbnail((EXPLAIN_VIEW_SIDE, EXPLAIN_VIEW_SIDE), Image.Resampling.BILINEAR)
    return pixels, view


def _read_headers(raws: list[RawImage], max_image_pixels: int,
                  max_request_pixels: int) -> list[tuple[HeaderInfo, float]]:
    """Every image's header (no pixel decoded) and the seconds it took to read; 413 past the request's
    pixel budget."""
    headers = []
    for raw in raws:
        t0 = time.perf_counter()
        headers.append((header_info(raw.data, max_image_pixels, source=raw.source), time.perf_counter() - t0))
    pixels = sum(h.pixels for h, _ in headers)
    if pixels > max_request_pixels:
        raise RequestTooManyPixels(f"the request's images have {pixels} pixels together, over the limit of "
                                   f"{max_request_pixels} (PATCHLIFE_MAX_REQUEST_PIXELS); send fewer or smaller "
                                   "images per request")
    return headers


def _check_deadline(rt: Runtime, now: float, deadline: float) -> None:
    if now >= deadline:
        rt.metrics.reject("deadline")
        raise DeadlineExceeded(f"the deadline passed while decoding the images ({DEADLINE_HEADER} or "
                               "PATCHLIFE_DEADLINE_MS)")


async def prepare_images(raws: list[RawImage], rt: Runtime, keep_view: bool = False,
                         deadline: float | None = None) -> Prepared:
    """Decode + preprocess each image in a worker thread (the event loop never decodes), one at a time
    per request, each holding its decode cost (service/frontend/decode_gate.py, from its header) in
    the shared decode budget while it decodes. A request whose ``deadline`` (worker clock) passes stops
    decoding: 504. Where the model process decodes JPEGs on its device (``card.decodes_jpeg``), a
    JPEG it can decode is passed on undecoded once its header passed the limits (its decode time is
    the header's); /explain (``keep_view``) decodes here, as it draws the model's view."""
    s = rt.settings
    clock = rt.clock()
    pre = rt.preprocessor()
    pass_on = rt.loaded().decodes_jpeg and not keep_view
    for raw in raws:
        check_media_type(raw.content_type, raw.source)
    headers = await anyio.to_thread.run_sync(_read_headers, raws, s.max_image_pixels, s.max_request_pixels)
    out = Prepared([], [], [])
    for raw, (header, header_s) in zip(raws, headers, strict=True):
        if pass_on and device_decodable(header.format, header.mode):
            rt.metrics.decode_seconds.observe(header_s)
            out.pixels.append(EncodedImage(bytes(raw.data), raw.source))
            out.decode_ms.append(header_s * 1000.0)
            continue
        cost = decode_cost(header.pixels, header.mode, header.format, header.transparent)
        wait_s = s.decode_wait_ms / 1000.0
        if rt.grace_over:
            rt.metrics.reject("shutdown")
            raise ShuttingDown("server is shutting down; retry on another instance")
        if deadline is not None:
            _check_deadline(rt, clock(), deadline)
            wait_s = min(wait_s, deadline - clock())
        try:
            async with rt.decode_gate.hold(cost, wait_s):
                t0 = time.perf_counter()
                pixels, view = await anyio.to_thread.run_sync(_decode_one, raw, pre, s.max_image_pixels,
                                                              keep_view)
                seconds = time.perf_counter() - t0
        except DecodeBusy:
            if deadline is not None:
                _check_deadline(rt, clock() + 0.001, deadline)  # the wait was cut short by the deadline: 504
            retry = str(max(1, math.ceil(s.decode_wait_ms / 1000.0)))
            raise DecodeOverloaded(f"{raw.source}: too many images being decoded (PATCHLIFE_MAX_DECODE_PIXELS); "
                                   "retry later", headers={"Retry-After": retry}) from None
        rt.metrics.decode_seconds.observe(seconds)
        out.pixels.append(pixels)
        out.decode_ms.append(seconds * 1000.0)
        if view is not None:
            out.views.append(view)
    return out


# -- the worker call -----------------------------------------------------------------------------
async def _disconnected(request: Request) -> None:
    """Return when the client goes away. The body is already read, so the next ASGI message the
    server can send us is ``http.disconnect``: awaiting it costs nothing and reacts at once."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_model(request: Request | None, model: ModelClient, pixels: list[torch.Tensor | EncodedImage],
                    keep_rate: float | None, deadline: float, min_keep_rate: float | None = None) -> list[ImageResult]:
    """``model.submit`` raced against the client's disconnect; worker errors -> API errors. Without an
    HTTP ``request`` (gRPC) nothing is raced: a cancelled call cancels the awaiting task itself."""
    submit = asyncio.ensure_future(model.submit(pixels, keep_rate, deadline)) if min_keep_rate is None else \
        asyncio.ensure_future(model.submit(pixels, keep_rate, deadline, min_keep_rate))
    gone = asyncio.ensure_future(_disconnected(request)) if request is not None else \
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
