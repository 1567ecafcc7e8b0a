"""``patchlife bench-http``: requests/s and server CPU per request under ``wrk``, one upload at a time.

What a request costs the server outside the model: HTTP, multipart parsing, limits, decoding,
preprocessing, JSON, metrics. The model is a near-null LifeViT made on the spot
(:mod:`bench.models`), unless ``--checkpoint`` names another. ``wrk`` (1 thread, 32 connections by
default: a C event loop that costs next to nothing per request) POSTs one prebuilt multipart body
per file to ``/classify``, closed-loop, for ``--duration`` seconds after ``--warmup`` seconds:

  * ``64px-png``: a 64x64 PNG; ``451x300-progressive``: a progressive JPEG;
  * ``1000x872``: a JPEG of a compact camera's thumbnail size; ``3000x2000``: a phone photo (quality 90);

all photo-like images made by :mod:`bench.photos`. The server CPU is that of every process under
``patchlife serve`` (:mod:`bench.proctree`), so a server split into a model process and API
processes is measured whole.

Settings are compared side by side: ``--api-processes 0,auto`` starts one server per value
(``PATCHLIFE_API_PROCESSES``) and alternates them round by round (0, auto, 0, auto, ...), each
server measuring every file. The table shows each file and setting's medians over the rounds, then
each setting against the first, as the median of the per-round ratios (passes on a shared machine
vary by 10-20%; the ratio of neighbouring passes varies less).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from .child import ServeChild, serve_child
from .loaddrive import run_wrk, wrk_available
from .loadmix import LoadRequest, make_requests
from .photos import photo_jpeg, photo_png

FILES: dict[str, Callable[[], bytes]] = {
    "64px-png": lambda: photo_png(64, 64),
    "451x300-progressive": lambda: photo_jpeg(451, 300, progressive=True),
    "1000x872": lambda: photo_jpeg(1000, 872),
    "3000x2000": lambda: photo_jpeg(3000, 2000),
}
MEASURED = ("requests_per_s", "server_cpu_ms_per_request")  # the figures compared between settings
WRK_MISSING = "needs the wrk tool on PATH (Debian: apt-get install wrk)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, help="checkpoint the servers load (default: the near-null model, made "
                                                   "in a temporary directory)")
    p.add_argument("--api-processes", default="0,auto",
                   help="PATCHLIFE_API_PROCESSES values to compare (comma-separated; a server each, alternating)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for every server (repeatable), e.g. PATCHLIFE_DECODE=cpu")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="PATCHLIFE_DEVICE of the servers")
    p.add_argument("--files", default=",".join(FILES), help=f"files to send (comma-separated, from {','.join(FILES)})")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per file and server")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measurement (0: none)")
    p.add_argument("--rounds", type=int, default=3, help="servers per setting, alternating; medians are reported")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (requests in flight)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    p.add_argument("--json", action="store_true", help="print only a JSON object")


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _check(args: argparse.Namespace) -> str | None:
    if not wrk_available():
        return WRK_MISSING
    if not _list(args.files) or set(_list(args.files)) - set(FILES):
        return f"--files: names from {','.join(FILES)} (got {args.files!r})"
    settings = _list(args.api_processes)
    if not settings or any(not (v == "auto" or v.isdigit()) for v in settings):
        return f"--api-processes: 'auto' or whole numbers, comma-separated (got {args.api_processes!r})"
    if any("=" not in e or not e.split("=", 1)[0] for e in args.env):
        return f"--env: NAME=VALUE (got {args.env})"
    if min(args.rounds, args.connections, args.threads) < 1 or args.duration <= 0 or args.warmup < 0:
        return "--rounds, --connections and --threads must be >= 1, --duration > 0, --warmup >= 0"
    return None


def check_answer(url: str, request: LoadRequest) -> None:
    """One request through httpx first: wrk counts only status codes, so make sure the body is classified."""
    r = httpx.post(url + request.path, content=request.body, headers=request.headers, timeout=60)
    if r.status_code != 200 or r.content.count(b'"timings_ms"') != request.images:
        raise RuntimeError(f"the server answered {r.status_code}: {r.text[:300]}")


def measure_file(child: ServeChild, request: LoadRequest, args: argparse.Namespace) -> dict[str, Any]:
    """wrk against one server with one file: its figures and the server's CPU over the measured window."""
    check_answer(child.url, request)
    wrk = (child.url, request.path, request.body, request.headers["content-type"], args.connections)
    if args.warmup > 0:
        run_wrk(*wrk, args.warmup, args.threads)
    cpu_before = child.cpu_seconds()
    w = run_wrk(*wrk, args.duration, args.threads)
    cpu_after = child.cpu_seconds()
    n = w.get("requests", 0)
    server_s = cpu_after - cpu_before if cpu_after is not None and cpu_before is not None else None
    return {"requests_per_s": w.get("requests_per_s"),
            "server_cpu_ms_per_request": round(1000 * server_s / n, 3) if server_s is not None and n else None,
            "p50_ms": w.get("p50_ms"), "p99_ms": w.get("p99_ms"), "requests": n,
            "errors": w["non_2xx"] + w["socket_errors"],
            "client_cpu_ms_per_request": round(1000 * w["client_cpu_s"] / n, 3) if n else None}


