"""SIGTERM on a real ``patchlife serve`` with 100 requests in flight: every request whose connection was
accepted gets an HTTP answer (200, or 503 with Connection: close), none is cut off; the process exits 0;
JSON log lines carry the request id."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from service_support import encode, photo, serve_process

CLIENTS = 100


def one_request(base: str, body: bytes, start: threading.Barrier, out: list[str], i: int) -> None:
    start.wait()
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            r = client.post("/classify", files=[("files", ("a.png", body, "image/png")),
                                                ("files", ("b.png", body, "image/png"))])
        closed = r.headers.get("connection", "").lower() == "close"
        out[i] = f"{r.status_code}" + ("+close" if r.status_code == 503 and closed else "")
    except httpx.ConnectError:
        out[i] = "refused"  # never accepted: the listener was already closed
    except httpx.TransportError as exc:  # accepted, then cut off without an answer
        out[i] = f"no answer ({type(exc).__name__})"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("grace_s", ["20", "0.5"])  # all finish / the grace ends first: the rest get 503
def test_sigterm_with_100_requests_in_flight_answers_every_accepted_connection(checkpoint_dir: Path,
                                                                               grace_s: str) -> None:
    body = encode(photo((900, 700)), "PNG")  # some decoding work, so that requests pile up
    outcomes = [""] * CLIENTS
    # One image decodes at a time, so the 100 requests are in flight together however fast the machine.
    env = {"PATCHLIFE_LOG_FORMAT": "json", "PATCHLIFE_SHUTDOWN_GRACE_S": grace_s,
           "PATCHLIFE_MAX_DECODE_PIXELS": str(900 * 700), "PATCHLIFE_DECODE_WAIT_MS": "60000"}
    with serve_process(checkpoint_dir, env, log_level="info") as (proc, base):
        with httpx.Client(base_url=base, timeout=30) as client:
            r = client.post("/classify", files={"file": ("a.png", body, "image/png")},
                            headers={"X-Request-ID": "probe-42"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "probe-42"
            start = threading.Barrier(CLIENTS + 1)
            threads = [threading.Thread(target=one_request, args=(base, body, start, outcomes, i))
                       for i in range(CLIENTS)]
            for t in threads:
                t.start()
            start.wait()
            in_flight, end = 0.0, time.monotonic() + 10
            while in_flight < CLIENTS * 0.9 and time.monotonic() < end:
                text = client.get("/metrics").text
                in_flight = next(float(line.split()[1]) for line in text.splitlines()
                                 if line.startswith("patchlife_http_requests_in_flight "))
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        for t in threads:
            t.join(60)
        assert proc.wait(timeout=60) == 0
        exit_s = time.monotonic() - t0
        stderr = proc.stderr.read().decode()  # type: ignore[union-attr]

    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    print(f"\ngrace {grace_s} s: {in_flight:.0f} requests in flight at SIGTERM (this scrape included); "
          f"outcomes {counts}; exit 0 after {exit_s:.1f} s")
    assert not [o for o in outcomes if o.startswith("no answer") or o == ""], counts
    assert set(outcomes) <= {"200", "503+close", "refused"}, counts
    assert in_flight >= 50  # the signal did land on a busy server
    if grace_s == "0.5":
        assert counts.get("503+close", 0) > 0  # the grace really ended with work still queued
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert any(r["request_id"] == "probe-42" and r["logger"] == "uvicorn.access" for r in records), stderr[-2000:]
