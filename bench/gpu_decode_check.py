"""Server CPU per 224-px JPEG request with decoding in the model process (PATCHLIFE_DECODE=gpu) against
decoding in the API processes (cpu): the issue "Decoding at the cost of the pixels"'s GPU-host
target (<= 1 ms with GPU decoding on). ``patchlife gpu-check`` calls :func:`measure`; it also runs
alone:

    python -m bench.gpu_decode_check --device cuda [--checkpoint DIR] [--seconds 10] [--json]

For each mode, one ``patchlife serve`` (API processes on auto) gets a closed loop of one-image
requests from this process for ``--seconds``; the server's CPU (user + system, summed over its
process tree from /proc) over that window, divided by the requests answered, is the figure. The
modes run one after the other on the same machine, so their ratio is the steadier number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .child import serve_child
from .photos import photo_jpeg

TARGET_MS = 1.0  # server CPU per 224-px JPEG request with the model process decoding (GPU host)


async def _closed_loop(url: str, body: bytes, clients: int, seconds: float) -> tuple[int, int]:
    """(answered 200, other answers) of ``clients`` concurrent senders for ``seconds``."""
    ok = bad = 0
    end = time.monotonic() + seconds
    files = {"file": ("photo.jpg", body, "image/jpeg")}

    async def sender(http: httpx.AsyncClient) -> None:
        nonlocal ok, bad
        while time.monotonic() < end:
            r = await http.post("/classify", files=files)
            if r.status_code == 200:
                ok += 1
            else:
                bad += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as http:
        await asyncio.gather(*(sender(http) for _ in range(clients)))
    return ok, bad


def measure_mode(decode: str, device: str, checkpoint: Path | None, seconds: float, clients: int,
                 startup_s: float = 300.0) -> dict[str, Any]:
    """One server with PATCHLIFE_DECODE=``decode``: requests/s and server CPU ms per request."""
    env = {"PATCHLIFE_DEVICE": device, "PATCHLIFE_DECODE": decode, "PATCHLIFE_API_PROCESSES": "auto"}
    if checkpoint is not None:
        env["PATCHLIFE_CHECKPOINT"] = str(checkpoint)
    body = photo_jpeg(224, 224, 1)
    with serve_child(env, ["--log-level", "warning"], startup_s) as child:
        asyncio.run(_closed_loop(child.url, body, clients, min(2.0, seconds)))  # warm-up
        cpu0, t0 = child.cpu_seconds() or 0.0, time.monotonic()  # the whole process tree (bench/proctree.py)
        ok, bad = asyncio.run(_closed_loop(child.url, body, clients, seconds))
        cpu, wall = (child.cpu_seconds() or cpu0) - cpu0, time.monotonic() - t0
    return {"decode": decode, "requests": ok, "errors": bad, "requests_per_s": round(ok / wall, 1),
            "server_cpu_ms_per_request": round(1000.0 * cpu / ok, 3) if ok else None}


def measure(device: str = "cuda", checkpoint: Path | None = None, seconds: float = 10.0, clients: int = 32,
            modes: tuple[str, ...] = ("gpu", "cpu")) -> dict[str, Any]:
    """Each mode's row, the gpu/cpu ratio of server CPU per request, and the target's verdict (gpu row)."""
    rows = [measure_mode(m, device, checkpoint, seconds, clients) for m in modes]
    by = {r["decode"]: r.get("server_cpu_ms_per_request") for r in rows}
    out: dict[str, Any] = {"photo": "224x224 JPEG", "rows": rows, "target_ms": TARGET_MS}
    gpu, cpu = by.get("gpu"), by.get("cpu")
    if gpu is not None:
        out["target_met"] = gpu <= TARGET_MS
        if cpu:
            out["gpu_over_cpu"] = round(gpu / cpu, 3)
    return out


def table(result: dict[str, Any]) -> str:
    lines = [f"server CPU per one-image request, {result['photo']} (target with gpu decoding: "
             f"<= {result['target_ms']} ms)", f"{'decode':>6} {'requests/s':>10} {'CPU ms/req':>10} {'errors':>6}"]
    for r in result["rows"]:
        lines.append(f"{r['decode']:>6} {r['requests_per_s']:>10} {r['server_cpu_ms_per_request']!s:>10} "
                     f"{r['errors']:>6}")
    if "gpu_over_cpu" in result:
        lines.append(f"gpu / cpu: {result['gpu_over_cpu']}")
    if "target_met" in result:
        lines.append("target " + ("met" if result["target_met"] else "MISSED"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="PATCHLIFE_DEVICE (gpu decoding needs cuda)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: the embedded model)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of load per mode")
    p.add_argument("--clients", type=int, default=32, help="requests in flight")
    p.add_argument("--modes", default="gpu,cpu", help="PATCHLIFE_DECODE values, in order (comma-separated)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    result = measure(args.device, args.checkpoint, args.seconds, args.clients,
                     tuple(m.strip() for m in args.modes.split(",") if m.strip()))
    print(json.dumps(result) if args.json else table(result))
    return 0 if result.get("target_met", True) else 1


if __name__ == "__main__":
    sys.exit(main())
