"""The inference worker: one thread owns the model; request handlers only enqueue and await.

    results = await worker.submit(pixels, keep_rate, deadline)   # list[ImageResult], input order

Each image goes through two queues (:mod:`service.runtime.admission`). The head (``Engine.head``)
yields its lives and budget; the tail (``Engine.tail``) runs it with others of the same budget
bucket (:mod:`service.runtime.batching` decides what runs next). The thread wakes on every enqueue
and at the policy's next due time. It sizes torch's CPU thread team (``Settings.torch_threads``)
before its first batch.

A batch is launched, then finished: the engine queues the device work and the copy of its answer
to the host (:mod:`service.runtime.handoff`), and reading that copy is what waits. On an asynchronous engine
(a GPU) the thread launches the next due batch before it waits for the current one's copy, so the
device is fed while the host reads answers; at most two batches are in flight. On the CPU each batch
is finished before the next is planned, exactly as if launching and finishing were one call.

Admission (:class:`QueueFull` when the queues would pass their capacity), deadlines
(:class:`DeadlinePassed` before an image starts a phase; its request's other images are dropped)
and delivery live with the queues; cancelling the task that awaits ``submit`` (the client went
away) drops its queued images too. ``stop()`` refuses new work with :class:`WorkerStopping`, runs
what is queued (without waiting for batches to fill) for up to ``shutdown_grace_s``, fails the rest
and joins the thread; ``begin_drain()`` (at SIGTERM) stops waiting for batches to fill while still
accepting the requests already on their way. The states follow :func:`service.protocol.advance`.

The event loop never waits on the thread (:mod:`service.runtime.mailbox`): ``submit`` (or ``admit``,
then ``run``) reserves room in an atomic capacity, posts to an inbox and sets an event; the thread
alone owns the queues, so it plans, expires and calls the metrics hooks with no lock held, and answers
all the requests a batch settled with one ``call_soon_threadsafe``. ``stop()`` waits on an event.

Failures: a batch whose model call raises (at launch or when its copy is read) fails its requests
with :class:`ModelFailed` (503 + Retry-After); a device out-of-memory error at launch first splits
the batch in two and retries each half once. ``health()`` says why the worker cannot serve (None
while it can): the model thread ended on an unexpected error (its queued requests are answered at
once), ``unhealthy_after_failures`` consecutive failed batches, or a batch running past
``watchdog_batch_s``; ``/readyz`` reports it.

Metrics go through :class:`WorkerHooks` (:mod:`service.runtime.seams`, with the :class:`ModelEngine`
seam; both re-exported here); its methods are called from the worker thread, and ``on_reject`` and
``on_queue_depth`` from the event loop too, never under a lock the other side waits on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from service.protocol import DeadlinePassed, ImageResult, Lifecycle, ModelFailed, WorkerStopping, advance
from service.runtime.admission import QueuedImage, Queues, Request, Ticket
from service.runtime.batching import Batch, BatchLimits, Counts, Load, Phase, Waiting, plan, scale_cap
from service.runtime.costmodel import CostModel, Timing
from service.runtime.handoff import HeadBatch, HostCopy, Rows
from service.runtime.mailbox import Posted, Withdrawn
from service.runtime.scaling import CAPS, Scaling, at_cap
from service.runtime.seams import ModelEngine, WorkerHooks
from service.settings import Settings

__all__ = ["DEVICE_OOM", "ModelEngine", "Worker", "WorkerHooks", "set_torch_threads"]

log = logging.getLogger("patchlife.worker")


# torch >= 2.5 names it torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class there.
DEVICE_OOM: tuple[type[BaseException], ...] = tuple(
    {c for c in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
     if isinstance(c, type)})


@dataclass(eq=False)
class _Flight:
    """A launched batch whose answers have not been read: one part, or two after an OOM split, each
    (its images in answer order, the engine's handle, host seconds its launch took)."""

    batch: Batch
    parts: list[tuple[list[QueuedImage], Any, float]]
    started: float               # worker clock, for the watchdog

    def add(self, images: list[QueuedImage], handle: Any, launch_s: float) -> None:
        self.parts.append((images, handle, launch_s))


def set_torch_threads(threads: int) -> int:
    """Apply ``PATCHLIFE_TORCH_THREADS`` to the calling thread (0: torch's default, one per core).

    Returns the thread count now in force. It must run in the thread that runs the model.
    ``torch.set_num_threads`` is process-wide in name, but the OpenMP team behind MKL's matrix
    products is sized per thread: a call made in the main thread (say, before the model loads) left
    a worker thread's products on the default team (torch 2.14, measured per-thread CPU time),
    while the call in the worker thread itself gave one busy thread.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class Worker:
    """Runs :class:`ModelEngine` head/tail batches in one thread, fed by ``submit`` from the event loop."""

    def __init__(self, engine: ModelEngine, settings: Settings, hooks: WorkerHooks | None = None,
                 clock: Callable[[], float] = time.monotonic, timings: Sequence[Timing] = (),
                 scaling: Scaling | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.hooks = hooks or WorkerHooks()
        self.clock = clock
        self.limits = BatchLimits.from_settings(settings)
        self.queues = Queues(engine, settings, self.hooks)  # the thread's alone; the loop posts to its inbox
        self.state = Lifecycle.LOADING       # READY (accepting) -> STOPPING (drain) -> DRAINING (refusing) -> STOPPED
        self._state_lock = threading.Lock()  # held only to apply protocol.advance
        self._thread: threading.Thread | None = None
        self._closed = False                 # the thread has ended: nothing takes the inbox any more
        self._drained = threading.Event()    # set by the thread once DRAINING finds nothing left to run
        self._failures = 0                   # consecutive failed batches
        self._last_error = ""
        self._fatal: str | None = None       # FAILED: why the model thread ended on an error
        self._busy_since: float | None = None
        self._head_tokens = engine.head_tokens
        self.cost = CostModel()  # what a batch costs on this device, learnt from the batches run
        self.cost.learn(timings)
        self.hooks.on_cost_model(self.cost)
        self.scaling = scaling               # accuracy scaling (None: off, every image at its own rate)
        self.cap = CAPS[0]                   # its current cap on the tail's keep rates (1.0: none)
        if scaling is not None and scaling.utilisation < 1:
            self.queues.arrival_window_s = scaling.window_s  # the load rule's arrivals

    def batch_seconds(self, phase: Phase, images: int, counts: Counts | None) -> float:
        """Predicted device time of a batch, padding included (the planner's price)."""
        tokens = self.engine.tail_tokens(counts) if counts is not None else 0
        return self.cost.seconds(phase, self.engine.padded_rows(images), tokens)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._transition(Lifecycle.READY)
        self._thread = threading.Thread(target=self._loop, name="patchlife-worker", daemon=True)
        self._thread.start()

    def begin_drain(self) -> None:
        """Shutdown has begun: run queued batches without waiting for them to fill. Work is still
        accepted (requests already reading their body or decoding finish normally). Thread-safe."""
        self._transition(Lifecycle.STOPPING)

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new work, finish what is queued within ``grace_s`` (default ``shutdown_grace_s``),
        then join the thread; what is still queued then is answered WorkerStopping."""
        self._transition(Lifecycle.DRAINING)
        thread = self._thread
        if thread is None:
            return
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        if grace > 0:  # the thread sets the event once it has run everything (or has ended)
            await asyncio.to_thread(self._drained.wait, grace)
        self._transition(Lifecycle.STOPPED)
        await asyncio.to_thread(thread.join)  # a running batch cannot be interrupted
        self._thread = None

    def _transition(self, state: Lifecycle) -> None:
        """Apply the lifecycle's one rule (:func:`service.protocol.advance`) and wake the thread."""
        with self._state_lock:
            self.state = advance(self.state, state)
        self.queues.inbox.wake.set()

    def health(self) -> str | None:
        """None while the worker can serve; otherwise why not (``/readyz`` answers 503 with it)."""
        if self._fatal is not None:
            return self._fatal
        thread = self._thread
        if thread is not None and not thread.is_alive():
            return "the model thread is not running"
        if self._failures >= self.settings.unhealthy_after_failures:
            return f"the last {self._failures} model batches failed (last: {self._last_error})"
        since = self._busy_since
        if since is not None and self.clock() - since > self.settings.watchdog_batch_s:
            return f"a model batch has been running for {self.clock() - since:.0f} s (PATCHLIFE_WATCHDOG_BATCH_S)"
        return None

    # -- the event-loop side: never waits on the thread --------------------------------------
    async def submit(self, pixels: Sequence[torch.Tensor], keep_rate: float | None,
                     deadline: float, min_keep_rate: float | None = None) -> list[ImageResult]:
        """Classify ``pixels`` (each ``[3, H, W]``) at ``keep_rate``; results in input order.

        Raises QueueFull, DeadlinePassed or WorkerStopping; ``deadline`` is on the worker clock.
        """
        return await self.run(self.admit(len(pixels), keep_rate, deadline, min_keep_rate), pixels)

    def admit(self, images: int, keep_rate: float | None, deadline: float,
              min_keep_rate: float | None = None) -> Ticket:
        """Refuse at once what ``submit`` would refuse before queueing (the model is down, the worker
        stops, the deadline passed, the queue is full), or reserve the room of ``images`` images: what
        the model process checks before it spends device time decoding them. Give the ticket to
        :meth:`run`, or back with :meth:`release`."""
        self._check_open()
        if not images:
            return Ticket(0, 0, keep_rate, deadline, ())
        rates = self.scaling.rates(keep_rate, min_keep_rate) if self.scaling is not None else ()
        estimate = self.queues.estimate(keep_rate)
        self._check_deadline(deadline)
        self.queues.admit(images, estimate * images)
        return Ticket(images, estimate, keep_rate, deadline, rates)

    def release(self, ticket: Ticket) -> None:
        """Give back an admitted ticket's room (its images will not be run)."""
        if not ticket.spent:
            ticket.spent = True
            self.queues.release(ticket.images, ticket.images * ticket.estimate)

    async def run(self, ticket: Ticket, pixels: Sequence[torch.Tensor]) -> list[ImageResult]:
        """Queue an admitted ticket's ``pixels`` (as many as it holds room for) and await their results."""
        if not pixels:
            return []
        request = self.post(ticket, pixels)
        try:
            return await request.future
        except asyncio.CancelledError:
            self.withdraw(request)  # the thread drops what is still queued of it
            raise

    def post(self, ticket: Ticket, pixels: Sequence[torch.Tensor]) -> Request:
        """:meth:`run` without awaiting: queue the pixels (at least one) and return the request, whose
        ``future`` the answer is set on, in this event loop. A caller that stops waiting calls
        :meth:`withdraw`. For callers that handle answers in a callback, not a task each (the model host)."""
        assert pixels and len(pixels) == ticket.images and not ticket.spent, "one run per ticket, of its images"
        try:  # the same checks again: time may have passed since admit (a decode on the device)
            self._check_open()
            now = self._check_deadline(ticket.deadline)
        except Exception:
            self.release(ticket)
            raise
        ticket.spent = True
        loop = asyncio.get_running_loop()
        request = Request(loop.create_future(), loop, ticket.deadline, [None] * len(pixels))
        if self.scaling is not None:
            request.objective_at = now + self.scaling.objective_s
        self.queues.inbox.post(Posted(request, list(pixels), ticket.keep_rate, ticket.estimate, now, ticket.rates))
        if self._closed:  # the thread ended after the checks above: nothing would take it, answer it here
            self.queues.refuse_inbox(*self._closing())
        return request

    def withdraw(self, request: Request) -> None:
        """The caller of :meth:`post` no longer waits: the thread drops what is still queued of it."""
        request.future.cancel()
        self.queues.inbox.post(Withdrawn(request))

    def _check_open(self) -> None:
        if self._fatal is not None:
            self.hooks.on_reject("model_error")
            raise ModelFailed(f"model unavailable: {self._fatal}", 5.0)
        if self.state not in (Lifecycle.READY, Lifecycle.STOPPING):
            self.hooks.on_reject("shutdown")
            raise WorkerStopping("server is shutting down")

    def _check_deadline(self, deadline: float) -> float:
        now = self.clock()
        if deadline <= now:
            self.hooks.on_reject("deadline")
            raise DeadlinePassed("the request's deadline passed before it was queued")
        return now

    def _closing(self) -> tuple[Callable[[], Exception], str]:
        """What the requests left when the thread ends are answered: (a maker of their error, the reason)."""
        if self._fatal is not None:
            fatal = self._fatal
            return (lambda: ModelFailed(f"model unavailable: {fatal}", 5.0)), "model_error"
        return (lambda: WorkerStopping("server shut down before the request ran")), "shutdown"

    # -- the worker thread -------------------------------------------------------------------
    def _loop(self) -> None:
        flight: list[_Flight] = []   # launched, answers not read yet (oldest first)
        try:
            set_torch_threads(self.settings.torch_threads)
            ahead = bool(self.engine.asynchronous)
            while True:
                batch, images = self._next(block=not flight)
                if batch is None and not flight:
                    break
                if batch is not None and not flight:
                    self._busy_since = self.clock()
                try:
                    if batch is not None:
                        flight.append(self._launch(batch, images))
                    # A GPU keeps the newest batch in flight while the older one's answers are read.
                    keep = 1 if ahead and batch is not None else 0
                    while len(flight) > keep:
                        self._finish(flight.pop(0))
                finally:
                    self._busy_since = flight[0].started if flight else None
                    self.queues.flush()  # what this round answered: one callback per event loop
        except BaseException as exc:  # a bug outside the model calls (planning, bookkeeping): never silent
            log.critical("the model thread stopped on an unexpected error", exc_info=exc)
            self._fatal = f"the model thread stopped: {type(exc).__name__}: {exc}"
            self._transition(Lifecycle.FAILED)
            self.hooks.on_model_failure("worker_died")
        finally:
            self._fail_queued([im for f in flight for images, _, _ in f.parts for im in images])

    def _fail_queued(self, in_flight: Sequence[QueuedImage] = ()) -> None:
        """The thread is ending: answer whatever is still queued, posted or launched (it will not run or
        be read). ``_closed`` first: a submit that posts after this takes the inbox itself."""
        self._closed = True
        error, reason = self._closing()
        self.queues.refuse_inbox(error, reason)
        for image in [*self.queues.images(), *in_flight]:
            self.queues.fail(image.request, error(), reason)
        self.queues.flush()
        self._drained.set()

    def _launch_phase(self, batch: Batch, images: list[QueuedImage]) -> tuple[list[QueuedImage], Any]:
        """Queue one batch on the engine: (its images in the order of the answer's rows, the handle)."""
        if batch.phase == "head":
            # accuracy scaling: also plan the budgets at the rates these images may be scaled to
            extra = sorted({r for im in images for r in im.rates[1:]}, reverse=True)
            return images, self.engine.head([im.pixels for im in images],  # type: ignore[misc]
                                            [im.keep_rate for im in images], *([extra] if extra else []))
        assert batch.counts is not None
        parts: dict[int, tuple[HeadBatch, list[int], list[QueuedImage]]] = {}
        for im in images:  # rows grouped by the head batch they came from: one gather each
            assert im.head is not None, "every image in the tail went through the head"
            parts.setdefault(id(im.head), (im.head, [], []))[1].append(im.row)
            parts[id(im.head)][2].append(im)
        ordered = [im for _, _, ims in parts.values() for im in ims]
        rows = [Rows(hb, torch.tensor(idx)) for hb, idx, _ in parts.values()]
        return ordered, self.engine.tail(rows, batch.counts)

    def _launch(self, batch: Batch, images: list[QueuedImage]) -> _Flight:
        """Launch one planned batch. A device out-of-memory error splits it in two halves, each tried
        once more; any other model error (or a second OOM) fails the requests of what failed."""
        flight = _Flight(batch, [], self.clock())
        t0 = self.clock()
        try:
            flight.add(*self._launch_phase(batch, images), self.clock() - t0)
        except DEVICE_OOM as exc:
            self.hooks.on_model_failure("out_of_memory")
            if len(images) < 2:
                self._batch_failed(batch, images, exc)
                return flight
            log.warning("%s batch of %d images ran out of device memory; retrying it in two halves",
                        batch.phase, len(images))
            _free_device_cache()
            half = len(images) // 2
            for part in (images[:half], images[half:]):
                t0 = self.clock()
                try:
                    flight.add(*self._launch_phase(batch, part), self.clock() - t0)
                except Exception as again:  # a model error: answer 503, never end the thread
                    self._batch_failed(batch, part, again)
        except Exception as exc:  # a model error fails its batch, never the worker
            self._batch_failed(batch, images, exc)
        return flight

    def _finish(self, flight: _Flight) -> None:
        """Read each launched part's answer (this waits for its copy) and hand it on."""
        for images, handle, launch_s in flight.parts:
            try:
                if flight.batch.phase == "head":
                    self._finish_head(images, handle, launch_s)
                else:
                    assert flight.batch.counts is not None
                    self._finish_tail(images, handle, flight.batch.counts, launch_s)
            except Exception as exc:  # e.g. a device error surfacing when the copy is waited for
                self._batch_failed(flight.batch, images, exc)
            else:
                self._batch_succeeded()

    def _batch_succeeded(self) -> None:
        self._failures = 0

    def _batch_failed(self, batch: Batch, images: list[QueuedImage], exc: BaseException) -> None:
        log.error("%s batch of %d images failed", batch.phase, len(images), exc_info=exc)
        self.hooks.on_model_failure("batch_error")
        error = ModelFailed(f"the model failed on this request's batch ({type(exc).__name__}); retry", 1.0)
        self._failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}"[:300]
        for image in images:
            self.queues.fail(image.request, error, "model_error")

    def _next(self, block: bool = True) -> tuple[Batch | None, list[QueuedImage]]:
        """Wait (on the inbox's event) until a batch is due; take its images out of the queues.

        Each round first moves what the event loop posted into the queues, then expires and plans on
        them: the thread owns them, so none of this holds a lock the loop could wait on.
        With ``block`` False (a batch is in flight), return (None, []) at once when nothing is due,
        and leave batches that are due only because the device would idle (reason ``idle``): it is
        busy with the batch in flight, whose images the queues do not show yet."""
        queues, wake = self.queues, self.queues.inbox.wake
        while self.state not in (Lifecycle.STOPPED, Lifecycle.FAILED):
            wake.clear()  # before taking the inbox: a post after this sets it again
            draining = self.state >= Lifecycle.DRAINING  # read first: nothing is posted after it
            queues.receive()
            now = self.clock()
            next_deadline = queues.expire(now)
            decision = plan([i.wait for i in queues.head.values()], self._tail_waits(now), now,
                            self.limits, self.engine.tail_tokens, drain=self.state >= Lifecycle.STOPPING,
                            cost=self.batch_seconds if self.cost.ready else None)
            if isinstance(decision, Batch):
                if not block and decision.reason == "idle":
                    break
                images = queues.take(decision, now)
                if decision.phase == "tail":
                    for image in images:  # the rate the plan bucketed it at
                        image.rung = at_cap(image.rates, self.cap) if image.options else 0
                queues.flush()  # expired meanwhile: answered before the batch runs
                return decision, images
            if not block:
                break
            queues.flush()
            if draining and not queues.head and not queues.tail:
                self._drained.set()  # stop() waits for this, not for a poll
            wake_at = [t for t in (decision, next_deadline) if t is not None]
            wake.wait(max(0.0, min(wake_at) - now) if wake_at else None)
        return None, []

    def _finish_head(self, images: list[QueuedImage], hb: HeadBatch, launch_s: float) -> None:
        t0 = self.clock()
        budgets, buckets = hb.budgets.tolist(), hb.buckets.tolist()  # waits for the plan's copy
        extra = {r: tuple(t.tolist() for t in hb.at_rate(r)) for r in hb.extra_rates}
        compute = launch_s + self.clock() - t0
        self._learn("head", len(images), 0, compute)
        self.hooks.on_batch("head", len(images), len(images) * self._head_tokens, None,
                            [im.phase_wait_s for im in images], compute)
        self.queues.to_tail(images, hb, budgets, buckets, compute, self.clock(), extra)  # type: ignore[arg-type]

    def _finish_tail(self, images: list[QueuedImage], copy: HostCopy, counts: Counts, launch_s: float) -> None:
        t0 = self.clock()
        probs = copy.get()  # waits for the probabilities' copy
        compute = launch_s + self.clock() - t0
        per_image = self.engine.tail_tokens(counts)
        needed = sum(self.engine.tail_tokens(im.budget) for im in images)
        merged = sum(1 for im in images if im.wait.bucket != tuple(counts))
        rows = self._learn("tail", len(images), per_image, compute, merged)
        self.hooks.on_batch("tail", len(images), per_image * len(images), "-".join(map(str, counts)),
                            [im.phase_wait_s for im in images], compute)
        self.hooks.on_waste(needed, per_image * rows)  # padding rows are computed tokens too
        self.queues.observe_rate(per_image * len(images), compute)
        gflops = self.engine.gflops(tuple(counts))
        done = self.clock()
        for image, p in zip(images, probs.unbind(0), strict=True):  # unbind: one call for every row's view
            hb = image.head
            assert hb is not None
            requested = hb.keep_rates[image.row]
            scaled = image.rung > 0  # accuracy scaling ran it at a lower rate, at that rate's budget
            result = ImageResult(p, hb.life_rows[image.row], image.options[image.rung][0] if scaled else image.budget,
                                 tuple(counts), gflops, image.rates[image.rung] if scaled else requested,
                                 image.queue_s * 1000.0, (image.compute_s + compute) * 1000.0, scaled, requested)
            self.queues.deliver(image, result, done)

    # -- accuracy scaling ----------------------------------------------------------------------
    def describe_scaling(self) -> dict[str, Any] | None:
        """Accuracy scaling's settings and current cap (None when off), for /v1/models and /readyz."""
        s = self.scaling
        if s is None:
            return None
        return {"latency_objective_ms": s.objective_s * 1e3, "default_keep_rate": s.default_rate,
                "floor": s.floor, "cap": self.cap}

    def _tail_waits(self, now: float) -> list[Waiting]:
        """The tail's images as the planner sees them: with accuracy scaling, the cap is decided first
        (:func:`service.runtime.batching.scale_cap`) and each image is re-bucketed at its rate under it."""
        if self.scaling is None or not self.cost.ready:
            return [i.wait for i in self.queues.tail.values()]
        s = self.scaling
        queued, arrived = self.queues.scalables(self._seconds_per_image, now)
        load = Load(arrived, s.window_s, s.utilisation) if s.utilisation < 1 else None
        self.cap = scale_cap(self.cap, queued, now, s.aim_s, s.hysteresis, load=load)
        return self.queues.tail_waits(self.cap)

    def _seconds_per_image(self, phase: Phase, counts: Counts | None) -> float:
        """Accuracy scaling's price of one image: its share of a batch of the size this phase's batches
        have held lately (the fixed cost per call is spread over the images that actually share it)."""
        typical = self.cost.typical_images(phase)
        images = self.limits.size if typical is None else max(1, min(self.limits.size, round(typical)))
        return self.batch_seconds(phase, images, counts) / images

    def _learn(self, phase: Phase, images: int, tokens_per_row: int, seconds: float, merged: int = 0) -> int:
        """Feed the cost model one batch and report its shape; returns the rows it ran as (padding included)."""
        rows = self.engine.padded_rows(images)
        self.cost.observe(phase, rows, tokens_per_row, seconds, images)
        self.hooks.on_cost_model(self.cost)
        self.hooks.on_shape(phase, merged, rows - images)
        return rows


def _free_device_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

