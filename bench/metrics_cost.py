"""What metrics cost when the service runs API processes (prometheus_client's multiprocess mode).

    python -m bench.metrics_cost                      # API processes 2, 8 and 32
    python -m bench.metrics_cost --apis 4 --writes 5000

Prints, measured in one run so that machine noise hits both sides alike:
- the metric writes of one request (requests in flight +1 and -1, HTTP latency, decode time),
  in-process against multiprocess (each write goes to a memory-mapped file), alternating;
- one scrape (``Metrics.exposition``): this process's registry, and the merge of a directory that
  one model process and N API processes wrote into (the cost grows with the processes started).
Children come from a forkserver that imports the service once.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from service.metrics import Metrics, cleanup_multiprocess, enable_multiprocess
from service.runtime.metrics_hooks import PrometheusHooks

ROUTES = ("/classify", "/explain", "/v2/models/{name}/infer", "/healthz", "/readyz", "/metrics")


def _request_writes(shared: bool, writes: int, repeat: int) -> float:
    """Best seconds per request's writes in a fresh process (multiprocess into a new directory if ``shared``)."""
    directory = Path(tempfile.mkdtemp(prefix="patchlife-bench-"))
    if shared:
        enable_multiprocess(directory)
    m = Metrics()
    http = m.http_duration.labels("/classify", "POST", "200")
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(writes):
            m.http_in_flight.inc()
            m.decode_seconds.observe(0.003)
            http.observe(0.02)
            m.http_in_flight.dec()
        best = min(best, (time.perf_counter() - t0) / writes)
    cleanup_multiprocess(directory)
    return best


def _api_process(directory: Path) -> None:
    """An API process's series: latency of every route at a few statuses, one decode."""
    enable_multiprocess(directory)
    m = Metrics()
    for route in ROUTES:
        for status in ("200", "415", "422", "503"):
            m.http_duration.labels(route, "POST", status).observe(0.01)
    m.decode_seconds.observe(0.001)


def _model_process(directory: Path) -> None:
    """The model process's series: build info, and head and tail batches of every bucket."""
    enable_multiprocess(directory)
    m = Metrics()
    m.set_model("bench", "bench", "cpu", "float32")
    hooks = PrometheusHooks(m, dense_gflops=4.0, num_patches=196)
    for b in range(10):
        hooks.on_batch("head", 4, 800, None, [0.001], 0.01)
        hooks.on_batch("tail", 3, 900, f"{20 * b + 10}-10", [0.001], 0.05)


def _scrape(directory: Path | None, repeat: int) -> tuple[float, int]:
    """Best seconds and bytes of one exposition: of ``directory`` merged, or of a fresh in-process registry."""
    if directory is not None:
        enable_multiprocess(directory)
    m = Metrics()
    best, size = float("inf"), 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        size = len(m.exposition())
        best = min(best, time.perf_counter() - t0)
    return best, size


@dataclass
class Figures:
    per_request_s: dict[str, float]  # "in_process", "multiprocess": best seconds of one request's writes
    registry_scrape: tuple[float, int]  # seconds, bytes: one process's own registry
    merged_scrapes: dict[int, tuple[float, int, int]]  # API processes -> seconds, bytes, files merged


def measure(apis: list[int], writes: int, repeat: int) -> Figures:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["service.metrics"])
    with ctx.Pool(1, maxtasksperchild=1) as pool:  # a fresh process per figure: the mode is per process
        per_request: dict[str, list[float]] = {"in_process": [], "multiprocess": []}
        for _ in range(2):  # alternating, twice
            for key, shared in (("in_process", False), ("multiprocess", True)):
                per_request[key].append(pool.apply(_request_writes, (shared, writes, repeat)))
        registry = pool.apply(_scrape, (None, repeat))
        merged = {}
        for n in apis:
            directory = Path(tempfile.mkdtemp(prefix="patchlife-bench-"))
            procs = [ctx.Process(target=_model_process, args=(directory,))]
            procs += [ctx.Process(target=_api_process, args=(directory,)) for _ in range(n)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            files = len(list(directory.glob("*.db")))  # the scraping process adds its own
            merged[n] = (*pool.apply(_scrape, (directory, repeat)), files)
            shutil.rmtree(directory, ignore_errors=True)
    return Figures({k: min(v) for k, v in per_request.items()}, registry, merged)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--apis", default="2,8,32", help="API process counts to scrape with (comma-separated)")
    ap.add_argument("--writes", type=int, default=20000, help="requests' metric writes per timing")
    ap.add_argument("--repeat", type=int, default=5, help="timings per figure (the best is printed)")
    args = ap.parse_args(argv)
    f = measure([int(n) for n in args.apis.split(",")], args.writes, args.repeat)
    one, shared = f.per_request_s["in_process"], f.per_request_s["multiprocess"]
    print(f"metric writes per request (in flight +1/-1, HTTP latency, decode time), best of {args.repeat} x "
          f"{args.writes}:")
    print(f"  in-process    {one * 1e6:7.1f} us")
    print(f"  multiprocess  {shared * 1e6:7.1f} us  ({shared / one:.1f}x)")
    print(f"one scrape (Metrics.exposition), best of {args.repeat}:")
    seconds, size = f.registry_scrape
    print(f"  in-process registry                       {seconds * 1e3:8.1f} ms  {size / 1e3:6.1f} kB")
    for n, (seconds, size, files) in f.merged_scrapes.items():
        print(f"  1 model + {n:3d} API processes ({files:4d} files) {seconds * 1e3:8.1f} ms  {size / 1e3:6.1f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
