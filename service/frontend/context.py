"""Per-request context: arrival time, ``X-Request-ID``, requests in flight (the log format: ``service/logs.py``).

``RequestContextMiddleware`` (pure ASGI, outermost of the app's own middlewares) stamps each request's
arrival (``scope[ARRIVAL_KEY]``, ``time.monotonic()``) before anything else runs, so a deadline counts
from there and not from when a thread-pool dependency got its turn; takes the client's
``X-Request-ID`` (1-128 characters of ``[A-Za-z0-9._:@/+=-]``) or makes one; echoes it in the
answer; and puts it in every log line written while the request is served (a context variable, so
uvicorn's access line and the thread-pool work of the request carry it too). From the start of
shutdown every answer carries ``Connection: close``.
"""

from __future__ import annotations

import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..logs import configure_logging, current_request_id, set_request_id

__all__ = ["ARRIVAL_KEY", "REQUEST_ID_HEADER", "InFlight", "RequestContextMiddleware", "configure_logging",
           "current_request_id"]

REQUEST_ID_HEADER = "X-Request-ID"
ARRIVAL_KEY = "patchlife.arrival"
_VALID_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class InFlight:
    """HTTP requests being served (the shutdown drain waits for this to reach 0); ``closing``: shutdown
    has begun, every answer says ``Connection: close`` so that no kept-alive connection is reused."""

    def __init__(self) -> None:
        self.count = 0
        self.closing = False


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, in_flight: InFlight) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVAL_KEY] = time.monotonic()
        sent = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), "")
        rid = sent if _VALID_ID.fullmatch(sent) else uuid.uuid4().hex
        set_request_id(rid)  # each request runs in its own task: no reset needed (the 500 handler still sees it)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = rid
                if self.in_flight.closing:
                    headers["Connection"] = "close"
            await send(message)

        self.in_flight.count += 1
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.in_flight.count -= 1
