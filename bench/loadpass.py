"""One pass of load for ``patchlife loadtest``: what a pass recorded, and the two ways of sending.

``closed_loop`` keeps ``clients`` requests in flight (each client sends its next request when its
last is answered): the maximum the server sustains. ``open_loop`` sends Poisson arrivals at a fixed
rate and counts each latency from the request's scheduled time, so a slow server cannot hide its
queueing. Both check an answer by counting its results in the raw bytes (no JSON decoding), so
that the client stays cheap; the client's own CPU time is recorded. A pass made with
``Pass(answers=[])`` also keeps every answer (which request, status, latency, body) for reading
after the pass, e.g. the served top-1 against labelled images (``bench.scalereport``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from .loadmix import LoadRequest


@dataclass
class Pass:
    """What one pass recorded (its latencies in seconds, answers by status)."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    images: int = 0
    elapsed_s: float = 0.0
    client_cpu_s: float = 0.0    # this process's CPU time during the pass (the load generator's cost)
    # With a list: (index of the request in the payloads, status, seconds from its scheduled send, body)
    answers: list[tuple[int, str, float, bytes]] | None = None

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


async def post(client: httpx.AsyncClient, payload: LoadRequest, out: Pass, t0: float, index: int = -1) -> None:
    body = b""
    try:
        r = await client.post(payload.path, content=payload.body, headers=payload.headers)
        status, body = str(r.status_code), r.content
        # One result per image, in raw bytes (each result has exactly one "timings_ms" key; a request
        # of another route names what to count instead: LoadRequest.answer).
        want = payload.images if payload.answers is None else payload.answers
        if status == "200" and body.count(payload.answer) != want:
            status = "wrong_result_count"
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    latency = time.perf_counter() - t0
    out.statuses[status] += 1
    if status == "200":
        out.latencies_s.append(latency)
        out.images += payload.images
    if out.answers is not None:
        out.answers.append((index, status, latency, body))


async def closed_loop(client: httpx.AsyncClient, payloads: list[LoadRequest], clients: int, requests: int,
                      duration_s: float, start: int = 0, record: bool = False) -> Pass:
    """``clients`` concurrent clients, each sending its next request when the last is answered
    (``record``: keep every answer in ``Pass.answers``)."""
    out, sent = Pass(answers=[] if record else None), 0
    t_start, cpu_start = time.perf_counter(), time.process_time()
    end = t_start + duration_s

    async def client_loop() -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < end:
            index = (start + sent) % len(payloads)
            sent += 1
            await post(client, payloads[index], out, time.perf_counter(), index)

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    out.elapsed_s = time.perf_counter() - t_start
    out.client_cpu_s = time.process_time() - cpu_start
    return out


def arrival_times(rate_per_s: float, requests: int, duration_s: float, seed: int = 0) -> list[float]:
    """A Poisson process: seconds from the start of each arrival at ``rate_per_s`` (independent
    exponential gaps of mean 1/rate), at most ``requests`` of them and none after ``duration_s``."""
    rng, out, t = random.Random(seed), list[float](), 0.0
    while len(out) < requests:
        t += rng.expovariate(rate_per_s)
        if t > duration_s:
            break
        out.append(t)
    return out


async def open_loop(client: httpx.AsyncClient, payloads: list[LoadRequest], rate_per_s: float, requests: int,
                    duration_s: float, seed: int = 0, record: bool = False) -> Pass:
    """Poisson arrivals at ``rate_per_s`` requests/s; latency counts from each request's scheduled time
    (``record``: keep every answer in ``Pass.answers``)."""
    out, tasks = Pass(answers=[] if record else None), []
    t_start, cpu_start = time.perf_counter(), time.process_time()
    for i, offset in enumerate(arrival_times(rate_per_s, requests, duration_s, seed)):
        due = t_start + offset
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        index = i % len(payloads)
        tasks.append(asyncio.create_task(post(client, payloads[index], out, due, index)))
    await asyncio.gather(*tasks)
    out.elapsed_s = time.perf_counter() - t_start
    out.client_cpu_s = time.process_time() - cpu_start
    return out
