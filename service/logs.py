"""Logging for every process of the service: one format, and the request id in every line.

The request id (``X-Request-ID``) lives in a context variable: set by the front end's middleware for
an HTTP request, and by the model process's transport host for the work it runs for that request,
so the lines of both kinds of process carry it. ``PATCHLIFE_LOG_FORMAT`` picks text or JSON; each line
names its process (``model``, ``api-1``, ...; ``main`` for the single-process service).
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from typing import Any

_request_id: ContextVar[str] = ContextVar("patchlife_request_id", default="-")
_process = "main"


def current_request_id() -> str:
    """The X-Request-ID of the request being served, ``-`` outside one."""
    return _request_id.get()


def set_request_id(rid: str) -> None:
    _request_id.set(rid)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        record.process_role = _process
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"), "process": getattr(record, "process_role", _process)}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(process_role)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str, fmt: str, process: str = "main") -> None:
    """The root handler for the service and uvicorn's loggers (``fmt``: ``text`` or ``json``);
    ``process``: this process's name in every line."""
    global _process
    _process = process
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
