"""``patchlife bench-frontend``: can the service's front end feed the model? For a GPU host, with
the targets of the issue "A front end that can feed a GPU"; ``patchlife gpu-check`` runs it.

It makes a calibrated ``deit_small`` on the spot (:mod:`bench.models`; or ``--checkpoint``), times
the offline served path (``patchlife bench --served``: the engine as the worker runs it, no HTTP) at
``--offline-batch``, then starts one ``patchlife serve`` (``PATCHLIFE_API_PROCESSES=auto`` unless
``--api-processes``) and, for each photo size (224-px and 1000-px JPEGs made by
:mod:`bench.photos`) and images per request (1 and 16), runs one ``patchlife loadtest`` pass
against it: the closed-loop maximum (by ``wrk`` where it is installed and one image goes per
request, else by ``--processes`` client processes), then an open loop at ``--rate-fraction`` (0.7)
of that rate from the client processes, for its p99. Each row: images/s, p50/p99, server CPU per
image (every process of the server), the open loop's p99, the busiest client process, and the
images/s over the offline served path's.

``--device cpu --model near-null`` runs the same plumbing cheaply without a GPU (the tests do).

``--engine stand-in`` measures the service around the model instead, on any machine: the server's
engine is a stand-in device that takes a measured table's time per batch (``--table``) without
using the CPU, and each row gives the CPU of the model process and of the API processes apart, and
the cores ``--rate`` images/s would need (:mod:`bench.standin_frontend`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import loadtest, standin_frontend
from .child import serve_child
from .loaddrive import ProcessDriver, wrk_available
from .loadmix import make_mix, make_requests
from .loadreport import BUSY_WARNING
from .models import MODELS
from .standin_frontend import DEFAULT_RATE as STANDIN_RATE
from .standin_frontend import INPUTS as STANDIN_INPUTS
from .standin_frontend import _fmt, _list  # one home for the two tables' helpers

PHOTOS = {"224px": "photo224", "1000px": "photo1000"}  # row name -> loadmix kind


@dataclass(frozen=True)
class Target:
    """A row's target on an H200-class host: images/s at least, open-loop p99 at most (ms), images/s over offline."""

    images_per_s: float | None = None
    open_p99_ms: float | None = None
    over_offline: float | None = None


