"""``python -m bench.model_cpu``: the model process's CPU per image around the model, at full batches.

    python -m bench.model_cpu [--checkpoint DIR] [--images-per-request 1,16] [--max-batch-size 64]
                              [--connections 4] [--in-flight 64] [--duration 5] [--warmup 2] [--json]

Issue 30's target is the model process's CPU per image at batch 64 (<= 0.10 ms: one core then feeds
10,000 images/s). Through HTTP this machine never gets there: the API processes limit the rate to a
few hundred images/s, so batches stay small and the figure is per-batch cost. Here the model process
runs alone (:mod:`bench.standin_host`: ``serve``'s model process, engine stood in by the measured
H200 device of :mod:`bench.standin`, which waits asleep), and this process speaks the wire to it
itself (:mod:`service.transport.wire`) from ``--connections`` connections, as that many API processes
would: each brings its own shared-memory pixel pool, filled once with pre-decoded pixels, and keeps
``--in-flight`` images in flight in requests of ``images-per-request`` images (each answer's slots are
sent again at once). So the client costs little, the queue stays full and batches of
``--max-batch-size`` form whenever the model process keeps up with the device.

For each images-per-request, after ``--warmup`` seconds, over ``--duration`` seconds it prints:
images/s; the model process's CPU (``/proc/<pid>/stat``, all its threads) per image and per tail
batch; the mean head and tail batch sizes actually run (from the model process's own
``patchlife_batch_size`` histogram); and the cores the model process would need at ``--rate`` images/s.
Each request's answer is checked (one result per image; a refusal is counted as an error, and any
error makes the exit status 1). The checkpoint gives only the geometry (a calibrated ``--model``
is made on the spot unless ``--checkpoint``; making deit-small takes a minute). On a shared machine
the figures move from run to run: compare before and after in alternating rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.protocol import Lifecycle
from service.transport import wire
from service.transport.slots import SlotPool

from .proctree import own_seconds
from .standin import DEFAULT_TABLE
from .standin_frontend import DEFAULT_RATE

DEADLINE_S = 60.0  # each request's deadline: long enough never to expire in a queue this bench fills


@dataclass
class Tally:
    """What the client has seen answered."""

    images: int = 0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Connection:
    """One API process's worth of the wire: its own pixel pool, ``lanes`` requests of ``per_request``
    images kept in flight, each resent as soon as it is answered."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pool: SlotPool,
                 lanes: int, per_request: int, tally: Tally) -> None:
        self.reader, self.writer, self.pool = reader, writer, pool
        self.lanes, self.per_request, self.tally = lanes, per_request, tally
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[wire.Done | wire.Failed]] = {}
        self.status = Lifecycle.LOADING
        self.ready = asyncio.Event()

    @classmethod
    async def open(cls, path: Path, lanes: int, per_request: int, tally: Tally, seed: int) -> Connection:
        reader, writer = await asyncio.open_unix_connection(str(path))
        welcome = await wire.receive(reader, wire.TO_API)
        if not isinstance(welcome, wire.Welcome):
            raise RuntimeError(f"expected the card first, got {welcome!r}")
        shape = welcome.card.input_shape
        pool = SlotPool(lanes * per_request, shape)
        rng = np.random.default_rng(seed)
        for slot in range(pool.slots):  # pre-decoded pixels, written once: the slots are reused as they are
            pool.write(slot, torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)))
        wire.send(writer, wire.Hello(os.getpid(), pool.name, pool.slots, shape))
        conn = cls(reader, writer, pool, lanes, per_request, tally)
        conn.on_status(welcome.status.state)
        return conn

    def on_status(self, state: Lifecycle) -> None:
        self.status = state
        if state != Lifecycle.LOADING:
            self.ready.set()

    async def read(self) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                message = await wire.receive(self.reader, wire.TO_API)
                if isinstance(message, wire.StatusUpdate):
                    self.on_status(message.status.state)
                elif isinstance(message, wire.Answers):
                    for answer in message.items:
                        future = self.waiting.pop(answer.id, None)
                        if future is not None and not future.done():
                            future.set_result(answer)
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(RuntimeError("the model process closed the connection"))

    async def lane(self, k: int) -> None:
        slots = tuple(range(k * self.per_request, (k + 1) * self.per_request))
        loop = asyncio.get_running_loop()
        while True:
            rid = next(self.ids)
            future: asyncio.Future[wire.Done | wire.Failed] = loop.create_future()
            self.waiting[rid] = future
            wire.send(self.writer, wire.Submit(rid, slots, None, time.monotonic() + DEADLINE_S, f"bench-{rid}"))
            answer = await future
            if isinstance(answer, wire.Failed):
                self.tally.errors[answer.kind.name] = self.tally.errors.get(answer.kind.name, 0) + 1
                await asyncio.sleep(0.01)  # a refusal (queue full): back off a little, as a client would
            elif len(answer.images) != self.per_request:
                self.tally.errors["short_answer"] = self.tally.errors.get("short_answer", 0) + 1
            else:
                self.tally.images += self.per_request
                self.tally.requests += 1

    def close(self) -> None:
        """After the reader saw the connection end: the model process, whose pool this is to it (it came
        with the hello), removes the segment then; only one it left is removed here."""
        name = self.pool.shm._name  # type: ignore[attr-defined]  # with its leading slash, as the tracker has it
        if not Path("/dev/shm", name.lstrip("/")).exists():
            resource_tracker.unregister(name, "shared_memory")  # gone: nothing for the tracker to remove at exit
            self.pool.close()
        else:
            self.pool.close(unlink=True)