def _median(values: list[Any]) -> float | None:
    known = [v for v in values if v is not None]
    return round(float(statistics.median(known)), 3) if known else None


def summarise(rounds: dict[str, dict[str, list[dict[str, Any]]]], settings: list[str]) -> dict[str, Any]:
    """``rounds[file][setting]``: the passes in round order -> medians per file and setting, and each
    setting over the first as the median of its per-round ratios."""
    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for name, by_setting in rounds.items():
        results[name] = {s: {**{k: _median([p.get(k) for p in passes]) for k in passes[0]},
                             "errors": sum(p["errors"] for p in passes), "rounds": passes}
                         for s, passes in by_setting.items()}
        base = by_setting[settings[0]]
        for s in settings[1:]:
            per_round = {k: [round(p[k] / b[k], 4) for p, b in zip(by_setting[s], base) if p.get(k) and b.get(k)]
                         for k in MEASURED}
            ratios.setdefault(name, {})[s] = {k: {"median": _median(v), "per_round": v} for k, v in per_round.items()}
    return {"results": results, "ratios": ratios}


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else f"{v:{spec}}"


def table(body: dict[str, Any]) -> str:
    settings = body["settings"]
    head = (f"{'file':<20} {'api processes':>13} {'requests/s':>10} {'server CPU ms/req':>17} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'wrk CPU ms/req':>14} {'errors':>6}")
    lines = [head, "-" * len(head)]
    for name, by_setting in body["results"].items():
        for s in settings:
            r = by_setting[s]
            lines.append(f"{name:<20} {s:>13} {_fmt(r['requests_per_s'], '.1f'):>10} "
                         f"{_fmt(r['server_cpu_ms_per_request'], '.2f'):>17} {_fmt(r['p50_ms'], '.1f'):>7} "
                         f"{_fmt(r['p99_ms'], '.1f'):>7} {_fmt(r['client_cpu_ms_per_request'], '.3f'):>14} "
                         f"{r['errors']:>6}")
    for s in settings[1:]:
        lines += ["", f"api processes {s} over {settings[0]} (median of the per-round ratios):"]
        for name, by_setting in body["ratios"].items():
            rq, cpu = by_setting[s]["requests_per_s"], by_setting[s]["server_cpu_ms_per_request"]
            lines.append(f"  {name:<20} requests/s {_fmt(rq['median'], '.3f')}x {rq['per_round']}, "
                         f"server CPU/request {_fmt(cpu['median'], '.3f')}x {cpu['per_round']}")
    lines += ["", f"model: {body['model']}; wrk -t{body['wrk']['threads']} -c{body['wrk']['connections']}, "
              f"{body['wrk']['duration_s']:g} s per file and server, {body['rounds']} rounds; server CPU: every "
              "process of the server"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if problem := _check(args):
        print(f"patchlife bench-http: {problem}", file=sys.stderr)
        return 2
    settings, names = _list(args.api_processes), _list(args.files)
    say = (lambda _msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    requests = {name: make_requests([(FILES[name](), None)], 1)[0] for name in names}
    env = {"PATCHLIFE_DEVICE": args.device, **dict(e.split("=", 1) for e in args.env)}
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {n: {s: [] for s in settings} for n in names}
    with tempfile.TemporaryDirectory(prefix="patchlife-bench-http-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from .models import make_checkpoint

            say("making the near-null model ...")
            checkpoint = make_checkpoint("near-null", Path(tmp) / "near-null")
        for r in range(args.rounds):
            for s in settings:
                say(f"[round {r + 1}/{args.rounds}: PATCHLIFE_API_PROCESSES={s}] ...")
                try:
                    with serve_child({**env, "PATCHLIFE_API_PROCESSES": s},
                                     ["--checkpoint", str(checkpoint), "--log-level", "warning"],
                                     args.startup_timeout) as child:
                        for name in names:
                            rounds[name][s].append(measure_file(child, requests[name], args))
                except RuntimeError as exc:
                    print(f"patchlife bench-http: {exc}", file=sys.stderr)
                    return 1
    body = {"model": str(args.checkpoint) if args.checkpoint else "near-null (made here)", "settings": settings,
            "files": {n: len(requests[n].body) for n in names}, "rounds": args.rounds,
            "wrk": {"threads": args.threads, "connections": args.connections, "duration_s": args.duration},
            **summarise(rounds, settings)}
    print(json.dumps(body, indent=2) if args.json else table(body))
    return 0 if all(r["errors"] == 0 for by in body["results"].values() for r in by.values()) else 1
