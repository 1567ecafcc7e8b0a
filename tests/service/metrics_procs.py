"""Child programs of the multiprocess metrics tests (an API process and a model process of one service,
each writing into the shared directory and answering commands over a pipe), and the test's handle on one.

They run in a forkserver whose Python has imported ``service.metrics`` (so it and torch load
once per session, not once per child) before any multiprocess switch: each child switches itself
with ``enable_multiprocess``, the path where prometheus_client was imported first.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from prometheus_client import values

from service.frontend.routes.metrics import metrics as metrics_route
from service.frontend.triton import model_statistics
from service.metrics import (
    Metrics,
    cleanup_multiprocess,
    enable_multiprocess,
    mark_process_dead,
    multiprocess_dir,
)
from service.protocol import ImageResult
from service.runtime.costmodel import CostModel, LinearFit
from service.runtime.metrics_hooks import PrometheusHooks

GRAPHS = {"captured": 6, "capture_seconds": 1.5, "capture_bytes": 4096, "eager_fallbacks": 2}
LAST_INFERENCE = 1_790_000_000.0  # what the model process's clock said, fixed so a test can compare it


def forkserver() -> ForkServerContext:
    """The children's context: a clean Python (no pytest threads) that imports the service once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["service.metrics", "service.frontend.triton"])  # from its cwd: the repo
    return ctx


class Child:
    """A child process with a command pipe; ``ready()`` waits until it has written its metrics."""

    def __init__(self, ctx: ForkServerContext, target: Any, *args: Any) -> None:
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, theirs), daemon=True)
        self.proc.start()
        theirs.close()

    def ready(self) -> int:
        assert self.conn.poll(60), "child did not start"
        pid = self.conn.recv()
        assert pid == self.proc.pid
        return pid

    def ask(self, cmd: str) -> Any:
        self.conn.send(cmd)
        assert self.conn.poll(30), f"no answer to {cmd}"
        return self.conn.recv()

    def stop(self, directory: Path) -> None:
        self.conn.send("exit")
        self.proc.join(30)
        assert self.proc.exitcode == 0
        mark_process_dead(self.proc.pid, directory)  # what serve's parent does when a child exits


def _answer(conn: Connection, m: Metrics, extra: dict[str, Any] | None = None) -> None:
    """Send the pid, then serve ``scrape`` (this process's /metrics) and the ``extra`` commands until ``exit``."""
    conn.send(os.getpid())
    while True:
        cmd = conn.recv()
        if cmd == "exit":
            return
        if cmd == "scrape":
            conn.send(m.exposition().decode())
        else:
            conn.send((extra or {})[cmd]())


def api_process(directory: Path, requests: int, in_flight: int, conn: Connection) -> None:
    """What an API process writes: HTTP latency, decode time, a rejection, requests still in flight."""
    enable_multiprocess(directory)
    m = Metrics()
    for _ in range(requests):
        m.http_duration.labels("/classify", "POST", "200").observe(0.02)
        m.decode_seconds.observe(0.003)
    m.reject("bad_image")
    for _ in range(in_flight):
        m.http_in_flight.inc()
    def route() -> tuple[str, str]:
        """GET /metrics as the route answers it (the merge runs in the threadpool)."""
        response = asyncio.run(metrics_route(SimpleNamespace(metrics=m)))  # type: ignore[arg-type]
        return bytes(response.body).decode(), response.media_type or ""

    _answer(conn, m, {"stats": lambda: model_statistics(m, "tiny"), "route": route})  # /v2/models/tiny/stats


def model_process(directory: Path, conn: Connection) -> None:
    """What the model process writes: the worker's series, build info, cost model, graphs, health."""
    enable_multiprocess(directory)
    m = Metrics()
    m.set_model("1.2.3", "tiny", "cpu", "float32")
    m.watch_device(torch.device("cpu"))
    healthy = [True]
    m.watch_health(lambda: healthy[0])
    m.set_graphs(lambda: GRAPHS)
    hooks = PrometheusHooks(m, dense_gflops=4.0, num_patches=196)
    hooks.on_queue_depth(5, 700)
    hooks.on_batch("head", 2, 400, None, [0.001, 0.002], 0.01)
    hooks.on_batch("tail", 2, 300, "48-40-32", [0.003, 0.004], 0.02)
    cost = CostModel()
    cost.fits["head"], cost.fits["tail"] = LinearFit(fixed=0.01, slope=0.001), LinearFit(fixed=0.02, slope=1e-5)
    hooks.on_cost_model(cost)
    hooks.on_image_done(ImageResult(torch.zeros(5), torch.zeros(2, 2), (3, 2, 1), (8, 8, 8), 2.0, 0.7, 1.0, 2.0))
    m.last_inference.set(LAST_INFERENCE)
    m.decode_fallback("refused")

    def sicken() -> bool:
        healthy[0] = False
        m.sample()  # the heartbeat
        return True

    _answer(conn, m, {"sicken": sicken})


def cuda_model_process(directory: Path, conn: Connection) -> None:
    """A model process on the GPU holding 64 MiB, its device memory sampled as the heartbeat does."""
    enable_multiprocess(directory)
    m = Metrics()
    m.set_model("1.2.3", "tiny", "cuda:0", "float32")
    m.watch_device(torch.device("cuda", 0))
    held = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    m.sample()
    _answer(conn, m)
    del held


def switching(directory: Path, conn: Connection) -> None:
    """enable_multiprocess twice (the second changes nothing), into another directory (refused),
    ``fresh`` (an earlier run's files go, this process's stay), then cleanup (back to in-process)."""
    out: dict[str, Any] = {"before": multiprocess_dir()}
    stale = directory / "counter_999999.db"
    directory.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"")
    enable_multiprocess(directory)
    first = values.ValueClass
    Metrics().reject("bad_image")
    enable_multiprocess(directory, fresh=True)
    out["same_class"] = values.ValueClass is first
    out["on"] = multiprocess_dir()
    out["files"] = sorted(p.name for p in directory.glob("*.db"))
    try:
        enable_multiprocess(directory / "elsewhere")
        out["moved"] = True
    except RuntimeError:
        out["moved"] = False
    cleanup_multiprocess(directory)
    out["after"] = multiprocess_dir()
    out["exists"] = directory.exists()
    out["in_process"] = Metrics().shared_dir is None
    conn.send(out)
