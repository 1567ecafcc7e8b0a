"""The worker's two seams, typed: the model it drives (:class:`ModelEngine`) and the observer it
reports to (:class:`WorkerHooks`).

:class:`service.runtime.engine.Engine` fills the first and the tests' stub engines implement it;
``service/metrics.py`` subclasses the second. Both load without the worker's loop or the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from service.protocol import ImageResult
from service.runtime.batching import Counts
from service.runtime.costmodel import CostModel
from service.runtime.handoff import HeadBatch, HostCopy, Rows


class ModelEngine(Protocol):
    """What the worker needs from the model. Counts are patches kept per pruning stage."""

    @property
    def head_tokens(self) -> int:
        """Tokens one image costs in the head (prefix + patches, times the first K blocks)."""

    @property
    def asynchronous(self) -> bool:
        """True when ``head``/``tail`` only queue work and their copies are waited for when read."""

    def head(self, pixels: Sequence[torch.Tensor], keep_rates: Sequence[float | None],
             extra_rates: Sequence[float] = ()) -> HeadBatch:
        """The head for one ``uint8 [3, H, W]`` tensor per image; buckets assigned with the budgets (and,
        for accuracy scaling, at each of ``extra_rates``: ``HeadBatch.at_rate``)."""

    def tail(self, parts: Sequence[Rows], counts: Sequence[int]) -> HostCopy:
        """The tail at ``counts``: probabilities ``[n, K]``, rows in part order."""

    def schedule_counts(self, keep_rate: float | None) -> Counts: ...

    def tail_tokens(self, counts: Counts) -> int: ...

    def gflops(self, counts: Counts) -> float: ...

    def padded_rows(self, n: int) -> int: ...


class WorkerHooks:
    """No-op observer of the worker; ``service/metrics.py`` subclasses it. Keep overrides cheap and
    thread-safe: they are called from the worker thread (``on_reject`` and ``on_queue_depth`` from the
    event loop too), with no lock held."""

    def on_queue_depth(self, images: int, tokens: int) -> None: ...

    def on_batch(self, phase: str, size: int, tokens: int, bucket: str | None,
                 queue_waits_s: list[float], compute_s: float) -> None: ...

    def on_waste(self, needed_tokens: int, computed_tokens: int) -> None: ...

    def on_shape(self, phase: str, merged_images: int, padded_rows: int) -> None:
        """A batch ran ``merged_images`` images above their own bucket and ``padded_rows`` padding rows."""

    def on_cost_model(self, model: CostModel) -> None:
        """The cost model was refitted (after warm-up timings, then every batch)."""

    def on_reject(self, reason: str) -> None: ...

    def on_image_done(self, result: ImageResult) -> None: ...

    def on_images_done(self, results: Sequence[ImageResult]) -> None:
        """The images answered in one round of the worker (a batch's, usually): ``on_image_done`` for
        each, unless overridden to record them at once (the metrics do)."""
        for result in results:
            self.on_image_done(result)

    def on_objective(self, met: bool) -> None:
        """A request was answered while a latency objective is set; ``met``: within it."""

    def on_model_failure(self, reason: str) -> None:
        """``out_of_memory`` (a batch hit it; it is split and retried), ``batch_error`` (a batch failed
        and its requests were answered 503), ``worker_died`` (the model thread ended on an error)."""
