"""``patchlife loadtest --open-loop``: accuracy scaling under a spike, measured as it is served.

Two server configurations alternate, a fresh server each pass (``bench.child``): ``on`` with
``PATCHLIFE_LATENCY_OBJECTIVE_MS`` set to ``--objective-ms`` (the service may lower keep rates to
meet it, down to each image's floor), ``off`` with it unset (every image runs at the keep rate it
asked for). The requests are labelled held-out scenes of the synthetic counting task
(``loadmix.labelled_scenes``; ``--images-per-request``, 8 by default in this mode, so that the
model rather than the path around it sets the capacity).

First, on an ``off`` server, the same client measures the closed-loop capacity at the model's
default keep rate (C_default) and at the floor (C_floor, requests asking ``keep_rate=<floor>``),
with the top-1 of those answers (the fixed-rate service's accuracy at each rate). The offered rates
(``--offered``) may be given relative to them (``mid`` = (C_default + C_floor) / 2, the default;
``0.5d`` = half of C_default). Then, per configuration and offered rate, Poisson arrivals for
``--duration`` seconds (the same arrival times for ``on`` and ``off``); ``bench.scalereport`` turns
the answers into throughput, p50/p99, attainment, 503/504 counts, scaled share, served top-1 and
goodput. ``--plot FILE.png`` draws goodput, p99 and top-1 against the offered rate (``bench.scaleplot``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import httpx

from . import scalereport as sr
from .child import serve_child
from .loaddrive import ProcessDriver, busy_share
from .loadmix import LoadRequest, labelled_scenes, make_requests
from .loadpass import Pass, closed_loop, open_loop

OBJECTIVE_ENV, FLOOR_ENV = "PATCHLIFE_LATENCY_OBJECTIVE_MS", "PATCHLIFE_MIN_KEEP_RATE"
CONFIGS = ("on", "off")
DEFAULT_IMAGES_PER_REQUEST = 8
MAX_REQUESTS = 10**9  # open and closed loops here end by time


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("open loop with accuracy scaling (--open-loop; --clients, --duration, --repeat, "
                             "--warmup, --timeout, --processes, --checkpoint and --url apply too)")
    g.add_argument("--open-loop", action="store_true",
                   help="Poisson arrivals of labelled scenes against servers with the latency objective on and off")
    g.add_argument("--offered", default="mid",
                   help="offered rates, comma-separated: images/s, or relative to the closed-loop capacities: "
                        "'mid' = (C_default + C_floor) / 2, '0.5d' = 0.5 x C_default, '1.2f' = 1.2 x C_floor")
    g.add_argument("--objective-ms", type=float, default=250.0,
                   help=f"{OBJECTIVE_ENV} of the 'on' servers, and the objective attainment and goodput count by")
    g.add_argument("--floor", type=float, default=None,
                   help=f"keep rate of the C_floor closed loop (default: {FLOOR_ENV} if set, else the floor the "
                        "server reports in /v1/models, which a server with the objective off does not: then give it)")
    g.add_argument("--min-keep-rate", type=float, default=None,
                   help="send min_keep_rate=<this> with every open-loop request (default: none, the server's "
                        "default floor applies)")
    g.add_argument("--scaling", default=",".join(CONFIGS), help="server configurations to run: on, off or both")
    g.add_argument("--scenes", type=int, default=512, help="distinct labelled scenes")
    g.add_argument("--scene-seed", type=int, default=1,
                   help="item stream of the counting task (1: the embedded model's held-out stream)")
    g.add_argument("--capacity-duration", type=float, default=15.0, help="seconds of each closed-loop capacity pass")
    g.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw goodput, p99 and served top-1 against the offered rate (needs matplotlib: "
                        "pip install 'patchlife[plot]')")


def _check(args: argparse.Namespace, configs: list[str], tokens: list[str]) -> str | None:
    if not configs or set(configs) - set(CONFIGS):
        return f"--scaling: from {','.join(CONFIGS)} (got {args.scaling!r})"
    if args.url and sr.needs_capacity(tokens):
        return "--open-loop --url: give --offered in images/s (the capacities need servers started here)"
    if min(args.images_per_request, args.scenes, args.repeat, args.clients, args.processes) < 1:
        return "--images-per-request, --scenes, --repeat, --clients and --processes must be >= 1"
    if args.duration <= 0 or args.objective_ms <= 0 or args.capacity_duration <= 0:
        return "--duration, --objective-ms and --capacity-duration must be above 0"
    for name in ("floor", "min_keep_rate"):
        if (v := getattr(args, name)) is not None and not 0 < v <= 1:
            return f"--{name.replace('_', '-')} must be in (0, 1]"
    if args.plot:
        from .scaleplot import matplotlib_missing
        return matplotlib_missing()
    return None


@contextlib.contextmanager
def _server(config: str, args: argparse.Namespace) -> Iterator[str]:
    """A fresh server with the objective set (``on``) or unset (``off``); ``--url`` instead when given."""
    if args.url:
        yield args.url.rstrip("/")
        return
    env = {OBJECTIVE_ENV: f"{args.objective_ms:g}"} if config == "on" else {}
    if args.checkpoint:
        env["PATCHLIFE_CHECKPOINT"] = args.checkpoint
    with serve_child(env, ["--log-level", "warning"], args.startup_timeout,
                     unset=() if config == "on" else (OBJECTIVE_ENV,)) as child:
        yield child.url


def _client(url: str, args: argparse.Namespace) -> httpx.AsyncClient:
    # Open loop: never queue in the client's pool (a request waiting there would hide the server's queue).
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=max(64, args.clients * 2))
    return httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits)


async def _warm_up(url: str, payloads: list[LoadRequest], args: argparse.Namespace) -> None:
    async with _client(url, args) as client:
        await closed_loop(client, payloads, args.clients, args.warmup, 1e9)


def _drive(url: str, payloads: list[LoadRequest], args: argparse.Namespace, driver: ProcessDriver | None,
           rate_per_s: float | None, duration_s: float, seed: int) -> tuple[Pass, float | None]:
    """A recorded pass: closed loop (``rate_per_s`` None, ``--clients``) or Poisson arrivals; and the
    busiest load-generating process's share of a core."""
    if driver is not None:
        clients = args.clients if rate_per_s is None else driver.processes
        sent, busy = driver.run(url, payloads, clients, 0, MAX_REQUESTS, duration_s, args.timeout,
                                rate_per_s=rate_per_s, record=True)
        return sent, max((b for b in busy if b is not None), default=None)

    async def one() -> Pass:
        async with _client(url, args) as client:
            if rate_per_s is None:
                return await closed_loop(client, payloads, args.clients, MAX_REQUESTS, duration_s, record=True)
            return await open_loop(client, payloads, rate_per_s, MAX_REQUESTS, duration_s, seed=seed, record=True)

    sent = asyncio.run(one())
    return sent, busy_share(sent.client_cpu_s, sent.elapsed_s)


