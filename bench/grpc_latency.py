"""Single-image latency on an idle server: gRPC against HTTP, through Triton's own clients.

    python -m bench.grpc_latency --requests 200          # starts a `patchlife serve` child
    python -m bench.grpc_latency --url 127.0.0.1:8000 --grpc 127.0.0.1:8001

One image at a time (the same PNG each time, the ``images`` input, every output asked for), the two
protocols alternating request by request so that machine noise hits both alike; prints the p50 and
p90 of each (client-measured) and the ratio gRPC / HTTP. Needs ``tritonclient[http,grpc]`` (the dev
extra). Without ``--url`` the child serves ``PATCHLIFE_CHECKPOINT`` or the embedded model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np

from .child import serve_child
from .loadtest import make_mix


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


@contextlib.contextmanager
def _targets(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    if args.url:
        yield args.url.removeprefix("http://"), args.grpc
        return
    with serve_child({}, ["--log-level", "warning"], grpc=True) as child:
        assert child.grpc_target is not None
        yield child.url.removeprefix("http://"), child.grpc_target


def measure(http_target: str, grpc_target: str, requests: int, warmup: int = 20) -> dict[str, Any]:
    """Alternate ``requests`` single-image calls per protocol; latencies in ms."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    png = make_mix(1, [None])[0][0]
    image = np.array([png], dtype=np.object_)
    model = httpx.get(f"http://{http_target}/v1/models", timeout=10).json()["name"]
    http, grpc = th.InferenceServerClient(http_target), tg.InferenceServerClient(grpc_target)

    def call(module: Any, client: Any) -> Callable[[], None]:
        tensor = module.InferInput("images", [1], "BYTES")
        tensor.set_data_from_numpy(image)
        return lambda: client.infer(model, [tensor])

    calls = {"http": call(th, http), "grpc": call(tg, grpc)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(warmup + requests):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000.0)
    http.close()
    grpc.close()
    out: dict[str, Any] = {k: {"p50_ms": round(statistics.median(v), 2), "p90_ms": round(_percentile(v, 90), 2)}
                           for k, v in times.items()}
    out["grpc_over_http_p50"] = round(out["grpc"]["p50_ms"] / out["http"]["p50_ms"], 3)
    out["requests"] = requests
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpc_latency", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=200, help="measured requests per protocol")
    p.add_argument("--url", default=None, help="HTTP host:port of a running server (default: start one)")
    p.add_argument("--grpc", default="127.0.0.1:8001", help="its gRPC host:port (with --url)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    with _targets(args) as (http_target, grpc_target):
        result = measure(http_target, grpc_target, args.requests)
    if args.json:
        print(json.dumps(result))
    else:
        for name in ("http", "grpc"):
            print(f"{name:<5} p50 {result[name]['p50_ms']:8.2f} ms   p90 {result[name]['p90_ms']:8.2f} ms")
        print(f"gRPC / HTTP p50: {result['grpc_over_http_p50']:.3f} ({args.requests} single-image requests each, "
              "alternating)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
