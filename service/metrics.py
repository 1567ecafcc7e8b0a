"""Every Prometheus metric of the service, in its own registry (names fixed by the shared contract).

Conventions: prefix ``patchlife_``, base units (seconds, bytes), ``_total`` on counters, histograms
and no summaries, bounded labels (HTTP routes by template, unknown ones as ``unmatched``; methods
outside the standard set as ``other``), labelled series created at 0 where the label values are
known in advance. Device memory is read when Prometheus scrapes, by a custom collector.

Feeding: the front end's front door (``record_http``: latency; ``http_in_flight``), the routes (decode
time, rejections of bad input, through the error handlers), and ``PrometheusHooks``
(``service/runtime/metrics_hooks.py``) for everything the batching worker sees.

With API processes beside the model process, each process calls ``enable_multiprocess`` (see
``metrics_dir.py``) before it makes its :class:`Metrics`, and its series go to memory-mapped files in
one directory; whichever process answers a scrape merges them. Counters and histograms are summed over
every process that ever wrote (a dead process's counts stay), and every gauge has a mode that shows
one value without a ``pid`` label. Callbacks read at scrape time (health, CUDA graphs, device
memory) cannot cross processes: there the model process samples them into plain gauges from its
heartbeat (:meth:`Metrics.sample`).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

import prometheus_client
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .metrics_dir import cleanup_multiprocess, enable_multiprocess, mark_process_dead, multiprocess_dir

__all__ = ["Metrics", "record_http", "observe_many", "DeviceMemoryCollector", "enable_multiprocess",
           "multiprocess_dir", "mark_process_dead", "cleanup_multiprocess"]

# Text exposition format 0.0.4: understood by every Prometheus (the client's default now says 1.0.0).
log = logging.getLogger("patchlife.http")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REJECT_REASONS = ("bad_image", "unsupported_media_type", "invalid_request", "too_large", "too_many_images",
                  "image_too_many_pixels", "request_too_many_pixels", "overloaded", "deadline", "disconnected",
                  "shutdown", "model_error", "read_timeout", "unauthorized")
FAILURE_REASONS = ("out_of_memory", "batch_error", "worker_died")
# Images the GPU decoder handed to the CPU path: another format, a JPEG nvJPEG refused, a GPU decode error.
DECODE_FALLBACK_REASONS = ("not_jpeg", "refused", "error")
PHASES = ("head", "tail")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# scope key set by the HTTP protocol (service/frontend/http_protocol.py) when the client closed the connection
# before its answer was complete: "before" (nothing sent yet: no access log line) or "during" (the answer)
CLIENT_GONE_KEY = "patchlife.client_gone"
CLIENT_CLOSED = 499  # nginx's "client closed request": what a request whose client left is counted as
# Tail batches are labelled by their first pruned stage's patch count over the grid's patches, rounded
# up to a tenth: at most 10 values, whatever the bucket grid (the counts themselves are unbounded).
KEEP_LABELS = tuple(f"{i / 10:.1f}" for i in range(1, 11))

# From 100 us: a GPU batch or a queue wait often takes well under a millisecond.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = tuple(float(2**i) for i in range(6, 25))  # 64 .. 16M tokens per batch
KEPT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 196, 256, 384, 576, 1024, 2048)
RATIO_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
# The keep rates accuracy scaling serves lie on tenths (its ladder, service/runtime/scaling.py), plus a
# request's own rate or floor: a bucket at each tenth (`le="0.3"` counts images served at 0.3 or below).
KEEP_RATE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
FLOPS_BUCKETS = tuple(g * 1e9 for g in (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0,
                                        20.0, 35.0, 50.0, 100.0))

# `_created` series double the output and confuse dashboards; this client-wide switch is the only one.
prometheus_client.disable_created_metrics()

# How a gauge aggregates over processes (ignored in-process). The "all" modes would add a ``pid`` label
# (the dashboard would need a sum), and every process's Metrics() writes 0 into each unlabelled or
# pre-created gauge, so a model-process gauge needs a mode that those zeros do not change. "live"
# modes drop a process's values when it is marked dead.
SUM_LIVE: Final = "livesum"  # additive over the processes alive: requests in flight, queue depth, graphs
MAX_LIVE: Final = "livemax"  # one writer (the model process) against the API processes' zeros: health, build, costs
MAX_EVER: Final = "max"  # a fact that outlives its process: the last inference


class DeviceMemoryCollector(Collector):
    """``patchlife_device_memory_{allocated,reserved}_bytes{device}`` read at scrape time (0 on the CPU)."""

    def __init__(self) -> None:
        self.device: torch.device | None = None  # set once the engine is loaded

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        allocated, reserved = self._families()
        read = self.read()
        if read is not None:
            allocated.add_metric([str(self.device)], read[0])
            reserved.add_metric([str(self.device)], read[1])
        yield allocated
        yield reserved

    def read(self) -> tuple[float, float] | None:
        """(allocated, reserved) bytes on the model's device now; None before the engine is loaded."""
        dev = self.device
        if dev is None:
            return None
        if dev.type == "cuda":
            return float(torch.cuda.memory_allocated(dev)), float(torch.cuda.memory_reserved(dev))
        return 0.0, 0.0

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("patchlife_device_memory_allocated_bytes",
                                  "Device memory held by tensors (torch allocator), bytes.", labels=["device"]),
                GaugeMetricFamily("patchlife_device_memory_reserved_bytes",
                                  "Device memory reserved by the torch caching allocator, bytes.",
                                  labels=["device"]))


