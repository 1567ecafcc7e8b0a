"""What each step of the API process's request pipeline costs, against a thread-pool round trip.

    python -m bench.loop_costs                 # median microseconds per step and input

The front end runs a step on its event loop when it costs less than about 100 us, and in the thread
pool otherwise (``service/frontend/pipeline.py``): a round trip through the pool is itself tens of
microseconds of CPU and two cross-thread wake-ups, which is not worth paying for a header read. This
prints the figures that rule stands on, for the inputs of ``patchlife bench-frontend``:
the header read (``header_info``) and the decode + preprocessing (``decode_one``) of a 64-px PNG, a
224-px, a 451x300 and a 1000x872 JPEG; a v2 binary request of one 224-px UINT8 image, parsed
(``oip.parse_request``) and preprocessed (``prepare_pixels``); the same image over gRPC, converted
(``convert.infer_request``); and an empty thread round trip, by ``anyio.to_thread`` and by the
``offload.in_thread`` that decodes take (``service/frontend/offload.py``), its wall time and the CPU it
costs. ``runs on`` says where the front end runs the step (the event ``loop`` or a ``thread`` of the pool).

Figures are per call, single-threaded, on whatever else the machine is doing: take them from a quiet
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np

from service.decode import header_info
from service.frontend import infer, offload, oip, pipeline
from service.frontend.upload import RawImage, UploadLimits
from service.preprocess import Preprocessor

from .photos import photo_image, photo_jpeg, photo_png

# deit_small's timm preprocessing (what the served model's card says)
CONFIG: dict[str, Any] = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875,
                          "crop_mode": "center", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
MAX_PIXELS = 40_000_000


def _median_us(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm (first-use imports, libjpeg-turbo's handle)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _v2_body(side: int) -> tuple[bytes, str]:
    pixels = np.asarray(photo_image(side, side, seed=3).convert("RGB"))[None]
    raw = pixels.tobytes()
    head = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, str(len(head))


async def _thread_trip_us(repeat: int, hop: Callable[[Callable[[], int]], Awaitable[int]]) -> tuple[float, float]:
    """An empty round trip through ``hop`` (``anyio.to_thread.run_sync``, or the front end's own
    ``offload.in_thread`` that decodes use): its median wall time and its mean CPU (all threads)."""
    await hop(int)  # the pool's first thread is made here
    times = []
    cpu0 = time.process_time()
    for _ in range(repeat):
        t0 = time.perf_counter()
        await hop(int)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, (time.process_time() - cpu0) / repeat * 1e6


def _rows(name: str, data: bytes, pre: Preprocessor, repeat: int) -> list[dict[str, Any]]:
    raw = RawImage(data, None, name)
    inline = pipeline.inline_header(raw, MAX_PIXELS) is not None
    return [{"input": name, "step": "header_info", "bytes": len(data),
             "us": _median_us(lambda: header_info(data, MAX_PIXELS), repeat), "inline": "loop" if inline else "thread"},
            {"input": name, "step": "decode_one", "bytes": len(data),
             "us": _median_us(lambda: pipeline.decode_one(raw, pre, MAX_PIXELS, False), repeat), "inline": "thread"}]


def _grpc_row(pixels: np.ndarray, repeat: int) -> dict[str, Any]:
    """gRPC's ``ModelInferRequest`` of one raw UINT8 image -> the request's images."""
    from service.frontend.grpc import convert
    from service.frontend.grpc import grpc_service_pb2 as pb

    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="pixels", datatype="UINT8", shape=[1, *pixels.shape])
    msg.raw_input_contents.append(pixels.tobytes())
    limits = UploadLimits(msg.ByteSize(), msg.ByteSize(), 16)
    return {"input": "grpc uint8 224px", "step": "infer_request", "bytes": msg.ByteSize(),
            "us": _median_us(lambda: convert.infer_request(msg, limits, MAX_PIXELS), repeat),
            "inline": "loop" if convert.converts_inline(msg) else "thread"}


def measure(repeat: int) -> list[dict[str, Any]]:
    pre = Preprocessor(CONFIG)
    rows: list[dict[str, Any]] = []
    images = {"png 64px": photo_png(64, 64, seed=1), "jpeg 224px": photo_jpeg(224, 224, seed=1),
              "jpeg 451x300": photo_jpeg(451, 300, seed=1), "jpeg 1000x872": photo_jpeg(1000, 872, seed=1)}
    for name, data in images.items():
        rows += _rows(name, data, pre, repeat)
    body, head_length = _v2_body(224)
    limits = UploadLimits(len(body), len(body), 16)
    arrays = [a for a in oip.parse_request(body, head_length, limits, MAX_PIXELS).items if isinstance(a, np.ndarray)]
    rows.append({"input": "v2 uint8 224px", "step": "parse_request", "bytes": len(body),
                 "us": _median_us(lambda: oip.parse_request(body, head_length, limits, MAX_PIXELS), repeat),
                 "inline": "loop" if infer.parsed_inline(len(body), int(head_length)) else "thread"})
    rows.append({"input": "v2 uint8 224px", "step": "prepare_pixels", "bytes": arrays[0].nbytes,
                 "us": _median_us(lambda: [pre.upright(infer.pixels_image(a)) for a in arrays], repeat),
                 "inline": "thread"})
    rows.append(_grpc_row(arrays[0], repeat))
    for step, hop in (("to_thread round trip", anyio.to_thread.run_sync), ("in_thread round trip", offload.in_thread)):
        trip_us, trip_cpu_us = asyncio.run(_thread_trip_us(repeat, hop))
        rows.append({"input": "-", "step": step, "bytes": 0, "us": trip_us, "inline": "-"})
        rows.append({"input": "-", "step": "  its CPU (process)", "bytes": 0, "us": trip_cpu_us, "inline": "-"})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loop_costs", description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=200, help="calls per step (the median is printed)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    rows = measure(args.repeat)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'input':<16} {'step':<22} {'bytes':>8} {'median us':>10}  runs on")
    for r in rows:
        print(f"{r['input']:<16} {r['step']:<22} {r['bytes']:>8} {r['us']:>10.1f}  {r['inline']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
