"""The messages between an API process and the model process, and their framing.

Frames on a Unix stream socket: a 4-byte little-endian length, then one message as msgpack, encoded
and decoded by msgspec (``msgspec`` in pyproject.toml). Each message is a declared, tagged
:class:`msgspec.Struct`, and each direction has one typed decoder: :data:`TO_MODEL` reads only
:class:`Hello`, :class:`Submit` and :class:`Cancel`, :data:`TO_API` only :class:`Welcome`,
:class:`StatusUpdate` and :class:`Answers`. Every field is checked on arrival (types, enum values,
array sizes), so a malformed, truncated or wrong-direction frame is a :class:`WireError` that names
what was wrong, and ends that one connection, never an arbitrary object handed on. Why not pickle (the
wire before): unpickling runs whatever the bytes say (a process that can write to the socket could
run code in the other), it accepts any object, and it is several times slower for these small
messages (``python -m bench.wire``). msgspec is also what vLLM's API server and engine core speak.

Only small things travel here: descriptors naming shared-memory slots, the model card, status, and
results; pixels never do (:mod:`.slots`). A JPEG the model process decodes itself
(``ModelCard.decodes_jpeg``) travels inline in its Submit, as msgpack ``bin`` (one copy into the frame).
A request's result arrays (probabilities, lives: a few KiB per image) travel as raw float32 bytes, one
``bin`` per array (``[n, classes]``, ``[n, rows, cols]``), read back with ``np.frombuffer`` (no pickle);
the other fields of an image are a named :class:`ImageOut`, not a positional tuple. Copies of an array:
one into the frame (a one-image request's straight from the result tensor's memory; several images are
stacked first), the stream reader's when the frame is read, and one out of the frame, so that each
request's tensors are writable and their own: three for a one-image request, where the pickle framing
made five (stack, pickle, header + body, read, unpickle).

Conversation: the model process sends :class:`Welcome` (the card, the status) on connect; the API
process answers :class:`Hello` (its slot pool, sized by the card's input shape); the model process then
sends :class:`StatusUpdate` whenever it changes and at least every ``HEARTBEAT_S``; each :class:`Submit` is
answered by exactly one :class:`Done` or :class:`Failed` (a :class:`Cancel` makes it a ``Failed`` of
kind ``CANCELLED`` unless the answer was on its way). Answers go back in :class:`Answers` frames: the
host puts every answer that is ready in one turn of its event loop (a batch's requests end together)
in one frame per connection, so a batch of 16 one-image requests costs one frame and one write; the
API process matches them to its requests by id.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Sequence
from typing import TypeVar, cast

import msgspec
import numpy as np
import torch

from ..protocol import EncodedImage, ErrorKind, ImageResult, ModelCard, ModelStatus, WorkerError

HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30  # a result is a few KiB per image, a Submit up to one request's files (PATCHLIFE_MAX_REQUEST_BYTES)
HEARTBEAT_S = 0.5
FLOAT = np.dtype(np.float32)


class WireError(ValueError):
    """A frame that is not what this side accepts: malformed, too large, or meant for the other side."""


class _Record(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """Encoded as a msgpack array (field names are not sent); an extra element is an error, not ignored
    (both ends are one build of this module)."""


class Hello(_Record, tag=True, frozen=True):
    pid: int
    shm_name: str
    slots: int
    shape: tuple[int, ...]


class Welcome(_Record, tag=True, frozen=True):
    card: ModelCard
    status: ModelStatus


class StatusUpdate(_Record, tag=True, frozen=True):
    status: ModelStatus


class Submit(_Record, tag=True, frozen=True):
    id: int
    slots: tuple[int | EncodedImage, ...]  # per image: its pixel slot, or the JPEG the model process decodes
    keep_rate: float | None
    deadline: float          # time.monotonic(): one clock for every process of the machine
    request_id: str
    min_keep_rate: float | None = None  # accuracy scaling's floor for this request (None: the server's)


class Cancel(_Record, tag=True, frozen=True):
    id: int


class ImageOut(_Record, frozen=True, gc=False):
    """One image's :class:`~service.protocol.ImageResult` but its arrays (those are in :class:`Done`)."""

    budget: tuple[int, ...]
    counts: tuple[int, ...]
    gflops: float
    keep_rate: float
    queue_ms: float
    compute_ms: float
    scaled: bool
    requested_keep_rate: float | None


class Done(_Record, tag=True, frozen=True):
    """A request's results: the arrays of its ``n`` images as raw float32 bytes (sent from a view of the
    result tensors, read back into a buffer of their own: a writable tensor), the rest by name."""

    id: int
    probs: bytearray             # float32 [n, classes] (sent from a memoryview: both are msgpack bin)
    lives: bytearray             # float32 [n, rows, cols]
    grid: tuple[int, int]        # rows, cols
    images: list[ImageOut]


class Failed(_Record, tag=True, frozen=True):
    id: int
    kind: ErrorKind
    message: str
    retry_after_s: float | None = None


class Answers(_Record, tag=True, frozen=True):
    """Every answer ready in one turn of the host's event loop, for one connection."""

    items: list[Done | Failed]


