"""HEAD on every GET route: answered as the GET would be, without its body (RFC 9110 9.3.2).

FastAPI registers GET routes for GET only (405 for HEAD), while load balancers and uptime checks
probe with HEAD. This ASGI middleware hands the app a GET in a copy of the scope (the server's own
scope keeps HEAD, so it knows no body follows) and drops the body the app sends, keeping the status
and the headers (Content-Length included) of the GET. A path with no GET route answers as a GET would:
404, or 405 with its ``Allow`` header. It runs inside the metrics middleware, which counts the request
as HEAD under the GET route's template.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGetMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)}
            await send(message)

        inner = {**scope, "method": "GET"}
        try:
            await self.app(inner, receive, without_body)
        finally:  # what the router found, for the middlewares outside (the metrics' route template)
            for key in ("route", "endpoint", "path_params"):
                if key in inner:
                    scope[key] = inner[key]
