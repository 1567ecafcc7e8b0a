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
saturation) and the CPU time of the server it started, summed over all the server's processes
(``bench.proctree``: the model process, API processes, replaced ones), per image. With
``--rate-fraction F`` an open-loop pass sends Poisson arrivals at F x the closed-loop throughput and
reports its latency percentiles (measured from the scheduled send time, so a slow server cannot
hide its queueing). With ``--idle-requests K``, K single-image requests are then sent one at a time
to the idle server; their p50 is compared with the server's own batch-1 compute + decode. ``--url``
targets a server that is already running (whatever it is configured with) instead of starting one.

``--open-loop`` is another test (``bench.scaling``): latency objective on against off, Poisson arrivals
of labelled scenes at offered rates, served top-1 and goodput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from . import loadreport as report
from . import scaling
from .child import serve_child
from .loaddrive import ProcessDriver, busy_share, run_wrk, wrk_available
from .loadmix import MIX_KINDS, LoadRequest, Mix, make_mix, make_requests
from .loadpass import Pass, closed_loop, open_loop, post

MODES = ("budget", "fifo", "unbatched")


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


ServerCpu = Callable[[], float | None]  # CPU seconds of the server's whole process tree so far


@dataclass(frozen=True)
class Served:
    url: str
    cpu: ServerCpu | None  # when this process started the server (bench.child: all its processes)


@contextlib.contextmanager
def server(mode: str, checkpoint: str | None, startup_s: float, threads: int | None = None) -> Iterator[Served]:
    """``patchlife serve`` in a subprocess for ``mode`` (``budget``, or ``budget@auto``: with that
    PATCHLIFE_API_PROCESSES); yields its URL and CPU reader once /readyz answers 200.

    ``threads``: PATCHLIFE_TORCH_THREADS of the server (None: inherited from this environment).
    """
    mode, _, api = mode.partition("@")
    env = {"PATCHLIFE_BATCHING": mode}
    if api:
        env["PATCHLIFE_API_PROCESSES"] = api
    if checkpoint:
        env["PATCHLIFE_CHECKPOINT"] = checkpoint
    if threads is not None:
        env["PATCHLIFE_TORCH_THREADS"] = str(threads)
    with serve_child(env, ["--log-level", "warning"], startup_s) as child:
        yield Served(child.url, child.cpu_seconds)


@dataclass
class Snapshot:
    """The server's counters, the machine's CPU times and the server's CPU time (all its processes) at one moment."""

    metrics: dict[str, float]
    cpu: Any
    server_s: float | None

    @staticmethod
    async def take(client: httpx.AsyncClient, server_cpu: ServerCpu | None) -> Snapshot:
        return Snapshot(await scrape(client), report.read_cpu_times(), server_cpu() if server_cpu else None)

    @staticmethod
    def take_blocking(url: str, server_cpu: ServerCpu | None) -> Snapshot:
        """The same from a thread without an event loop (between the client processes' warm-up and start)."""
        try:
            metrics = report.parse_metrics(httpx.get(url + "/metrics", timeout=10).text)
        except httpx.HTTPError:
            metrics = {}
        return Snapshot(metrics, report.read_cpu_times(), server_cpu() if server_cpu else None)


async def _closed(client: httpx.AsyncClient, url: str, payloads: list[LoadRequest], args: argparse.Namespace,
                  server_cpu: ServerCpu | None,
                  driver: ProcessDriver | None) -> tuple[dict[str, Any], int, float, Snapshot]:
    """The measured closed loop by the chosen driver: (its summary, images, seconds, the snapshot before)."""
    loop = asyncio.get_running_loop()
    if driver is not None and args.driver != "wrk":
        snap: list[Snapshot] = []
        closed, busy = await loop.run_in_executor(None, lambda: driver.run(
            url, payloads, args.clients, args.warmup, args.requests, args.duration, args.timeout,
            between=lambda: snap.append(Snapshot.take_blocking(url, server_cpu))))
        return {**closed.summary(), **_busy(busy)}, closed.images, closed.elapsed_s, snap[0]
    await closed_loop(client, payloads, args.clients, args.warmup, 1e9)
    before = await Snapshot.take(client, server_cpu)
    if args.driver == "wrk":
        p = payloads[0]
        w = await loop.run_in_executor(None, lambda: run_wrk(url, p.path, p.body, p.headers["content-type"],
                                                             args.clients, args.duration))
        requests = w.get("requests", 0)
        images = (requests - w["non_2xx"]) * p.images
        summary = {"images_per_s": round(images / w["elapsed_s"], 2), "requests_per_s": w.get("requests_per_s"),
                   "p50_ms": w.get("p50_ms"), "p95_ms": None, "p99_ms": w.get("p99_ms"),
                   "errors": w["non_2xx"] + w["socket_errors"], "requests": requests, "images": images,
                   "client_cpu_ms_per_request": round(1000 * w["client_cpu_s"] / requests, 3) if requests else None,
                   **_busy([busy_share(w["client_cpu_s"], w["elapsed_s"])])}
        return summary, images, w["elapsed_s"], before
    closed = await closed_loop(client, payloads, args.clients, args.requests, args.duration, start=args.warmup)
    return ({**closed.summary(), **_busy([busy_share(closed.client_cpu_s, closed.elapsed_s)])}, closed.images,
            closed.elapsed_s, before)