ToModel = Hello | Submit | Cancel
ToApi = Welcome | StatusUpdate | Answers
Message = ToModel | ToApi
M = TypeVar("M")

TO_MODEL: msgspec.msgpack.Decoder[ToModel] = msgspec.msgpack.Decoder(ToModel)  # the model process reads these
TO_API: msgspec.msgpack.Decoder[ToApi] = msgspec.msgpack.Decoder(ToApi)        # an API process reads these


def _plain(value: object) -> object:
    """A numpy scalar that reached a message (a budget's count, a rate) as the Python number it holds."""
    if isinstance(value, np.generic):
        return value.item()
    raise NotImplementedError(f"{type(value).__name__} does not cross the wire")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_plain)


def _raw(tensors: list[torch.Tensor]) -> bytearray:
    """The tensors' float32 bytes, stacked: no copy for one image already contiguous float32 on the CPU
    (a memoryview of it, encoded as the bytearray the other side decodes), one copy for several."""
    t = tensors[0] if len(tensors) == 1 else torch.stack(tensors)
    if t.dtype != torch.float32 or not t.is_contiguous():
        t = t.float().contiguous()
    return cast(bytearray, t.numpy().data)


def _tensor(raw: bytearray, shape: tuple[int, ...]) -> torch.Tensor:
    if len(raw) != math.prod(shape) * FLOAT.itemsize or len(raw) == 0:
        raise WireError(f"an array of {len(raw)} bytes for float32 {list(shape)}")
    return torch.from_numpy(np.frombuffer(raw, FLOAT).reshape(shape))


def pack_results(rid: int, results: Sequence[ImageResult]) -> Done:
    if not results:
        return Done(rid, bytearray(), bytearray(), (0, 0), [])
    rows, cols = results[0].lives.shape
    return Done(rid, _raw([r.probs for r in results]), _raw([r.lives for r in results]), (int(rows), int(cols)),
                [ImageOut(tuple(r.budget), tuple(r.counts), r.gflops, r.keep_rate, r.queue_ms, r.compute_ms, r.scaled,
                          r.requested_keep_rate) for r in results])


def unpack_results(done: Done) -> list[ImageResult]:
    """The results of a decoded :class:`Done`; raises :class:`WireError` if an array's size is wrong."""
    n = len(done.images)
    if n == 0:
        return []
    classes = len(done.probs) // (n * FLOAT.itemsize)
    if n == 1:  # most requests: the tensors are the image's own, no views to cut
        probs: Sequence[torch.Tensor] = [_tensor(done.probs, (classes,))]
        lives: Sequence[torch.Tensor] = [_tensor(done.lives, done.grid)]
    else:
        probs, lives = _tensor(done.probs, (n, classes)).unbind(0), _tensor(done.lives, (n, *done.grid)).unbind(0)
    return [ImageResult(p, lv, i.budget, i.counts, i.gflops, i.keep_rate, i.queue_ms, i.compute_ms, i.scaled,
                        i.requested_keep_rate) for p, lv, i in zip(probs, lives, done.images, strict=True)]


def failed(rid: int, exc: WorkerError) -> Failed:
    kind = getattr(exc, "kind", ErrorKind.MODEL_FAILED)  # a WorkerError of no kind is a bug: 503, not a hang
    return Failed(rid, kind, str(exc), exc.retry_after_s)


def worker_error(f: Failed) -> WorkerError:
    """The refusal the model process sent, as the same :class:`WorkerError` (kind, message, Retry-After)."""
    return WorkerError.of(f.kind, f.message, f.retry_after_s)


def frame(message: Message) -> bytearray:
    """One message with its length header, encoded straight into one buffer (no concatenation)."""
    buf = bytearray(HEADER.size)
    _ENCODER.encode_into(message, buf, HEADER.size)
    n = len(buf) - HEADER.size
    if n > MAX_FRAME:
        raise WireError(f"a {type(message).__name__} of {n} bytes: over the {MAX_FRAME}-byte frame limit")
    HEADER.pack_into(buf, 0, n)
    return buf


def decode(body: bytes | bytearray | memoryview, decoder: msgspec.msgpack.Decoder[M]) -> M:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError too: a wrong tag names the other side's message
        raise WireError(f"malformed or unexpected message ({len(body)} bytes): {exc}") from None


def send(writer: asyncio.StreamWriter, message: Message) -> None:
    """Queue one frame (one write call: frames of concurrent senders never interleave). Each frame is a
    new buffer: the transport may keep a reference to what it could not send at once."""
    writer.write(frame(message))


async def receive(reader: asyncio.StreamReader, decoder: msgspec.msgpack.Decoder[M], limit: int = MAX_FRAME) -> M:
    """The next message, as ``decoder`` types it (:data:`TO_MODEL` or :data:`TO_API`); raises
    ``asyncio.IncompleteReadError`` at the end of the stream and :class:`WireError` for a bad frame."""
    (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if n > limit:
        raise WireError(f"frame of {n} bytes: over the {limit}-byte limit")
    return decode(await reader.readexactly(n), decoder)
