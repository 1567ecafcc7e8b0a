"""``patchlife bench-overhead``: what the service adds to one request on an idle server.

In one run, on the same machine and model:
  * compute: the model's own batch-1 time, ``Engine.head`` + ``Engine.tail`` on a preprocessed
    image, in this process;
  * end to end: a JPEG posted to ``/classify`` of a ``patchlife serve`` child process on a free
    loopback port, one request at a time (an idle server), timed by the client.
The two are measured in alternating rounds so that machine noise hits both alike. Overhead =
median(end to end) / median(compute) - 1; the target is <= 15% for deit_small on CPU. The server's
own timings split the rest into decode, queue (batching delay) and HTTP + JSON.

Without ``--checkpoint`` a deit_small LifeViT with random weights is written to a temporary
directory: timing does not depend on the weights.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from service.runtime.engine import Engine
from service.runtime.worker import set_torch_threads
from service.settings import Settings

from .child import serve_child


def _photo_jpeg(width: int, height: int) -> bytes:
    """A smooth, photo-like JPEG (gradients + blobs), deterministic."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 23.0) * np.cos(y / 17.0)], -1) * 200
    img += rng.normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _make_checkpoint(backbone: str, directory: Path) -> Path:
    # The benchmark, not the service, builds a throwaway checkpoint: the one import of model/ here.
    from model.checkpoint import create_lifevit, save_checkpoint
    return save_checkpoint(create_lifevit(backbone, keep_rate=0.7), directory)


def _model_thread_setup(engine: Engine, threads: int) -> int:
    """Size the thread's torch team as the worker does, warm up; returns the threads it runs with."""
    set_torch_threads(threads)
    engine.warmup(2)
    return torch.get_num_threads()


def _time_compute(engine: Engine, pixels: torch.Tensor, n: int) -> list[float]:
    """Run in the bench's model thread (see ``measure_overhead``), as the worker runs the model in its own."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.run_batch(pixels)  # reads the answer on the host: waits for the GPU
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _time_requests(client: httpx.Client, jpeg: bytes, n: int) -> tuple[list[float], list[dict[str, float]]]:
    walls, timings = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.post("/classify", files={"file": ("photo.jpg", jpeg, "image/jpeg")})
        walls.append((time.perf_counter() - t0) * 1000.0)
        r.raise_for_status()
        timings.append(r.json()["results"][0]["timings_ms"])
    return walls, timings


def _summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
    return {"median": round(statistics.median(values), 3), "p10": round(q[0], 3), "p90": round(q[-1], 3),
            "mean": round(statistics.fmean(values), 3)}


def measure_overhead(args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    jpeg = _photo_jpeg(width, height)
    # The server child reads the same PATCHLIFE_* variables; --device and the checkpoint override them.
    settings = Settings(checkpoint=checkpoint, device=args.device)
    engine = Engine.from_settings(settings)
    # The model runs in one dedicated thread sized like the worker's (PATCHLIFE_TORCH_THREADS); on
    # CPU the main thread's OpenMP team can time very differently from a worker thread's.
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-model")
    threads = model_thread.submit(_model_thread_setup, engine, settings.torch_threads).result()
    pixels = engine.preprocess(Image.open(io.BytesIO(jpeg)))[None]
    env = {"PATCHLIFE_DEVICE": args.device, "PATCHLIFE_CHECKPOINT": str(checkpoint)}
    if args.max_delay_ms is not None:
        env["PATCHLIFE_MAX_DELAY_MS"] = str(args.max_delay_ms)
    try:
        with serve_child(env, ["--log-level", "warning"]) as child, \
                httpx.Client(base_url=child.url, timeout=120.0) as client:
            _time_requests(client, jpeg, 5)  # warm the connection and the server's caches
            model_thread.submit(_time_compute, engine, pixels, 5).result()
            per_round = max(1, args.requests // args.rounds)
            compute, walls, timings = [], [], []
            for _ in range(args.rounds):
                time.sleep(0.5)  # let the server's idle OpenMP threads stop spinning on the shared cores
                compute += model_thread.submit(_time_compute, engine, pixels, per_round).result()
                time.sleep(0.5)
                w, t = _time_requests(client, jpeg, per_round)
                walls += w
                timings += t
    finally:
        model_thread.shutdown()
    parts = {k: _summary([t[k] for t in timings]) for k in ("decode", "queue", "compute")}
    rest = [w - t["decode"] - t["queue"] - t["compute"] for w, t in zip(walls, timings, strict=True)]
    c, e = _summary(compute), _summary(walls)
    return {"model": engine.name, "backbone": engine.config.backbone, "device": str(engine.device),
            "torch_threads": threads, "image": f"{width}x{height} JPEG ({len(jpeg)} bytes)",
            "requests": len(walls), "compute_ms": c, "end_to_end_ms": e,
            "server_ms": {**parts, "http_json_client": _summary(rest)},
            "overhead": round(e["median"] / c["median"] - 1.0, 4), "target": 0.15}


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="patchlife-overhead-") as tmp:
        checkpoint = args.checkpoint or _make_checkpoint(args.backbone, Path(tmp))
        result = measure_overhead(args, checkpoint)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {result['backbone']} on {result['device']} ({result['torch_threads']} torch threads), "
          f"{result['requests']} sequential requests, {result['image']}")
    for name, key in (("model batch-1 compute", "compute_ms"), ("end to end (client)", "end_to_end_ms")):
        s = result[key]
        print(f"  {name:<24} median {s['median']:8.2f} ms   p10 {s['p10']:8.2f}   p90 {s['p90']:8.2f}")
    print("  server breakdown (median ms): " + ", ".join(
        f"{k} {v['median']:.2f}" for k, v in result["server_ms"].items()))
    verdict = "OK" if result["overhead"] <= result["target"] else "over target"
    print(f"  overhead {result['overhead'] * 100:.1f}% (target <= {result['target'] * 100:.0f}%): {verdict}")
    return 0
