"""The worker's queues: what is admitted, what waits for which phase, what is failed, what is delivered.

Each image waits twice: for the head (``head``, arrival order), then for the tail (``tail``, with its
bucket and budget known). A request is refused at once with :class:`QueueFull` when the admitted
images or tail tokens would pass their capacity (:class:`~service.runtime.mailbox.Capacity`, a
reservation the event loop checks without waiting on the worker); an image not yet through the head
is counted at its keep rate's schedule counts. Failing a request drops all its queued images; an
answer is delivered when its request's last image is done.

The worker thread owns everything here but :meth:`Queues.estimate`, :meth:`Queues.admit`,
:meth:`Queues.release`, :meth:`Queues.refuse_inbox` and the inbox and capacity themselves
(:mod:`service.runtime.mailbox`): the event loop posts to the inbox and the worker moves what it
finds there into the queues (:meth:`Queues.receive`) before each plan. No lock guards the queues,
because no other thread touches them; answers are collected in ``settled`` and sent back by
:meth:`Queues.flush`, one callback per event loop.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from operator import itemgetter

import torch

from service.protocol import DeadlinePassed, ImageResult, QueueFull
from service.runtime.batching import Batch, Counts, Phase, Scalable, Waiting
from service.runtime.handoff import HeadBatch
from service.runtime.mailbox import Capacity, Inbox, Outcome, Posted, settle
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
    left: int = field(init=False)  # results still missing (a count: deliver checks it per image)

    def __post_init__(self) -> None:
        self.left = sum(1 for r in self.results if r is None)


@dataclass(eq=False)
class Ticket:
    """Room admission reserved for one request's images (``Worker.admit``), until they are posted
    (``Worker.run``) or given back (``Worker.release``)."""

    images: int
    estimate: int                # tail tokens per image (its keep rate's schedule counts)
    keep_rate: float | None
    deadline: float
    rates: tuple[float, ...]     # accuracy scaling's rates for it (() for none)
    spent: bool = False          # posted or given back


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
    """The head and tail queues (insertion order = arrival order), fed through the inbox."""

    def __init__(self, engine: ModelEngine, settings: Settings, hooks: WorkerHooks) -> None:
        self.engine = engine
        self.settings = settings
        self.hooks = hooks
        self.capacity = Capacity(settings.queue_capacity_images, settings.queue_capacity_tokens,
                                 hooks.on_queue_depth)
        self.inbox = Inbox()
        self.head: dict[int, QueuedImage] = {}
        self.tail: dict[int, QueuedImage] = {}
        self.settled: list[tuple[Request, Outcome]] = []  # answered, not yet sent back (flush)
        self.done: list[ImageResult] = []  # the settled requests' results, for the metrics hooks (flush)
        self.estimates: dict[float | None, int] = {}  # keep rate (on KEEP_RATE_GRID) -> tail tokens
        self._ids = itertools.count()
        self._rate_tokens_per_s = 0.0        # smoothed tail throughput, for Retry-After
        self._rate_counts: dict[float | None, Counts] = {}  # schedule counts per keep rate (scaling)
        # accuracy scaling's load rule: when each image arrived, with its rates and keep rate (kept for
        # ``arrival_window_s``; None: not recorded, scaling is off)
        self.arrival_window_s: float | None = None
        self.arrivals: deque[tuple[float, tuple[tuple[float, ...], float | None], int]] = deque()
        self.arrived: Counter[tuple[tuple[float, ...], float | None]] = Counter()  # images per key in the window

    @property
    def tokens(self) -> int:
        """Tail tokens admitted and not yet in a batch (those still in the inbox included)."""
        return self.capacity.tokens

    def images(self) -> list[QueuedImage]:
        return [*self.head.values(), *self.tail.values()]

    # -- admission (the event loop) --------------------------------------------------------------
    def estimate(self, keep_rate: float | None) -> int:
        """Tail tokens of an image not yet through the head: its keep rate's schedule counts.

        Keyed by the rate rounded to ``KEEP_RATE_GRID``, so the cache stays small whatever rates
        clients send (an estimate only sizes admission)."""
        key = None if keep_rate is None else round(max(1, round(keep_rate / KEEP_RATE_GRID)) * KEEP_RATE_GRID, 6)
        if key not in self.estimates:
            self.estimates[key] = self.engine.tail_tokens(self.engine.schedule_counts(key))
        return self.estimates[key]

    def admit(self, images: int, tokens: int) -> None:
        """Reserve room for ``images`` holding ``tokens``, or raise QueueFull (nothing reserved then)."""
        held = self.capacity.reserve(images, tokens)
        if held is None:
            return
        self.hooks.on_reject("overloaded")
        queued, queued_tokens = held
        rate = self._rate_tokens_per_s
        retry = queued_tokens / rate if rate > 0 else 1.0
        raise QueueFull(min(max(retry, 0.1), 60.0),
                        f"queue full ({queued} images, {queued_tokens} tokens queued); retry later")

    def release(self, images: int, tokens: int) -> None:
        """Give back a reservation that was never posted (the request was refused after ``admit``)."""
        self.capacity.add(-images, -tokens)
        self.capacity.publish()

    def refuse_inbox(self, error: Callable[[], Exception], reason: str) -> None:
        """Answer ``error()`` to every request still in the inbox (any thread: the worker has stopped
        taking it). Each message is taken by one thread only."""
        refused: list[tuple[Request, Outcome]] = []
        for message in self.inbox.take():
            if isinstance(message, Posted) and not message.request.finished:
                message.request.finished = True
                self.capacity.add(-len(message.pixels), -message.estimate * len(message.pixels))
                self.hooks.on_reject(reason)
                refused.append((message.request, error()))
        self.capacity.publish()
        settle(refused)

    def observe_rate(self, tokens: int, seconds: float) -> None:
        """A tail batch ran ``tokens`` in ``seconds``: the throughput QueueFull's Retry-After divides by."""
        if seconds > 0:
            rate = tokens / seconds
            self._rate_tokens_per_s = rate if self._rate_tokens_per_s == 0 else (
                0.8 * self._rate_tokens_per_s + 0.2 * rate)

    # -- the worker thread: moves between the queues ---------------------------------------------
    def receive(self) -> bool:
        """Move what the event loop posted into the queues; True if there was anything."""
        messages = self.inbox.take()
        for message in messages:
            if isinstance(message, Posted):
                self.add(message.request, message.pixels, message.keep_rate, message.estimate, message.now,
                         message.rates)
            elif not message.request.finished:
                self.fail(message.request, None, "disconnected")
        self.capacity.publish()  # the reservations admission made (it leaves reporting them to this thread)
        return bool(messages)

    def add(self, request: Request, pixels: Sequence[torch.Tensor], keep_rate: float | None,
            estimate: int, now: float, rates: tuple[float, ...] = ()) -> None:
        """Queue a request's images for the head (admitted: their room is reserved).
        ``rates``: the keep rates accuracy scaling may run them at (() for none)."""
        rates = rates if len(rates) > 1 else ()
        for i, px in enumerate(pixels):
            key = next(self._ids)
            request.keys.append(key)
            self.head[key] = QueuedImage(request, i, keep_rate, px, estimate, Waiting(key, now, now), rates=rates)
        if self.arrival_window_s is not None:
            self.arrivals.append((now, (rates, keep_rate), len(pixels)))
            self.arrived[rates, keep_rate] += len(pixels)

    def remove(self, key: int) -> QueuedImage | None:
        """Unqueue one image and give back its room (``capacity.publish`` reports it)."""
        image = self.head.pop(key, None) or self.tail.pop(key, None)
        if image is not None:
            self.capacity.add(-1, -image.tokens)
        return image

    def take(self, batch: Batch, now: float) -> list[QueuedImage]:
        """Take a planned batch's images out of their queue, their waits counted."""
        queue = self.head if batch.phase == "head" else self.tail
        images = [queue.pop(k) for k in batch.keys]
        self.capacity.add(-len(images), -sum(image.tokens for image in images))
        for image in images:
            image.phase_wait_s = now - image.wait.arrived
            image.queue_s += image.phase_wait_s
        self.capacity.publish()
        return images

    def to_tail(self, images: Sequence[QueuedImage], hb: HeadBatch, budgets: list[list[int]],
                buckets: list[list[int]], compute_s: float, now: float,
                extra: dict[float, tuple[list[list[int]], list[list[int]]]] | None = None) -> None:
        """Queue a finished head batch's images (row order) for the tail at their buckets; ``extra``:
        budgets and buckets at accuracy scaling's rates (``HeadBatch.at_rate``), for the images' options.
        They come back over capacity if need be: they were admitted."""
        tail_tokens = self.engine.tail_tokens
        added = tokens = 0
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
            added, tokens = added + 1, tokens + image.tokens
        self.capacity.add(added, tokens)
        self.capacity.publish()

    # -- accuracy scaling ----------------------------------------------------------------------
    def scalables(self, each: Callable[[Phase, Counts | None], float],
                  now: float | None = None) -> tuple[list[Scalable], list[tuple[Scalable, int]]]:
        """Every queued image's remaining device seconds at each rate it may run at, in arrival order,
        and (with ``now``) the images that arrived in the last ``arrival_window_s``, priced whole (head
        plus its tail at each rate's schedule counts: the load they brought), one entry per distinct
        rate ladder with its number of images (a few entries at any rate); ``each(phase, counts)``:
        seconds per image of a full batch (the cost model). A head image's tail is estimated at its
        rate's schedule counts (its budget is not known yet)."""
        # Memos by what the seconds depend on: a few distinct values for hundreds of images.
        tail: dict[Counts | None, float] = {}
        ladders: dict[object, tuple[float, ...]] = {}
        head = each("head", None)

        def cost(counts: Counts) -> float:
            if counts not in tail:
                tail[counts] = each("tail", counts)
            return tail[counts]

        def whole(submitted: float, rates: tuple[float, ...], keep_rate: float | None) -> Scalable:
            key = rates or keep_rate
            if key not in ladders:
                ladders[key] = tuple(head + cost(self._counts_at(r)) for r in rates or (keep_rate,))
            return Scalable(submitted, rates or (1.0,), ladders[key])

        out = [whole(image.wait.submitted, image.rates, image.keep_rate) for image in self.head.values()]
        for image in self.tail.values():
            if image.options:
                buckets = tuple(bucket for _, bucket in image.options)
                if buckets not in ladders:
                    ladders[buckets] = tuple(cost(b) for b in buckets)
                out.append(Scalable(image.wait.submitted, image.rates, ladders[buckets]))
            else:
                out.append(Scalable(image.wait.submitted, (1.0,), (cost(image.wait.bucket),)))
        out.sort(key=itemgetter(0))
        arrived: list[tuple[Scalable, int]] = []
        if now is not None and self.arrival_window_s is not None:
            since = now - self.arrival_window_s
            while self.arrivals and self.arrivals[0][0] < since:
                _, key, n = self.arrivals.popleft()
                self.arrived[key] -= n
                if not self.arrived[key]:
                    del self.arrived[key]
            arrived = [(whole(0.0, *key), n) for key, n in self.arrived.items()]
        return out, arrived

    def tail_waits(self, cap: float) -> list[Waiting]:
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

    # -- answers (the worker thread) ------------------------------------------------------------
    def fail(self, request: Request, error: Exception | None, reason: str | None) -> None:
        """Drop the request's queued images and answer it with ``error`` (None: nobody listens)."""
        if request.finished:
            return
        request.finished = True
        for key in request.keys:
            self.remove(key)
        self.capacity.publish()
        if reason:
            self.hooks.on_reject(reason)
        if error is not None:
            self.settled.append((request, error))

    def expire(self, now: float) -> float | None:
        """Fail queued requests past their deadline; returns the next queued deadline."""
        soonest: float | None = None
        for image in self.images():
            req = image.request
            if req.finished:
                continue
            if req.deadline <= now:
                self.fail(req, DeadlinePassed("the deadline passed while the request was queued"), "deadline")
            else:
                soonest = req.deadline if soonest is None else min(soonest, req.deadline)
        return soonest

    def deliver(self, image: QueuedImage, result: ImageResult, now: float | None = None) -> None:
        """Record one image's result; answer its request once its last image is done (at ``flush``).
        ``now``: the worker clock, for the latency objective's count."""
        request = image.request
        if request.finished:
            return
        if request.results[image.index] is None:
            request.left -= 1
        request.results[image.index] = result
        if request.left > 0:
            return
        request.finished = True
        self.done.extend(request.results)  # type: ignore[arg-type]  # all set: checked above
        if request.objective_at is not None and now is not None:
            self.hooks.on_objective(now <= request.objective_at)
        self.settled.append((request, list(request.results)))

    def flush(self) -> None:
        """Send back every answer settled since the last flush: one callback per event loop (their
        images' metrics first, in one call)."""
        if self.done:
            done, self.done = self.done, []
            self.hooks.on_images_done(done)
        if self.settled:
            settled, self.settled = self.settled, []
            settle(settled)
