"""What crosses between the front end and the runtime: plain records, the runtime's refusals, and
the one interface the front end holds (:class:`ModelClient`).

The front end (``service/frontend/``) reads these and never imports the runtime. Two classes
implement :class:`ModelClient`: ``service/runtime/local.py`` (the model in this process: tests,
notebooks, ``PATCHLIFE_API_PROCESSES=0``) and ``service/transport/client.py`` (the model in a process
of its own, pixels through shared memory). The card, the status and an encoded image cross that
boundary as typed msgpack (``service/transport/wire.py``), so they are dataclasses of plain fields
(their dicts in JSON form: lists, not tuples, so that what arrives equals what was sent); a refusal
crosses as its :class:`ErrorKind`; torch is named only for type checking (an :class:`ImageResult`
carries CPU tensors, which travel as raw float32 buffers).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch


def json_form(value: Any) -> Any:
    """``value`` with every tuple a list (recursively, through dicts and lists): as JSON reads it back."""
    if isinstance(value, dict):
        return {k: json_form(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_form(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelCard:
    """What the front end knows of the served model, fixed once the checkpoint is loaded.

    ``info`` is the description /v1/models and /v2 metadata serve (JSON-able, without what warm-up
    changes: that is in :class:`ModelStatus`); ``preprocess`` the checkpoint's timm preprocessing config,
    from which the front end resizes and crops (it normalises nothing: the model process does that).
    """

    name: str
    info: dict[str, Any]
    class_names: tuple[str, ...]
    preprocess: dict[str, Any]
    grid: tuple[int, int]                  # patch rows, cols
    dense_gflops: float
    first_block: int                       # K: the block after which lives are predicted
    depth: int                             # L: the backbone's blocks
    checkpoint: str                        # its directory (the web page's examples live there)
    batch_classes: tuple[int, ...]         # the batch sizes the runtime pads to (Triton's config)
    decodes_jpeg: bool = False             # the model process decodes JPEGs on its device: send EncodedImage

    def __post_init__(self) -> None:
        # msgpack has no tuples: in JSON form here, the card that reaches an API process equals this one
        object.__setattr__(self, "info", json_form(self.info))
        object.__setattr__(self, "preprocess", json_form(self.preprocess))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(3, H, W)`` of one preprocessed image: the size of a shared-memory pixel slot."""
        size = self.preprocess["input_size"]
        return 3, int(size[-2]), int(size[-1])


@dataclass(frozen=True)
class EncodedImage:
    """A JPEG the front end did not decode (``ModelCard.decodes_jpeg``): its header passed the limits
    there; the model process decodes it, in a batch on its device. ``source`` names it in errors."""

    data: bytes
    source: str


class Lifecycle(enum.IntEnum):
    """One state for the model and one for each front end; ordered, so ``state >= DRAINING`` reads as
    "from the drain on".

    LOADING: checkpoint loading or warming up (503 not ready).  READY: serving.  STOPPING: SIGTERM
    received, /readyz 503, requests still served (``shutdown_delay_s``).  DRAINING: new requests 503
    with ``Connection: close``, those in flight finish.  GRACE_OVER: the grace ended, requests still
    decoding stop.  STOPPED: nothing runs.  FAILED: the start failed (the reason is kept).
    """

    LOADING = 0
    READY = 1
    STOPPING = 2
    DRAINING = 3
    GRACE_OVER = 4
    STOPPED = 5
    FAILED = 6


def advance(current: Lifecycle, target: Lifecycle) -> Lifecycle:
    """The one transition rule of every :class:`Lifecycle` (the model's, the worker's, each front end's):
    forward only, so a late event (a warm-up ending during the drain, a stop after a failure) never
    undoes a later state; FAILED, the last, is final."""
    return target if target > current else current


@dataclass(frozen=True)
class ModelStatus:
    """The model's side of readiness, cheap to read (the transport caches the last one it was sent).

    problem: why a started model cannot serve right now (its thread died, batches keep failing, a batch
    hangs, the model process is stalled or gone); None while it can. detail: what warm-up did (graphs, cost
    model). live: False when it never will again without a restart (its process is gone, or stalled past
    PATCHLIFE_MODEL_STALL_EXIT_S): ``/healthz`` then answers 503.
    """

    state: Lifecycle = Lifecycle.LOADING
    error: str | None = None               # FAILED: why the start failed
    problem: str | None = None
    warmup_seconds: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    live: bool = True


