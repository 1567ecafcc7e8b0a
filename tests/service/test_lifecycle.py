"""`patchlife serve` as a real process (start, answer, SIGTERM), a missing checkpoint, and a client
that disconnects while its images wait in the worker's queue."""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from service_support import encode, photo, serve_process
from starlette.requests import Request

from cli.main import main
from service.frontend.errors import ClientDisconnected
from service.frontend.pipeline import run_model
from service.metrics import Metrics
from service.runtime.engine import Engine
from service.runtime.metrics_hooks import PrometheusHooks
from service.runtime.worker import Worker
from service.settings import Settings


def test_serve_without_a_checkpoint_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--port", "1"]) == 1
    assert "no patchlife checkpoint at" in capsys.readouterr().err


def test_serve_process_answers_and_stops_on_sigterm(checkpoint_dir: Path) -> None:
    with serve_process(checkpoint_dir, {"PATCHLIFE_PORT": "1"}) as (proc, base):  # --port wins over the env
        with httpx.Client(base_url=base, timeout=10) as client:
            r = client.post("/classify", files={"file": ("a.png", encode(photo(), "PNG"), "image/png")})
            assert r.status_code == 200 and len(r.json()["results"]) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


class DisconnectAfter:
    """ASGI ``receive`` of a request whose body was read: the client leaves after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def __call__(self) -> dict[str, Any]:
        await asyncio.sleep(self.delay)
        return {"type": "http.disconnect"}


def test_disconnect_drops_queued_work_and_is_counted(checkpoint_dir: Path) -> None:
    engine = Engine(checkpoint_dir, device="cpu")
    # Another request holds the model (its head batch waits on `gate`), so the image stays queued until
    # the client has gone (an idle worker would run it at once).
    gate, entered, head = threading.Event(), threading.Event(), engine.head

    def gated_head(pixels: torch.Tensor, keep_rates: list[float | None]) -> Any:
        entered.set()
        gate.wait(30)
        return head(pixels, keep_rates)

    engine.head = gated_head  # type: ignore[method-assign,assignment]
    settings = Settings(checkpoint=checkpoint_dir, device="cpu", max_delay_ms=10_000, max_batch_size=8)
    metrics = Metrics()
    request = Request({"type": "http", "method": "POST", "path": "/classify", "headers": []}, DisconnectAfter(0.1))

    async def scenario() -> None:
        worker = Worker(engine, settings, PrometheusHooks(metrics, engine.dense_gflops))
        await worker.start()
        try:
            pixels = [torch.zeros(3, 32, 32)]
            blocker = asyncio.create_task(worker.submit(pixels, None, worker.clock() + 60))
            while not entered.is_set():
                await asyncio.sleep(0.005)
            t0 = time.monotonic()
            with pytest.raises(ClientDisconnected):
                await run_model(request.receive, worker, pixels, None, worker.clock() + 60)
            assert time.monotonic() - t0 < 5.0  # noticed at once, not when the model frees up
            gate.set()
            assert len(await blocker) == 1
        finally:
            gate.set()
            await worker.stop()

    asyncio.run(scenario())
    v = metrics.registry.get_sample_value
    assert v("patchlife_rejected_requests_total", {"reason": "disconnected"}) == 1
    assert v("patchlife_queue_depth", {"unit": "images"}) == 0
    assert v("patchlife_batch_size_sum", {"phase": "head"}) == 1  # only the blocker's image ever ran


def _multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = "patchlife-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _untimed(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "timings_ms"} for r in answer["results"]]


def _leave_mid_answer(host: str, port: int, body: bytes, content_type: str) -> bytes:
    """Send the request from a socket with a tiny receive window, read the first bytes of the answer, then
    leave with a reset (SO_LINGER 0): the server is still writing the rest, and its next write fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.settimeout(60)
    try:
        sock.connect((host, port))
        sock.sendall(f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        first = sock.recv(16)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return first


def test_a_client_that_leaves_while_its_answer_is_written_harms_nobody(checkpoint_dir: Path) -> None:
    """A large answer (128 images with their lifespans) still being written when its client resets the
    connection: the server neither crashes nor leaks the request, and answers the next client exactly."""
    files = [encode(photo(seed=i), "PNG") for i in range(128)]
    body, content_type = _multipart(files)
    with serve_process(checkpoint_dir, {"PATCHLIFE_MAX_IMAGES_PER_REQUEST": "128",
                                         "PATCHLIFE_MAX_BATCH_WASTE": "0"}) as (proc, base):
        url = httpx.URL(base)
        with httpx.Client(base_url=base, timeout=60) as client:
            reference = client.post("/classify", content=body, headers={"Content-Type": content_type})
            assert reference.status_code == 200 and len(reference.content) > 64 * 1024  # far beyond a 1 KiB window
            for _ in range(4):
                assert _leave_mid_answer(url.host, url.port or 80, body, content_type).startswith(b"HTTP/1.1 200")
            again = client.post("/classify", content=body, headers={"Content-Type": content_type})
            assert again.status_code == 200
            assert _untimed(again.json()) == _untimed(reference.json())  # waste 0: no answer depends on the batch
            metrics = client.get("/metrics").text
        assert proc.poll() is None
        in_flight = [line for line in metrics.splitlines() if line.startswith("patchlife_http_requests_in_flight")]
        assert in_flight and all(float(line.split()[-1]) <= 1 for line in in_flight), in_flight  # the scrape itself
        assert "Traceback" not in proc.stderr.read().decode()  # type: ignore[union-attr]
