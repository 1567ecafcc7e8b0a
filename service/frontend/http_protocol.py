"""uvicorn's httptools protocol with the timeouts a slow or silent client needs, below the ASGI app.

* A new connection that sends nothing for ``PATCHLIFE_KEEPALIVE_TIMEOUT_S`` is closed, like one kept
  alive after an answer (uvicorn's own ``timeout_keep_alive`` only starts after a first answer).
* A request's headers must be complete within ``PATCHLIFE_READ_TIMEOUT_S`` of its first byte
  (slowloris): past it the client gets a JSON 408 with ``Connection: close``. Body reads are timed in
  the app (``service/frontend/bodyread.py``), where the deadline and the drain are known.

``timed_protocol(settings)`` returns the class to pass as ``uvicorn.Config(http=...)``. The connections
it made know when they were accepted or last answered and whether a request is in progress: the
shutdown drain uses that to answer connections whose client may be sending a request at that moment.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..settings import Settings

log = logging.getLogger("patchlife.protocol")


def _timeout_answer() -> bytes:
    body = json.dumps({"error": {"code": "request_timeout", "message": "request headers not complete in time "
                                                                       "(PATCHLIFE_READ_TIMEOUT_S)"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class TimedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus the idle timer of a new connection and the header timer of each request."""

    read_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.accepted_at = self.answered_at = self.loop.time()
        self._header_timer: asyncio.TimerHandle | None = None
        # the same handle uvicorn uses between requests: data_received cancels it
        self.timeout_keep_alive_task = self.loop.call_later(self.idle_timeout_s, self.timeout_keep_alive_handler)

    def on_response_complete(self) -> None:
        self.answered_at = self.loop.time()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.read_timeout_s, self._headers_timed_out)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        log.info("request headers from %s not complete after %.1f s: 408", self.client, self.read_timeout_s)
        self.transport.write(_timeout_answer())
        self.transport.close()

    def expecting_request(self, within_s: float) -> bool:
        """Open, no request in progress, and accepted or last answered (kept alive) less than ``within_s``
        ago: its client may be sending a request right now, which a close would reset."""
        idle = self.cycle is None or self.cycle.response_complete
        recent = self.loop.time() - self.answered_at < within_s
        return idle and recent and not self.transport.is_closing()


def timed_protocol(settings: Settings) -> type[TimedHttpProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with ``settings``' timeouts."""
    return type("PatchlifeHttpProtocol", (TimedHttpProtocol,), {
        "read_timeout_s": settings.read_timeout_s, "idle_timeout_s": settings.keepalive_timeout_s})
