"""What the REST routes take from a request besides its body: the front end's state, the deadline
header, and the option query parameters (the pipeline they feed is ``service/frontend/pipeline.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request

from ..bodyread import DEADLINE_KEY
from ..context import ARRIVAL_KEY
from ..numbers import parse_float
from ..pipeline import DEADLINE_HEADER
from ..state import FrontendState


async def get_frontend(request: Request) -> FrontendState:
    """``async``: plain ``def`` dependencies run in the thread pool, queued behind image decodes."""
    return request.app.state.frontend  # type: ignore[no-any-return]


FrontendDep = Annotated[FrontendState, Depends(get_frontend)]


MAX_DEADLINE_MS = 3_600_000
DEADLINE_HEADER_NAME = "x-request-deadline-ms"  # FastAPI's name for the x_request_deadline_ms parameter below


def documented_as(**schema: Any) -> Callable[[dict[str, Any]], None]:
    """``json_schema_extra`` that replaces a ``str`` parameter's schema by what it accepts: the value
    is read as text by service/frontend/numbers.py, the clients (and Schemathesis) see the number it must be."""

    def replace(out: dict[str, Any]) -> None:
        title = out.get("title")
        out.clear()
        out.update(schema, **({"title": title} if title else {}))

    return replace


async def request_deadline(request: Request, fe: FrontendDep, x_request_deadline_ms: Annotated[str | None, Header(
        description="Per-request deadline in ms (default PATCHLIFE_DEADLINE_MS), 0 < ms <= 3600000; it covers "
                    "reading the body too. A request not started by then is answered 504.",
        json_schema_extra=documented_as(type="number", exclusiveMinimum=0, maximum=MAX_DEADLINE_MS))] = None,
        ) -> float:
    """The request's deadline on the worker clock, counted from its arrival (stamped by the front
    door, ``service/frontend/front_door.py``, before anything else ran). Also stored in the scope on the
    monotonic clock, where the body reader (``service/frontend/bodyread.py``) stops waiting for the client."""
    ms = fe.settings.deadline_ms if x_request_deadline_ms is None else \
        parse_float(x_request_deadline_ms, DEADLINE_HEADER, 0.0, MAX_DEADLINE_MS, low_open=True)
    arrival = request.scope.get(ARRIVAL_KEY)
    now = time.monotonic()
    waited = max(0.0, now - arrival) if arrival is not None else 0.0
    request.scope[DEADLINE_KEY] = now - waited + ms / 1000.0
    return fe.clock()() - waited + ms / 1000.0


DeadlineDep = Annotated[float, Depends(request_deadline)]
# Typed str so that one parser (service/frontend/numbers.py) reads query, form, JSON and header numbers alike;
# the schema still says what is accepted.
TopKQuery = Annotated[str | None, Query(description="Labels per image, 1..PATCHLIFE_MAX_TOP_K (default 5); "
                                                    "also accepted as a form/JSON field.",
                                        json_schema_extra=documented_as(type="integer", minimum=1))]
KeepRateQuery = Annotated[str | None, Query(description="Keep rate for this request, 0 < r <= 1 "
                                                        "(default: the model's); also a form/JSON field.",
                                            json_schema_extra=documented_as(type="number", exclusiveMinimum=0,
                                                                            maximum=1))]
MinKeepRateQuery = Annotated[str | None, Query(description="Lowest keep rate accuracy scaling may run this request "
                                                           "at under load, 0 < r <= keep_rate (default: the "
                                                           "server's floor; none below an explicit keep_rate); "
                                                           "also a form/JSON field.",
                                               json_schema_extra=documented_as(type="number", exclusiveMinimum=0,
                                                                               maximum=1))]
