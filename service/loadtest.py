"""``patchlife loadtest``: budget-grouped vs FIFO vs unbatched serving, under the same load.

For each pass it starts ``patchlife serve`` on a free loopback port (``PATCHLIFE_BATCHING`` set to
the mode, every other ``PATCHLIFE_*`` variable of the caller passed on), waits for ``/readyz``,
warms it up, then drives it closed-loop: ``--clients`` clients, each POSTing
``--images-per-request`` images to ``/classify`` and sending the next request as soon as the answer
is back, until ``--requests`` requests or ``--duration`` seconds. The image mix is fixed (the
synthetic counting task's scenes, from empty to busy, at a cycle of keep rates), so every mode sees
the same requests in the same order.

Single passes vary by 15-20% on a shared machine, so each mode runs ``--repeat`` passes, a fresh
server each: the batched modes alternate pass by pass (budget, fifo, budget, fifo, ...), unbatched
runs after them. The table shows each mode's medians with the images/s spread over its passes, the
budget/FIFO ratio of each adjacent pair of passes and their median, and budget against the offline
reference (``--offline``: the same model and mix in-process, no HTTP).

The client is kept cheap so that the server, not the client, is measured (they share the CPU on one
machine): every request body is multipart-encoded once up front, each pass uses one keep-alive
client, and an answer is checked by counting its results in the raw bytes (no JSON decoding).
Several images per request spread the HTTP cost over them, which matters for tiny models; the
client's own CPU time per request is reported.

What the server did is explained from its ``/metrics`` counters read before and after the measured
window (batch sizes, merges, padding, waste, model busy share; see ``loadreport.SERIES``), its
``GET /v1/models`` (bucket count and cost model), ``/proc/stat`` (the machine's idle share at
saturation) and ``/proc/<pid>/stat`` of the server it started (CPU time per image). With
``--rate-fraction F`` an open-loop pass sends Poisson arrivals at F x the closed-loop throughput and
reports its latency percentiles (measured from the scheduled send time, so a slow server cannot
hide its queueing). With ``--idle-requests K``, K single-image requests are then sent one at a time
to the idle server; their p50 is compared with the server's own batch-1 compute + decode. ``--url``
targets a server that is already running (whatever it is configured with) instead of starting one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from . import loadreport as report
from .child import serve_child

MODES = ("budget", "fifo", "unbatched")
Mix = list[tuple[bytes, float | None]]  # (PNG, keep rate), one per image


# -- the request mix ---------------------------------------------------------------------------
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _synthetic_images(n: int, seed: int) -> list[Image.Image]:
    """The synthetic counting task's scenes (0-11 objects): budgets vary with their content."""
    from model.data import SyntheticShapes  # the package ships with the service: always there

    data = SyntheticShapes(n, seed=seed)
    return [data.image(i)[0] for i in range(n)]


def make_mix(n: int, keep_rates: list[float | None], seed: int = 7) -> Mix:
    """``n`` (PNG bytes, keep rate) pairs; keep rates cycle so each meets every kind of image."""
    images = _synthetic_images(n, seed)
    return [(_png(img), keep_rates[i % len(keep_rates)]) for i, img in enumerate(images)]


@dataclass(frozen=True)
class LoadRequest:
    """One request, encoded once: POST ``path`` with ``body`` (multipart, ``images`` files)."""

    path: str
    body: bytes
    headers: dict[str, str]
    images: int
    mix: Mix  # the (PNG, keep rate) of each image it carries


def make_requests(mix: Mix, per_request: int) -> list[LoadRequest]:
    """``len(mix)`` requests of ``per_request`` images each.

    Request ``k`` carries images ``k*n .. k*n+n-1`` of the mix (cyclically) at the keep rate of mix
    entry ``k``: with one image per request that is the mix itself, and with more the keep rates
    still cycle from request to request.
    """
    out = []
    for k in range(len(mix)):
        rate = mix[k][1]
        pngs = [mix[(k * per_request + j) % len(mix)][0] for j in range(per_request)]
        files = [("files", (f"{j}.png", png, "image/png")) for j, png in enumerate(pngs)]
        params = {} if rate is None else {"keep_rate": str(rate)}
        request = httpx.Request("POST", "http://loadtest/classify", params=params, files=files)
        path = request.url.raw_path.decode()
        out.append(LoadRequest(path, request.read(), {"content-type": request.headers["content-type"]},
                           len(pngs), [(png, rate) for png in pngs]))
    return out


