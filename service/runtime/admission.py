"""The worker's queues: what is admitted, what waits for which phase, what is failed, what is delivered.

Each image waits twice: for the head (``head``, arrival order), then for the tail (``tail``, with its
bucket and budget known). A request is refused at once with :class:`QueueFull` when the queued images
or queued tail tokens would pass their capacity; an image not yet through the head is counted at its
keep rate's schedule counts. Failing a request drops all its queued images; an answer is delivered when
its request's last image is done. Every ``*_locked`` method runs under ``cond``, the one lock the
worker's thread and the event loop share (:mod:`service.runtime.worker` holds it for the loop's state too).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from operator import itemgetter

import torch

from service.protocol import DeadlinePassed, ImageResult, QueueFull
from service.runtime.batching import Batch, Counts, Phase, Scalable, Waiting
from service.runtime.handoff import HeadBatch
from service.runtime.scaling import at_cap
from service.runtime.seams import ModelEngine, WorkerHooks
from service.settings import Settings

KEEP_RATE_GRID = 0.01  # per-rate state (admission estimates) is keyed by the rate rounded to this


@dataclass(eq=False)
class Request:
    """One ``submit`` call: its images' results fill in, in input order, until it is finished."""

    future: asyncio.Future[list[ImageResult]]
    loop: asyncio.AbstractEventLoop
    deadline: float
    results: list[ImageResult | None]
    keys: list[int] = field(default_factory=list)
    finished: bool = False       # answered, failed or abandoned: nothing more to do for it
    objective_at: float | None = None  # accuracy scaling: answered in time when by then (worker clock)


@dataclass(eq=False)
class QueuedImage:
    request: Request
    index: int                   # position in the request
    keep_rate: float | None
    pixels: torch.Tensor | None  # [3, H, W] until the head
    tokens: int                  # tail tokens it holds in the queue (estimate before the head)
    wait: Waiting
    head: HeadBatch | None = None  # after the head: its batch's arrays, and its row there
    row: int = -1
    budget: Counts = ()
    queue_s: float = 0.0         # both phases so far
    phase_wait_s: float = 0.0    # the last phase only (for the per-phase histogram)
    compute_s: float = 0.0
    # accuracy scaling: the keep rates it may run at (highest, the requested one, first; () when it
    # cannot be scaled), after the head its (budget, bucket) at each, and the one its tail ran at
    rates: tuple[float, ...] = ()
    options: tuple[tuple[Counts, Counts], ...] = ()
    rung: int = 0
    scaled_waits: dict[int, Waiting] = field(default_factory=dict)  # its tail Waiting per rung, made once


