"""Every error the service answers, as one JSON shape:

    {"error": {"code": "bad_image", "message": "files[1]: ...", "details": [...]}}

``code`` is stable and machine-readable; ``message`` says what was wrong in words; ``details`` is
present only for request validation errors (one entry per offending field). Errors that reject a
request for a reason listed in the ``patchlife_rejected_requests_total`` metric carry that reason
and are counted by the handler; the worker counts its own rejections (overload, deadline,
disconnect, shutdown) through its hooks, so those are not counted twice here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api_errors import ApiError as ApiError
from ..api_errors import BadImage as BadImage
from ..api_errors import TooManyPixels as TooManyPixels
from ..api_errors import UnsupportedMediaType as UnsupportedMediaType
from ..protocol import ErrorKind, WorkerError


class InvalidRequest(ApiError):
    """A missing/unknown/duplicate field or an out-of-range parameter (422), or a malformed body (400)."""
    status, code, reason = 422, "invalid_request", "invalid_request"


def invalid_json(exc: ValidationError, what: str) -> InvalidRequest:
    """A pydantic error on a JSON body as the API's error: 400 for broken JSON, else 422 naming the
    first few fields that are wrong (``what`` names the body in the message)."""
    errors = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return InvalidRequest(f"body is not valid JSON: {errors[0]['msg']}", status=400)
    where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
    return InvalidRequest(f"invalid {what}: {where}")


class TooLarge(ApiError):
    """A file or the whole body is over its byte limit: 413."""
    status, code, reason = 413, "too_large", "too_large"


class TooManyImages(ApiError):
    status, code, reason = 413, "too_many_images", "too_many_images"


class RequestTooManyPixels(ApiError):
    """The request's images together are over the per-request pixel budget, found from their headers."""
    status, code, reason = 413, "request_too_many_pixels", "request_too_many_pixels"


class DecodeOverloaded(ApiError):
    """No room to decode (PATCHLIFE_MAX_DECODE_PIXELS) within PATCHLIFE_DECODE_WAIT_MS: 503 + Retry-After."""
    status, code, reason = 503, "overloaded", "overloaded"


class ModelUnavailable(ApiError):
    """The model failed the request's batch or its thread is down (the worker counts it): 503 + Retry-After."""
    status, code = 503, "model_unavailable"


class NotReady(ApiError):
    """The model is still loading or warming up: ``Retry-After: 1`` unless the caller says otherwise."""
    status, code = 503, "not_ready"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "1", **(headers or {})})


class Overloaded(ApiError):
    status, code = 503, "overloaded"


class ShuttingDown(ApiError):
    """Shutdown has begun; ``Connection: close`` so that the client does not reuse the connection."""
    status, code = 503, "shutting_down"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={"Connection": "close", **(headers or {})})


class DeadlineExceeded(ApiError):
    status, code = 504, "deadline_exceeded"


class RequestTimeout(ApiError):
    """The client stopped sending its body for PATCHLIFE_READ_TIMEOUT_S: 408, and the connection closes
    (the rest of the body may still come; nothing after it could be read as a request)."""
    status, code = 408, "request_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class ClientDisconnected(ApiError):
    """Nobody reads this answer; 499 (nginx's "client closed request") keeps the access log honest."""
    status, code = 499, "client_disconnected"


class UploadAbandoned(ClientDisconnected):
    """The client closed the connection before its body was complete (nothing reached the worker, so it is
    counted here)."""
    reason = "disconnected"


REFUSALS: dict[ErrorKind, type[ApiError]] = {
    ErrorKind.BAD_INPUT: BadImage,  # a JPEG the model process could not decode: as the CPU path says it
    ErrorKind.QUEUE_FULL: Overloaded,
    ErrorKind.DEADLINE: DeadlineExceeded,
    ErrorKind.STOPPING: ShuttingDown,
    ErrorKind.MODEL_FAILED: ModelUnavailable,
    ErrorKind.CANCELLED: ClientDisconnected,
}


def refusal(exc: WorkerError, deadline_hint: str = "") -> ApiError:
    """The model's refusal (in this process or from the model process: the same :class:`WorkerError`)
    as the API error it answers, by its kind; Retry-After where it has one. ``deadline_hint``: where a
    request's deadline comes from, said in a 504's message."""
    message = f"{exc} {deadline_hint}" if exc.kind == ErrorKind.DEADLINE and deadline_hint else str(exc)
    retry = exc.retry_after_s
    return REFUSALS[exc.kind](message, headers={} if retry is None else {"Retry-After": str(max(1, math.ceil(retry)))})


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if details:
        err["details"] = details
    return {"error": err}


def _status_code_name(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "header", "body", "path")]
        out.append({"field": ".".join(loc) or "request", "message": str(err.get("msg", "invalid"))})
    return out


def install_error_handlers(app: FastAPI, on_reject: Callable[[str], None]) -> None:
    """Route every exception to the JSON error shape; ``on_reject(reason)`` feeds the metrics."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        if exc.reason:
            on_reject(exc.reason)
        return JSONResponse(error_body(exc.code, exc.message), exc.status, headers=exc.headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        on_reject("invalid_request")
        details = _validation_details(exc)
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details) or "invalid request"
        return JSONResponse(error_body("invalid_request", message, details), 422)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse(error_body(_status_code_name(exc.status_code), str(exc.detail)),
                            exc.status_code, headers=dict(exc.headers or {}))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    # Anything else is a bug: the front door (front_door.py) answers it (not an Exception handler here: Starlette
    # runs that one in its outermost middleware, which then re-raises, so uvicorn logs the traceback a
    # second time and drops the kept-alive connection without saying so).


INTERNAL_MESSAGE = "internal server error; see the server log"
