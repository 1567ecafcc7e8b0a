"""``/openapi.json`` as the server really behaves, for clients and for Schemathesis
(tests/service/frontend/test_fuzz.py).

FastAPI derives the schema from the route signatures; the bodies are parsed by hand (streamed under
limits: service/frontend/upload.py, service/frontend/oip.py), so what they accept is written here, after FastAPI's pass:

* the limits of this server's settings (``top_k`` at most ``PATCHLIFE_MAX_TOP_K``; a float's smallest
  accepted value is the smallest normal double, as service/frontend/numbers.py reads it);
* the served model as the only value of ``/v2`` paths' ``{name}`` (other names are 404), and the v2
  infer body: JSON (with a working example), or the binary tensor extension with its header;
* the answers every operation that reads a body may give: 408 for a stalled body, 503/504 as the
  routes document them, and the /v2 error shape ``{"error": "..."}``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import BaseRoute

from . import oip
from .access import api_routes, route_group
from .schemas import _PIXEL

if TYPE_CHECKING:
    from .state import FrontendState

SMALLEST_FLOAT = sys.float_info.min  # below it a float underflows; service/frontend/numbers.py refuses it
_V2_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_NATIVE_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}


def _error(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _infer_body(model: str) -> dict[str, Any]:
    tensor = {"type": "object", "required": ["name", "shape", "datatype"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "enum": [oip.IMAGES, oip.PIXELS]},
                             "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 8},
                             "datatype": {"type": "string", "enum": ["BYTES", "UINT8"]},
                             "parameters": {"type": "object"}, "data": {"type": "array"}}}
    params = {"type": "object", "properties": {
        "top_k": {"type": "integer", "minimum": 1}, "keep_rate": {"type": "number", "minimum": SMALLEST_FLOAT,
                                                                  "maximum": 1},
        "min_keep_rate": {"type": "number", "minimum": SMALLEST_FLOAT, "maximum": 1},
        "binary_data_output": {"type": "boolean"}}}
    request = {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": params,
        "inputs": {"type": "array", "items": tensor, "minItems": 1, "maxItems": 8},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "enum": list(oip.OUTPUTS)}, "parameters": {"type": "object"}}}}}}
    example = {"id": "example", "parameters": {"top_k": 3},
               "inputs": [{"name": oip.IMAGES, "datatype": "BYTES", "shape": [1], "data": [_PIXEL]}]}
    return {"required": True, "content": {
        "application/json": {"schema": request, "example": example},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


def _infer_responses(op: dict[str, Any]) -> None:
    responses = op.setdefault("responses", {})
    ok = responses.get("200", {"description": "Output tensors"})
    ok["content"] = {"application/json": {"schema": {"type": "object", "required": ["model_name", "outputs"]}},
                     "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    responses["200"] = ok
    for status, what in (("400", "Malformed body or binary framing"), ("404", "Unknown model name or version"),
                         ("408", "The body stopped arriving (PATCHLIFE_READ_TIMEOUT_S)"),
                         ("413", "Over a size, count or pixel limit"),
                         ("415", "A Content-Type other than application/json or application/octet-stream"),
                         ("422", "Invalid tensors or parameters"),
                         ("503", "Not ready, overloaded or shutting down"),
                         ("504", "The deadline passed (X-Request-Deadline-Ms)")):
        responses[status] = _error(what, _V2_ERROR)


def _tighten(schema: Any, max_top_k: int) -> None:
    """Every ``top_k`` capped at the server's limit; every ``exclusiveMinimum: 0`` made the smallest
    normal float (the same set as service/frontend/numbers.py accepts)."""
    if isinstance(schema, dict):
        if schema.get("exclusiveMinimum") == 0:
            del schema["exclusiveMinimum"]
            schema["minimum"] = SMALLEST_FLOAT
        for key, value in schema.items():
            if key == "top_k" and isinstance(value, dict):
                _cap(value, max_top_k)
            _tighten(value, max_top_k)
    elif isinstance(schema, list):
        for item in schema:
            _tighten(item, max_top_k)


def _cap(schema: dict[str, Any], max_top_k: int) -> None:
    for branch in [schema, *schema.get("anyOf", [])]:
        if branch.get("type") == "integer":
            branch["minimum"], branch["maximum"] = 1, max_top_k


def documented_routes(routes: Sequence[BaseRoute], order: Sequence[APIRouter]) -> list[BaseRoute]:
    """The app's routes with its included routers in ``order`` (the app matches them in another);
    the app's own routes first, as FastAPI lists them."""
    def place(route: BaseRoute) -> int:
        router = getattr(route, "original_router", None)
        return next((i + 1 for i, r in enumerate(order) if r is router), 0)

    return sorted(routes, key=place)  # stable: routes of one router keep their order


