"""Reading the request body with a clock running, and never closing on bytes left unread.

``BodyReader`` wraps each request's ``receive`` and ``send`` (the front door,
``service/frontend/front_door.py``, makes one per request):

* While the body is still arriving, each wait for the next chunk is bounded by
  ``PATCHLIFE_READ_TIMEOUT_S`` and by the request's deadline (``X-Request-Deadline-Ms``, stored in
  the scope by the deadline dependency): a client that stops sending is answered 408
  ``request_timeout`` or 504 ``deadline_exceeded``, with ``Connection: close``. The body is read
  whole before any image is decoded or queued, so a slow client holds no slot of the decode budget
  or of the queue, only its connection.
* Once the drain's grace is over (``FrontendState.grace_over``), a request still uploading is answered 503
  ``shutting_down`` instead of waiting for the rest.
* An answer that closes the connection (``Connection: close``: shutdown, timeouts, or a client that
  asked for it) is held back until the rest of the body has been read and thrown away, up to
  ``max_request_bytes`` and ``LINGER_S``: closing a socket with unread bytes in it sends a TCP reset,
  which destroys the answer on its way to the client. A kept-alive connection needs none of this
  (uvicorn reads past the unread rest itself).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from starlette.types import Message, Receive, Scope, Send

from .errors import ApiError, DeadlineExceeded, RequestTimeout, ShuttingDown

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..settings import Settings
    from .context import InFlight


class BodyReadState(Protocol):
    """What the body reader reads of the front end's state (``state.FrontendState``): typed here,
    so that this module, which the front end's state's users import, imports none of them."""

    @property
    def settings(self) -> Settings: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def in_flight(self) -> InFlight: ...

    @property
    def grace_over(self) -> bool: ...

LINGER_S = 2.0   # longest a closing answer waits for the rest of the body (below uvicorn's 5 s stop grace)
POLL_S = 0.1     # how often a body wait looks at the drain's grace
DEADLINE_KEY = "patchlife.deadline"  # scope: the request's deadline on time.monotonic, set by the deadline dependency


class BodyReader:
    """One request's ``receive``/``send`` pair with the rules of the module docstring."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, fe: BodyReadState) -> None:
        self.scope, self._receive, self._send, self.fe = scope, receive, send, fe
        self.body_done = not _has_body(scope)
        self.stalled = False  # the client stopped sending: no point waiting for the rest

    async def receive(self) -> Message:
        if self.body_done:
            return await self._receive()
        timeout = self.fe.settings.read_timeout_s
        deadline: float | None = self.scope.get(DEADLINE_KEY)
        end = time.monotonic() + timeout
        by_deadline = deadline is not None and deadline < end
        if deadline is not None and by_deadline:
            end = deadline
        while True:
            if self.fe.grace_over:  # the client is still sending: the 503 waits for the rest (LINGER_S)
                self.fe.metrics.reject("shutdown")
                raise ShuttingDown("server is shutting down; the request body was not read in time")
            left = end - time.monotonic()
            if left <= 0:
                self.stalled = True
                raise self._timed_out(by_deadline, timeout)
            try:
                # a timeout scope on this task, not wait_for's task per chunk: a body that has arrived
                # (the usual case) is returned at once, and the scope costs a timer handle only
                async with asyncio.timeout(min(left, POLL_S)):
                    message = await self._receive()
            except TimeoutError:
                continue
            self._note(message)
            return message

    def _timed_out(self, by_deadline: bool, timeout: float) -> ApiError:
        if by_deadline:
            self.fe.metrics.reject("deadline")
            return DeadlineExceeded("the deadline passed while reading the request body (X-Request-Deadline-Ms "
                                    "or PATCHLIFE_DEADLINE_MS)", headers={"Connection": "close"})
        self.fe.metrics.reject("read_timeout")
        return RequestTimeout(f"no body bytes for {timeout:g} s (PATCHLIFE_READ_TIMEOUT_S)")

    def _note(self, message: Message) -> None:
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_done = True

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and not self.body_done and not self.stalled \
                and self._closes(message):
            await self._discard_rest()
        await self._send(message)

    def _closes(self, message: Message) -> bool:
        """Whether the connection closes after this answer (so unread bytes would reset it)."""
        if self.fe.in_flight.closing or self.scope.get("http_version") == "1.0":
            return True
        headers = list(message.get("headers", ())) + list(self.scope.get("headers", ()))
        return any(k.lower() == b"connection" and b"close" in v.lower() for k, v in headers)

    async def _discard_rest(self) -> None:
        limit, read = self.fe.settings.max_request_bytes, 0
        end = time.monotonic() + LINGER_S
        while not self.body_done and read <= limit:
            left = end - time.monotonic()
            if left <= 0:
                return
            try:
                message = await asyncio.wait_for(self._receive(), left)
            except asyncio.TimeoutError:
                return
            read += len(message.get("body", b""))
            self._note(message)


def _has_body(scope: Scope) -> bool:
    for key, value in scope.get("headers", ()):
        if key == b"transfer-encoding" or (key == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False
