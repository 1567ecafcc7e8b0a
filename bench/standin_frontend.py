"""``patchlife bench-frontend --engine stand-in``: what the service costs around the model, per process.

One ``patchlife serve`` whose engine is the stand-in device (:mod:`bench.standin`: the model's time
taken from a measured table, spent asleep, so the server's CPU is the service's own), a calibrated
``deit_small`` checkpoint for its geometry (made on the spot unless ``--checkpoint``). For each input
and images per request, client processes keep ``--clients`` requests in flight for ``--duration``
seconds after a warm-up; each row gives images/s, p50/p99, and the CPU of the model process (per
image) and of the API processes together (per request) over that window (:mod:`bench.proctree`:
the model process's own threads, and its process tree less them), and the cores those would need to
serve ``--rate`` images/s (default: what one H200 runs deit_small's served path at).

Inputs: ``jpeg224`` (224-px photo-like JPEGs, decoded on the CPU in the API process), ``png64``
(64-px PNGs) to ``/classify`` as multipart files; ``v2pixels``: ``/v2/models/{name}/infer`` with the
binary tensor data extension, ``pixels`` UINT8 ``[N, 224, 224, 3]``.

On a shared machine the client processes compete with the server for the CPU, so images/s and
latencies say little there; CPU per request is the figure to compare (take it from a quiet machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from .child import ServeChild, serve_child
from .loaddrive import ProcessDriver
from .loadmix import DISTINCT_PHOTOS, LoadRequest, make_requests
from .photos import photo_image, photo_jpeg, photo_png
from .proctree import own_seconds

INPUTS = ("jpeg224", "png64", "v2pixels")
DEFAULT_RATE = 13_600.0  # images/s: one H200, deit_small's served path at batch 64 (shared/docs/gpu-findings.md)
SIDE = 224


def _classify(kind: str, per_request: int) -> list[LoadRequest]:
    make: Callable[[int], bytes] = (lambda i: photo_jpeg(SIDE, SIDE, seed=100 + i)) if kind == "jpeg224" else \
        (lambda i: photo_png(64, 64, seed=200 + i))
    return make_requests([(make(i), None) for i in range(DISTINCT_PHOTOS)], per_request)


def _v2_pixels(model: str, per_request: int) -> list[LoadRequest]:
    """Binary v2 requests of raw pixels; an answer is checked by its probabilities' shape."""
    out = []
    for k in range(DISTINCT_PHOTOS):
        pixels = np.stack([np.asarray(photo_image(SIDE, SIDE, seed=300 + (k + j) % DISTINCT_PHOTOS).convert("RGB"))
                           for j in range(per_request)])
        raw = pixels.tobytes()
        head = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
        headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}
        out.append(LoadRequest(f"/v2/models/{model}/infer", head + raw, headers, per_request, [],
                               answer=b'"shape":[%d,' % per_request, answers=1))
    return out


def requests_for(kind: str, per_request: int, model: str) -> list[LoadRequest]:
    return _v2_pixels(model, per_request) if kind == "v2pixels" else _classify(kind, per_request)


@dataclass
class CpuSplit:
    """CPU seconds so far of the model process (its own threads) and of everything under it."""

    model_s: float
    api_s: float

    @staticmethod
    def read(child: ServeChild) -> CpuSplit:
        tree, own = child.cpu_seconds(), own_seconds(child.proc.pid)
        if tree is None or own is None:
            raise RuntimeError("the server has exited")
        return CpuSplit(own, tree - own)


def measure_row(child: ServeChild, driver: ProcessDriver, args: argparse.Namespace, kind: str, per_request: int,
                model: str) -> dict[str, Any]:
    payloads = requests_for(kind, per_request, model)
    marks: list[CpuSplit] = []
    p, busy = driver.run(child.url, payloads, args.clients, 2 * args.clients, 10**9, args.duration, 60.0,
                         between=lambda: marks.append(CpuSplit.read(child)))
    after = CpuSplit.read(child)
    s = p.summary()
    requests, images = len(p.latencies_s), p.images
    model_ms = 1000.0 * (after.model_s - marks[0].model_s) / images if images else None
    api_ms = 1000.0 * (after.api_s - marks[0].api_s) / requests if requests else None
    cores = None if model_ms is None or api_ms is None else \
        args.rate * (model_ms / 1000.0 + api_ms / 1000.0 / per_request)
    return {"input": kind, "images_per_request": per_request, "images_per_s": s["images_per_s"],
            "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "errors": s["errors"], "error_statuses": s["error_statuses"],
            "model_cpu_ms_per_image": _round(model_ms), "api_cpu_ms_per_request": _round(api_ms),
            "model_cores_at_rate": _round(None if model_ms is None else args.rate * model_ms / 1000.0, 2),
            "cores_at_rate": _round(cores, 2), "client_busy_max": max((b for b in busy if b is not None), default=None)}


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(v, digits)


