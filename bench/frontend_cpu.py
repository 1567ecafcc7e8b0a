"""The front end's own CPU per request, in one process: the app (middleware, routing, body parsing,
headers, decoding, encoding) driven through ASGI, with a model that answers at once.

    python -m bench.frontend_cpu                      # 224-px JPEG to /classify, decoded here
    python -m bench.frontend_cpu --pass-on            # ... passed on undecoded (the card's decodes_jpeg)
    python -m bench.frontend_cpu --input v2pixels     # one 224-px UINT8 image, v2 binary extension

No HTTP server and no model process: what ``patchlife bench-frontend --engine stand-in`` reports as
the API process's CPU less uvicorn's HTTP parsing and the wire to the model process, so a change to
the front end's own path shows here without the noise of the rest. ``--pass-on`` leaves out the
decode too (about 1 ms of the 224-px JPEG's cost), which leaves what the middleware, the routing and
the pipeline's steps cost. CPU is the process's (every thread), over ``--requests`` requests sent one
after the other after a warm-up; take it from a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from service.frontend.app import make_app
from service.metrics import Metrics
from service.protocol import EncodedImage, ImageResult, Lifecycle, ModelCard, ModelStatus
from service.settings import Settings

from .photos import photo_image, photo_jpeg

BOUNDARY = b"benchboundary"
GRID = (14, 14)


def card(decodes_jpeg: bool) -> ModelCard:
    """deit_small's geometry and preprocessing, 10 classes."""
    preprocess = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875,
                  "crop_mode": "center", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    return ModelCard("bench", {"device": "cpu", "dtype": "float32"}, tuple(f"class {i}" for i in range(10)),
                     preprocess, GRID, 4.6, 3, 12, "", (1, 8, 64), decodes_jpeg=decodes_jpeg)


class InstantModel:
    """A :class:`~service.protocol.ModelClient` that answers every image at once, correctly shaped."""

    def __init__(self, decodes_jpeg: bool) -> None:
        self.card = card(decodes_jpeg)

    async def open(self) -> ModelCard:
        return self.card

    async def start(self) -> None:
        return None

    def status(self) -> ModelStatus:
        return ModelStatus(Lifecycle.READY)

    def clock(self) -> float:
        return time.monotonic()

    async def submit(self, pixels: Sequence[torch.Tensor | EncodedImage], keep_rate: float | None,
                     deadline: float, min_keep_rate: float | None = None) -> list[ImageResult]:
        return [ImageResult(torch.full((10,), 0.1), torch.full(GRID, 5.0), (196, 98), (196, 98), 2.3, 0.7, 0.1, 0.2)
                for _ in pixels]

    def begin_drain(self) -> None:
        return None

    async def stop(self, grace_s: float | None = None) -> None:
        return None


def request_for(kind: str) -> tuple[str, list[tuple[bytes, bytes]], bytes]:
    """(path, headers, body) of one request of ``kind``."""
    if kind == "v2pixels":
        pixels = np.asarray(photo_image(224, 224, seed=1).convert("RGB"))[None]
        raw = pixels.tobytes()
        head = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                       "parameters": {"binary_data_size": len(raw)}}]}).encode()
        return "/v2/models/bench/infer", [(b"content-type", b"application/octet-stream"),
                                          (b"inference-header-content-length", str(len(head)).encode())], head + raw
    body = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + photo_jpeg(224, 224, seed=1) + b"\r\n--" + BOUNDARY + b"--\r\n")
    return "/classify", [(b"content-type", b"multipart/form-data; boundary=" + BOUNDARY)], body


async def _one(app: Any, path: str, headers: list[tuple[bytes, bytes]], body: bytes, method: str = "POST") -> int:
    """The status ``app`` answers one request with."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "server": ("bench", 80), "client": ("client", 1),
             "headers": [(b"host", b"bench"), (b"content-length", str(len(body)).encode()), *headers]}
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError("unreachable")

    status: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


async def measure(kind: str, pass_on: bool, requests: int, warmup: int = 50) -> dict[str, float]:
    app = make_app(Settings(grpc_port=0), InstantModel(pass_on), Metrics())
    path, headers, body = request_for(kind)
    async with app.router.lifespan_context(app):
        while await _one(app, "/readyz", [], b"", "GET") != 200:  # the start runs in the background
            await asyncio.sleep(0.01)
        for _ in range(warmup):
            if (status := await _one(app, path, headers, body)) != 200:
                raise RuntimeError(f"{path} answered {status}")
        cpu0, t0 = time.process_time(), time.perf_counter()
        statuses = [await _one(app, path, headers, body) for _ in range(requests)]
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    if set(statuses) != {200}:
        raise RuntimeError(f"{path} answered {sorted(set(statuses))}")
    return {"cpu_ms_per_request": cpu / requests * 1e3, "wall_ms_per_request": wall / requests * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.frontend_cpu", description=__doc__.split("\n")[0])
    p.add_argument("--input", choices=("jpeg224", "v2pixels"), default="jpeg224", help="what each request sends")
    p.add_argument("--pass-on", action="store_true", help="the card says the model process decodes JPEGs")
    p.add_argument("--requests", type=int, default=1000, help="requests timed, one after the other")
    args = p.parse_args(argv)
    out = asyncio.run(measure(args.input, args.pass_on, args.requests))
    print(f"{args.input}{' passed on' if args.pass_on else ''}: API CPU {out['cpu_ms_per_request']:.3f} ms "
          f"per request (wall {out['wall_ms_per_request']:.3f} ms), {args.requests} requests, in process")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