def _summary(sent: Pass, payloads: list[LoadRequest], objective_s: float | None, window_s: float,
             busy: float | None) -> dict[str, Any]:
    labels = [p.labels for p in payloads]
    return {**sr.pass_summary(sent.answers or [], labels, objective_s, window_s, sent.elapsed_s), "client_busy": busy}


def _capacity(url: str, payloads: list[LoadRequest], floor_payloads: list[LoadRequest], args: argparse.Namespace,
              driver: ProcessDriver | None) -> dict[str, Any]:
    out = {}
    for name, ps in (("default", payloads), ("floor", floor_payloads)):
        sent, busy = _drive(url, ps, args, driver, None, args.capacity_duration, 0)
        out[name] = _summary(sent, ps, None, args.capacity_duration, busy)
    return out


async def _models(url: str, args: argparse.Namespace) -> Any:
    """The server's ``GET /v1/models`` answer ({} when it has none)."""
    async with _client(url, args) as client:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            return (await client.get("/v1/models")).json()
    return {}


def _floor(args: argparse.Namespace, models: Any) -> float:
    if args.floor is not None:
        return float(args.floor)
    if os.environ.get(FLOOR_ENV):
        return float(os.environ[FLOOR_ENV])
    scaling = find_key(models, "accuracy_scaling")  # what a server with the objective on reports
    found = scaling.get("floor") if isinstance(scaling, dict) else find_key(models, "min_keep_rate")
    if not isinstance(found, int | float) or isinstance(found, bool):
        raise RuntimeError(f"no floor: give --floor (0.3 for the embedded model) or set {FLOOR_ENV}; the server's "
                           "/v1/models does not report one (a server with the objective off does not)")
    return float(found)


def find_key(body: Any, key: str) -> Any:
    """The first value of ``key`` in nested dicts and lists (depth first), or None."""
    if isinstance(body, dict):
        if key in body:
            return body[key]
        body = list(body.values())
    if isinstance(body, list):
        for v in body:
            if (found := find_key(v, key)) is not None:
                return found
    return None


