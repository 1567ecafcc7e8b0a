"""The FastAPI application: ``create_app(settings)``.

Lifespan: load the engine (before serving, so a bad checkpoint fails the start with the engine's
message), then in the background warm the model up and start the batching worker; ``/readyz``
turns 200 only then. On shutdown: refuse new work, let the worker finish what is queued within
``shutdown_grace_s``, stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

import anyio
from fastapi import FastAPI

from .engine import Engine
from .errors import install_error_handlers
from .metrics import HttpMetricsMiddleware, Metrics, PrometheusHooks
from .routes import classify, explain, health, metrics, models, ui
from .routes.common import Runtime
from .settings import Settings, get_settings
from .worker import Worker

log = logging.getLogger("patchlife.app")


def package_version() -> str:
    try:
        return version("patchlife")
    except PackageNotFoundError:
        return "0+unknown"


def load_engine(settings: Settings) -> Engine:
    return Engine(settings.checkpoint, settings.device, settings.dtype, settings.bucket_step, settings.keep_rate)


async def _warm_up_and_start(rt: Runtime) -> None:
    engine = rt.engine
    assert engine is not None
    try:
        seconds = await anyio.to_thread.run_sync(engine.warmup, rt.settings.warmup_batches)
        worker = Worker(engine, rt.settings, PrometheusHooks(rt.metrics, engine.dense_gflops))
        await worker.start()
    except Exception as exc:  # stay alive (healthz) but never ready; the reason shows in /readyz
        log.exception("warm-up failed")
        rt.startup_error = f"{type(exc).__name__}: {exc}"
        return
    rt.worker, rt.ready = worker, True
    log.info("model %s ready on %s (warm-up %.2f s)", engine.name, engine.device, seconds)


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
        starting = asyncio.create_task(_warm_up_and_start(rt))
        try:
            yield
        finally:
            rt.ready, rt.draining = False, True
            await starting  # a warm-up in its thread cannot be interrupted; it is short
            if rt.worker is not None:
                await rt.worker.stop()

    app = FastAPI(title="patchlife", version=package_version(), lifespan=lifespan,
                  summary="Vision transformers that slim their patches by life regression, served with "
                          "token-budget batching.")
    app.state.runtime = rt
    install_error_handlers(app, rt.metrics.reject)
    app.add_middleware(HttpMetricsMiddleware, metrics=rt.metrics)
    for module in (classify, explain, health, models, metrics, ui):
        app.include_router(module.router)
    return app
