"""The model process's side of the hand-off: serves one :class:`~service.protocol.ModelClient` (the
engine and its batching worker, ``service/runtime/local.py``) to every API process.

Each API process holds one connection: this side sends the card first (it sizes the API process's
slots), the API process answers with its pool. A :class:`~.wire.Submit` becomes one task that reads its
pixels from the sender's shared-memory slots (views, no copy; encoded JPEGs come inline), awaits
``model.submit`` with the request's deadline and keep rate, and answers :class:`~.wire.Done` or
:class:`~.wire.Failed`; a :class:`~.wire.Cancel` cancels that task, so the worker drops what it still
queues for it, as when an HTTP client goes away in the single-process service. Answers wait in the
connection's outbox until the end of the event loop's turn (one ``call_soon``), then leave together in
one :class:`~.wire.Answers` frame: the requests of one batch end in the same turn, so a batch costs
one frame and one write per API process, not one per request. Status (readiness, health) is pushed on
change and every ``HEARTBEAT_S``. A frame this side does not accept (:class:`~.wire.WireError`) ends
that connection alone. When a connection ends (its API process exited or died) its tasks are cancelled
and its segment is unmapped and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..logs import set_request_id
from ..protocol import EncodedImage, ErrorKind, ImageResult, ModelCard, ModelClient, WorkerError
from . import wire
from .slots import SlotPool

log = logging.getLogger("patchlife.transport")


class Posting(Protocol):
    """A request queued by :meth:`PostingModel.post`: its answer (or refusal) comes on ``future``."""

    @property
    def future(self) -> asyncio.Future[list[ImageResult]]: ...


@runtime_checkable
class PostingModel(Protocol):
    """A model that also queues a request without a task (``service/runtime/local.py``'s ``LocalModel``):
    ``post`` raises what ``submit`` would refuse with, or returns the request (None: use ``submit``)."""

    def post(self, pixels: Sequence[torch.Tensor | EncodedImage], keep_rate: float | None, deadline: float,
             min_keep_rate: float | None = None) -> Posting | None: ...

    def withdraw(self, request: Posting) -> None: ...


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter, pool: SlotPool, pid: int, own_pool: bool) -> None:
        self.writer, self.pool, self.pid, self.own_pool = writer, pool, pid, own_pool
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.posted: dict[int, Posting] = {}  # requests queued without a task (PostingModel), by id
        self.outbox: list[wire.Done | wire.Failed] = []  # answers of this turn of the loop (see _flush)

    def answer(self, answer: wire.Done | wire.Failed) -> None:
        """Send ``answer`` with the others that are ready in this turn of the event loop."""
        if self.writer.is_closing():
            return
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outbox.append(answer)

    def _flush(self) -> None:
        answers, self.outbox = self.outbox, []
        if not answers or self.writer.is_closing():
            return
        try:
            frame = wire.frame(wire.Answers(answers))
        except Exception:  # a bug: these must still be answered, or their slots never come back
            log.exception("answers to API process %d could not be encoded", self.pid)
            frame = wire.frame(wire.Answers([wire.Failed(a.id, ErrorKind.MODEL_FAILED, "model process error: "
                                                         "the answer could not be encoded", 1.0) for a in answers]))
        with contextlib.suppress(ConnectionError):
            self.writer.write(frame)


class ModelHost:
    """``await host.start(path)`` listens on a Unix socket; ``heartbeat`` (optional) runs every
    ``HEARTBEAT_S`` before the status goes out (the model process samples its metrics there);
    ``pool``: the shared pool (``slots.py``) the API processes attach to, when there is one (an API
    process that names another segment in its hello brings a private pool of its own)."""

    def __init__(self, model: ModelClient, card: ModelCard, heartbeat: Callable[[], None] | None = None,
                 pool: SlotPool | None = None, max_frame: int = wire.MAX_FRAME) -> None:
        self.model, self.card, self.heartbeat, self.pool = model, card, heartbeat, pool
        self.poster = model if isinstance(model, PostingModel) else None  # a request then costs no task
        self.max_frame = max_frame  # the largest frame an API process may send (a Submit with inline JPEGs)
        self.connections: set[_Connection] = set()
        self.connected = asyncio.Event()  # set at the first API process's connection (serve's "serving" line)
        self._server: asyncio.AbstractServer | None = None
        self._beat: asyncio.Task[None] | None = None

    async def start(self, path: Path) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(path))
        self._beat = asyncio.create_task(self._heartbeat())

    async def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.writer.close()

    def push_status(self) -> None:
        status = wire.StatusUpdate(self.model.status())
        for conn in self.connections:
            if not conn.writer.is_closing():
                wire.send(conn.writer, status)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(wire.HEARTBEAT_S)
            try:
                if self.heartbeat is not None:
                    self.heartbeat()
                self.push_status()
            except Exception:  # a metrics read must not end the heartbeat
                log.exception("heartbeat failed")

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Connection | None:
        """Send the card, read the hello, attach its pool: the connection, or None (closed) if that failed."""
        try:
            wire.send(writer, wire.Welcome(self.card, self.model.status()))  # the card sizes the sender's slots
            hello = await wire.receive(reader, wire.TO_MODEL, self.max_frame)
            if not isinstance(hello, wire.Hello) or tuple(hello.shape) != self.card.input_shape:
                raise wire.WireError(f"bad hello: {hello!r}")
            shared = self.pool is not None and hello.shm_name == self.pool.name
            pool = self.pool if shared else SlotPool(hello.slots, hello.shape, name=hello.shm_name)
            assert pool is not None
        except (wire.WireError, asyncio.IncompleteReadError) as exc:
            log.error("an API process could not connect: %s", exc)
        except Exception:
            log.exception("an API process could not connect")
        else:
            return _Connection(writer, pool, hello.pid, own_pool=not shared)
        writer.close()
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = await self._handshake(reader, writer)
        if conn is None:
            return
        self.connections.add(conn)
        self.connected.set()
        wire.send(writer, wire.StatusUpdate(self.model.status()))  # it may have changed while the sender set up
        log.info("API process %d connected (%d pixel slots)", conn.pid, conn.pool.slots)
        try:
            while True:
                message = await wire.receive(reader, wire.TO_MODEL, self.max_frame)
                if isinstance(message, wire.Submit):
                    if not self._post(conn, message):
                        run = asyncio.create_task(self._run(conn, message))
                        run.add_done_callback(functools.partial(self._cancelled_unstarted, conn, message.id))
                        conn.tasks[message.id] = run
                elif isinstance(message, wire.Cancel):
                    self._cancel(conn, message.id)
                else:
                    raise wire.WireError(f"a second {type(message).__name__}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the API process closed or died
        except wire.WireError as exc:
            log.error("closing the connection of API process %d: %s", conn.pid, exc)
        except Exception:
            log.exception("connection of API process %d failed", conn.pid)
        finally:
            await self._end(conn)

    async def _end(self, conn: _Connection) -> None:
        """The connection ended: what it has queued is withdrawn or cancelled, its slots freed."""
        self.connections.discard(conn)
        for rid in list(conn.posted):
            self._cancel(conn, rid)
        tasks = list(conn.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conn.writer.close()
        if conn.own_pool:
            conn.pool.close(unlink=True)  # the owner unlinks on a clean exit; after a crash, this does
        else:  # nobody will answer for what it held: its slots are free again
            freed = conn.pool.release(conn.pid)
            if freed:
                log.info("%d pixel slots of API process %d freed", freed, conn.pid)
        log.info("API process %d disconnected", conn.pid)

    def _post(self, conn: _Connection, msg: wire.Submit) -> bool:
        """Queue a Submit of slot pixels with no task (:class:`PostingModel`); its answer is sent from the
        request's future's callback (:meth:`_posted_done`). False: it needs a task (:meth:`_run`)."""
        if self.poster is None or not all(type(i) is int for i in msg.slots):
            return False
        try:
            posting = self.poster.post(conn.pool.read(list(msg.slots)), msg.keep_rate,  # type: ignore[arg-type]
                                       msg.deadline, msg.min_keep_rate)
        except WorkerError as exc:
            conn.answer(wire.failed(msg.id, exc))
            return True
        except Exception as exc:  # a bug here (or a slot id out of range) must not leave the API process waiting
            conn.answer(self._failure(msg.id, msg.request_id, exc))
            return True
        if posting is None:
            return False
        conn.posted[msg.id] = posting
        posting.future.add_done_callback(functools.partial(self._posted_done, conn, msg.id, msg.request_id))
        return True

    def _posted_done(self, conn: _Connection, rid: int, request_id: str,
                     future: asyncio.Future[list[ImageResult]]) -> None:
        if conn.posted.pop(rid, None) is None or future.cancelled():
            return  # cancelled (and answered so) meanwhile
        answer: wire.Done | wire.Failed
        exc = future.exception()
        if exc is None:
            try:
                answer = wire.pack_results(rid, future.result())
            except Exception as bug:
                answer = self._failure(rid, request_id, bug)
            else:
                if log.isEnabledFor(logging.DEBUG):  # with the request's id, as _run logs it
                    contextvars.copy_context().run(_log_answered, request_id, len(answer.images))
        elif isinstance(exc, WorkerError):
            answer = wire.failed(rid, exc)
        else:
            answer = self._failure(rid, request_id, exc)
        conn.answer(answer)

    def _failure(self, rid: int, request_id: str, exc: BaseException) -> wire.Failed:
        """A bug's answer (503), logged with the HTTP request's id, as :meth:`_run` logs it."""
        contextvars.copy_context().run(_log_failure, request_id, exc)
        return wire.Failed(rid, ErrorKind.MODEL_FAILED, f"model process error: {type(exc).__name__}: {exc}", 1.0)

    def _cancel(self, conn: _Connection, rid: int) -> None:
        """The API process cancelled ``rid`` (its client went away), or its connection ended."""
        posting = conn.posted.pop(rid, None)
        if posting is not None:
            assert self.poster is not None
            self.poster.withdraw(posting)
            conn.answer(wire.Failed(rid, ErrorKind.CANCELLED, "cancelled by the API process"))
            return
        task = conn.tasks.get(rid)
        if task is not None:
            task.cancel()

    def _cancelled_unstarted(self, conn: _Connection, rid: int, task: asyncio.Task[None]) -> None:
        """A cancel read right behind its submit (both in one read) cancels the task before its first
        step, so ``_run``'s own ``except`` never runs: answer for it here, or the sender's slots never
        come back. (``_run`` catches a cancel once started, so its task ends cancelled only this way.)"""
        if task.cancelled():
            conn.tasks.pop(rid, None)
            conn.answer(wire.Failed(rid, ErrorKind.CANCELLED, "cancelled by the API process"))

    async def _run(self, conn: _Connection, msg: wire.Submit) -> None:
        set_request_id(msg.request_id)  # this task's log lines carry the HTTP request's id
        answer: wire.Done | wire.Failed
        try:
            views = iter(conn.pool.read([i for i in msg.slots if isinstance(i, int)]))
            pixels = [i if isinstance(i, EncodedImage) else next(views) for i in msg.slots]
            results = await self.model.submit(pixels, msg.keep_rate, msg.deadline, msg.min_keep_rate)
            answer = wire.pack_results(msg.id, results)
            log.debug("%d images answered", len(results))
        except asyncio.CancelledError:
            answer = wire.Failed(msg.id, ErrorKind.CANCELLED, "cancelled by the API process")
        except WorkerError as exc:
            answer = wire.failed(msg.id, exc)
        except Exception as exc:  # a bug here must not leave the API process waiting
            log.exception("request failed in the model process")
            answer = wire.Failed(msg.id, ErrorKind.MODEL_FAILED, f"model process error: {type(exc).__name__}: {exc}",
                                 1.0)
        finally:
            conn.tasks.pop(msg.id, None)
        conn.answer(answer)


def _log_failure(request_id: str, exc: BaseException) -> None:
    set_request_id(request_id)  # in a copied context: the connection's own log lines keep theirs
    log.error("request failed in the model process", exc_info=exc)


def _log_answered(request_id: str, images: int) -> None:
    set_request_id(request_id)
    log.debug("%d images answered", images)
