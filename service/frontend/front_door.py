"""The front door: the one ASGI middleware every HTTP request passes, outside the app's routing.

It only wraps (the request's ``receive`` and ``send``, and a ``try`` around the app), so the five
concerns that wrap a request are one layer and one ``send`` function instead of a stack of five:

* context (``service/frontend/context.py``): the arrival is stamped (``scope[ARRIVAL_KEY]``) before any
  app code runs, so a deadline counts from there; the client's ``X-Request-ID`` is taken, or one is
  made, echoed in the answer and set for every log line of the request; the request counts in
  flight (the drain waits for it), and from the start of shutdown every answer says ``Connection: close``;
* the body's clock (``service/frontend/bodyread.py``): reads bounded by ``PATCHLIFE_READ_TIMEOUT_S``
  and the deadline, and an answer that closes the connection waits for the unread rest of the body;
* HEAD on every GET route: the app sees a GET in a copy of the scope (the server's keeps HEAD, so it
  knows no body follows) and the body it sends is dropped, status and headers kept (RFC 9110 9.3.2);
* the HTTP metrics: latency by route template, method and status, and requests in flight
  (``service/metrics.py``'s ``record_http``, which counts a client gone before its answer as 499);
* the last resort: an exception that escapes the app is one log record with the traceback and a
  JSON 500 with ``Connection: close`` (the connection's state is unknown after a bug), which carries
  the request id and is counted like any answer; /v2 answers in the protocol's error shape.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..logs import current_request_id, set_request_id
from ..metrics import record_http
from .bodyread import BodyReader, BodyReadState
from .context import ARRIVAL_KEY, REQUEST_ID_HEADER, request_id
from .errors import INTERNAL_MESSAGE, error_body

log = logging.getLogger("patchlife.errors")
ROUTE_KEYS = ("route", "endpoint", "path_params")  # what the router found, read by the metrics


def _internal_error(path: str) -> bytes:
    body = {"error": INTERNAL_MESSAGE} if path.startswith("/v2") else error_body("internal_error", INTERNAL_MESSAGE)
    return json.dumps(body).encode()


class FrontDoor:
    def __init__(self, app: ASGIApp, frontend: BodyReadState) -> None:
        self.app = app
        self.frontend = frontend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVAL_KEY] = time.monotonic()
        rid = request_id(scope)
        set_request_id(rid)  # each request runs in its own task: no reset needed (the 500 handler still sees it)
        fe = self.frontend
        head = scope.get("method") == "HEAD"
        inner = {**scope, "method": "GET"} if head else scope
        reader = BodyReader(inner, receive, send, fe)
        status, started = 500, False  # 500: what the client gets if the app raises before answering

        async def respond(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = rid
                if fe.in_flight.closing:
                    headers["Connection"] = "close"
            elif head and message["type"] == "http.response.body":
                message = {"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)}
            await reader.send(message)

        fe.in_flight.count += 1
        fe.metrics.http_in_flight.inc()
        t0 = time.perf_counter()
        try:
            await self.app(inner, reader.receive, respond)
        except Exception as exc:
            log.error("unhandled error on %s %s (request %s)", scope.get("method"), scope.get("path"),
                      current_request_id(), exc_info=exc)
            if not started:  # else half an answer went out: uvicorn closes the connection when we return
                content = _internal_error(str(scope.get("path", "")))
                await respond({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
                    (b"connection", b"close")]})
                await respond({"type": "http.response.body", "body": content})
        finally:
            if head:
                scope.update({k: inner[k] for k in ROUTE_KEYS if k in inner})
            fe.metrics.http_in_flight.dec()
            record_http(fe.metrics, scope, status, time.perf_counter() - t0)
            fe.in_flight.count -= 1
