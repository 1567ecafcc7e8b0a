"""The messages between an API process and the model process, and their framing.

Frames on a Unix stream socket: a 4-byte little-endian length, then a pickled message (protocol 5).
Only small things travel here: descriptors naming shared-memory slots, the model card, status, and
results (probabilities, lives, budgets: a few KiB per image); pixels never do (:mod:`.slots`). A JPEG
the model process decodes itself (``ModelCard.decodes_jpeg``) travels inline in its Submit, as the
file's bytes (one copy into the frame: pickle protocol 5 writes ``bytes`` as they are). The
socket lives in a directory only this user can enter, and both ends are processes of one ``serve``.

Conversation: the model process sends :class:`Welcome` (the card, the status) on connect; the API
process answers :class:`Hello` (its slot pool, sized by the card's input shape); the model process then
sends :class:`StatusUpdate` whenever it changes and at least every ``HEARTBEAT_S``; each :class:`Submit` is
answered by exactly one :class:`Done` or :class:`Failed` (a :class:`Cancel` makes it a
``Failed("cancelled")`` unless the answer was on its way).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..protocol import (
    BadInput,
    DeadlinePassed,
    EncodedImage,
    ImageResult,
    ModelCard,
    ModelFailed,
    ModelStatus,
    QueueFull,
    WorkerError,
    WorkerStopping,
)

HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30  # a result is a few KiB per image, a Submit up to one request's files (PATCHLIFE_MAX_REQUEST_BYTES)
HEARTBEAT_S = 0.5


@dataclass(frozen=True)
class Hello:
    pid: int
    shm_name: str
    slots: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Welcome:
    card: ModelCard
    status: ModelStatus


@dataclass(frozen=True)
class StatusUpdate:
    status: ModelStatus


@dataclass(frozen=True)
class Submit:
    id: int
    slots: tuple[int | EncodedImage, ...]  # per image: its pixel slot, or the JPEG the model process decodes
    keep_rate: float | None
    deadline: float          # time.monotonic(): one clock for every process of the machine
    request_id: str
    min_keep_rate: float | None = None  # accuracy scaling's floor for this request (None: the server's)


@dataclass(frozen=True)
class Cancel:
    id: int


@dataclass(frozen=True)
class Done:
    id: int
    probs: np.ndarray        # [n, classes] float32
    lives: np.ndarray        # [n, rows, cols] float32
    rest: tuple[tuple[Any, ...], ...]  # per image: budget, counts, gflops, keep_rate, queue_ms, compute_ms,
    #                                    scaled, requested_keep_rate (ImageResult's order)


@dataclass(frozen=True)
class Failed:
    id: int
    kind: str                # a WorkerError class name, or "cancelled"
    message: str
    retry_after_s: float = 1.0


def pack_results(rid: int, results: list[ImageResult]) -> Done:
    probs = torch.stack([r.probs for r in results]).numpy()
    lives = torch.stack([r.lives for r in results]).numpy()
    rest = tuple((r.budget, r.counts, r.gflops, r.keep_rate, r.queue_ms, r.compute_ms, r.scaled,
                  r.requested_keep_rate) for r in results)
    return Done(rid, probs, lives, rest)


def unpack_results(done: Done) -> list[ImageResult]:
    probs, lives = torch.from_numpy(done.probs), torch.from_numpy(done.lives)
    return [ImageResult(probs[i], lives[i], *rest) for i, rest in enumerate(done.rest)]


def failed(rid: int, exc: BaseException) -> Failed:
    retry = getattr(exc, "retry_after_s", 1.0)
    return Failed(rid, type(exc).__name__, str(exc), float(retry))


def raise_failure(f: Failed) -> None:
    """The refusal the model process sent, raised as the same :class:`WorkerError` here."""
    if f.kind == "QueueFull":
        raise QueueFull(f.retry_after_s, f.message)
    if f.kind == "ModelFailed":
        raise ModelFailed(f.message, f.retry_after_s)
    kinds: dict[str, type[WorkerError]] = {"DeadlinePassed": DeadlinePassed, "WorkerStopping": WorkerStopping,
                                           "BadInput": BadInput}
    raise kinds.get(f.kind, ModelFailed)(f.message)


def send(writer: asyncio.StreamWriter, message: Any) -> None:
    """Queue one frame (one write call: frames of concurrent senders never interleave)."""
    body = pickle.dumps(message, protocol=5)
    writer.write(HEADER.pack(len(body)) + body)


async def receive(reader: asyncio.StreamReader) -> Any:
    """The next message; raises ``asyncio.IncompleteReadError`` at the end of the stream."""
    (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes: over {MAX_FRAME}")
    return pickle.loads(await reader.readexactly(n))
