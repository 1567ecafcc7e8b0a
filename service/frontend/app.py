"""The FastAPI application of one front end: ``make_app(settings, model, metrics)``.

``model`` is the typed handle on the model (:class:`~service.protocol.ModelClient`): in this process
(``service/app.py`` wires it, for tests and ``PATCHLIFE_API_PROCESSES=0``) or in the model process
(``service/transport/client.py``, in each API process). Lifespan: open the model (before serving, so a
bad checkpoint fails the start with the engine's message), then in the background let it warm up
and start; ``/readyz`` turns 200 only then. On shutdown: refuse new work, let the model finish what is
queued within ``shutdown_grace_s``, stop it. ``patchlife serve`` runs :func:`drain` at SIGTERM, before
uvicorn closes anything (see ``service/frontend/http_server.py`` and docs/ops.md for the order of events).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from .. import package_version
from ..metrics import HttpMetricsMiddleware, Metrics
from ..protocol import Lifecycle, ModelClient
from ..settings import Settings
from .bodyread import BodyReadMiddleware
from .context import RequestContextMiddleware
from .errors import LastResortMiddleware, install_error_handlers
from .head import HeadAsGetMiddleware
from .openapi import install_openapi
from .routes import classify, docs, explain, health, models, ui, v2
from .routes import metrics as metrics_route
from .routes.common import Runtime

log = logging.getLogger("patchlife.app")


async def _start(rt: Runtime) -> None:
    """The model's warm-up and start, in the background; a failure keeps the process alive (healthz)
    but never ready, with the reason in /readyz."""
    try:
        await rt.model.start()
    except Exception as exc:
        rt.startup_error = f"{type(exc).__name__}: {exc}"
        if rt.state == Lifecycle.LOADING:
            rt.state = Lifecycle.FAILED
        return
    if rt.state == Lifecycle.LOADING:
        rt.state = Lifecycle.READY


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
    rt.advance(Lifecycle.DRAINING)
    loop = asyncio.get_running_loop()
    end = loop.time() + s.shutdown_grace_s
    while rt.in_flight.count > 0 and loop.time() < end:
        await asyncio.sleep(poll_s)
    rt.advance(Lifecycle.GRACE_OVER)  # requests still decoding stop before their next image (503)
    await rt.model.stop(grace_s=max(0.0, end - loop.time()))
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
    rt.advance(Lifecycle.STOPPING)
    rt.in_flight.closing = True
    rt.model.begin_drain()


def make_app(settings: Settings, model: ModelClient, metrics: Metrics, shared_ports: bool = False) -> FastAPI:
    """The app of one front end, serving ``model``; ``metrics``: this process's series; ``shared_ports``:
    one of several API processes (gRPC then listens with SO_REUSEPORT beside the others)."""
    rt = Runtime(settings, metrics, model, shared_ports=shared_ports)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt.card = await model.open()
        info = rt.card.info
        rt.metrics.set_model(package_version(), rt.card.name, info["device"], info["dtype"])
        grpc_server = await _start_grpc(rt, app.version) if settings.grpc_port else None
        starting = asyncio.create_task(_start(rt))
        try:
            yield
        finally:
            rt.advance(Lifecycle.STOPPED)
            await starting  # a warm-up in its thread cannot be interrupted; it is short
            await model.stop()
            if grpc_server is not None:  # after the model: its calls have been answered by then
                await grpc_server.stop(GRPC_STOP_GRACE_S)

    app = FastAPI(title="patchlife", version=package_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  summary="Vision transformers that slim their patches by life regression, served with "
                          "token-budget batching.")
    app.state.runtime = rt
    install_error_handlers(app, rt.metrics.reject)
    # Each add_middleware wraps the ones before it: the last added runs first.
    app.add_middleware(HeadAsGetMiddleware)  # HEAD on every GET route, routed as GET inside the metrics
    app.add_middleware(LastResortMiddleware)  # innermost: a bug's 500 is still counted and carries the request id
    app.add_middleware(HttpMetricsMiddleware, metrics=rt.metrics)
    app.add_middleware(RequestContextMiddleware, in_flight=rt.in_flight)  # arrival stamped before any app code
    app.add_middleware(BodyReadMiddleware, runtime=rt)  # outermost: sees every answer that closes the connection
    # Each router names its access group (service/frontend/access.py); health, ui and docs are open.
    for module in (classify, explain, health, models, metrics_route, ui, docs):  # docs: /docs, /redoc offline
        app.include_router(module.router)
    app.include_router(v2.router)  # Open Inference Protocol v2 (KServe, Triton clients)
    install_openapi(app, rt)  # /openapi.json describes the bodies parsed by hand, with this server's limits
    return app