class Queues:
    """The head and tail queues (insertion order = arrival order) and the tail tokens they hold."""

    def __init__(self, engine: ModelEngine, settings: Settings, hooks: WorkerHooks) -> None:
        self.engine = engine
        self.settings = settings
        self.hooks = hooks
        self.cond = threading.Condition()
        self.head: dict[int, QueuedImage] = {}
        self.tail: dict[int, QueuedImage] = {}
        self.tokens = 0                      # tail tokens queued
        self.estimates: dict[float | None, int] = {}  # keep rate (on KEEP_RATE_GRID) -> tail tokens
        self._ids = itertools.count()
        self._rate_tokens_per_s = 0.0        # smoothed tail throughput, for Retry-After
        self._rate_counts: dict[float | None, Counts] = {}  # schedule counts per keep rate (scaling)

    def images(self) -> list[QueuedImage]:
        return [*self.head.values(), *self.tail.values()]

    # -- admission ----------------------------------------------------------------------------
    def estimate(self, keep_rate: float | None) -> int:
        """Tail tokens of an image not yet through the head: its keep rate's schedule counts.

        Keyed by the rate rounded to ``KEEP_RATE_GRID``, so the cache stays small whatever rates
        clients send (an estimate only sizes admission)."""
        key = None if keep_rate is None else round(max(1, round(keep_rate / KEEP_RATE_GRID)) * KEEP_RATE_GRID, 6)
        if key not in self.estimates:
            self.estimates[key] = self.engine.tail_tokens(self.engine.schedule_counts(key))
        return self.estimates[key]

    def add_locked(self, request: Request, pixels: Sequence[torch.Tensor], keep_rate: float | None,
                   estimate: int, now: float, rates: tuple[float, ...] = ()) -> None:
        """Queue a request's images for the head, or raise QueueFull if they would pass capacity.
        ``rates``: the keep rates accuracy scaling may run them at (() for none)."""
        self._admit_locked(len(pixels), estimate * len(pixels))
        for i, px in enumerate(pixels):
            key = next(self._ids)
            request.keys.append(key)
            self.head[key] = QueuedImage(request, i, keep_rate, px, estimate, Waiting(key, now, now),
                                         rates=rates if len(rates) > 1 else ())
        self.tokens += estimate * len(pixels)
        self.depth_changed()

    def _admit_locked(self, images: int, tokens: int) -> None:
        s = self.settings
        queued = len(self.head) + len(self.tail)
        if queued + images <= s.queue_capacity_images and self.tokens + tokens <= s.queue_capacity_tokens:
            return
        self.hooks.on_reject("overloaded")
        rate = self._rate_tokens_per_s
        retry = self.tokens / rate if rate > 0 else 1.0
        raise QueueFull(min(max(retry, 0.1), 60.0),
                        f"queue full ({queued} images, {self.tokens} tokens queued); retry later")

    def observe_rate(self, tokens: int, seconds: float) -> None:
        """A tail batch ran ``tokens`` in ``seconds``: the throughput QueueFull's Retry-After divides by."""
        if seconds > 0:
            rate = tokens / seconds
            self._rate_tokens_per_s = rate if self._rate_tokens_per_s == 0 else (
                0.8 * self._rate_tokens_per_s + 0.2 * rate)

    # -- moves between the queues --------------------------------------------------------------
    def depth_changed(self) -> None:
        self.hooks.on_queue_depth(len(self.head) + len(self.tail), self.tokens)

    def remove_locked(self, key: int) -> QueuedImage | None:
        image = self.head.pop(key, None) or self.tail.pop(key, None)
        if image is not None:
            self.tokens -= image.tokens
        return image

    def take_locked(self, batch: Batch, now: float) -> list[QueuedImage]:
        """Take a planned batch's images out of their queue, their waits counted."""
        queue = self.head if batch.phase == "head" else self.tail
        images = [queue[k] for k in batch.keys]
        for image in images:
            self.remove_locked(image.wait.key)
            image.phase_wait_s = now - image.wait.arrived
            image.queue_s += image.phase_wait_s
        self.depth_changed()
        return images

    def to_tail_locked(self, images: Sequence[QueuedImage], hb: HeadBatch, budgets: list[list[int]],
                       buckets: list[list[int]], compute_s: float, now: float,
                       extra: dict[float, tuple[list[list[int]], list[list[int]]]] | None = None) -> None:
        """Queue a finished head batch's images (row order) for the tail at their buckets; ``extra``:
        budgets and buckets at accuracy scaling's rates (``HeadBatch.at_rate``), for the images' options."""
        tail_tokens = self.engine.tail_tokens
        for row, (image, budget, bucket) in enumerate(zip(images, budgets, buckets, strict=True)):
            if image.request.finished:
                continue
            image.pixels, image.head, image.row, image.budget = None, hb, row, tuple(budget)
            image.compute_s += compute_s
            image.tokens = tail_tokens(tuple(bucket))
            image.wait = Waiting(image.wait.key, image.wait.submitted, now, tuple(bucket),
                                 tail_tokens(image.budget))
            if image.rates and extra:
                image.options = ((image.budget, tuple(bucket)),
                                 *((tuple(extra[r][0][row]), tuple(extra[r][1][row])) for r in image.rates[1:]))
            self.tail[image.wait.key] = image
            self.tokens += image.tokens
        self.depth_changed()

    # -- accuracy scaling ----------------------------------------------------------------------
    def scalables_locked(self, each: Callable[[Phase, Counts | None], float]) -> list[Scalable]:
        """Every queued image's remaining device seconds at each rate it may run at, in arrival order;
        ``each(phase, counts)``: seconds per image of a full batch (the cost model). A head image's tail
        is estimated at its rate's schedule counts (its budget is not known yet)."""
        # Memos by what the seconds depend on: a few distinct values for hundreds of images.
        tail: dict[Counts | None, float] = {}
        ladders: dict[object, tuple[float, ...]] = {}

        def cost(counts: Counts) -> float:
            if counts not in tail:
                tail[counts] = each("tail", counts)
            return tail[counts]

        out = []
        head = each("head", None)
        for image in self.head.values():
            key = image.rates or image.keep_rate
            if key not in ladders:
                ladders[key] = tuple(head + cost(self._counts_at(r)) for r in image.rates or (image.keep_rate,))
            out.append(Scalable(image.wait.submitted, image.rates or (1.0,), ladders[key]))
        for image in self.tail.values():
            if image.options:
                buckets = tuple(bucket for _, bucket in image.options)
                if buckets not in ladders:
                    ladders[buckets] = tuple(cost(b) for b in buckets)
                out.append(Scalable(image.wait.submitted, image.rates, ladders[buckets]))
            else:
                out.append(Scalable(image.wait.submitted, (1.0,), (cost(image.wait.bucket),)))
        out.sort(key=itemgetter(0))
        return out

    def tail_waits_locked(self, cap: float) -> list[Waiting]:
        """The tail's images re-bucketed at their rates under ``cap`` (the planner's view)."""
        waits = []
        for image in self.tail.values():
            rung = at_cap(image.rates, cap) if image.options else 0
            if rung == 0:
                waits.append(image.wait)
            else:
                wait = image.scaled_waits.get(rung)
                if wait is None:
                    budget, bucket = image.options[rung]
                    wait = image.scaled_waits[rung] = replace(image.wait, bucket=bucket,
                                                              need=self.engine.tail_tokens(budget))
                waits.append(wait)
        return waits

    def _counts_at(self, rate: float | None) -> Counts:
        if rate not in self._rate_counts:
            self._rate_counts[rate] = tuple(self.engine.schedule_counts(rate))
        return self._rate_counts[rate]

    # -- answers -------------------------------------------------------------------------------
    def fail_locked(self, request: Request, error: Exception | None, reason: str | None) -> None:
        """Drop the request's queued images and answer it with ``error`` (None: nobody listens)."""
        if request.finished:
            return
        request.finished = True
        for key in request.keys:
            self.remove_locked(key)
        self.depth_changed()
        if reason:
            self.hooks.on_reject(reason)
        if error is not None:
            resolve(request, error)

    def expire_locked(self, now: float) -> float | None:
        """Fail queued requests past their deadline; returns the next queued deadline."""
        soonest: float | None = None
        for image in self.images():
            req = image.request
            if req.finished:
                continue
            if req.deadline <= now:
                self.fail_locked(req, DeadlinePassed("the deadline passed while the request was queued"),
                                 "deadline")
            else:
                soonest = req.deadline if soonest is None else min(soonest, req.deadline)
        return soonest

    def deliver(self, image: QueuedImage, result: ImageResult, now: float | None = None) -> None:
        """Record one image's result; answer its request once its last image is done (takes the lock).
        ``now``: the worker clock, for the latency objective's count."""
        request = image.request
        with self.cond:
            if request.finished:
                return
            request.results[image.index] = result
            if any(r is None for r in request.results):
                return
            request.finished = True
        for r in request.results:
            self.hooks.on_image_done(r)  # type: ignore[arg-type]
        if request.objective_at is not None and now is not None:
            self.hooks.on_objective(now <= request.objective_at)
        resolve(request, list(request.results))  # type: ignore[arg-type]


def resolve(request: Request, outcome: list[ImageResult] | Exception) -> None:
    """Answer a request's future from any thread (the event loop may be gone at shutdown)."""

    def settle() -> None:
        if request.future.done():  # cancelled meanwhile
            return
        if isinstance(outcome, Exception):
            request.future.set_exception(outcome)
        else:
            request.future.set_result(outcome)

    try:
        request.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # loop closed
        pass
