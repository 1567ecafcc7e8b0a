"""`patchlife serve` as a real process (start, answer, SIGTERM), a missing checkpoint, and a client
that disconnects while its images wait in the worker's queue."""

from __future__ import annotations

import asyncio
import signal
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