TARGETS = {("224px", 1): Target(8_000, 100.0), ("224px", 16): Target(12_000, over_offline=0.5)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: --model, made on the spot)")
    p.add_argument("--model", default="deit-small", choices=sorted(MODELS),
                   help="the model made without --checkpoint (default: deit-small)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu", "auto"), help="PATCHLIFE_DEVICE and the "
                                                                                   "offline bench's device")
    p.add_argument("--api-processes", default="auto", help="PATCHLIFE_API_PROCESSES of the server")
    p.add_argument("--photos", default=",".join(PHOTOS), help=f"photo sizes (comma-separated, from {','.join(PHOTOS)})")
    p.add_argument("--images-per-request", default="1,16", help="images per request (comma-separated)")
    p.add_argument("--processes", type=int, default=max(2, (os.cpu_count() or 2) // 4),
                   help="client processes (the closed loop without wrk, and the open loop)")
    p.add_argument("--clients", type=int, default=64, help="requests in flight in the closed loop")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per closed and per open loop")
    p.add_argument("--rate-fraction", type=float, default=0.7, help="the open loop's rate, as a fraction of the "
                                                                    "closed loop's")
    p.add_argument("--offline-batch", type=int, default=64, help="batch size of the offline served path")
    p.add_argument("--no-wrk", action="store_true", help="client processes for the closed loop even where wrk is")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    p.add_argument("--json", action="store_true", help="print only a JSON object")
    stand_in = p.add_argument_group("--engine stand-in (bench/standin_frontend.py)")
    stand_in.add_argument("--engine", default="model", choices=("model", "stand-in"),
                          help="model: serve the checkpoint on --device; stand-in: a stand-in device whose batches "
                               "take --table's times, for the CPU the service itself costs")
    stand_in.add_argument("--table", type=Path, help="the stand-in's device times, JSON (default: "
                                                     "bench/tables/h200_deit_small.json)")
    stand_in.add_argument("--inputs", default=",".join(STANDIN_INPUTS),
                          help="stand-in inputs (comma-separated, from " + ",".join(STANDIN_INPUTS) + ")")
    stand_in.add_argument("--rate", type=float, default=STANDIN_RATE, help="images/s to size the cores for")
    stand_in.add_argument("--device-decode-ms", type=float, default=None, metavar="MS",
                          help="the model process decodes JPEGs on the stand-in device, MS per image of device time "
                               "(as beside a GPU, where PATCHLIFE_DECODE=auto decodes with nvJPEG): the API "
                               "processes read headers and pass the bytes on (default: they decode)")
    stand_in.add_argument("--max-batch-size", type=int, default=64,
                          help="PATCHLIFE_MAX_BATCH_SIZE of the stand-in's server (unless set in the environment)")


def served_images_per_s(checkpoint: Path, device: str, batch: int) -> float:
    """``patchlife bench --served`` of the checkpoint, in its own process: the served variant's images/s."""
    argv = [sys.executable, "-m", "cli", "bench", "--served", "--checkpoint", str(checkpoint), "--device", device,
            "--dtype", "auto", "--batch-size", str(batch), "--rounds", "5", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"patchlife bench --served failed: {done.stderr.strip()[-300:]}")
    variants = {v["name"]: v for v in json.loads(done.stdout)["variants"]}
    return float(variants["served"]["images_per_s"])


def _pass_args(args: argparse.Namespace, per_request: int, wrk: bool) -> argparse.Namespace:
    """loadtest's options for one row: duration-bound passes, the open loop on."""
    parser = argparse.ArgumentParser()
    loadtest.add_arguments(parser)
    ns = parser.parse_args([])
    overrides = {"clients": args.clients, "requests": 10**9, "duration": args.duration, "warmup": 4 * args.clients,
                 "images_per_request": per_request, "rate_fraction": args.rate_fraction,
                 "processes": args.processes, "driver": "wrk" if wrk else "httpx", "timeout": 60.0}
    for k, v in overrides.items():
        setattr(ns, k, v)
    return ns


def row(name: str, per_request: int, r: dict[str, Any], offline: float | None) -> dict[str, Any]:
    """The figures of one loadtest pass, the ratio to offline, and the target verdict where there is one."""
    opened = r.get("open_loop") or {}
    busy = [b for b in (r.get("client_busy_max"), opened.get("client_busy_max")) if b is not None]
    out = {"photos": name, "images_per_request": per_request, "images_per_s": r.get("images_per_s"),
           "p50_ms": r.get("p50_ms"), "p99_ms": r.get("p99_ms"), "errors": r.get("errors", 0) + opened.get("errors", 0),
           "server_cpu_ms_per_image": r.get("server_cpu_ms_per_image"), "open_rate_per_s": opened.get("rate_per_s"),
           "open_p99_ms": opened.get("p99_ms"),
           "client_busy_max": max(busy, default=None),
           "over_offline": round(r["images_per_s"] / offline, 4) if offline and r.get("images_per_s") else None}
    if (t := TARGETS.get((name, per_request))) is not None:
        misses = [f"{what} {have} vs {sign} {want}" for what, have, sign, want in (
            ("images/s", out["images_per_s"], ">=", t.images_per_s), ("open p99 ms", out["open_p99_ms"], "<=",
                                                                      t.open_p99_ms),
            ("over offline", out["over_offline"], ">=", t.over_offline)) if want is not None and
            (have is None or (have < want if sign == ">=" else have > want))]
        out["target"] = {k: v for k, v in vars(t).items() if v is not None}
        out["target_misses"] = misses
    return out


def measure(args: argparse.Namespace, checkpoint: Path, offline: float | None) -> list[dict[str, Any]]:
    """One server, one pass per (photo size, images per request)."""
    env = {"PATCHLIFE_DEVICE": args.device, "PATCHLIFE_API_PROCESSES": args.api_processes,
           "PATCHLIFE_CHECKPOINT": str(checkpoint), "PATCHLIFE_BATCHING": "budget"}
    rows = []
    with serve_child(env, ["--log-level", "warning"], args.startup_timeout) as child, \
            contextlib.ExitStack() as stack:
        driver = stack.enter_context(ProcessDriver(args.processes))
        for name in _list(args.photos):
            mix = make_mix(64, [None], kinds=(PHOTOS[name],))
            for n in (int(v) for v in _list(args.images_per_request)):
                wrk = n == 1 and wrk_available() and not args.no_wrk
                r = asyncio.run(loadtest.measure(child.url, make_requests(mix, n), _pass_args(args, n, wrk),
                                                 server_cpu=child.cpu_seconds, driver=driver))
                rows.append(row(name, n, r, offline))
    return rows


def table(body: dict[str, Any]) -> str:
    head = (f"{'photos':<7} {'img/req':>7} {'images/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms/img':>10} "
            f"{'open rate/s':>11} {'open p99':>8} {'client busy':>11} {'x offline':>9}  target")
    lines = [head, "-" * len(head)]
    for r in body["rows"]:
        verdict = "" if "target" not in r else "ok" if not r["target_misses"] else "MISSED: " + "; ".join(
            r["target_misses"])
        lines.append(f"{r['photos']:<7} {r['images_per_request']:>7} {_fmt(r['images_per_s'], '.0f'):>9} "
                     f"{_fmt(r['p50_ms'], '.1f'):>7} {_fmt(r['p99_ms'], '.1f'):>7} "
                     f"{_fmt(r['server_cpu_ms_per_image'], '.3f'):>10} {_fmt(r['open_rate_per_s'], '.0f'):>11} "
                     f"{_fmt(r['open_p99_ms'], '.1f'):>8} {_fmt(r['client_busy_max'], '.0%'):>11} "
                     f"{_fmt(r['over_offline'], '.3f'):>9}  {verdict}")
    busiest = max((r["client_busy_max"] for r in body["rows"] if r["client_busy_max"] is not None), default=None)
    if busiest is not None and busiest > BUSY_WARNING:
        lines += ["", f"WARNING: a load-generating process was busy {busiest:.0%} of a core (over {BUSY_WARNING:.0%}): "
                  "the client may be what limits these figures; add --processes"]
    lines += ["", f"offline served path (patchlife bench --served, batch {body['offline_batch']}): "
              f"{_fmt(body['offline_images_per_s'], '.0f')} images/s; server: {body['model']} on {body['device']}, "
              f"PATCHLIFE_API_PROCESSES={body['api_processes']}; client processes {body['processes']}"]
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> str | None:
    if not _list(args.photos) or set(_list(args.photos)) - set(PHOTOS):
        return f"--photos: from {','.join(PHOTOS)}"
    if not all(v.isdigit() and int(v) >= 1 for v in _list(args.images_per_request)) or not \
            _list(args.images_per_request):
        return "--images-per-request: positive whole numbers, comma-separated"
    if min(args.processes, args.clients, args.offline_batch) < 1 or args.duration <= 0 or \
            not 0 < args.rate_fraction <= 1:
        return "--processes, --clients, --offline-batch >= 1, --duration > 0, 0 < --rate-fraction <= 1"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "--device cuda, but torch sees no CUDA GPU (--device cpu runs the plumbing on the CPU)"
    return None


def run(args: argparse.Namespace) -> int:
    stand_in = getattr(args, "engine", "model") == "stand-in"
    if problem := (standin_frontend.check(args) if stand_in else _check(args)):
        print(f"patchlife bench-frontend: {problem}", file=sys.stderr)
        return 2
    say = (lambda _m: None) if args.json else (lambda m: print(f"[bench-frontend] {m}", file=sys.stderr, flush=True))
    if stand_in:
        return standin_frontend.run(args, say)
    try:
        with tempfile.TemporaryDirectory(prefix="patchlife-bench-frontend-") as tmp:
            checkpoint = args.checkpoint
            if checkpoint is None:
                from .models import make_checkpoint

                say(f"making a calibrated {args.model} ...")
                checkpoint = make_checkpoint(args.model, Path(tmp) / args.model)
            say(f"offline served path at batch {args.offline_batch} ...")
            offline = served_images_per_s(checkpoint, args.device, args.offline_batch)
            say("serving it; one load pass per photo size and images per request ...")
            rows = measure(args, checkpoint, offline)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"patchlife bench-frontend: {exc}", file=sys.stderr)
        return 1
    body = {"model": str(args.checkpoint or args.model), "device": args.device, "api_processes": args.api_processes,
            "processes": args.processes, "offline_batch": args.offline_batch, "offline_images_per_s": offline,
            "rows": rows}
    print(json.dumps(body, indent=2) if args.json else table(body))
    return 0 if all(r["errors"] == 0 for r in rows) else 1