class ModelClient(Protocol):
    """The front end's only handle on the model, in this process or in another.

    ``open`` returns the card (raising the load error), ``start`` warms up and starts serving (the app
    runs it in the background; an exception becomes ``status().error``), ``submit`` runs images through
    the batching worker (raising the :class:`WorkerError` kinds below): each a preprocessed ``uint8
    [3, H, W]`` tensor, or, where the card says ``decodes_jpeg``, a JPEG still encoded; ``min_keep_rate``
    is how far accuracy scaling may lower the keep rate (None: the server's floor, or no scaling below an
    explicit ``keep_rate``). ``clock`` is the clock deadlines
    are on: the system-wide monotonic clock, the same in every process.
    """

    async def open(self) -> ModelCard: ...

    async def start(self) -> None: ...

    def status(self) -> ModelStatus: ...

    def clock(self) -> float: ...

    async def submit(self, pixels: Sequence[torch.Tensor | EncodedImage], keep_rate: float | None,
                     deadline: float, min_keep_rate: float | None = None) -> list[ImageResult]: ...

    def begin_drain(self) -> None: ...

    async def stop(self, grace_s: float | None = None) -> None: ...


@dataclass
class ImageResult:
    probs: torch.Tensor          # [num_classes] float32 CPU
    lives: torch.Tensor          # [rows, cols] float32 CPU, layer units
    budget: tuple[int, ...]      # the image's own patch counts per stage
    counts: tuple[int, ...]      # the counts its tail batch actually ran at (>= budget)
    gflops: float                # GFLOPs of the image at `counts`
    keep_rate: float
    queue_ms: float              # total time waiting in queues (head + tail)
    compute_ms: float            # wall time of the head batch + the tail batch it ran in
    scaled: bool = False         # run below its requested keep rate (accuracy scaling under load)
    requested_keep_rate: float | None = None  # the rate asked for (None: keep_rate, i.e. not scaled)


class ErrorKind(enum.IntEnum):
    """Why the model could not answer a request: one value per :class:`WorkerError` class, the same in
    every process. It is what crosses the wire (``service/transport/wire.py``: a small int, checked
    against this enum on arrival) and what the front end turns into an HTTP or gRPC status
    (``service/frontend/errors.py``), so no class names are passed around as strings."""

    BAD_INPUT = 1     # an image the model process could not decode: 400 bad_image
    QUEUE_FULL = 2    # 503 overloaded + Retry-After
    DEADLINE = 3      # 504 deadline_exceeded
    STOPPING = 4      # 503 shutting_down
    MODEL_FAILED = 5  # 503 model_unavailable + Retry-After
    CANCELLED = 6     # the API process withdrew the request (its client left): 499, nobody reads it


class WorkerError(Exception):
    """Why the worker could not answer a request; the routes turn each into its API error
    (:mod:`service.frontend.errors`: 503 overloaded / shutting down / model unavailable, 504, 400 bad image).

    Each subclass names its :class:`ErrorKind`; :meth:`of` builds the subclass of a kind back (the
    transport raises in the API process what the model process raised). ``retry_after_s``: the
    Retry-After to send, where the refusal has one (None otherwise)."""

    kind: ClassVar[ErrorKind]
    retry_after_s: float | None = None
    _classes: ClassVar[dict[ErrorKind, type[WorkerError]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None:
            if kind in WorkerError._classes:
                raise TypeError(f"{kind!r} already names {WorkerError._classes[kind].__name__}")
            WorkerError._classes[kind] = cls

    @classmethod
    def _rebuild(cls, message: str, retry_after_s: float | None) -> WorkerError:
        return cls(message)

    @staticmethod
    def of(kind: ErrorKind, message: str, retry_after_s: float | None = None) -> WorkerError:
        """The refusal of ``kind`` with this message (and Retry-After, for the kinds that have one)."""
        return WorkerError._classes[ErrorKind(kind)]._rebuild(message, retry_after_s)


class QueueFull(WorkerError):
    """The queue is full; try again in ``retry_after_s`` seconds (503 + Retry-After)."""

    kind = ErrorKind.QUEUE_FULL
    retry_after_s: float

    def __init__(self, retry_after_s: float, message: str = "") -> None:
        super().__init__(message or f"server overloaded; retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s

    @classmethod
    def _rebuild(cls, message: str, retry_after_s: float | None) -> WorkerError:
        return cls(1.0 if retry_after_s is None else retry_after_s, message)


class DeadlinePassed(WorkerError):
    """The request's deadline passed before its work started (504)."""

    kind = ErrorKind.DEADLINE


class WorkerStopping(WorkerError):
    """The worker is stopping and accepts no new work (503)."""

    kind = ErrorKind.STOPPING


class ModelFailed(WorkerError):
    """The model failed this request's batch, or the model thread is down (503 + Retry-After)."""

    kind = ErrorKind.MODEL_FAILED
    retry_after_s: float

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @classmethod
    def _rebuild(cls, message: str, retry_after_s: float | None) -> WorkerError:
        return cls(message, 1.0 if retry_after_s is None else retry_after_s)


class BadInput(WorkerError):
    """An image the model process could not decode (a corrupt JPEG whose header looked fine): 400
    bad_image for that request only, as the CPU path answers it."""

    kind = ErrorKind.BAD_INPUT


class Cancelled(WorkerError):
    """The API process withdrew the request (its client went away) before it was answered: the model
    process's acknowledgement, which gives the request's pixel slots back; nobody waits for it (499)."""

    kind = ErrorKind.CANCELLED