class Metrics:
    """The registry and every metric in it; the aggregate of every process's when multiprocess is on."""

    def __init__(self) -> None:
        self.shared_dir = multiprocess_dir()  # fixed for this object's life: its values live there or here
        r = self.registry = CollectorRegistry()
        self.http_duration = Histogram(
            "patchlife_http_request_duration_seconds", "HTTP request latency by route template, method, status.",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_in_flight = Gauge("patchlife_http_requests_in_flight", "HTTP requests being served.",
                                    registry=r, multiprocess_mode=SUM_LIVE)
        self.decode_seconds = Histogram("patchlife_image_decode_seconds",
                                        "Image decode + preprocess time per image.", buckets=LATENCY_BUCKETS,
                                        registry=r)
        self.compute_seconds = Histogram("patchlife_model_compute_seconds",
                                         "Model time per batch (synchronised on a GPU).", ["phase"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("patchlife_rejected_requests_total", "Requests rejected, by reason.",
                                ["reason"], registry=r)
        self.kept_tokens = Histogram("patchlife_image_kept_tokens",
                                     "Patch tokens alive in the last stage, at the counts run, per image.",
                                     buckets=KEPT_BUCKETS, registry=r)
        self.budget_ratio = Histogram("patchlife_image_budget_ratio",
                                      "Image FLOPs over the dense backbone's FLOPs.",
                                      buckets=RATIO_BUCKETS, registry=r)
        self.image_flops = Histogram("patchlife_image_flops", "FLOPs per image at the counts run.",
                                     buckets=FLOPS_BUCKETS, registry=r)
        self.build_info = Gauge("patchlife_build_info", "Always 1; labels describe the running build.",
                                ["version", "model", "device", "dtype"], registry=r, multiprocess_mode=MAX_LIVE)
        self.queue_wait = Histogram("patchlife_queue_wait_seconds", "Time an image waited for its batch.",
                                    ["phase"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("patchlife_batch_size", "Images per batch.", ["phase"],
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("patchlife_batch_tokens", "Tokens per batch (block sequence lengths "
                                      "summed over the batch's blocks and images).", ["phase"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.needed_tokens = Counter("patchlife_needed_tokens_total",
                                     "Tail tokens the images' own budgets needed.", registry=r)
        self.computed_tokens = Counter("patchlife_computed_tokens_total",
                                       "Tail tokens computed (budgets rounded up to their batch's bucket).",
                                       registry=r)
        self.batches = Counter("patchlife_batches_total", "Batches run, by phase and budget bucket (tail: first "
                               "pruned stage's patches over the grid's, rounded up to 0.1; head: none).",
                               ["phase", "bucket"], registry=r)
        self.model_failures = Counter("patchlife_model_failures_total", "Model failures: out_of_memory (a batch "
                                      "hit it and was split), batch_error (a batch failed, its requests got 503), "
                                      "worker_died (the model thread stopped).", ["reason"], registry=r)
        self.model_healthy = Gauge("patchlife_model_healthy", "1 while the model thread can serve (what /readyz "
                                   "checks besides start-up and shutdown), 0 otherwise.", registry=r,
                                   multiprocess_mode=MAX_LIVE)
        self.queue_depth = Gauge("patchlife_queue_depth", "Queued work, in images and in tail tokens.", ["unit"],
                                 registry=r, multiprocess_mode=SUM_LIVE)
        self.merged_images = Counter("patchlife_merged_images_total",
                                     "Images whose phase-B batch ran above their own bucket (merged by the "
                                     "planner).", registry=r)
        self.padded_rows = Counter("patchlife_padded_rows_total", "Padding rows added to reach a captured "
                                   "batch-size class (CUDA graphs).", ["phase"], registry=r)
        self.cost_fixed = Gauge("patchlife_cost_model_fixed_seconds", "The batch cost model's fixed part per "
                                "call, by phase.", ["phase"], registry=r, multiprocess_mode=MAX_LIVE)
        self.cost_slope = Gauge("patchlife_cost_model_unit_seconds", "The batch cost model's part per unit of "
                                "work: per image (head), per tail token (tail).", ["phase"], registry=r,
                                multiprocess_mode=MAX_LIVE)
        self.graphs_captured = Gauge("patchlife_cuda_graphs_captured", "CUDA graphs captured at warm-up.",
                                     registry=r, multiprocess_mode=SUM_LIVE)
        self.graph_capture_seconds = Gauge("patchlife_cuda_graph_capture_seconds",
                                           "Time spent capturing CUDA graphs at warm-up.", registry=r,
                                           multiprocess_mode=SUM_LIVE)
        self.graph_memory = Gauge("patchlife_cuda_graph_memory_bytes",
                                  "Device memory reserved while capturing CUDA graphs.", registry=r,
                                  multiprocess_mode=SUM_LIVE)
        self.eager_fallbacks = Gauge("patchlife_eager_fallbacks", "Batches whose shape had no captured graph "
                                     "and ran eagerly (since start).", registry=r, multiprocess_mode=SUM_LIVE)
        self.grpc_duration = Histogram(
            "patchlife_grpc_request_duration_seconds", "gRPC call latency (Open Inference Protocol v2) by method "
            "and status code.", ["method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.encode_seconds = Histogram("patchlife_output_encode_seconds", "Time to encode a v2 inference "
                                        "answer's output tensors (REST and gRPC).", buckets=LATENCY_BUCKETS,
                                        registry=r)
        self.image_compute = Histogram("patchlife_image_compute_seconds", "Wall time of the two model batches "
                                       "(phase A, phase B) an image ran in, per image answered.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.last_inference = Gauge("patchlife_last_inference_timestamp_seconds", "Unix time at which the last "
                                    "image was answered by the model.", registry=r,
                                    multiprocess_mode=MAX_EVER)
        self.decode_fallbacks = Counter("patchlife_decode_fallbacks", "Images the GPU decoder passed to the CPU "
                                        "path, by reason: not_jpeg, refused (nvJPEG refused the file), error.",
                                        ["reason"], registry=r)
        self.served_keep_rate = Histogram("patchlife_served_keep_rate", "Keep rate each answered image ran at "
                                          "(below its requested rate when accuracy scaling lowered it).",
                                          buckets=KEEP_RATE_BUCKETS, registry=r)
        self.scaled_images = Counter("patchlife_scaled_images", "Images answered below their requested keep rate "
                                     "(accuracy scaling under load).", registry=r)
        self.objective_answers = Counter("patchlife_objective_answers", "Requests answered while a latency "
                                         "objective is set (PATCHLIFE_LATENCY_OBJECTIVE_MS), by whether the "
                                         "answer came within it (met: true/false).", ["met"], registry=r)
        for met in ("true", "false"):
            self.objective_answers.labels(met)
        self.device_memory = DeviceMemoryCollector()
        self.memory_gauges: tuple[Gauge, Gauge] | None = None  # multiprocess: sampled, not read at scrape
        if self.shared_dir is None:
            r.register(self.device_memory)
        else:
            self.memory_gauges = tuple(  # type: ignore[assignment]
                Gauge(f.name, f.documentation, ["device"], registry=r, multiprocess_mode=SUM_LIVE)
                for f in DeviceMemoryCollector._families())
        self._watched: list[Callable[[], None]] = []  # multiprocess: callbacks that sample() runs
        self._exposed = r
        if self.shared_dir is not None:
            self._exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._exposed, path=str(self.shared_dir))
        self._init_series()

    def _init_series(self) -> None:
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for phase in PHASES:
            for metric in (self.compute_seconds, self.queue_wait, self.batch_size, self.batch_tokens):
                metric.labels(phase)
        self.batches.labels("head", "none")
        for keep in KEEP_LABELS:
            self.batches.labels("tail", keep)
        for reason in FAILURE_REASONS:
            self.model_failures.labels(reason)
        for reason in DECODE_FALLBACK_REASONS:
            self.decode_fallbacks.labels(reason)
        for unit in ("images", "tokens"):
            self.queue_depth.labels(unit)
        for phase in PHASES:
            for metric in (self.padded_rows, self.cost_fixed, self.cost_slope):  # type: ignore[assignment]
                metric.labels(phase)

    def _graph_gauges(self) -> tuple[tuple[Gauge, str], ...]:
        return ((self.graphs_captured, "captured"), (self.graph_capture_seconds, "capture_seconds"),
                (self.graph_memory, "capture_bytes"), (self.eager_fallbacks, "eager_fallbacks"))

    def set_graphs(self, describe: Callable[[], Mapping[str, Any]] | Mapping[str, Any]) -> None:
        """After warm-up: the engine's ``ShapeRunner.describe`` (read at each scrape, or at each
        :meth:`sample` in multiprocess mode), or one reading of it (a dict) to set now."""
        if isinstance(describe, Mapping):
            for gauge, key in self._graph_gauges():
                gauge.set(float(describe[key]))
            return
        read: Callable[[], Mapping[str, Any]] = describe
        if self.shared_dir is not None:
            self._watch(lambda: self.set_graphs(read()))
        else:
            for gauge, key in self._graph_gauges():
                gauge.set_function(lambda key=key: float(read()[key]))  # type: ignore[misc]

    def set_model(self, version: str, model: str, device: str, dtype: str) -> None:
        """Called once the model's card is known (every front end): the build info."""
        if self.shared_dir is None:  # (multiprocess: called once per process; clear() is not supported)
            self.build_info.clear()
        self.build_info.labels(version, model, device, dtype).set(1)

    def watch_device(self, device: torch.device) -> None:
        """Called where the engine is loaded (the model process): the device whose memory is reported.
        Never in an API process: reading a CUDA device's memory would open a CUDA context there."""
        self.device_memory.device = device
        self.sample_device_memory()

    def watch_health(self, healthy: Callable[[], bool]) -> None:
        """``patchlife_model_healthy`` is read from ``healthy()`` at scrape time (at each :meth:`sample`
        in multiprocess mode, where a scrape runs in another process)."""
        if self.shared_dir is not None:
            self._watch(lambda: self.set_healthy(healthy()))
        else:
            self.model_healthy.set_function(lambda: 1.0 if healthy() else 0.0)

    def set_healthy(self, healthy: bool) -> None:
        """Set ``patchlife_model_healthy`` now (ignored once :meth:`watch_health` reads a callback in-process)."""
        self.model_healthy.set(1.0 if healthy else 0.0)

    def _watch(self, sample: Callable[[], None]) -> None:
        self._watched.append(sample)
        sample()

    def sample_device_memory(self) -> None:
        """Multiprocess mode: copy the device's allocator memory into its gauges (the model process's
        heartbeat calls this). In-process the collector reads it at scrape time, so this does nothing."""
        read = self.device_memory.read()
        if self.memory_gauges is None or read is None:
            return
        for gauge, value in zip(self.memory_gauges, read):
            gauge.labels(str(self.device_memory.device)).set(value)

    def sample(self) -> None:
        """Multiprocess mode: what a scrape would read from callbacks (health, CUDA graphs, device
        memory), written into the gauges now; the model process's heartbeat calls it about once a second."""
        for watched in self._watched:
            watched()
        self.sample_device_memory()

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def decode_fallback(self, reason: str) -> None:
        """An image the GPU decoder passed to the CPU path; ``reason`` is one of DECODE_FALLBACK_REASONS."""
        if reason not in DECODE_FALLBACK_REASONS:
            raise ValueError(f"unknown decode fallback reason {reason!r}")
        self.decode_fallbacks.labels(reason).inc()

    def collect(self) -> Iterable[Metric]:
        """Every family as a scrape sees it: this registry, or the whole directory in multiprocess mode."""
        return self._exposed.collect()

    def exposition(self) -> bytes:
        return generate_latest(self._exposed)


def observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """``histogram.observe(v)`` for every one of ``values`` (a histogram with no labels, or one child),
    with one write per bucket touched and one for the sum, instead of two writes per value.

    Why: with API processes every write is a store into a memory-mapped file behind a pid check, and
    the batching worker observes several per image (queue waits, per-image sizes and FLOPs); a batch's
    values fall in a few buckets. It relies on prometheus_client's histogram internals (``_upper_bounds``,
    ``_buckets``, ``_sum``), checked by tests/service/test_metrics.py; without them it observes one by one.
    """
    bounds, buckets, total = (getattr(histogram, n, None) for n in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:
        for v in values:
            histogram.observe(v)
        return
    counts: dict[int, int] = {}
    added = 0.0
    for v in values:
        if v != v:  # NaN: in no bucket, the sum NaN, as observe() does
            histogram.observe(v)
            continue
        i = bisect.bisect_left(bounds, v)  # the first bound >= v: observe()'s "amount <= bound"
        counts[i] = counts.get(i, 0) + 1
        added += v
    if counts:
        total.inc(added)
        for i, n in counts.items():
            buckets[i].inc(n)


def record_http(metrics: Metrics, scope: Mapping[str, Any], status: int, seconds: float) -> None:
    """One HTTP request's latency by route template/method/status (called by the front door,
    ``service/frontend/front_door.py``, once the app has answered).

    The router stores the matched route in ``scope["route"]``, so the template (``/classify``) is read
    after the call; nothing that did not match a route gets its raw path as a label. A request whose
    client closed the connection before its answer was complete (during the upload, in the queue, or
    while the answer was written) is counted as 499, whatever the app answered, with one INFO line
    when no access line was written for it: a client's doing, not a 5xx.
    """
    gone = scope.get(CLIENT_GONE_KEY)
    if gone is not None:
        if gone == "before":
            log.info("%s %s: the client closed the connection before its answer (%d)",
                     scope.get("method"), scope.get("path"), CLIENT_CLOSED)
        status = CLIENT_CLOSED
    route = getattr(scope.get("route"), "path", None) or "unmatched"
    method = scope.get("method", "GET") if scope.get("method") in HTTP_METHODS else "other"
    metrics.http_duration.labels(route, method, str(status)).observe(seconds)