# -- one pass of load ---------------------------------------------------------------------------
@dataclass
class Pass:
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    images: int = 0
    elapsed_s: float = 0.0
    client_cpu_s: float = 0.0    # this process's CPU time during the pass (the load generator's cost)

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != "200")

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies_s or [float("nan")]) * 1000.0
        p50, p95, p99 = (float(np.percentile(lat, q)) for q in (50, 95, 99))
        requests, secs = sum(self.statuses.values()), self.elapsed_s or float("inf")
        return {"images_per_s": round(self.images / secs, 2), "requests_per_s": round(len(self.latencies_s) / secs, 2),
                "p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "p99_ms": round(p99, 2),
                "errors": self.errors, "requests": requests, "images": self.images,
                "error_statuses": {s: n for s, n in self.statuses.items() if s != "200"},
                "client_cpu_ms_per_request": round(1000.0 * self.client_cpu_s / requests, 3) if requests else None}


async def _post(client: httpx.AsyncClient, payload: LoadRequest, out: Pass, t0: float) -> None:
    try:
        r = await client.post(payload.path, content=payload.body, headers=payload.headers)
        status = str(r.status_code)
        # One result per image, in raw bytes (each result has exactly one "timings_ms" key).
        if status == "200" and r.content.count(b'"timings_ms"') != payload.images:
            status = "wrong_result_count"
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    out.statuses[status] += 1
    if status == "200":
        out.latencies_s.append(time.perf_counter() - t0)
        out.images += payload.images


async def closed_loop(client: httpx.AsyncClient, payloads: list[LoadRequest], clients: int, requests: int,
                      duration_s: float, start: int = 0) -> Pass:
    """``clients`` concurrent clients, each sending its next request when the last is answered."""
    out, sent = Pass(), 0
    t_start, cpu_start = time.perf_counter(), time.process_time()
    end = t_start + duration_s

    async def client_loop() -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < end:
            payload = payloads[(start + sent) % len(payloads)]
            sent += 1
            await _post(client, payload, out, time.perf_counter())

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    out.elapsed_s = time.perf_counter() - t_start
    out.client_cpu_s = time.process_time() - cpu_start
    return out


async def open_loop(client: httpx.AsyncClient, payloads: list[LoadRequest], rate_per_s: float, requests: int,
                    duration_s: float, seed: int = 0) -> Pass:
    """Poisson arrivals at ``rate_per_s`` requests/s; latency counts from each request's scheduled time."""
    out, rng, tasks = Pass(), random.Random(seed), []
    t_start, cpu_start = time.perf_counter(), time.process_time()
    due = t_start
    for i in range(requests):
        due += rng.expovariate(rate_per_s)
        if due - t_start > duration_s:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(_post(client, payloads[i % len(payloads)], out, due)))
    await asyncio.gather(*tasks)
    out.elapsed_s = time.perf_counter() - t_start
    out.client_cpu_s = time.process_time() - cpu_start
    return out


# -- the server ---------------------------------------------------------------------------------
async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """The series of ``loadreport.SERIES`` that ``/metrics`` has (absent ones are missing from the dict)."""
    try:
        return report.parse_metrics((await client.get("/metrics")).text)
    except httpx.HTTPError:
        return {}


