"""The batching worker's hooks feeding the service's metrics (:mod:`service.metrics`).

Lives with the runtime, where the worker runs: the API processes, which only serve HTTP, never load it.
"""

from __future__ import annotations

import math
import time

from ..metrics import KEEP_LABELS, Metrics
from ..protocol import ImageResult
from .costmodel import CostModel
from .seams import WorkerHooks


class PrometheusHooks(WorkerHooks):
    """Batching-worker hooks -> metrics. Called from the worker thread and the event loop, no lock held;
    prometheus_client is thread-safe."""

    def __init__(self, metrics: Metrics, dense_gflops: float, num_patches: int = 0) -> None:
        self.m = metrics
        self.dense_gflops = dense_gflops
        self.num_patches = num_patches  # of the grid, for the bounded tail bucket label

    def on_queue_depth(self, images: int, tokens: int) -> None:
        self.m.queue_depth.labels("images").set(images)
        self.m.queue_depth.labels("tokens").set(tokens)

    def on_batch(self, phase: str, size: int, tokens: int, bucket: str | None,
                 queue_waits_s: list[float], compute_s: float) -> None:
        self.m.compute_seconds.labels(phase).observe(compute_s)
        self.m.batch_size.labels(phase).observe(size)
        self.m.batch_tokens.labels(phase).observe(tokens)
        wait = self.m.queue_wait.labels(phase)
        for w in queue_waits_s:
            wait.observe(w)
        self.m.batches.labels(phase, self.bucket_label(bucket)).inc()

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
        self.m.last_inference.set(time.time())
        self.m.served_keep_rate.observe(result.keep_rate)
        if result.scaled:
            self.m.scaled_images.inc()
        self.m.image_compute.observe(result.compute_ms / 1000.0)
        self.m.kept_tokens.observe(result.counts[-1])
        self.m.image_flops.observe(result.gflops * 1e9)
        if self.dense_gflops > 0:
            self.m.budget_ratio.observe(result.gflops / self.dense_gflops)
