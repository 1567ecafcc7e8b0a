"""Hand-written parameter binding for the hot routes (POST /classify, POST /v2/models/{name}/infer).

FastAPI binds an endpoint's parameters by solving its dependency graph for every request and then
validates the returned model against ``response_model`` before serialising it: about 0.15-0.2 ms
of the API process's CPU per request (``python -m bench.frontend_cpu --pass-on``), for parameters
that cannot fail FastAPI's own validation (every query parameter and header here is typed ``str``,
read by ``service/frontend/numbers.py``) and a model the endpoint has just built itself.

A route of :class:`DirectRoute` whose endpoint names a binder (:func:`binds`) runs that binder
instead: it reads the same parameters from the same places in the same order (the access group's
key first, then the front end, the deadline header, then the query and path) and calls the
endpoint with them. What the endpoint returns is serialised exactly as FastAPI does (the route's
response field, ``dump_json``, the same response options). The endpoint keeps its signature, so
the OpenAPI schema is unchanged, and ``tests/service/frontend/test_direct_routes.py`` checks that
every parameter the signature declares is one its binder reads, and that answers (errors included)
are those of FastAPI's own handler: status, headers and body, measured times aside.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute

try:  # private (FastAPI 0.165): an included router's view of a route; without it a route is its own view
    from fastapi.routing import _effective_route_context_var
except ImportError:  # pragma: no cover - other FastAPI versions
    _effective_route_context_var = None  # type: ignore[assignment]

from ..access import Group, group_of
from ..state import FrontendState
from .params import DEADLINE_HEADER_NAME, request_deadline

Binder = Callable[[Request, FrontendState, float], Awaitable[Any]]  # (request, fe, deadline) -> endpoint's result
F = TypeVar("F", bound=Callable[..., Any])
BINDER_ATTR = "direct_binder"
READS_ATTR = "direct_reads"  # the parameter names a binder reads besides request, fe and deadline


def binds(binder: Binder, reads: tuple[str, ...]) -> Callable[[F], F]:
    """Mark an endpoint as bound by hand: ``binder(request, fe, deadline)`` calls it with its other
    parameters, named in ``reads`` (checked against the signature by the tests)."""

    def mark(endpoint: F) -> F:
        setattr(endpoint, BINDER_ATTR, binder)
        setattr(endpoint, READS_ATTR, reads)
        return endpoint

    return mark


class DirectRoute(APIRoute):
    """An APIRoute that runs its endpoint's binder, if it has one, instead of FastAPI's dependency
    solving; FastAPI's own handler still runs while the app has ``dependency_overrides`` (they name
    FastAPI's dependencies; the tests set one to compare the two handlers' answers)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        fastapi_handler = super().get_route_handler()
        binder: Binder | None = getattr(self.endpoint, BINDER_ATTR, None)
        if binder is None:
            return fastapi_handler
        context = _effective_route_context_var.get() if _effective_route_context_var is not None else None
        route: Any = context if context is not None and context.original_route is self else self
        group = _access_group(route.path, route.dependencies)
        field, status = route.response_field, route.status_code or 200
        options = {"include": route.response_model_include, "exclude": route.response_model_exclude,
                   "by_alias": route.response_model_by_alias, "exclude_unset": route.response_model_exclude_unset,
                   "exclude_defaults": route.response_model_exclude_defaults,
                   "exclude_none": route.response_model_exclude_none}

        async def handle(request: Request) -> Response:
            if request.app.dependency_overrides:
                return await fastapi_handler(request)
            fe: FrontendState = request.app.state.frontend
            if group is not None:  # the router's require(): before anything else, as FastAPI runs it
                fe.keys.check(group, request.headers.get("authorization"))
            deadline = await request_deadline(request, fe, request.headers.get(DEADLINE_HEADER_NAME))
            result = await binder(request, fe, deadline)
            if isinstance(result, Response) or field is None:
                return result  # type: ignore[no-any-return]
            return Response(field.serialize_json(result, **options), status, media_type="application/json")

        return handle


def _access_group(path: str, dependencies: Sequence[Any]) -> Group | None:
    """The group of the route's ``require()`` dependency; no other dependency may be declared (the
    binder would not run it)."""
    groups = {g for d in dependencies if (g := group_of(d.dependency)) is not None}
    if len(groups) != len(dependencies) or len(groups) > 1:
        raise TypeError(f"{path}: a directly bound route takes one require() dependency at most, and no other")
    return groups.pop() if groups else None
