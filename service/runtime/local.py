"""The model in this process: an :class:`Engine` and its batching :class:`Worker` behind the
front end's :class:`~service.protocol.ModelClient` interface.

The single-process service (``PATCHLIFE_API_PROCESSES=0``, tests, notebooks) hands this to the app
directly; the model process of the multi-process service serves it to the API processes through
``service/transport/host.py``. Either way this is where the engine is loaded, warmed up (CUDA
graphs, cost-model timings) and its worker started, and where the worker's metrics are fed; and,
when PATCHLIFE_DECODE puts decoding on the model's device, where the JPEGs the front end passed on
undecoded are decoded in batches (``service/runtime/gpu_decode.py``) before they join the worker's queue.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import anyio
import torch

from ..api_errors import ApiError
from ..metrics import Metrics
from ..protocol import (
    BadInput,
    EncodedImage,
    ImageResult,
    Lifecycle,
    ModelCard,
    ModelFailed,
    ModelStatus,
    WorkerStopping,
    advance,
)
from ..settings import Settings
from . import gpu_decode
from .admission import Request
from .engine import Engine
from .metrics_hooks import PrometheusHooks
from .scaling import scaling_for
from .worker import Worker

log = logging.getLogger("patchlife.model")


class LocalModel:
    """``open`` loads the checkpoint (unless given a loaded engine), ``start`` warms up and starts the
    worker. Metrics of the worker go to ``metrics`` (the process's registry, or the shared
    multiprocess directory)."""

    def __init__(self, settings: Settings, metrics: Metrics, engine: Engine | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine = engine
        self.worker: Worker | None = None
        self.decoder: gpu_decode.DecodeQueue | None = None  # set by open() when JPEGs are decoded here
        self._state = Lifecycle.LOADING
        self._error: str | None = None
        self._warmup_seconds: float | None = None

    async def open(self) -> ModelCard:
        if self.engine is None:
            self.engine = await anyio.to_thread.run_sync(Engine.from_settings, self.settings)
        self.metrics.watch_device(self.engine.device)
        card = self.engine.card()
        self.decoder = self._device_decoder(card)
        return dataclasses.replace(card, decodes_jpeg=self.decoder is not None)

    def _device_decoder(self, card: ModelCard) -> gpu_decode.DecodeQueue | None:
        """The batched decoder when PATCHLIFE_DECODE puts JPEGs on the model's device (ValueError for
        gpu without CUDA: a load error); None when the front end decodes."""
        assert self.engine is not None
        if gpu_decode.decode_on(self.settings.decode, self.engine.device) != "gpu":
            return None
        try:  # the metric arrives with job A's Metrics.decode_fallback; until then only the counter counts
            decoder = gpu_decode.BatchDecoder(card.preprocess, self.engine.device, self.settings.max_image_pixels,
                                              on_fallback=getattr(self.metrics, "decode_fallback", None),
                                              max_batch_pixels=self.settings.max_decode_pixels)
        except ValueError as exc:  # a preprocessing the device path does not reproduce: decode on the CPU
            log.warning("JPEGs are decoded on the CPU: %s", exc)
            return None
        log.info("JPEGs are decoded in batches on %s", self.engine.device)
        return gpu_decode.DecodeQueue(decoder)

    async def start(self) -> None:
        engine = self.engine
        assert engine is not None, "open() first"
        try:
            t0 = time.perf_counter()
            timings = await anyio.to_thread.run_sync(engine.warmup, self.settings.warmup_batches)
            seconds = time.perf_counter() - t0
            graphs = engine.runner.describe()
            self.metrics.set_graphs(engine.runner.describe)
            hooks = PrometheusHooks(self.metrics, engine.dense_gflops, engine.grid[0] * engine.grid[1])
            scaling = scaling_for(self.settings, engine.default_schedule.keep_rate, engine.checkpoint,
                                  engine.model.normalization)
            if scaling is not None:
                log.info("accuracy scaling on: objective %.0f ms, default floor %s", scaling.objective_s * 1e3,
                         "none (requests scale only with their own min_keep_rate)" if scaling.floor is None
                         else f"keep rate {scaling.floor:g}")
            worker = Worker(engine, self.settings, hooks, timings=timings, scaling=scaling)
            await worker.start()
            self.metrics.watch_health(lambda: worker.health() is None)
        except Exception as exc:  # the app stays alive (healthz) but never ready; the reason shows in /readyz
            log.exception("warm-up failed")
            self._state, self._error = advance(self._state, Lifecycle.FAILED), f"{type(exc).__name__}: {exc}"
            raise
        self.worker, self._warmup_seconds = worker, round(seconds, 3)
        self._state = advance(self._state, Lifecycle.READY)  # unless a stop came during the warm-up
        log.info("model %s ready on %s %s (warm-up %.2f s; %d CUDA graphs captured in %.2f s, %.1f MiB; cost model %s)",
                 engine.name, engine.device, engine.dtype, seconds, graphs["captured"], graphs["capture_seconds"],
                 graphs["capture_bytes"] / 2**20, worker.cost.describe())

    def status(self) -> ModelStatus:
        worker, engine = self.worker, self.engine
        if worker is None or engine is None:
            return ModelStatus(self._state, self._error)
        return ModelStatus(self._state, self._error, worker.health(), self._warmup_seconds,
                           {"graphs": engine.runner.describe(), "cost_model": worker.cost.describe(),
                            "accuracy_scaling": worker.describe_scaling()})

    def clock(self) -> float:
        return self.worker.clock() if self.worker is not None else time.monotonic()

    async def submit(self, pixels: Sequence[torch.Tensor | EncodedImage], keep_rate: float | None,
                     deadline: float, min_keep_rate: float | None = None) -> list[ImageResult]:
        worker = self.worker
        if worker is None:
            raise WorkerStopping("the model is not running")
        if not any(isinstance(p, EncodedImage) for p in pixels):
            return await worker.submit(pixels, keep_rate, deadline, min_keep_rate)  # type: ignore[arg-type]
        # Admission first: a request the queue would refuse (QueueFull, shutting down, past its deadline)
        # is refused before its JPEGs take device time to decode.
        ticket = worker.admit(len(pixels), keep_rate, deadline, min_keep_rate)
        worker.queues.capacity.publish()  # the worker reports admissions when it takes them: these decode first
        try:
            decoded = await self._decoded(pixels)
        except BaseException:  # a bad image, the decoder closing, the client gone: its room is given back
            worker.release(ticket)
            raise
        return await worker.run(ticket, decoded)

    def post(self, pixels: Sequence[torch.Tensor | EncodedImage], keep_rate: float | None, deadline: float,
             min_keep_rate: float | None = None) -> Request | None:
        """``submit`` without a task: refuse at once (the same :class:`WorkerError`) or queue the pixels and
        return the request, whose ``future`` gets the answer (:meth:`withdraw` it if nobody waits any more).
        None when ``submit`` must do it: no pixels, or JPEGs to decode first. The model host uses it so
        that a request costs a callback, not a task."""
        worker = self.worker
        if worker is None:
            raise WorkerStopping("the model is not running")
        if not pixels or any(isinstance(p, EncodedImage) for p in pixels):
            return None
        return worker.post(worker.admit(len(pixels), keep_rate, deadline, min_keep_rate), pixels)  # type: ignore[arg-type]

    def withdraw(self, request: Request) -> None:
        if self.worker is not None:
            self.worker.withdraw(request)

    async def _decoded(self, items: Sequence[torch.Tensor | EncodedImage]) -> list[torch.Tensor]:
        """The encoded images decoded (with those of other requests) and put back in their places; a
        file that does not decode fails this request alone (BadInput: 400, as on the CPU path)."""
        if self.decoder is None:  # the card said decodes_jpeg=False: a front end that sent them anyway is a bug
            raise ModelFailed("this model process does not decode images (PATCHLIFE_DECODE)")
        decoded = iter(await self.decoder.decode([p for p in items if isinstance(p, EncodedImage)]))
        out: list[torch.Tensor] = []
        for p in items:
            item = next(decoded) if isinstance(p, EncodedImage) else p
            if isinstance(item, ApiError):
                raise BadInput(item.message)
            out.append(item)
        return out

    def begin_drain(self) -> None:
        """SIGTERM: batches stop waiting to fill; requests already on their way are still accepted."""
        if self._state == Lifecycle.READY:  # a loading model has nothing to drain; start() makes it READY
            self._state = advance(self._state, Lifecycle.STOPPING)
        if self.worker is not None:
            self.worker.begin_drain()

    async def stop(self, grace_s: float | None = None) -> None:
        if self.worker is not None:
            await self.worker.stop(grace_s=grace_s)
        if self.decoder is not None:
            await anyio.to_thread.run_sync(self.decoder.close)
        self._state = advance(self._state, Lifecycle.STOPPED)