@contextlib.contextmanager
def _server(args: argparse.Namespace, checkpoint: Path) -> Iterator[ServeChild]:
    env = {"PATCHLIFE_API_PROCESSES": args.api_processes, "PATCHLIFE_CHECKPOINT": str(checkpoint),
           "PATCHLIFE_DEVICE": "cpu", "PATCHLIFE_BATCHING": "budget",
           "PATCHLIFE_MAX_BATCH_SIZE": os.environ.get("PATCHLIFE_MAX_BATCH_SIZE", str(args.max_batch_size))}
    command = ["-m", "bench.standin_serve", *(["--table", str(args.table)] if args.table else []),
               *(["--device-decode-ms", str(args.device_decode_ms)] if args.device_decode_ms is not None else [])]
    with serve_child(env, ["--log-level", "warning"], args.startup_timeout, command=command) as child:
        yield child


def measure(args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    with _server(args, checkpoint) as child, ProcessDriver(args.processes) as driver:
        card = httpx.get(child.url + "/v1/models", timeout=30).json()
        model = card["models"][0]["name"] if "models" in card else card["name"]
        rows = [measure_row(child, driver, args, kind, n, model)
                for kind in _list(args.inputs) for n in (int(v) for v in _list(args.images_per_request))]
    return {"engine": "stand-in", "table": str(args.table or "bench/tables/h200_deit_small.json"),
            "model": str(args.checkpoint or args.model), "api_processes": args.api_processes,
            "max_batch_size": int(os.environ.get("PATCHLIFE_MAX_BATCH_SIZE", args.max_batch_size)),
            "rate": args.rate, "clients": args.clients, "processes": args.processes,
            "device_decode_ms": args.device_decode_ms, "rows": rows}


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else f"{v:{spec}}"


def table(body: dict[str, Any]) -> str:
    head = (f"{'input':<9} {'img/req':>7} {'images/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'model ms/img':>12} "
            f"{'API ms/req':>10} {'model cores':>11} {'all cores':>9} {'errors':>6}")
    lines = [head, "-" * len(head)]
    for r in body["rows"]:
        lines.append(f"{r['input']:<9} {r['images_per_request']:>7} {_fmt(r['images_per_s'], '.0f'):>9} "
                     f"{_fmt(r['p50_ms'], '.1f'):>7} {_fmt(r['p99_ms'], '.1f'):>7} "
                     f"{_fmt(r['model_cpu_ms_per_image'], '.3f'):>12} {_fmt(r['api_cpu_ms_per_request'], '.3f'):>10} "
                     f"{_fmt(r['model_cores_at_rate'], '.1f'):>11} {_fmt(r['cores_at_rate'], '.1f'):>9} "
                     f"{r['errors']:>6}")
    lines += ["", f"cores at {body['rate']:.0f} images/s: CPU per image x the rate (the model process alone, and "
              "with the API processes); stand-in device: " + body["table"] + f"; {body['model']}, "
              f"PATCHLIFE_API_PROCESSES={body['api_processes']}, PATCHLIFE_MAX_BATCH_SIZE={body['max_batch_size']}; "
              f"{body['clients']} requests in flight from {body['processes']} client processes; JPEGs decoded "
              + ("by the API processes" if body.get("device_decode_ms") is None else
                 f"on the stand-in device ({body['device_decode_ms']:g} ms per image)")]
    return "\n".join(lines)


def check(args: argparse.Namespace) -> str | None:
    if not _list(args.inputs) or set(_list(args.inputs)) - set(INPUTS):
        return f"--inputs: from {','.join(INPUTS)}"
    if args.api_processes == "0":
        return "--engine stand-in measures the API processes apart from the model process: --api-processes >= 1"
    if args.table is not None and not Path(args.table).is_file():
        return f"--table: no file {args.table}"
    if args.device_decode_ms is not None and not args.device_decode_ms >= 0:
        return "--device-decode-ms: >= 0"
    if args.rate <= 0 or args.max_batch_size < 1:
        return "--rate > 0, --max-batch-size >= 1"
    return None


def run(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    try:
        with tempfile.TemporaryDirectory(prefix="patchlife-bench-standin-") as tmp:
            checkpoint = args.checkpoint
            if checkpoint is None:
                from .models import make_checkpoint

                say(f"making a calibrated {args.model} (its geometry; the stand-in never runs it) ...")
                checkpoint = make_checkpoint(args.model, Path(tmp) / args.model)
            say("serving it on the stand-in device; one load pass per input and images per request ...")
            body = measure(args, checkpoint)
    except RuntimeError as exc:
        print(f"patchlife bench-frontend: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2) if args.json else table(body))
    return 0 if all(r["errors"] == 0 and r["images_per_s"] > 0 for r in body["rows"]) else 1
