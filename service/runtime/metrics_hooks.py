"""The batching worker's hooks feeding the service's metrics (:mod:`service.metrics`).

Lives with the runtime, where the worker runs: the API processes, which only serve HTTP, never load it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from ..metrics import KEEP_LABELS, Metrics, observe_many
from ..protocol import ImageResult
from .costmodel import CostModel
from .seams import WorkerHooks


class PrometheusHooks(WorkerHooks):
    """Batching-worker hooks -> metrics. Called from the worker thread and the event loop, no lock held;
    prometheus_client is thread-safe. A batch's per-image values are recorded together
    (:func:`~service.metrics.observe_many`), and labelled children are looked up once."""

    def __init__(self, metrics: Metrics, dense_gflops: float, num_patches: int = 0) -> None:
        self.m = metrics
        self.dense_gflops = dense_gflops
        self.num_patches = num_patches  # of the grid, for the bounded tail bucket label
        self._depth = (metrics.queue_depth.labels("images"), metrics.queue_depth.labels("tokens"))
        m = metrics  # per phase: compute, size, tokens, queue wait
        self._phase = {p: (m.compute_seconds.labels(p), m.batch_size.labels(p), m.batch_tokens.labels(p),
                           m.queue_wait.labels(p)) for p in ("head", "tail")}

    def on_queue_depth(self, images: int, tokens: int) -> None:
        self._depth[0].set(images)
        self._depth[1].set(tokens)

    def on_batch(self, phase: str, size: int, tokens: int, bucket: str | None,
                 queue_waits_s: list[float], compute_s: float) -> None:
        m = self.m
        compute, sizes, batch_tokens, wait = self._phase.get(phase) or (
            m.compute_seconds.labels(phase), m.batch_size.labels(phase), m.batch_tokens.labels(phase),
            m.queue_wait.labels(phase))
        compute.observe(compute_s)
        sizes.observe(size)
        batch_tokens.observe(tokens)
        observe_many(wait, queue_waits_s)
        m.batches.labels(phase, self.bucket_label(bucket)).inc()

    def bucket_label(self, bucket: str | None) -> str:
        """``48-40-32`` -> the first count over the grid's patches, rounded up to a tenth (``0.3``)."""
        if not bucket or self.num_patches <= 0:
            return "none"
        try:
            first = int(bucket.split("-", 1)[0])
        except ValueError:
            return "none"
        tenths = min(10, max(1, math.ceil(first * 10 / self.num_patches - 1e-9)))
        return KEEP_LABELS[tenths - 1]

    def on_model_failure(self, reason: str) -> None:
        self.m.model_failures.labels(reason).inc()

    def on_waste(self, needed_tokens: int, computed_tokens: int) -> None:
        self.m.needed_tokens.inc(needed_tokens)
        self.m.computed_tokens.inc(computed_tokens)

    def on_reject(self, reason: str) -> None:
        self.m.reject(reason)

    def on_shape(self, phase: str, merged_images: int, padded_rows: int) -> None:
        if merged_images:
            self.m.merged_images.inc(merged_images)
        if padded_rows:
            self.m.padded_rows.labels(phase).inc(padded_rows)

    def on_cost_model(self, model: CostModel) -> None:
        for phase, fit in model.fits.items():
            self.m.cost_fixed.labels(phase).set(fit.fixed)
            self.m.cost_slope.labels(phase).set(fit.slope)

    def on_objective(self, met: bool) -> None:
        self.m.objective_answers.labels("true" if met else "false").inc()

    def on_image_done(self, result: ImageResult) -> None:
        self.on_images_done((result,))

    def on_images_done(self, results: Sequence[ImageResult]) -> None:
        if not results:
            return
        m = self.m
        m.last_inference.set(time.time())
        observe_many(m.served_keep_rate, [r.keep_rate for r in results])
        scaled = sum(1 for r in results if r.scaled)
        if scaled:
            m.scaled_images.inc(scaled)
        observe_many(m.image_compute, [r.compute_ms / 1000.0 for r in results])
        observe_many(m.kept_tokens, [r.counts[-1] for r in results])
        observe_many(m.image_flops, [r.gflops * 1e9 for r in results])
        if self.dense_gflops > 0:
            observe_many(m.budget_ratio, [r.gflops / self.dense_gflops for r in results])
