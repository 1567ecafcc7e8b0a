"""The FastAPI application: ``create_app(settings)``.

Lifespan: load the engine (before serving, so a bad checkpoint fails the start with the engine's
message), then in the background warm the model up and start the batching worker; ``/readyz``
turns 200 only then. On shutdown: refuse new work, let the worker finish what is queued within
``shutdown_grace_s``, stop it. ``patchlife serve`` runs :func:`drain` at SIGTERM, before uvicorn
closes anything (see ``service/serve.py`` and docs/ops.md for the order of events).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import anyio
from fastapi import FastAPI

from ..metrics import HttpMetricsMiddleware, Metrics, PrometheusHooks
from ..runtime.engine import Engine
from ..runtime.worker import Worker
from ..settings import Settings, get_settings
from .bodyread import BodyReadMiddleware
from .context import RequestContextMiddleware
from .errors import LastResortMiddleware, install_error_handlers
from .openapi import install_openapi
from .routes import classify, docs, explain, health, metrics, models, ui, v2
from .routes.common import Runtime

log = logging.getLogger("patchlife.app")


def package_version() -> str:
    try:
        return version("patchlife")
    except PackageNotFoundError:
        return "0+unknown"


def load_engine(settings: Settings) -> Engine:
    return Engine.from_settings(settings)


async def _warm_up_and_start(rt: Runtime) -> None:
    engine = rt.engine
    assert engine is not None
    try:
        t0 = time.perf_counter()
        timings = await anyio.to_thread.run_sync(engine.warmup, rt.settings.warmup_batches)
        seconds = time.perf_counter() - t0
        rt.metrics.set_graphs(engine.runner.describe)
        hooks = PrometheusHooks(rt.metrics, engine.dense_gflops, engine.grid[0] * engine.grid[1])
        worker = Worker(engine, rt.settings, hooks, timings=timings)
        await worker.start()
        rt.metrics.watch_health(lambda: worker.health() is None)
    except Exception as exc:  # stay alive (healthz) but never ready; the reason shows in /readyz
        log.exception("warm-up failed")
        rt.startup_error = f"{type(exc).__name__}: {exc}"
        return
    rt.worker, rt.warmup_seconds, rt.ready = worker, round(seconds, 3), True
    graphs = engine.runner.describe()
    log.info("model %s ready on %s %s (warm-up %.2f s; %d CUDA graphs captured in %.2f s, %.1f MiB; cost model %s)",
             engine.name, engine.device, engine.dtype, seconds, graphs["captured"], graphs["capture_seconds"],
             graphs["capture_bytes"] / 2**20, worker.cost.describe())


async def drain(rt: Runtime, poll_s: float = 0.01) -> None:
    """The shutdown drain, started at SIGTERM while the listener is still open.

    1. (already done by the caller) ``/readyz`` answers 503; the worker runs queued batches without
       waiting for them to fill; requests are still served for ``shutdown_delay_s``, so that a load
       balancer stops sending before anything is refused.
    2. New requests are answered 503 ``shutting_down`` with ``Connection: close``; the requests in
       flight finish within ``shutdown_grace_s``.
    3. At the end of the grace the worker stops: what is still queued, or still decoding, is
       answered 503 too (a batch already running completes).
    """
    s = rt.settings
    await asyncio.sleep(s.shutdown_delay_s)
    rt.draining = True
    loop = asyncio.get_running_loop()
    end = loop.time() + s.shutdown_grace_s
    while rt.in_flight.count > 0 and loop.time() < end:
        await asyncio.sleep(poll_s)
    rt.grace_over = True  # requests still decoding stop before their next image (503)
    if rt.worker is not None:
        await rt.worker.stop(grace_s=max(0.0, end - loop.time()))
    answered = loop.time() + 1.0  # the 503s of what the worker failed are written by their own tasks
    while rt.in_flight.count > 0 and loop.time() < answered:
        await asyncio.sleep(poll_s)
    log.info("drained: %d requests still in flight", rt.in_flight.count)


GRPC_STOP_GRACE_S = 1.0  # gRPC calls still writing their answer when the lifespan ends


async def _start_grpc(rt: Runtime, version: str) -> Any:
    """The gRPC listener (``service/frontend/grpc/``), imported only when it is served: a server with
    PATCHLIFE_GRPC_PORT=0 never loads grpcio or the generated messages."""
    from .grpc.server import start_server

    return await start_server(rt, version)


def begin_shutdown(rt: Runtime) -> None:
    """SIGTERM, first step (on the event loop): readiness false, batches stop waiting to fill."""
    rt.stopping = rt.in_flight.closing = True
    if rt.worker is not None:
        rt.worker.begin_drain()


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app. ``engine``: an already loaded engine (``patchlife serve`` loads it first)."""
    settings = settings or get_settings()
    rt = Runtime(settings, Metrics(), engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if rt.engine is None:
            rt.engine = await anyio.to_thread.run_sync(load_engine, settings)
        info = rt.engine.info()
        rt.metrics.set_model(package_version(), info["name"], rt.engine.device, info["dtype"])
        grpc_server = await _start_grpc(rt, app.version) if settings.grpc_port else None
        starting = asyncio.create_task(_warm_up_and_start(rt))
        try:
            yield
        finally:
            rt.ready, rt.stopping, rt.draining = False, True, True
            await starting  # a warm-up in its thread cannot be interrupted; it is short
            if rt.worker is not None:
                await rt.worker.stop()
            if grpc_server is not None:  # after the worker: its calls have been answered by then
                await grpc_server.stop(GRPC_STOP_GRACE_S)

    app = FastAPI(title="patchlife", version=package_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  summary="Vision transformers that slim their patches by life regression, served with "
                          "token-budget batching.")
    app.state.runtime = rt
    install_error_handlers(app, rt.metrics.reject)
    # Each add_middleware wraps the ones before it: the last added runs first.
    app.add_middleware(LastResortMiddleware)  # innermost: a bug's 500 is still counted and carries the request id
    app.add_middleware(HttpMetricsMiddleware, metrics=rt.metrics)
    app.add_middleware(RequestContextMiddleware, in_flight=rt.in_flight)  # arrival stamped before any app code
    app.add_middleware(BodyReadMiddleware, runtime=rt)  # outermost: sees every answer that closes the connection
    for module in (classify, explain, health, models, metrics, ui, docs):  # docs: /docs, /redoc offline
        app.include_router(module.router)
    app.include_router(v2.router)  # Open Inference Protocol v2 (KServe, Triton clients)
    install_openapi(app, rt)  # /openapi.json describes the bodies parsed by hand, with this server's limits
    return app
