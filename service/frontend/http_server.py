"""uvicorn for one front end, with the service's drain: what ``patchlife serve`` runs in its single
process and in each API process (``service/processes.py``). Its own module, so that neither of those
two imports the other for it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import select
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from ..protocol import Lifecycle
from ..settings import Settings
from .app import begin_shutdown, drain
from .http_protocol import TimedHttpProtocol, timed_protocol
from .state import FrontendState


class _Server(uvicorn.Server):
    """uvicorn, plus a drain that starts at the first SIGTERM/SIGINT, before uvicorn closes anything.

    Order of events (docs/ops.md): /readyz turns 503 at once and the worker stops waiting for
    batches to fill; requests are still served for ``shutdown_delay_s``; then new requests are
    answered 503 with ``Connection: close`` while the listener stays open and the requests in flight
    finish within ``shutdown_grace_s`` (what the worker still holds then is answered 503, and so is a
    request still uploading); the connections in the listen backlog are accepted and answered; only
    then does uvicorn's own shutdown close the listener and the idle connections. Every answer that
    closes a connection waits for the unread rest of its body (``service/frontend/bodyread.py``), so every
    connection that was accepted gets an answer it can read, and the drain and the stop grace do not
    add up. The command
    then exits 0 (uvicorn alone would re-raise the signal and end with 143). A second signal starts
    uvicorn's shutdown at once; a third SIGINT forces the exit.
    """

    def __init__(self, config: uvicorn.Config, frontend: FrontendState) -> None:
        super().__init__(config)
        self.frontend = frontend
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self._signalled = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What exists now (torch, FastAPI, the app: about 400,000 objects) lives as long as the process.
        # Frozen out of the collector's generations, it is no longer traversed by the full collections
        # that the requests' own garbage triggers (each 0.1-0.2 s of CPU at that size).
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._signalled and self._loop is not None and self.started:
            self._signalled = True
            self.frontend.advance(Lifecycle.STOPPING)  # a plain store: safe in a signal handler; /readyz now 503
            self._loop.call_soon_threadsafe(self._start_drain, sig)
            return
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    def _start_drain(self, sig: int) -> None:
        begin_shutdown(self.frontend)
        self._drain = asyncio.ensure_future(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        try:
            await drain(self.frontend)
            await self._answer_backlog()
        except Exception:
            logging.getLogger("patchlife.serve").exception("shutdown drain failed")
        finally:
            if not self.should_exit:
                super().handle_exit(sig, None)
                self._captured_signals.clear()


    async def _answer_backlog(self, quiet_s: float = 0.1, limit_s: float = 2.0) -> None:
        """Close the listener only when nothing is left to answer, then answer what it had accepted.

        Closing a listening socket resets the connections still in its backlog, and closing an
        accepted connection resets a request on its way. So first wait (event loop still accepting)
        until, for ``quiet_s``, no connection is in the backlog, no request is in flight (those get
        503 + Connection: close) and no connection accepted or answered in the last second is idle
        (its client may be sending a request); close the listeners in that same instant (uvicorn would
        only notice ``should_exit`` up to 0.1 s later, accepting meanwhile); then wait the same way for
        the connections accepted before the close. ``limit_s`` bounds each wait.
        """
        await self._until_quiet(quiet_s, limit_s, then_close=True)
        await self._until_quiet(quiet_s, limit_s, then_close=False)

    async def _until_quiet(self, quiet_s: float, limit_s: float, then_close: bool, poll_s: float = 0.02) -> None:
        loop = asyncio.get_running_loop()
        end = quiet = loop.time()
        end += limit_s
        while True:
            now = loop.time()
            fresh = any(isinstance(c, TimedHttpProtocol) and c.expecting_request(1.0)
                        for c in self.server_state.connections)
            if self.frontend.in_flight.count > 0 or fresh or (then_close and _backlog(self.servers)):
                quiet = now
            if now - quiet >= quiet_s or now >= end:
                if then_close:  # no await since the check above: nothing can have been accepted since
                    for server in self.servers:
                        server.close()
                return
            await asyncio.sleep(poll_s)


def _backlog(servers: list[asyncio.base_events.Server]) -> bool:
    """Whether a listening socket has a connection waiting to be accepted (it polls readable)."""
    fds = [sock.fileno() for server in servers for sock in server.sockets]
    return bool(fds) and bool(select.select(fds, [], [], 0)[0])


def make_server(app: FastAPI, settings: Settings, log_level: str) -> _Server:
    """uvicorn for one front end, with the drain above. log_config=None: uvicorn's loggers go through
    our handler (format, X-Request-ID). Our drain has already waited for the requests in flight, so
    uvicorn's own graceful timeout only covers stragglers. The protocol class adds the header and idle
    timeouts (service/frontend/http_protocol.py); timeout_keep_alive is the same idle limit between requests."""
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            log_config=None, timeout_graceful_shutdown=5, http=timed_protocol(settings),
                            timeout_keep_alive=settings.keepalive_timeout_s)  # type: ignore[arg-type]  # a float works
    return _Server(config, app.state.frontend)
