"""Per-request context: arrival time, ``X-Request-ID``, requests in flight (the log format: ``service/logs.py``).

The front door (``service/frontend/front_door.py``, the app's one middleware) stamps each request's
arrival (``scope[ARRIVAL_KEY]``, ``time.monotonic()``) before anything else runs, so a deadline counts
from there and not from when a thread-pool dependency got its turn; takes the client's
``X-Request-ID`` (1-128 characters of ``[A-Za-z0-9._:@/+=-]``) or makes one; echoes it in the
answer; and puts it in every log line written while the request is served (a context variable, so
uvicorn's access line and the thread-pool work of the request carry it too). From the start of
shutdown every answer carries ``Connection: close``.
"""

from __future__ import annotations

import re
import uuid

from starlette.types import Scope

from ..logs import configure_logging, current_request_id

__all__ = ["ARRIVAL_KEY", "REQUEST_ID_HEADER", "InFlight", "configure_logging", "current_request_id",
           "request_id"]

REQUEST_ID_HEADER = "X-Request-ID"
ARRIVAL_KEY = "patchlife.arrival"
_VALID_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class InFlight:
    """HTTP requests being served (the shutdown drain waits for this to reach 0); ``closing``: shutdown
    has begun, every answer says ``Connection: close`` so that no kept-alive connection is reused."""

    def __init__(self) -> None:
        self.count = 0
        self.closing = False


def request_id(scope: Scope) -> str:
    """The client's ``X-Request-ID`` if it is a valid one, else a new one."""
    sent = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), "")
    return sent if _VALID_ID.fullmatch(sent) else uuid.uuid4().hex
