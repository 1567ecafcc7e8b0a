"""``patchlife serve``: the HTTP service under uvicorn.

Settings come from ``PATCHLIFE_*`` environment variables; ``--host``, ``--port`` and
``--checkpoint`` override them. The engine is loaded before the socket opens, so a missing or bad
checkpoint ends the command at once with the engine's message (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from .app import begin_shutdown, create_app, drain, load_engine
from .context import configure_logging
from .routes.common import Runtime
from .settings import Settings


class _Server(uvicorn.Server):
    """uvicorn, plus a drain that starts at the first SIGTERM/SIGINT, before uvicorn closes anything.

    Order of events (docs/ops.md): /readyz turns 503 at once and the worker stops waiting for
    batches to fill; requests are still served for ``shutdown_delay_s``; then new requests are
    answered 503 with ``Connection: close`` while the listener stays open and the requests in flight
    finish within ``shutdown_grace_s`` (what the worker still holds then is answered 503); only then
    does uvicorn's own shutdown close the listener and the idle connections. So every connection
    that was accepted gets an answer, and the drain and the stop grace do not add up. The command
    then exits 0 (uvicorn alone would re-raise the signal and end with 143). A second signal starts
    uvicorn's shutdown at once; a third SIGINT forces the exit.
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self._signalled = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._signalled and self._loop is not None and self.started:
            self._signalled = True
            self.runtime.stopping = True  # a plain store: safe in a signal handler; /readyz now 503
            self._loop.call_soon_threadsafe(self._start_drain, sig)
            return
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    def _start_drain(self, sig: int) -> None:
        begin_shutdown(self.runtime)
        self._drain = asyncio.ensure_future(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        try:
            await drain(self.runtime)
        except Exception:
            logging.getLogger("patchlife.serve").exception("shutdown drain failed")
        finally:
            if not self.should_exit:
                super().handle_exit(sig, None)
                self._captured_signals.clear()


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k in ("host", "port", "checkpoint") if (v := getattr(args, k, None)) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"patchlife serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, settings.log_format)
    try:
        engine = load_engine(settings)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"patchlife serve: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, engine)
    # log_config=None: uvicorn's loggers go through our handler (format, X-Request-ID). Our drain has
    # already waited for the requests in flight, so uvicorn's own graceful timeout only covers stragglers.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            log_config=None, timeout_graceful_shutdown=5)
    server = _Server(config, app.state.runtime)
    server.run()
    return 0 if server.started else 1
