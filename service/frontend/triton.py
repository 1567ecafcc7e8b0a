"""Triton's model configuration and statistics extensions, as JSON (REST) and the same dicts over gRPC.

Neither is written by hand: the configuration comes from the engine's description and the settings
(the tensors from ``oip.tensor_specs``, the table the model metadata is built from too), and the
statistics are read from the Prometheus registry, so they count exactly the events the
``patchlife_*`` series count (one source, nothing counted twice):

  success / fail   inference requests answered 200 / anything else, and their time from arrival to
                   answer: /classify, /explain and the v2 infer routes
                   (``patchlife_http_request_duration_seconds``) plus gRPC ModelInfer
                   (``patchlife_grpc_request_duration_seconds``)
  inference_count  images the model answered (``patchlife_image_compute_seconds``)
  execution_count  model executions: phase-A batches (``patchlife_batch_size``)
  queue, compute_input, compute_infer, compute_output
                   counted per image the model answered (perf_analyzer requires the three compute
                   counts to be equal), with the time of: the waits for the phase-A and phase-B
                   batches (``patchlife_queue_wait_seconds``); decoding + preprocessing
                   (``patchlife_image_decode_seconds``, every image decoded); the two batches each
                   image ran in, as Triton counts a batch's time for each of its requests
                   (``patchlife_image_compute_seconds``); encoding v2 answers' output tensors
                   (``patchlife_output_encode_seconds``; /classify's JSON is not counted).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from ..metrics import Metrics
from ..protocol import ModelCard
from ..settings import Settings
from .oip import PLATFORM, VERSION, tensor_specs

BACKEND = "patchlife"
DATA_TYPES = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32", "INT32": "TYPE_INT32"}
INFERENCE_ROUTES = frozenset({"/classify", "/explain", "/v2/models/{name}/infer",
                              "/v2/models/{name}/versions/{version}/infer"})
GRPC_INFER = "ModelInfer"


def model_config(card: ModelCard, settings: Settings) -> dict[str, Any]:
    """``GET /v2/models/{name}/config``: Triton's ``ModelConfig`` as JSON (its proto field names).

    ``max_batch_size`` is what one request may carry (``PATCHLIFE_MAX_IMAGES_PER_REQUEST``), so each
    tensor's ``dims`` leave the batch dimension out; the preferred batch sizes are the batch-size
    classes the engine pads to (and captures CUDA graphs for) up to ``PATCHLIFE_MAX_BATCH_SIZE``.
    """
    inputs, outputs = tensor_specs(card.info)
    return {
        "name": card.name, "platform": PLATFORM, "backend": BACKEND,
        "max_batch_size": settings.max_images_per_request,
        "input": [{"name": t.name, "data_type": DATA_TYPES[t.datatype], "dims": list(t.dims), "optional": True}
                  for t in inputs],  # either input, or both
        "output": [{"name": t.name, "data_type": DATA_TYPES[t.datatype], "dims": list(t.dims)} for t in outputs],
        "dynamic_batching": {"preferred_batch_size": list(card.batch_classes),
                             "max_queue_delay_microseconds": round(settings.max_delay_ms * 1000)},
    }


class _Samples:
    """Every sample in the registry, summed by name over the labels a predicate accepts."""

    def __init__(self, metrics: Metrics) -> None:
        self.by_name: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in metrics.collect():  # every process's series when the service has several
            for s in family.samples:
                self.by_name[s.name].append((s.labels, s.value))

    def total(self, name: str, where: Callable[[dict[str, str]], bool] = lambda _: True) -> float:
        return sum(v for labels, v in self.by_name.get(name, []) if where(labels))


def _duration(count: float, seconds: float) -> dict[str, int]:
    return {"count": int(count), "ns": int(round(seconds * 1e9))}


def model_statistics(metrics: Metrics, name: str) -> dict[str, Any]:
    """``GET /v2/models/{name}/stats``: one ``ModelStatistics`` entry (JSON) read from the metrics."""
    s = _Samples(metrics)
    http, grpc = "patchlife_http_request_duration_seconds", "patchlife_grpc_request_duration_seconds"

    def http_ok(ok: bool) -> Callable[[dict[str, str]], bool]:
        return lambda la: la.get("route") in INFERENCE_ROUTES and (la.get("status") == "200") == ok

    def grpc_ok(ok: bool) -> Callable[[dict[str, str]], bool]:
        return lambda la: la.get("method") == GRPC_INFER and (la.get("code") == "OK") == ok

    def head(la: dict[str, str]) -> bool:
        return la.get("phase") == "head"

    def answered(ok: bool) -> dict[str, int]:
        return _duration(s.total(f"{http}_count", http_ok(ok)) + s.total(f"{grpc}_count", grpc_ok(ok)),
                         s.total(f"{http}_sum", http_ok(ok)) + s.total(f"{grpc}_sum", grpc_ok(ok)))

    executions = s.total("patchlife_batch_size_count", head)
    images = s.total("patchlife_image_compute_seconds_count")
    stats = {
        "success": answered(True), "fail": answered(False),
        "queue": _duration(images, s.total("patchlife_queue_wait_seconds_sum")),
        "compute_input": _duration(images, s.total("patchlife_image_decode_seconds_sum")),
        "compute_infer": _duration(images, s.total("patchlife_image_compute_seconds_sum")),
        "compute_output": _duration(images, s.total("patchlife_output_encode_seconds_sum")),
        "cache_hit": _duration(0, 0.0), "cache_miss": _duration(0, 0.0),  # no response cache
    }
    return {"name": name, "version": VERSION,
            "last_inference": int(s.total("patchlife_last_inference_timestamp_seconds") * 1000),
            "inference_count": int(images), "execution_count": int(executions), "inference_stats": stats,
            "batch_stats": []}