def server_order(configs: list[str], repeat: int, capacity: bool) -> list[str]:
    """Configurations alternate pass by pass; ``off`` leads when it measures the capacities."""
    first = sorted(configs, key=lambda c: c != "off") if capacity else configs
    return first * repeat


def run(args: argparse.Namespace) -> int:
    if args.images_per_request is None:
        args.images_per_request = DEFAULT_IMAGES_PER_REQUEST
    configs = [c.strip() for c in args.scaling.split(",") if c.strip()]
    try:
        tokens = sr.parse_offered(args.offered)
    except ValueError as exc:
        return _fail(str(exc), 2)
    if problem := _check(args, configs, tokens):
        return _fail(problem, 2)
    mix, labels = labelled_scenes(args.scenes, args.scene_seed)
    extra = {"min_keep_rate": f"{args.min_keep_rate:g}"} if args.min_keep_rate is not None else None
    payloads = make_requests(mix, args.images_per_request, labels, extra)
    capacity_needed = sr.needs_capacity(tokens)
    if capacity_needed and "off" not in configs:
        configs = [*configs, "off"]  # the capacities are measured on a fixed-rate server
    order = ["server"] * args.repeat if args.url else server_order(configs, args.repeat, capacity_needed)
    objective_s = args.objective_ms / 1000.0
    body: dict[str, Any] = {"objective_ms": args.objective_ms, "images_per_request": args.images_per_request,
                            "duration_s": args.duration, "order": order, "tokens": tokens}
    capacities: list[dict[str, Any]] = []
    passes: dict[str, list[dict[str, Any]]] = {}
    rates: list[float] | None = None if capacity_needed else sr.resolve_offered(tokens, None, None)
    try:
        with contextlib.ExitStack() as stack:
            driver = stack.enter_context(ProcessDriver(args.processes)) if args.processes > 1 else None
            for i, config in enumerate(order):
                _say(args, f"[server {i + 1}/{len(order)}: scaling {config}] ...")
                with _server(config, args) as url:
                    asyncio.run(_warm_up(url, payloads, args))
                    if capacity_needed and config == "off":
                        models = asyncio.run(_models(url, args))
                        floor = body.setdefault("floor", _floor(args, models))
                        body.setdefault("default_keep_rate", find_key(models, "keep_rate"))
                        floor_payloads = make_requests([(png, floor) for png, _ in mix], args.images_per_request,
                                                       labels)
                        capacities.append(_capacity(url, payloads, floor_payloads, args, driver))
                        rates = rates or sr.resolve_offered(tokens, capacities[0]["default"]["images_per_s"],
                                                            capacities[0]["floor"]["images_per_s"])
                    assert rates is not None
                    for rate in rates:
                        _say(args, f"  offered {rate:.1f} images/s for {args.duration:g} s")
                        sent, busy = _drive(url, payloads, args, driver, rate / args.images_per_request,
                                            args.duration, seed=len(passes.get(config, [])) // max(len(rates), 1))
                        summary = {"offered": rate, **_summary(sent, payloads, objective_s, args.duration, busy)}
                        passes.setdefault(config, []).append(summary)
    except (RuntimeError, httpx.HTTPError) as exc:
        return _fail(str(exc), 1)
    assert rates is not None
    body["offered"] = rates
    if capacities:
        body["capacity"] = {k: sr.combine_passes([c[k] for c in capacities]) for k in ("default", "floor")}
    body["results"] = {c: [sr.combine_passes([p for p in ps if p["offered"] == r]) for r in rates]
                       for c, ps in passes.items()}
    if "on" in body["results"] and "off" in body["results"]:
        top1 = body.get("capacity", {}).get("default", {}).get("top1")
        body["comparison"] = [sr.comparison(on, off, top1)
                              for on, off in zip(body["results"]["on"], body["results"]["off"], strict=True)]
    print(json.dumps(body, indent=2) if args.json else sr.table(body))
    if args.plot:
        from .scaleplot import plot
        plot(body, args.plot)
        _say(args, f"plot: {args.plot}")
    return 0


def _say(args: argparse.Namespace, line: str) -> None:
    if not args.json:
        print(line, file=sys.stderr)


def _fail(message: str, code: int) -> int:
    print(f"patchlife loadtest: {message}", file=sys.stderr)
    return code
