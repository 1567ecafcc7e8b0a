"""Per-request context: arrival time, ``X-Request-ID``, requests in flight; and the log format.

``RequestContextMiddleware`` (pure ASGI, outermost of the app's own middlewares) stamps each request's
arrival (``scope[ARRIVAL_KEY]``, ``time.monotonic()``) before anything else runs, so a deadline counts
from there and not from when a thread-pool dependency got its turn; takes the client's
``X-Request-ID`` (1-128 characters of ``[A-Za-z0-9._:@/+=-]``) or makes one; echoes it in the
answer; and puts it in every log line written while the request is served (a context variable, so
uvicorn's access line and the thread-pool work of the request carry it too). From the start of
shutdown every answer carries ``Connection: close``.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
ARRIVAL_KEY = "patchlife.arrival"
_VALID_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_request_id: ContextVar[str] = ContextVar("patchlife_request_id", default="-")


def current_request_id() -> str:
    """The X-Request-ID of the request being served, ``-`` outside one."""
    return _request_id.get()


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
        _request_id.set(rid)  # each request runs in its own task: no reset needed (the 500 handler still sees it)

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


# -- logs ----------------------------------------------------------------------------------------
class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-")}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str, fmt: str) -> None:
    """The root handler for the service and uvicorn's loggers (``fmt``: ``text`` or ``json``)."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
