"""GET /healthz and /readyz: alive always; ready only when loaded, warmed up and not shutting down."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from service_support import wait_ready

from service.app import create_app
from service.protocol import Lifecycle
from service.settings import Settings


def test_healthz_and_readyz_when_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ready"
    detail = body["detail"]  # what warm-up did: no graphs on CPU, a cost model from its timings
    assert detail["warmup_seconds"] > 0 and detail["graphs"]["enabled"] is False
    assert detail["graphs"]["captured"] == 0 and detail["cost_model"]["tail"]["observations"] > 0


def test_readyz_503_while_warming_up_and_classify_refused(make_client: Callable[..., TestClient]) -> None:
    c = make_client()
    rt = c.app.state.frontend  # type: ignore[attr-defined]
    rt.state = Lifecycle.LOADING  # as between engine load and the end of warm-up
    try:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert r.headers["retry-after"] == "1"
        assert c.get("/healthz").status_code == 200
        r = c.post("/classify", content=b"x", headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        rt.state, rt.startup_error = Lifecycle.FAILED, "RuntimeError: CUDA out of memory"
        assert "CUDA out of memory" in c.get("/readyz").json()["error"]["message"]
    finally:
        rt.state, rt.startup_error = Lifecycle.READY, None
    assert c.get("/readyz").status_code == 200


def test_readyz_503_when_draining(make_client: Callable[..., TestClient]) -> None:
    c = make_client()
    c.app.state.frontend.state = Lifecycle.DRAINING  # type: ignore[attr-defined]  # what SIGTERM sets in `patchlife serve`
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"


def test_lifespan_shutdown_stops_the_worker(checkpoint_dir: Path) -> None:
    app = create_app(Settings(checkpoint=checkpoint_dir, device="cpu", warmup_batches=0, grpc_port=0))
    with TestClient(app) as c:
        wait_ready(c)
        worker = app.state.frontend.model.worker
        assert worker is not None and worker._thread is not None and worker._thread.is_alive()
    assert app.state.frontend.state == Lifecycle.STOPPED
    assert worker._thread is None  # joined