def build_openapi(app: FastAPI, fe: FrontendState, order: Sequence[APIRouter] = ()) -> dict[str, Any]:
    routes = documented_routes(app.routes, order) if order else app.routes
    spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=routes)
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            params = op.get("parameters", [])
            for p in params:
                if p["name"] == "top_k":
                    _cap(p["schema"], fe.settings.max_top_k)
                if p["name"] == "name" and path.startswith("/v2/models") and fe.card is not None:
                    p["schema"] = {"type": "string", "enum": [fe.card.name]}
            if method == "post" and path.endswith("/infer"):
                op["requestBody"] = _infer_body(fe.card.name if fe.card else "model")
                params.append({"name": oip.HEADER_LENGTH, "in": "header", "required": False,
                               "description": "Binary tensor extension: bytes of JSON before the binary data.",
                               "schema": {"type": "integer", "minimum": 0}})
                op["parameters"] = params
                _infer_responses(op)
            elif method == "post":
                op["responses"]["408"] = _error("The body stopped arriving (PATCHLIFE_READ_TIMEOUT_S)",
                                                _NATIVE_ERROR)
    _secure(app, fe, spec)
    _tighten(spec, fe.settings.max_top_k)
    if fe.card is not None:
        spec["info"]["description"] = about_served_model(fe.card.name, fe.card.info.get("description", ""),
                                                   fe.card.class_names)
    return spec


def _secure(app: FastAPI, fe: FrontendState, spec: dict[str, Any]) -> None:
    """The operations of each access group that has a key (service/frontend/access.py) require the
    bearer scheme, and may answer 401; /docs then shows its Authorize button. Open groups say nothing."""
    keyed = False
    for route in api_routes(app.routes):
        group = route_group(route)
        if route.path_format not in spec["paths"] or group is None or not fe.keys.required(group):
            continue
        keyed = True
        for method in route.methods or ():
            op = spec["paths"][route.path_format].get(method.lower())
            if op is None:
                continue
            op["security"] = [{"bearer": []}]
            schema = _V2_ERROR if route.path_format.startswith("/v2") else _NATIVE_ERROR
            op.setdefault("responses", {})["401"] = _error(
                f"No key or a wrong key for the {group.value} group ({group.setting})", schema)
    if keyed:
        spec.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer",
            "description": "The key of the operation's API group, as `Authorization: Bearer <key>`."}


def about_served_model(name: str, description: str, classes: tuple[str, ...] | list[str]) -> str:
    """The top of /docs and /redoc: what the served model recognises, so nobody sends it what it cannot read."""
    shown = ", ".join(f"`{c}`" for c in classes[:20]) + (f" and {len(classes) - 20} more" if len(classes) > 20 else "")
    about = description.strip() or "(its checkpoint records no description)"
    return (f"**Served model: `{name}`.** {about}\n\n"
            f"Its {len(classes)} classes: {shown}. `GET /v1/models` describes it in full.")


def install_openapi(app: FastAPI, fe: FrontendState, order: Sequence[APIRouter] = ()) -> None:
    """Serve :func:`build_openapi`'s schema (built once the model is loaded, then kept), its operations
    in the included routers' ``order``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build_openapi(app, fe, order)
            if fe.card is None:
                return spec  # the served model's name is not known yet: do not keep this one
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
