"""Closed-loop drivers for ``patchlife loadtest`` that do not become the bottleneck.

The in-process driver (``loadpass.closed_loop``: asyncio + httpx in this process) costs several ms
of CPU per request on one core; on a fast server it measures itself. Two others:

  * ``processes``: ``--processes N`` client processes, each running the in-process driver with its
    share of the clients, started together behind a barrier. Each reports its own CPU time, so the
    table shows the client CPU per request and warns when a client process was over
    ``loadreport.BUSY_WARNING`` of one core (then the numbers say more about the client than the server).
  * ``wrk``: the Debian ``wrk`` tool with one prebuilt request body (its C event loop costs next to
    nothing per request), for the closed-loop maximum. Optional: used only where ``wrk`` is on PATH.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from .loadpass import Pass, closed_loop, open_loop


def busy_share(cpu_s: float, elapsed_s: float) -> float | None:
    return round(cpu_s / elapsed_s, 3) if elapsed_s > 0 else None


# -- client processes ---------------------------------------------------------------------------
def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal non-negative shares (the first ones larger)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _client_process(url: str, payloads: list[Any], clients: int, warmup: int, requests: int, duration_s: float,
                    start: int, timeout: float, barrier: Any, rate_per_s: float | None = None,
                    record: bool = False) -> dict[str, Any]:
    """One client process: warm up its connections, wait for the others (and the parent's scrape),
    then run its closed loop (or, with ``rate_per_s``, its open loop at that rate; seeded by
    ``start``, so that processes draw different arrivals). Returns the pass and its busy share."""
    async def main() -> dict[str, Any]:
        limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
            if warmup:
                await closed_loop(client, payloads, clients, warmup, 1e9, start=start)
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)  # warmed up: parent scrapes
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)  # go
            if rate_per_s is None:
                p = await closed_loop(client, payloads, clients, requests, duration_s, start=start + warmup,
                                      record=record)
            else:
                p = await open_loop(client, payloads, rate_per_s, requests, duration_s, seed=start, record=record)
        return {"pass": p, "busy": busy_share(p.client_cpu_s, p.elapsed_s)}

    return asyncio.run(main())


class ProcessDriver:
    """``processes`` client processes, spawned once and reused for every pass of a run.

    ``run`` is synchronous (the parent blocks while its children drive the load). ``between`` is
    called when every child has warmed up and before any sends a measured request: the parent reads
    the server's counters there. With ``rate_per_s`` the processes send Poisson arrivals that add up
    to that rate (open loop) instead of keeping ``clients`` requests in flight; with ``record`` every
    answer comes back in the merged pass's ``answers``.
    """

    def __init__(self, processes: int) -> None:
        self.processes = processes
        ctx = mp.get_context("spawn")  # no fork of a process that may hold threads and an event loop
        self.manager = ctx.Manager()
        self.pool = ProcessPoolExecutor(max_workers=processes, mp_context=ctx)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        self.manager.shutdown()

    def __enter__(self) -> ProcessDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, url: str, payloads: list[Any], clients: int, warmup: int, requests: int, duration_s: float,
            timeout: float, between: Any = None, rate_per_s: float | None = None,
            record: bool = False) -> tuple[Pass, list[float | None]]:
        """(the merged pass, each client process's busy share)."""
        n = min(self.processes, clients)
        rate = None if rate_per_s is None else rate_per_s / n
        barrier = self.manager.Barrier(n + 1)
        shares, quotas, warmups = split(clients, n), split(requests, n), split(warmup, n)
        offsets = [sum(quotas[:i]) + sum(warmups[:i]) for i in range(n)]  # each process its own slice of the mix
        futures = [self.pool.submit(_client_process, url, payloads, shares[i], warmups[i], quotas[i], duration_s,
                                    offsets[i], timeout, barrier, rate, record) for i in range(n)]
        barrier.wait()
        if between is not None:
            between()
        barrier.wait()
        results = [f.result() for f in futures]
        merged = Pass(answers=[] if record else None)
        for r in results:
            p = r["pass"]
            if merged.answers is not None and p.answers is not None:
                merged.answers += p.answers
            merged.latencies_s += p.latencies_s
            merged.statuses.update(p.statuses)
            merged.images += p.images
            merged.elapsed_s = max(merged.elapsed_s, p.elapsed_s)
            merged.client_cpu_s += p.client_cpu_s
        return merged, [r["busy"] for r in results]


# -- wrk ----------------------------------------------------------------------------------------
WRK_SCRIPT = """-- patchlife loadtest: one prebuilt request, sent as is
wrk.method = "POST"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "{content_type}"
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms), requests, non-2xx answers and socket errors from
    ``wrk --latency`` output."""
    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
        return float(number) * _UNITS[unit]

    out: dict[str, Any] = {}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["requests_per_s"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text):
        out["requests"], out["elapsed_s"] = int(m.group(1)), ms(m.group(2) + m.group(3)) / 1e3
    for q in (50, 90, 99):
        if m := re.search(rf"^\s+{q}(?:\.000)?%\s+([\d.]+(?:us|ms|s|m))\s*$", text, re.M):
            out[f"p{q}_ms"] = round(ms(m.group(1)), 3)
    out["non_2xx"] = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)) else 0
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(map(int, socket.groups())) if socket else 0
    return out


def run_wrk(url: str, path: str, body: bytes, content_type: str, connections: int, duration_s: float,
            threads: int = 1) -> dict[str, Any]:
    """``wrk -t threads -c connections -d duration --latency`` POSTing ``body`` to ``url + path``;
    the parsed figures plus wrk's own CPU seconds (its child-process rusage)."""
    if not wrk_available():
        raise RuntimeError("--driver wrk needs the wrk tool on PATH (Debian: apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT.format(body=body_file, content_type=content_type))
        argv = ["wrk", f"-t{threads}", f"-c{max(connections, threads)}", f"-d{max(1, round(duration_s))}s",
                "--latency", "-s", str(script), url.rstrip("/") + path]
        import resource
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    out = parse_wrk(done.stdout)
    out["elapsed_s"] = out.get("elapsed_s") or time.perf_counter() - t0
    out["client_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out