def batch_stats(metrics_dir: Path) -> dict[str, tuple[float, float]]:
    """``phase -> (batches, images)`` so far, from the model process's ``patchlife_batch_size`` histogram."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    out: dict[str, list[float]] = {}
    for family in registry.collect():
        if family.name != "patchlife_batch_size":
            continue
        for s in family.samples:
            phase = s.labels.get("phase", "")
            if s.name.endswith("_count"):
                out.setdefault(phase, [0.0, 0.0])[0] = s.value
            elif s.name.endswith("_sum"):
                out.setdefault(phase, [0.0, 0.0])[1] = s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


@contextlib.contextmanager
def host(args: argparse.Namespace, checkpoint: Path, work: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The model process alone (:mod:`bench.standin_host`), until the block ends."""
    sock, metrics = work / "model.sock", work / "metrics"
    env = {**os.environ, "PATCHLIFE_CHECKPOINT": str(checkpoint), "PATCHLIFE_DEVICE": "cpu",
           "PATCHLIFE_BATCHING": "budget", "PATCHLIFE_MAX_BATCH_SIZE": str(args.max_batch_size),
           "PATCHLIFE_QUEUE_CAPACITY_IMAGES": str(max(256, 2 * args.connections * args.in_flight)),
           "PATCHLIFE_LOG_LEVEL": "warning"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [sys.executable, "-m", "bench.standin_host", "--socket", str(sock), "--metrics-dir", str(metrics),
               "--table", str(args.table)]
    proc = subprocess.Popen(command, env=env, cwd=Path(__file__).resolve().parent.parent)
    try:
        end = time.monotonic() + args.startup_timeout
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the model process did not start (exit status {proc.poll()})")
            time.sleep(0.05)
        yield proc, metrics
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def measure_load(args: argparse.Namespace, pid: int, sock: Path, metrics: Path, per_request: int,
                      seed: int) -> dict[str, Any]:
    tally = Tally()
    lanes = max(1, args.in_flight // per_request)
    conns = [await Connection.open(sock, lanes, per_request, tally, seed + i) for i in range(args.connections)]
    tasks: list[asyncio.Task[None]] = []
    try:
        tasks += [asyncio.create_task(c.read()) for c in conns]
        await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in conns)), args.startup_timeout)
        if any(c.status != Lifecycle.READY for c in conns):
            raise RuntimeError(f"the model process is {conns[0].status.name}, not ready")
        tasks += [asyncio.create_task(c.lane(k)) for c in conns for k in range(c.lanes)]
        await asyncio.sleep(args.warmup)
        t0, cpu0, batches0, images0 = time.monotonic(), own_seconds(pid), batch_stats(metrics), tally.images
        errors0 = sum(tally.errors.values())
        await asyncio.sleep(args.duration)
        t1, cpu1, batches1, images1 = time.monotonic(), own_seconds(pid), batch_stats(metrics), tally.images
        errors = sum(tally.errors.values()) - errors0
    finally:
        for task in tasks[len(conns):]:  # the lanes
            task.cancel()
        for c in conns:
            c.writer.close()
        with contextlib.suppress(asyncio.TimeoutError):  # the readers end when the model process has hung up
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10.0)
        for c in conns:
            c.close()
    if cpu0 is None or cpu1 is None:
        raise RuntimeError("the model process has exited")
    images, cpu = images1 - images0, cpu1 - cpu0

    def mean(phase: str) -> float | None:
        b = batches1.get(phase, (0.0, 0.0))[0] - batches0.get(phase, (0.0, 0.0))[0]
        n = batches1.get(phase, (0.0, 0.0))[1] - batches0.get(phase, (0.0, 0.0))[1]
        return round(n / b, 2) if b else None

    tail_batches = batches1.get("tail", (0.0, 0.0))[0] - batches0.get("tail", (0.0, 0.0))[0]
    per_image = 1000.0 * cpu / images if images else None
    return {"images_per_request": per_request, "in_flight": lanes * per_request * len(conns),
            "images_per_s": round(images / (t1 - t0), 1), "model_cpu_ms_per_image": _round(per_image),
            "model_cpu_ms_per_tail_batch": _round(1000.0 * cpu / tail_batches if tail_batches else None),
            "mean_head_batch": mean("head"), "mean_tail_batch": mean("tail"),
            "model_cpu_share": round(cpu / (t1 - t0), 3),
            "model_cores_at_rate": _round(None if per_image is None else args.rate * per_image / 1000.0, 2),
            "errors": errors, "error_kinds": dict(tally.errors)}


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(v, digits)


