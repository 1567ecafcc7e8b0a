"""Hardening through the real app: decode pixel budgets, full-size images dropped after decoding, the
watchdog behind /readyz, dependencies off the thread pool, deadlines from arrival, X-Request-ID and
JSON logs, and readiness during shutdown."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from service_support import encode, photo
from starlette.requests import Request

import service.runtime.worker as worker_mod
from service.frontend.app import begin_shutdown
from service.frontend.context import ARRIVAL_KEY
from service.frontend.decode_gate import DecodeBusy, DecodeGate
from service.frontend.front_door import FrontDoor
from service.frontend.pipeline import EXPLAIN_VIEW_SIDE, prepare_images
from service.frontend.routes.params import request_deadline
from service.frontend.state import FrontendState
from service.frontend.upload import RawImage
from service.logs import JsonFormatter, _request_id, _RequestIdFilter
from service.metrics import Metrics
from service.protocol import Lifecycle
from service.runtime.local import LocalModel
from service.settings import Settings

PNG = encode(photo((64, 48)), "PNG")  # 3,072 pixels


def post(client: TestClient, *images: bytes, **kw: Any) -> Any:
    return client.post("/classify", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)],
                       **kw)


# -- decoding memory -------------------------------------------------------------------------------
def test_request_pixel_budget_is_413_before_decoding(make_client: Callable[..., TestClient],
                                                     metric: Callable[..., float]) -> None:
    c = make_client(max_request_pixels=5_000)
    r = post(c, PNG, PNG)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_many_pixels"
    assert "PATCHLIFE_MAX_REQUEST_PIXELS" in r.json()["error"]["message"]
    assert metric(c, "patchlife_rejected_requests_total", {"reason": "request_too_many_pixels"}) == 1
    assert metric(c, "patchlife_image_decode_seconds_count") == 0  # nothing was decoded
    assert post(c, PNG).status_code == 200


def test_no_room_to_decode_is_503_with_retry_after(make_client: Callable[..., TestClient],
                                                   metric: Callable[..., float]) -> None:
    c = make_client(max_decode_pixels=10_000, decode_wait_ms=300)
    budget = c.app.state.frontend.decode_gate  # type: ignore[attr-defined]
    c.portal.call(budget._acquire, budget.capacity, 1.0)  # type: ignore[union-attr]  # another decode holds it all
    try:
        r = post(c, PNG)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1
        assert metric(c, "patchlife_rejected_requests_total", {"reason": "overloaded"}) == 1
        r = post(c, PNG, headers={"X-Request-Deadline-Ms": "30"})  # the deadline ends the wait first
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    finally:
        c.portal.call(budget._release, budget.capacity)  # type: ignore[union-attr]
    assert post(c, PNG).status_code == 200 and budget.in_use == 0


def test_classify_keeps_no_decoded_image_and_explain_only_a_small_view(client: TestClient) -> None:
    rt = client.app.state.frontend  # type: ignore[attr-defined]
    big = encode(photo((3000, 2000)), "JPEG")
    raws = [RawImage(big, "image/jpeg", "file[0]")]
    classify = client.portal.call(prepare_images, raws, rt)  # type: ignore[union-attr]
    assert len(classify.pixels) == 1 and classify.views == []
    explain = client.portal.call(prepare_images, raws, rt, True)  # type: ignore[union-attr]
    assert len(explain.views) == 1 and max(explain.views[0].size) <= EXPLAIN_VIEW_SIDE


def test_decode_gate_serves_in_order_and_times_out() -> None:
    async def main() -> None:
        budget, order = DecodeGate(10), []

        async def take(name: str, pixels: int, hold_s: float) -> None:
            async with budget.hold(pixels, timeout_s=1.0):
                order.append(name)
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(take("big", 8, 0.05))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(take("huge", 50, 0.0)), asyncio.create_task(take("small", 1, 0.0))]
        await asyncio.gather(first, *waiting)
        assert order == ["big", "huge", "small"]  # FIFO: small does not overtake; huge holds all 10
        assert budget.in_use == 0
        async with budget.hold(10, timeout_s=1.0):
            with pytest.raises(DecodeBusy):
                async with budget.hold(1, timeout_s=0.02):
                    pass
            cancelled = asyncio.create_task(take("gone", 5, 0.0))
            await asyncio.sleep(0.01)
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
            assert not budget._waiters  # a cancelled waiter leaves the queue
        assert budget.in_use == 0

    asyncio.run(main())


# -- the watchdog behind /readyz -----------------------------------------------------------------
def test_a_dead_model_thread_turns_readyz_503_and_requests_503(make_client: Callable[..., TestClient],
                                                              metric: Callable[..., float],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    c = make_client()
    worker = c.app.state.frontend.model.worker  # type: ignore[attr-defined]
    real_plan = worker_mod.plan

    def plan(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is worker._thread:  # only this app's model thread
            raise KeyError("planning bug")
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(worker_mod, "plan", plan)
    assert metric(c, "patchlife_model_healthy") == 1
    r = post(c, PNG)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable" and r.headers["retry-after"]
    t0 = time.monotonic()
    r = c.get("/readyz")
    assert r.status_code == 503 and time.monotonic() - t0 < 1.0
    assert "model thread stopped" in r.json()["error"]["message"] and "planning bug" in r.json()["error"]["message"]
    assert post(c, PNG).status_code == 503
    assert metric(c, "patchlife_model_healthy") == 0
    assert metric(c, "patchlife_model_failures_total", {"reason": "worker_died"}) == 1
    assert metric(c, "patchlife_rejected_requests_total", {"reason": "model_error"}) == 2


# -- dependencies and deadlines ------------------------------------------------------------------
def test_probes_and_scrapes_answer_while_the_thread_pool_is_full(make_client: Callable[..., TestClient]) -> None:
    c = make_client()
    limiter = c.portal.call(anyio.to_thread.current_default_thread_limiter)  # type: ignore[union-attr]
    tokens, release = limiter.total_tokens, threading.Event()
    c.portal.call(setattr, limiter, "total_tokens", 1)  # type: ignore[union-attr]
    c.portal.start_task_soon(anyio.to_thread.run_sync, release.wait)  # type: ignore[union-attr]  # a long decode
    try:
        time.sleep(0.05)
        with ThreadPoolExecutor(3) as pool:
            answers = [pool.submit(c.get, path) for path in ("/readyz", "/metrics", "/v1/models")]
            assert [a.result(timeout=10).status_code for a in answers] == [200, 200, 200]
    finally:
        release.set()
        c.portal.call(setattr, limiter, "total_tokens", tokens)  # type: ignore[union-attr]


def test_deadline_counts_from_arrival_not_from_when_the_dependency_ran(checkpoint_dir: Any) -> None:
    settings, metrics = Settings(checkpoint=checkpoint_dir, device="cpu"), Metrics()
    rt = FrontendState(settings, metrics, LocalModel(settings, metrics))  # not opened: its clock is the monotonic one
    arrived = time.monotonic() - 5.0  # the request waited 5 s before its dependencies ran
    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [], ARRIVAL_KEY: arrived}
    deadline = asyncio.run(request_deadline(Request(scope), rt, 1000.0))
    assert deadline == pytest.approx(arrived + 1.0, abs=0.05) and deadline < time.monotonic()


def test_an_expired_deadline_is_504(client: TestClient) -> None:
    r = post(client, PNG, headers={"X-Request-Deadline-Ms": "0.001"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"


# -- request id and logs -------------------------------------------------------------------------
def test_one_middleware_wraps_every_request(client: TestClient) -> None:
    """Request id, arrival, the body's clock, HEAD, the HTTP metrics and the last-resort 500 are one
    ASGI layer (service/frontend/front_door.py), each behaviour tested where it is named."""
    assert [m.cls for m in client.app.user_middleware] == [FrontDoor]  # type: ignore[attr-defined]


def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    r = post(client, PNG, headers={"X-Request-ID": "lb-7f3a:42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "lb-7f3a:42"
    made = client.get("/readyz").headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    bad = client.get("/readyz", headers={"X-Request-ID": "a b" + "x" * 200}).headers["x-request-id"]
    assert len(bad) == 32 and bad != made
    err = client.post("/classify", content=b"nope", headers={"content-type": "image/png", "X-Request-ID": "e-1"})
    assert err.status_code == 400 and err.headers["x-request-id"] == "e-1"


def test_json_log_lines_carry_the_request_id() -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("patchlife.test-json")
    log.addHandler(handler)
    log.propagate = False
    try:
        def in_request() -> None:
            _request_id.set("rid-9")
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("failed %s", "here")

        contextvars.copy_context().run(in_request)
        log.warning("outside")
    finally:
        log.removeHandler(handler)
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first["request_id"] == "rid-9" and first["message"] == "failed here" and first["level"] == "ERROR"
    assert "ValueError: boom" in first["exception"] and first["time"].endswith("Z")
    assert second["request_id"] == "-" and "exception" not in second


# -- shutdown ------------------------------------------------------------------------------------
def test_shutdown_order_readiness_first_then_refuse_with_connection_close(
        make_client: Callable[..., TestClient], metric: Callable[..., float]) -> None:
    c = make_client()
    rt = c.app.state.frontend  # type: ignore[attr-defined]
    assert "connection" not in post(c, PNG).headers  # kept alive while serving
    begin_shutdown(rt)  # SIGTERM; shutdown_delay_s runs
    for _ in range(3):
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert metric(c, "patchlife_rejected_requests_total", {"reason": "shutdown"}) == 0  # probes are not rejections
    r = post(c, PNG)
    assert r.status_code == 200  # still served: the load balancer has not noticed yet
    assert r.headers["connection"] == "close"  # but the client will not reuse the connection
    rt.state = Lifecycle.DRAINING
    r = post(c, PNG)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert r.headers["connection"] == "close"
    assert metric(c, "patchlife_rejected_requests_total", {"reason": "shutdown"}) == 1
