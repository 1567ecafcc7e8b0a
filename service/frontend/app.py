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
from ..metrics import Metrics
from ..protocol import Lifecycle, ModelClient
from ..settings import Settings
from .errors import install_error_handlers
from .front_door import FrontDoor
from .openapi import install_openapi
from .routes import classify, docs, explain, health, models, ui, v2
from .routes import metrics as metrics_route
from .state import FrontendState

log = logging.getLogger("patchlife.app")


async def _start(fe: FrontendState) -> None:
    """The model's warm-up and start, in the background; a failure keeps the process alive (healthz)
    but never ready, with the reason in /readyz."""
    try:
        await fe.model.start()
    except Exception as exc:
        fe.startup_error = f"{type(exc).__name__}: {exc}"
        if fe.state == Lifecycle.LOADING:
            fe.state = Lifecycle.FAILED
        return
    if fe.state == Lifecycle.LOADING:
        fe.state = Lifecycle.READY


async def drain(fe: FrontendState, poll_s: float = 0.01) -> None:
    """The shutdown drain, started at SIGTERM while the listener is still open.

    1. (already done by the caller) ``/readyz`` answers 503; the worker runs queued batches without
       waiting for them to fill; requests are still served for ``shutdown_delay_s``, so that a load
       balancer stops sending before anything is refused.
    2. New requests are answered 503 ``shutting_down`` with ``Connection: close``; the requests in
       flight finish within ``shutdown_grace_s``.
    3. At the end of the grace the worker stops: what is still queued, or still decoding, is
       answered 503 too (a batch already running completes).
    """
    s = fe.settings
    await asyncio.sleep(s.shutdown_delay_s)
    fe.advance(Lifecycle.DRAINING)
    loop = asyncio.get_running_loop()
    end = loop.time() + s.shutdown_grace_s
    while fe.in_flight.count > 0 and loop.time() < end:
        await asyncio.sleep(poll_s)
    fe.advance(Lifecycle.GRACE_OVER)  # requests still decoding stop before their next image (503)
    await fe.model.stop(grace_s=max(0.0, end - loop.time()))
    answered = loop.time() + 1.0  # the 503s of what the worker failed are written by their own tasks
    while fe.in_flight.count > 0 and loop.time() < answered:
        await asyncio.sleep(poll_s)
    log.info("drained: %d requests still in flight", fe.in_flight.count)


GRPC_STOP_GRACE_S = 1.0  # gRPC calls still writing their answer when the lifespan ends


async def _start_grpc(fe: FrontendState, version: str) -> Any:
    """The gRPC listener (``service/frontend/grpc/``), imported only when it is served: a server with
    PATCHLIFE_GRPC_PORT=0 never loads grpcio or the generated messages."""
    from .grpc.server import start_server

    return await start_server(fe, version)


def begin_shutdown(fe: FrontendState) -> None:
    """SIGTERM, first step (on the event loop): readiness false, batches stop waiting to fill."""
    fe.advance(Lifecycle.STOPPING)
    fe.in_flight.closing = True
    fe.model.begin_drain()


# The routers in the order the docs list them (docs: /docs, /redoc offline; v2: the Open Inference
# Protocol for KServe and Triton clients) ...
DOCUMENTED = (classify.router, explain.router, health.router, models.router, metrics_route.router, ui.router,
              docs.router, v2.router, v2.infer_router)
# ... and the order they are matched in: the two hot routes first. FastAPI (0.165) tries each included
# router's routes in turn (2-3 us each), and v2 inference came last of 28: 58 us a request, now 9 us.
SERVED = (classify.router, v2.infer_router, *(r for r in DOCUMENTED if r not in (classify.router, v2.infer_router)))


def make_app(settings: Settings, model: ModelClient, metrics: Metrics, shared_ports: bool = False) -> FastAPI:
    """The app of one front end, serving ``model``; ``metrics``: this process's series; ``shared_ports``:
    one of several API processes (gRPC then listens with SO_REUSEPORT beside the others)."""
    fe = FrontendState(settings, metrics, model, shared_ports=shared_ports)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        fe.card = await model.open()
        info = fe.card.info
        fe.metrics.set_model(package_version(), fe.card.name, info["device"], info["dtype"])
        grpc_server = await _start_grpc(fe, app.version) if settings.grpc_port else None
        starting = asyncio.create_task(_start(fe))
        try:
            yield
        finally:
            fe.advance(Lifecycle.STOPPED)
            await starting  # a warm-up in its thread cannot be interrupted; it is short
            await model.stop()
            if grpc_server is not None:  # after the model: its calls have been answered by then
                await grpc_server.stop(GRPC_STOP_GRACE_S)

    app = FastAPI(title="patchlife", version=package_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  summary="Vision transformers that slim their patches by life regression, served with "
                          "token-budget batching.")
    app.state.frontend = fe
    install_error_handlers(app, fe.metrics.reject)
    # One middleware, as they only wrap: request id, arrival, body clock, HEAD, metrics and the last resort
    app.add_middleware(FrontDoor, frontend=fe)
    # Each router names its access group (service/frontend/access.py); health, ui and docs are open.
    # Matched in this order; documented in DOCUMENTED's (/openapi.json as before the inference routes moved).
    for router in SERVED:
        app.include_router(router)
    install_openapi(app, fe, DOCUMENTED)  # /openapi.json: the bodies parsed by hand, this server's limits
    return app
