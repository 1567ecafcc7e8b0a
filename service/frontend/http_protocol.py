"""uvicorn's httptools protocol with the timeouts a slow or silent client needs, below the ASGI app.

* A new connection that sends nothing for ``PATCHLIFE_KEEPALIVE_TIMEOUT_S`` is closed, like one kept
  alive after an answer (uvicorn's own ``timeout_keep_alive`` only starts after a first answer).
* A request's headers must be complete within ``PATCHLIFE_READ_TIMEOUT_S`` of its first byte
  (slowloris): past it the client gets a JSON 408 with ``Connection: close``. Body reads are timed in
  the app (``service/frontend/bodyread.py``), where the deadline and the drain are known.

* A request's line and headers together may not pass ``PATCHLIFE_MAX_HEADER_BYTES``: past it the client
  gets a JSON 431 (414 when the URL alone is over) with ``Connection: close``, the parser stops buffering
  (it holds at most the limit plus one read), and what the client still sends is read and dropped for
  ``LINGER_S`` so that the answer is not lost to a reset.
* A client that closes the connection before its answer is complete is marked in the request's scope
  (``CLIENT_GONE_KEY``): the metrics count it as 499 (``service/metrics.py``), never as a 5xx.
* Half-close: a client that sends a whole request and then shuts down its side for writing
  (``shutdown(SHUT_WR)``) still gets its answer, and the connection is closed after it (nothing more
  can come). An EOF before a request is complete closes the connection at once, as before.

``timed_protocol(settings)`` returns the class to pass as ``uvicorn.Config(http=...)``. The connections
it made know when they were accepted or last answered and whether a request is in progress: the
shutdown drain uses that to answer connections whose client may be sending a request at that moment.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..metrics import CLIENT_GONE_KEY
from ..settings import Settings

log = logging.getLogger("patchlife.protocol")
LINGER_S = 2.0  # after a refusal of the headers: how long what the client still sends is read and dropped


def _answer(status: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n".encode()
            + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _timeout_answer() -> bytes:
    return _answer("408 Request Timeout", "request_timeout",
                   "request headers not complete in time (PATCHLIFE_READ_TIMEOUT_S)")


class TimedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus the idle timer of a new connection and the header timer of each request."""

    read_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0
    max_header_bytes: int = 32768
    _half_closed = False
    _refused = False        # the headers were refused: everything that still comes is dropped
    _in_headers = False     # a request's line and headers are arriving
    _header_bytes = 0       # bytes received since its first (an upper bound until they are complete)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._in_headers and not self._refused:
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse_headers(url_only=False)

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._refused:
            super().on_header(name, value)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def _refuse_headers(self, url_only: bool) -> None:
        self._refused, self._in_headers = True, False
        self._cancel_header_timer()
        limit = self.max_header_bytes
        log.info("request headers from %s over %d bytes: %s", self.client, limit, 414 if url_only else 431)
        if url_only:
            answer = _answer("414 URI Too Long", "uri_too_long", f"the URL is over {limit} bytes "
                             "(PATCHLIFE_MAX_HEADER_BYTES)")
        else:
            answer = _answer("431 Request Header Fields Too Large", "headers_too_large",
                             f"the request line and headers are over {limit} bytes (PATCHLIFE_MAX_HEADER_BYTES)")
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer, then our FIN; reading goes on until the client closes
        self.loop.call_later(LINGER_S, self.transport.close)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.accepted_at = self.answered_at = self.loop.time()
        self._header_timer: asyncio.TimerHandle | None = None
        # the same handle uvicorn uses between requests: data_received cancels it
        self.timeout_keep_alive_task = self.loop.call_later(self.idle_timeout_s, self.timeout_keep_alive_handler)

    def on_response_complete(self) -> None:
        self.answered_at = self.loop.time()
        super().on_response_complete()
        if self._half_closed and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()  # answered; the client can send nothing more (no pipelined request left)

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio reads the result
        """The client shut its side: keep ours open (True) while a whole request awaits its answer."""
        if self._refused:
            return None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            self._half_closed = True
            return True
        return None  # nothing complete to answer: the transport closes (a disconnect for a body still expected)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.scope[CLIENT_GONE_KEY] = "during" if cycle.response_started else "before"  # type: ignore[literal-required]
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._header_bytes = True, 0
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.read_timeout_s, self._headers_timed_out)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._in_headers = False
        if self._refused:
            return
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)  # "k: v\r\n"
        if size > self.max_header_bytes:  # the read that completed them went past the limit
            self._refuse_headers(url_only=len(self.url) > self.max_header_bytes)
            return
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
        "read_timeout_s": settings.read_timeout_s, "idle_timeout_s": settings.keepalive_timeout_s,
        "max_header_bytes": settings.max_header_bytes})