def _busy(shares: list[float | None]) -> dict[str, Any]:
    known = [b for b in shares if b is not None]
    return {"client_processes": len(shares), "client_busy_max": max(known) if known else None}


async def measure(url: str, payloads: list[LoadRequest], args: argparse.Namespace,
                  transport: httpx.AsyncBaseTransport | None = None, server_cpu: ServerCpu | None = None,
                  driver: ProcessDriver | None = None) -> dict[str, Any]:
    """One pass: warm-up, closed loop (with /metrics, /proc/stat and the server's CPU time before and
    after), then the server's batching info, optional open loop, optional idle single requests.

    One keep-alive client for all of it: connections are opened during the warm-up and reused.
    ``server_cpu``: the CPU seconds of the server's processes, when this process started it.
    ``driver``: client processes that run the closed loop instead of this process (``--processes``).
    """
    limits = httpx.Limits(max_connections=max(args.clients, 1) * 4, max_keepalive_connections=max(args.clients, 1) * 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits, transport=transport) as client:
        summary, images, elapsed, before = await _closed(client, url, payloads, args, server_cpu, driver)
        cpu_after, server_after = report.read_cpu_times(), server_cpu() if server_cpu else None
        after = await scrape(client)
        result = {**summary, **report.window_summary(report.deltas(before.metrics, after), elapsed)}
        result["cpu_idle"] = report.idle_share(before.cpu, cpu_after)  # the whole machine's, at saturation
        server_s = server_after - before.server_s if server_after is not None and before.server_s is not None else None
        result["server_cpu_ms_per_image"] = round(1000.0 * server_s / images, 3) if server_s is not None and images \
            else None
        result["batching"] = info = await batching(client)
        if info is not None and info.get("cost_model") is None:
            info["cost_model"] = report.cost_model_from_gauges(after)
        if args.rate_fraction > 0 and summary["requests_per_s"]:
            result["open_loop"] = await _open_loop_pass(client, url, payloads, args, summary["requests_per_s"], driver)
        if args.idle_requests > 0:
            result["idle"] = await idle_requests(client, payloads, args.idle_requests)
        return result


async def _open_loop_pass(client: httpx.AsyncClient, url: str, payloads: list[LoadRequest], args: argparse.Namespace,
                          closed_requests_per_s: float, driver: ProcessDriver | None) -> dict[str, Any]:
    """Poisson arrivals at ``--rate-fraction`` of the closed loop's requests/s, from the client processes when
    there are some (their busy share is reported: a saturated sender delays its own arrivals)."""
    rate = args.rate_fraction * closed_requests_per_s  # requests/s
    if driver is not None:
        sent, busy = await asyncio.get_running_loop().run_in_executor(None, lambda: driver.run(
            url, payloads, args.clients, 0, args.requests, args.duration, args.timeout, rate_per_s=rate))
    else:
        sent = await open_loop(client, payloads, rate, args.requests, args.duration)
        busy = [busy_share(sent.client_cpu_s, sent.elapsed_s)]
    opened = sent.summary()
    return {"rate_per_s": round(rate, 2), **{k: opened[k] for k in ("images_per_s", "p50_ms", "p95_ms", "p99_ms",
                                                                      "errors")}, **_busy(busy),
            "p99_over_p50": round(opened["p99_ms"] / opened["p50_ms"], 2) if opened["p50_ms"] else None}


