"""The API process's side of the hand-off: a :class:`~service.protocol.ModelClient` whose model runs
in the model process.

``submit`` takes one shared-memory slot per image (503 + Retry-After when the pool is full: the
front end's own overload signal), writes the preprocessed pixels there, sends a descriptor (with
the JPEGs the model process decodes itself inline) and awaits the answer; answers arrive several to
a frame (:class:`~.wire.Answers`, one per batch) and are matched to their requests by id, a refusal
raised as the :class:`~service.protocol.WorkerError` of its kind. A cancelled submit (the
client went away) sends a cancel; its slots come back only with the model process's answer. When
the connection ends (the model process died, or is gone for good), every waiting request gets 503
``model_unavailable``, ``status()`` says why, and ``on_lost``
runs (the API process then exits: its parent is gone or going).

Liveness: the model process sends its status at least every ``wire.HEARTBEAT_S``; every message read
counts as a heartbeat. Once the model has been ready, a silence longer than ``stall_s`` makes
``status().problem`` say so (``/readyz`` 503), and one longer than ``stall_exit_s`` calls ``on_stall``
once (the API process then kills the model process, so that ``serve`` ends non-zero and the pod is
restarted) and makes ``status().live`` false (``/healthz`` 503). A stopped or deadlocked model process
never answers, so each request is bounded here too: ``deadline_margin_s`` after its deadline it is
answered :class:`DeadlinePassed` (504) whatever the model process does; a cancel is sent and its
slots come back with the model process's answer to it (or never, if that process is gone: the API
process exits then).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..logs import current_request_id
from ..protocol import (
    DeadlinePassed,
    EncodedImage,
    ImageResult,
    Lifecycle,
    ModelCard,
    ModelFailed,
    ModelStatus,
    QueueFull,
    WorkerStopping,
)
from . import wire
from .slots import SlotPool

log = logging.getLogger("patchlife.transport")
LOST = "the model process is gone"
# The model process answers a request itself when its deadline passes in the queue; this much later the
# API process stops waiting (a batch that started just before the deadline still completes in time).
DEADLINE_MARGIN_S = 0.25
WATCH_S = 0.1  # how often the heartbeat's age is looked at


def _retrieved(future: asyncio.Future[list[ImageResult]]) -> None:
    """Mark a failure as seen: a request that stopped waiting (its client left, its deadline passed) must
    not leave "exception never retrieved" in the log when the model process fails it later."""
    if not future.cancelled():
        future.exception()


class RemoteModel:
    """Connects to the model process's socket at ``path``; ``slots``: this process's pixel slots."""

    def __init__(self, path: Path, slots: int, on_lost: Callable[[], None] | None = None,
                 on_reject: Callable[[str], None] | None = None, connect_timeout_s: float = 30.0,
                 stall_s: float = 3.0, stall_exit_s: float = 0.0, on_stall: Callable[[], None] | None = None,
                 deadline_margin_s: float | None = DEADLINE_MARGIN_S,
                 shared_pool: tuple[str, Path] | None = None) -> None:
        self.path, self.slots, self.on_lost = path, slots, on_lost
        self.on_reject = on_reject or (lambda reason: None)  # this side's refusals (the worker counts its own)
        self.connect_timeout_s = connect_timeout_s
        self.stall_s, self.stall_exit_s, self.on_stall = stall_s, stall_exit_s, on_stall
        self.deadline_margin_s = deadline_margin_s
        self.shared_pool = shared_pool  # (segment, lock file) of the model process's pool for every API process
        self._heard = time.monotonic()      # when the model process last sent anything
        self._was_ready = False             # stalls count only once the model has served (warm-up may be long)
        self._stall_logged = self._stall_ended = False
        self._watch_task: asyncio.Task[None] | None = None
        self.card: ModelCard | None = None
        self.pool: SlotPool | None = None
        self._status = ModelStatus()
        self._lost = False
        self._stopped = False
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, tuple[asyncio.Future[list[ImageResult]], list[int]]] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()

    async def open(self) -> ModelCard:
        reader, writer = await self._connect()
        first = await wire.receive(reader, wire.TO_API)  # the card comes before the pool: its shape sizes the slots
        if not isinstance(first, wire.Welcome):
            raise RuntimeError(f"unexpected first message from the model process: {first!r}")
        self.card, self._status = first.card, first.status
        self._heard = time.monotonic()
        self._was_ready = first.status.state == Lifecycle.READY
        if self.shared_pool is None:
            self.pool = SlotPool(self.slots, first.card.input_shape)
        else:
            self.pool = SlotPool(self.slots, first.card.input_shape, name=self.shared_pool[0],
                                 lock_path=self.shared_pool[1])
        wire.send(writer, wire.Hello(os.getpid(), self.pool.name, self.slots, first.card.input_shape))
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read(reader))
        self._watch_task = asyncio.create_task(self._watch())
        return first.card

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        end = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                return await asyncio.open_unix_connection(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > end:
                    raise RuntimeError(f"no model process listening at {self.path}") from None
                await asyncio.sleep(0.05)

    async def start(self) -> None:
        """Wait until the model process has warmed up (or failed to)."""
        while self._status.state == Lifecycle.LOADING and not self._lost and not self._stopped:
            self._changed.clear()
            await self._changed.wait()
        if self._status.state == Lifecycle.FAILED:
            raise RuntimeError(self._status.error or "the model failed to start")
        if self._lost:
            raise RuntimeError(LOST)
        if self._status.state == Lifecycle.LOADING:  # stop() cancelled the reader: no status will come
            raise RuntimeError("stopped while the model was loading")

    def status(self) -> ModelStatus:
        if self._lost:
            return ModelStatus(Lifecycle.STOPPED, self._status.error, LOST, self._status.warmup_seconds,
                               self._status.detail, live=False)
        silent = self.silent_s()
        if silent is not None and silent > self.stall_s:
            problem = (f"the model process has sent nothing for {silent:.1f} s (stalled; PATCHLIFE_MODEL_STALL_S="
                       f"{self.stall_s:g})")
            live = not (self.stall_exit_s and silent > self.stall_exit_s)
            return dataclasses.replace(self._status, problem=problem, live=live)
        return self._status

    def silent_s(self) -> float | None:
        """Seconds since the model process last sent anything, once it has been ready (None before)."""
        if not self._was_ready or self._stopped:
            return None
        return time.monotonic() - self._heard

    async def _watch(self) -> None:
        """Log a stall once, and past ``stall_exit_s`` call ``on_stall`` once."""
        while not self._lost and not self._stopped:
            await asyncio.sleep(WATCH_S)
            silent = self.silent_s()
            if silent is None or silent <= self.stall_s:
                self._stall_logged = False
                continue
            if not self._stall_logged:
                self._stall_logged = True
                log.warning("the model process has sent nothing for %.1f s: /readyz answers 503", silent)
            if self.stall_exit_s and silent > self.stall_exit_s and not self._stall_ended:
                self._stall_ended = True
                log.error("the model process has sent nothing for %.1f s (PATCHLIFE_MODEL_STALL_EXIT_S=%g): "
                          "ending it", silent, self.stall_exit_s)
                if self.on_stall is not None:
                    self.on_stall()

    def clock(self) -> float:
        return time.monotonic()

    async def submit(self, pixels: Sequence[torch.Tensor | EncodedImage], keep_rate: float | None,
                     deadline: float, min_keep_rate: float | None = None) -> list[ImageResult]:
        if self._stopped and not self._lost:  # the drain ended: the connection is closing or closed
            raise WorkerStopping("the API process is stopping")
        if self._lost or self._writer is None or self._writer.is_closing() or self.pool is None:
            self.on_reject("model_error")
            raise ModelFailed(LOST, retry_after_s=5.0)
        tensors = [p for p in pixels if not isinstance(p, EncodedImage)]  # encoded JPEGs go inline, not in slots
        ids = self.pool.take(len(tensors))
        if ids is None:
            self.on_reject("overloaded")
            where = "the service" if self.pool.shared else "this API process"
            raise QueueFull(1.0, f"server overloaded: {self.pool.free} of {self.pool.slots} pixel slots free in "
                                 f"{where} (PATCHLIFE_PIXEL_SLOTS); retry after 1.0 s")
        try:
            for slot, p in zip(ids, tensors, strict=True):
                self.pool.write(slot, p)
        except Exception:
            self.pool.give(ids)
            raise
        slots = iter(ids)
        items = tuple(p if isinstance(p, EncodedImage) else next(slots) for p in pixels)
        rid = next(self._ids)
        future: asyncio.Future[list[ImageResult]] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)
        self._pending[rid] = (future, ids)
        wire.send(self._writer, wire.Submit(rid, items, keep_rate, deadline, current_request_id(), min_keep_rate))
        limit = None if self.deadline_margin_s is None else \
            max(0.0, deadline + self.deadline_margin_s - time.monotonic())
        try:
            await asyncio.wait({future}, timeout=limit)  # never cancels the future itself
        except asyncio.CancelledError:  # the client went away: a late answer only frees the slots
            future.cancel()
            self._cancel(rid)
            raise
        if not future.done():  # the model process did not answer in time: maybe it never will
            future.cancel()
            self._cancel(rid)
            self.on_reject("deadline")
            raise DeadlinePassed("the model process did not answer by the request's deadline")
        return future.result()

    def _cancel(self, rid: int) -> None:
        writer = self._writer
        if not self._lost and rid in self._pending and writer is not None and not writer.is_closing():
            wire.send(writer, wire.Cancel(rid))  # the slots come back with the answer

    def begin_drain(self) -> None:
        """Nothing to do here: the model process drains on its own signal."""

    async def stop(self, grace_s: float | None = None) -> None:
        """Let the requests on their way finish within ``grace_s``, then close the connection (the model
        process cancels what is left of ours: those requests are answered 503) and the pool. A ``start``
        still waiting for the warm-up ends (the lifespan awaits it before the process can exit)."""
        self._stopped = True
        self._changed.set()
        end = time.monotonic() + (grace_s or 0.0)
        while self._pending and not self._lost and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if self._writer is not None:
            self._writer.close()
        for task in (self._reader_task, self._watch_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._fail_pending()
        if self.pool is not None:
            self.pool.close(unlink=self.pool.owner)  # a shared pool is the model process's to remove
            self.pool = None

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await wire.receive(reader, wire.TO_API)
                self._heard = time.monotonic()
                if isinstance(message, wire.Answers):
                    for answer in message.items:
                        self._answer(answer)
                elif isinstance(message, wire.StatusUpdate):
                    self._status = message.status
                    self._was_ready = self._was_ready or message.status.state == Lifecycle.READY
                    self._changed.set()
                else:
                    raise wire.WireError(f"a second {type(message).__name__}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except wire.WireError as exc:
            log.error("closing the connection to the model process: %s", exc)
            if self._writer is not None:
                self._writer.close()
        except asyncio.CancelledError:
            return  # stop(): not a loss
        except Exception:
            log.exception("reading from the model process failed")
        self._lost = True
        self._changed.set()
        log.error("%s: answering 503 from now on", LOST)
        self._fail_pending()
        if self.on_lost is not None:
            self.on_lost()

    def _answer(self, message: wire.Done | wire.Failed) -> None:
        entry = self._pending.pop(message.id, None)
        if entry is None:
            return
        future, ids = entry
        if self.pool is not None:
            self.pool.give(ids)
        if future.done():  # cancelled meanwhile
            return
        if isinstance(message, wire.Done):
            try:
                results = wire.unpack_results(message)
            except wire.WireError as exc:  # answered here; _read then ends the connection
                future.set_exception(ModelFailed(f"a malformed answer from the model process: {exc}", 5.0))
                raise
            future.set_result(results)
        else:
            future.set_exception(wire.worker_error(message))

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():  # the slots are not given back: nobody will read them again
            if not future.done():
                self.on_reject("model_error")
                future.set_exception(ModelFailed(LOST, retry_after_s=5.0))