async def batching(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """Bucket count and cost model from ``GET /v1/models`` (None if the server does not say)."""
    try:
        r = await client.get("/v1/models")
        return report.batching_info(r.json()) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


@dataclass(frozen=True)
class Served:
    url: str
    pid: int | None  # the server's process id when this process started it (its CPU time is read)


@contextlib.contextmanager
def server(mode: str, checkpoint: str | None, startup_s: float, threads: int | None = None) -> Iterator[Served]:
    """``patchlife serve`` in a subprocess for ``mode``; yields its URL and pid once /readyz answers 200.

    ``threads``: PATCHLIFE_TORCH_THREADS of the server (None: inherited from this environment).
    """
    env = {"PATCHLIFE_BATCHING": mode}
    if checkpoint:
        env["PATCHLIFE_CHECKPOINT"] = checkpoint
    if threads is not None:
        env["PATCHLIFE_TORCH_THREADS"] = str(threads)
    with serve_child(env, ["--log-level", "warning"], startup_s) as child:
        yield Served(child.url, child.proc.pid)


async def measure(url: str, payloads: list[LoadRequest], args: argparse.Namespace,
                  transport: httpx.AsyncBaseTransport | None = None, pid: int | None = None) -> dict[str, Any]:
    """One pass: warm-up, closed loop (with /metrics, /proc/stat and the server's CPU time before and
    after), then the server's batching info, optional open loop, optional idle single requests.

    One keep-alive client for all of it: connections are opened during the warm-up and reused.
    ``pid``: the server's process, when this process started it.
    """
    limits = httpx.Limits(max_connections=max(args.clients, 1) * 4, max_keepalive_connections=max(args.clients, 1) * 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits, transport=transport) as client:
        await closed_loop(client, payloads, args.clients, args.warmup, 1e9)
        before, cpu_before, server_before = await scrape(client), report.read_cpu_times(), report.process_cpu_s(pid)
        closed = await closed_loop(client, payloads, args.clients, args.requests, args.duration, start=args.warmup)
        cpu_after, server_after, after = report.read_cpu_times(), report.process_cpu_s(pid), await scrape(client)
        result = {**closed.summary(), **report.explain(report.deltas(before, after), closed.elapsed_s)}
        result["cpu_idle"] = report.idle_share(cpu_before, cpu_after)  # the whole machine's, at saturation
        server_s = server_after - server_before if server_after is not None and server_before is not None else None
        result["server_cpu_ms_per_image"] = round(1000.0 * server_s / closed.images, 3) \
            if server_s is not None and closed.images else None
        result["batching"] = info = await batching(client)
        if info is not None and info.get("cost_model") is None:
            info["cost_model"] = report.cost_model_from_gauges(after)
        if args.rate_fraction > 0 and closed.latencies_s:
            result["open_loop"] = await _open_loop_pass(client, payloads, args, closed)
        if args.idle_requests > 0:
            result["idle"] = await idle_requests(client, payloads, args.idle_requests)
        return result


async def _open_loop_pass(client: httpx.AsyncClient, payloads: list[LoadRequest], args: argparse.Namespace,
                          closed: Pass) -> dict[str, Any]:
    rate = args.rate_fraction * len(closed.latencies_s) / closed.elapsed_s  # requests/s
    opened = (await open_loop(client, payloads, rate, args.requests, args.duration)).summary()
    return {"rate_per_s": round(rate, 2), **{k: opened[k] for k in ("images_per_s", "p50_ms", "p95_ms", "p99_ms",
                                                                      "errors")},
            "p99_over_p50": round(opened["p99_ms"] / opened["p50_ms"], 2) if opened["p50_ms"] else None}


async def idle_requests(client: httpx.AsyncClient, payloads: list[LoadRequest], k: int,
                        settle_s: float = 0.5) -> dict[str, Any]:
    """``k`` requests one at a time (one image each, the model's default keep rate) to an idle server,
    against the server's own batch-1 compute and decode over the same requests (from /metrics)."""
    singles = make_requests([(p.mix[0][0], None) for p in payloads[:k]], 1)
    await asyncio.sleep(settle_s)  # let the load's queues drain and the server's idle threads stop spinning
    out, before = Pass(), await scrape(client)
    for i in range(k):
        await _post(client, singles[i % len(singles)], out, time.perf_counter())
    return report.idle_summary(out.latencies_s, out.errors, report.deltas(before, await scrape(client)))


# -- the offline reference ----------------------------------------------------------------------
def offline_images_per_s(mix: Mix, checkpoint: str | None, batch_size: int, seconds: float = 5.0,
                         threads: int = 0) -> float:
    """The same model and mix without HTTP: head in batches, tail grouped by bucket, in-process.

    The model runs in a thread of its own with ``threads`` torch threads (0: torch's default), as
    the server's worker does.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="offline-model") as pool:
        return pool.submit(_offline, mix, checkpoint, batch_size, seconds, threads).result()


def _offline(mix: Mix, checkpoint: str | None, batch_size: int, seconds: float, threads: int) -> float:

    from service.engine import Engine
    from service.settings import Settings
    from service.worker import set_torch_threads

    set_torch_threads(threads)
    s = Settings()
    engine = Engine.from_settings(s.model_copy(update={"checkpoint": Path(checkpoint)}) if checkpoint else s)
    pixels = [engine.preprocess(Image.open(io.BytesIO(png))) for png, _ in mix]
    rates = [r for _, r in mix]

    def one_pass() -> int:
        for i in range(0, len(pixels), batch_size):
            engine.tail_by_bucket(engine.head(pixels[i:i + batch_size], rates[i:i + batch_size])).get()
        return len(pixels)

    one_pass()  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += one_pass()
    return done / (time.perf_counter() - t0)


# -- command line -------------------------------------------------------------------------------
def _rates(text: str) -> list[float | None]:
    return [None if v.strip() in ("default", "none", "") else float(v) for v in text.split(",")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="load a running server instead of starting one per mode")
    p.add_argument("--modes", default=",".join(MODES), help="batching modes to compare (comma-separated)")
    p.add_argument("--checkpoint", default=None, help="checkpoint the servers load (default: PATCHLIFE_CHECKPOINT "
                                                      "or the embedded model)")
    p.add_argument("--clients", type=int, default=32, help="concurrent closed-loop clients")
    p.add_argument("--requests", type=int, default=2000, help="most requests per pass")
    p.add_argument("--duration", type=float, default=30.0, help="most seconds per pass")
    p.add_argument("--warmup", type=int, default=64, help="requests sent before measuring")
    p.add_argument("--mix-size", type=int, default=256, help="distinct images in the mix (and distinct requests)")
    p.add_argument("--images-per-request", type=int, default=1,
                   help="images in one multipart request (spreads the HTTP cost; the throughput is in images/s)")
    p.add_argument("--keep-rates", type=_rates, default=_rates("default,0.5,0.7,0.9"),
                   help="keep rates the requests cycle through ('default': the model's)")
    p.add_argument("--rate-fraction", type=float, default=0.0,
                   help="also run open-loop at this fraction of the closed-loop throughput (e.g. 0.7)")
    p.add_argument("--offline", action="store_true", help="also time the same mix in-process, without HTTP")
    p.add_argument("--offline-seconds", type=float, default=10.0, help="how long the offline reference runs")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PATCHLIFE_TORCH_THREADS of the servers started here and of the offline reference "
                        "(default: inherited from the environment)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    p.add_argument("--repeat", type=int, default=3,
                   help="passes per mode; batched modes alternate pass by pass (budget, fifo, budget, ...), "
                        "unbatched runs after them; medians are reported")
    p.add_argument("--idle-requests", type=int, default=0,
                   help="after each pass, send this many single-image requests one at a time to the idle server "
                        "and compare their p50 with the server's batch-1 compute + decode (0: off)")
    p.add_argument("--json", action="store_true", help="print only a JSON object (medians and every pass)")


def _one_pass(mode: str, payloads: list[LoadRequest], args: argparse.Namespace) -> dict[str, Any]:
    if args.url:
        return asyncio.run(measure(args.url.rstrip("/"), payloads, args))
    with server(mode, args.checkpoint, args.startup_timeout, args.torch_threads) as served:
        return asyncio.run(measure(served.url, payloads, args, pid=served.pid))


def _offline_reference(payloads: list[LoadRequest], args: argparse.Namespace) -> float:
    from service.settings import Settings
    s = Settings()
    threads = s.torch_threads if args.torch_threads is None else args.torch_threads
    sent = [image for p in payloads for image in p.mix]  # the images and keep rates the servers got
    return round(offline_images_per_s(sent, args.checkpoint, s.max_batch_size, args.offline_seconds, threads), 2)


def _check(args: argparse.Namespace, modes: list[str]) -> str | None:
    if unknown := sorted(set(modes) - set(MODES)):
        return f"unknown modes {unknown}; choose from {list(MODES)}"
    if min(args.images_per_request, args.clients, args.mix_size, args.repeat) < 1:
        return "--images-per-request, --clients, --mix-size and --repeat must be >= 1"
    return None


def run(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if problem := _check(args, modes):
        print(f"patchlife loadtest: {problem}", file=sys.stderr)
        return 2
    payloads = make_requests(make_mix(args.mix_size, args.keep_rates), args.images_per_request)
    order = ["server"] * args.repeat if args.url else report.pass_order(modes, args.repeat)
    passes: dict[str, list[dict[str, Any]]] = {}
    for i, mode in enumerate(order):
        if not args.json:
            print(f"[pass {i + 1}/{len(order)}: {mode}] ...", file=sys.stderr)
        try:
            passes.setdefault(mode, []).append(_one_pass(mode, payloads, args))
        except RuntimeError as exc:
            print(f"patchlife loadtest: {exc}", file=sys.stderr)
            return 1
    results = {mode: report.combine(ps) for mode, ps in passes.items()}
    body: dict[str, Any] = {"order": order, "modes": results, "budget_over_fifo": report.pair_ratios(results)}
    if args.offline:
        body["offline_images_per_s"] = offline = _offline_reference(payloads, args)
        budget = results.get("budget", results.get("server"))
        body["budget_over_offline"] = round(budget["images_per_s"] / offline, 4) if budget and offline else None
    print(json.dumps(body, indent=2) if args.json else report.table(body))
    return 0 if all(r["errors"] == 0 for r in results.values()) else 1