async def idle_requests(client: httpx.AsyncClient, payloads: list[LoadRequest], k: int,
                        settle_s: float = 0.5) -> dict[str, Any]:
    """``k`` requests one at a time (one image each, the model's default keep rate) to an idle server,
    against the server's own batch-1 compute and decode over the same requests (from /metrics)."""
    singles = make_requests([(p.mix[0][0], None) for p in payloads[:k]], 1)
    await asyncio.sleep(settle_s)  # let the load's queues drain and the server's idle threads stop spinning
    out, before = Pass(), await scrape(client)
    for i in range(k):
        await post(client, singles[i % len(singles)], out, time.perf_counter())
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

    from service.runtime.engine import Engine
    from service.runtime.worker import set_torch_threads
    from service.settings import Settings

    set_torch_threads(threads)
    s = Settings()
    engine = Engine.from_settings(s.model_copy(update={"checkpoint": Path(checkpoint)}) if checkpoint else s)
    pixels = [engine.preprocess(Image.open(io.BytesIO(png))) for png, _ in mix]
    rates = [r for _, r in mix]

    def one_pass() -> int:
        for i in range(0, len(pixels), batch_size):
            engine.run_batch(pixels[i:i + batch_size], rates[i:i + batch_size])
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
    p.add_argument("--mix", default="scenes",
                   help=f"kinds of image in the mix, cycled image by image (comma-separated, from "
                        f"{','.join(MIX_KINDS)}): the synthetic task's PNG scenes and photo-like JPEGs of 224x224, "
                        "640x480, 1000x872 and 1500x1000 made by code")
    p.add_argument("--images-per-request", type=int, default=None,
                   help="images in one multipart request (spreads the HTTP cost; the throughput is in images/s; "
                        "default: 1, with --open-loop 8)")
    p.add_argument("--keep-rates", type=_rates, default="default,0.5,0.7,0.9",  # argparse applies type
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
    p.add_argument("--processes", type=int, default=1,
                   help="client processes sharing --clients and the open loop's arrivals (1: this process drives "
                        "the load; with --driver wrk they send the open loop only); the table warns when one was "
                        "busy over 70%% of a core")
    p.add_argument("--driver", choices=("httpx", "wrk"), default="httpx",
                   help="wrk: the wrk tool (if installed) sends the first request of the mix, prebuilt, for the "
                        "closed-loop maximum; httpx: this tool's own clients (every request of the mix)")
    p.add_argument("--api-processes", default=None,
                   help="PATCHLIFE_API_PROCESSES values to compare for each mode (comma-separated, e.g. 0,auto: "
                        "servers alternate pass by pass; ratios to the first value are reported)")
    p.add_argument("--json", action="store_true", help="print only a JSON object (medians and every pass)")
    scaling.add_arguments(p)


def _one_pass(mode: str, payloads: list[LoadRequest], args: argparse.Namespace,
              driver: ProcessDriver | None = None) -> dict[str, Any]:
    if args.url:
        return asyncio.run(measure(args.url.rstrip("/"), payloads, args, driver=driver))
    with server(mode, args.checkpoint, args.startup_timeout, args.torch_threads) as served:
        return asyncio.run(measure(served.url, payloads, args, server_cpu=served.cpu, driver=driver))


def _offline_reference(payloads: list[LoadRequest], args: argparse.Namespace) -> float:
    from service.settings import Settings
    s = Settings()
    threads = s.torch_threads if args.torch_threads is None else args.torch_threads
    sent = [image for p in payloads for image in p.mix]  # the images and keep rates the servers got
    return round(offline_images_per_s(sent, args.checkpoint, s.max_batch_size, args.offline_seconds, threads), 2)


def _kinds(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _variants(modes: list[str], api_processes: str | None) -> list[str]:
    """Each mode, or each mode at each ``--api-processes`` value (``budget@0``, ``budget@auto``)."""
    if not api_processes:
        return modes
    return [f"{m}@{a.strip()}" for m in modes for a in api_processes.split(",") if a.strip()]


def _check(args: argparse.Namespace, modes: list[str]) -> str | None:
    if unknown := sorted({m.partition("@")[0] for m in modes} - set(MODES)):
        return f"unknown modes {unknown}; choose from {list(MODES)}"
    if not _kinds(args.mix) or (unknown := sorted(set(_kinds(args.mix)) - set(MIX_KINDS))):
        return f"--mix: kinds from {','.join(MIX_KINDS)} (got {args.mix!r})"
    if min(args.images_per_request, args.clients, args.mix_size, args.repeat, args.processes) < 1:
        return "--images-per-request, --clients, --mix-size, --repeat and --processes must be >= 1"
    if args.driver == "wrk" and not wrk_available():
        return "--driver wrk needs the wrk tool on PATH (Debian: apt-get install wrk)"
    return None


def run(args: argparse.Namespace) -> int:
    if args.open_loop:
        return scaling.run(args)
    if args.images_per_request is None:
        args.images_per_request = 1
    modes = _variants([m.strip() for m in args.modes.split(",") if m.strip()], args.api_processes)
    if problem := _check(args, modes):
        print(f"patchlife loadtest: {problem}", file=sys.stderr)
        return 2
    payloads = make_requests(make_mix(args.mix_size, args.keep_rates, kinds=_kinds(args.mix)), args.images_per_request)
    order = ["server"] * args.repeat if args.url else report.pass_order(modes, args.repeat)
    passes: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        driver = stack.enter_context(ProcessDriver(args.processes)) if args.processes > 1 else None
        for i, mode in enumerate(order):
            if not args.json:
                print(f"[pass {i + 1}/{len(order)}: {mode}] ...", file=sys.stderr)
            try:
                passes.setdefault(mode, []).append(_one_pass(mode, payloads, args, driver))
            except RuntimeError as exc:
                print(f"patchlife loadtest: {exc}", file=sys.stderr)
                return 1
    results = {mode: report.combine(ps) for mode, ps in passes.items()}
    body: dict[str, Any] = {"order": order, "modes": results, "budget_over_fifo": report.pair_ratios(results)}
    if args.api_processes and not args.url:
        body["api_processes"] = report.variant_ratios(results)
    if args.offline:
        body["offline_images_per_s"] = offline = _offline_reference(payloads, args)
        budget = results.get("budget", results.get("server"))
        body["budget_over_offline"] = round(budget["images_per_s"] / offline, 4) if budget and offline else None
    print(json.dumps(body, indent=2) if args.json else report.table(body))
    return 0 if all(r["errors"] == 0 for r in results.values()) else 1
