"""What crosses between the front end and the runtime: plain records and the runtime's refusals.

The front end (``service/frontend/``) reads these and never the worker's module; the runtime
(``service/runtime/worker.py``) makes them. Torch is named only for type checking: an
:class:`ImageResult` carries CPU tensors in this in-process transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class ImageResult:
    probs: torch.Tensor          # [num_classes] float32 CPU
    lives: torch.Tensor          # [rows, cols] float32 CPU, layer units
    budget: tuple[int, ...]      # the image's own patch counts per stage
    counts: tuple[int, ...]      # the counts its phase-B batch actually ran at (>= budget)
    gflops: float                # GFLOPs of the image at `counts`
    keep_rate: float
    queue_ms: float              # total time waiting in queues (phase A + phase B)
    compute_ms: float            # wall time of the phase-A batch + the phase-B batch it ran in


class WorkerError(Exception):
    """Why the worker could not answer a request; the routes turn each into its API error
    (:mod:`service.frontend.errors`: 503 overloaded / shutting down / model unavailable, 504)."""


class QueueFull(WorkerError):
    """The queue is full; try again in ``retry_after_s`` seconds (503 + Retry-After)."""

    def __init__(self, retry_after_s: float, message: str = "") -> None:
        super().__init__(message or f"server overloaded; retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class DeadlinePassed(WorkerError):
    """The request's deadline passed before its work started (504)."""


class WorkerStopping(WorkerError):
    """The worker is stopping and accepts no new work (503)."""


class ModelFailed(WorkerError):
    """The model failed this request's batch, or the model thread is down (503 + Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