def measure(args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="patchlife-bench-model-cpu-") as tmp, \
            host(args, checkpoint, Path(tmp)) as (proc, metrics):
        for i, per_request in enumerate(int(v) for v in args.images_per_request.split(",") if v.strip()):
            rows.append(asyncio.run(measure_load(args, proc.pid, Path(tmp) / "model.sock", metrics, per_request,
                                                100 * i)))
    return {"engine": "stand-in", "table": str(args.table), "model": str(args.checkpoint or args.model),
            "max_batch_size": args.max_batch_size, "connections": args.connections, "rate": args.rate,
            "duration_s": args.duration, "rows": rows}


def table(body: dict[str, Any]) -> str:
    head = (f"{'img/req':>7} {'in flight':>9} {'images/s':>9} {'CPU ms/img':>10} {'CPU ms/tail batch':>17} "
            f"{'head batch':>10} {'tail batch':>10} {'CPU share':>9} {'cores':>6} {'errors':>6}")
    lines = [head, "-" * len(head)]
    for r in body["rows"]:
        lines.append(f"{r['images_per_request']:>7} {r['in_flight']:>9} {r['images_per_s']:>9.0f} "
                     f"{_fmt(r['model_cpu_ms_per_image'], '.4f'):>10} "
                     f"{_fmt(r['model_cpu_ms_per_tail_batch'], '.3f'):>17} "
                     f"{_fmt(r['mean_head_batch'], '.1f'):>10} {_fmt(r['mean_tail_batch'], '.1f'):>10} "
                     f"{r['model_cpu_share']:>9.2f} {_fmt(r['model_cores_at_rate'], '.2f'):>6} {r['errors']:>6}")
    lines += ["", f"model process alone (bench/standin_host.py), stand-in device {body['table']}; {body['model']}; "
              f"PATCHLIFE_MAX_BATCH_SIZE={body['max_batch_size']}; {body['connections']} connections; "
              f"cores: the model process's at {body['rate']:.0f} images/s; target <= 0.10 ms/image at batch 64"]
    return "\n".join(lines)


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else f"{v:{spec}}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.model_cpu", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint whose geometry the stand-in takes (default: make one)")
    p.add_argument("--model", default="deit-small", help="bench model made when no --checkpoint (bench/models.py)")
    p.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="stand-in device times (bench/standin.py)")
    p.add_argument("--images-per-request", default="1,16", help="comma-separated; one row each")
    p.add_argument("--max-batch-size", type=int, default=64, help="PATCHLIFE_MAX_BATCH_SIZE of the model process")
    p.add_argument("--connections", type=int, default=4, help="wire connections (API processes) to drive it from")
    p.add_argument("--in-flight", type=int, default=64, help="images in flight per connection")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per row")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each row is measured")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="images/s the cores column is for")
    p.add_argument("--startup-timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.max_batch_size < 1 or args.connections < 1 or args.in_flight < 1 or args.duration <= 0:
        p.error("--max-batch-size, --connections, --in-flight >= 1 and --duration > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="patchlife-bench-model-cpu-ckpt-") as tmp:
            checkpoint = args.checkpoint
            if checkpoint is None:
                from .models import make_checkpoint

                print(f"making a calibrated {args.model} (its geometry; the stand-in never runs it) ...",
                      file=sys.stderr)
                checkpoint = make_checkpoint(args.model, Path(tmp) / args.model)
            body = measure(args, checkpoint)
    except RuntimeError as exc:
        print(f"python -m bench.model_cpu: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2) if args.json else table(body))
    return 0 if all(r["errors"] == 0 and r["images_per_s"] > 0 for r in body["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
