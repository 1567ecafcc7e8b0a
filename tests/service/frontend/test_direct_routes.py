"""The hot routes' hand-written parameter binding (service/frontend/routes/direct.py): each binder
reads every parameter its endpoint declares, it is what runs, and its answers (errors included) are
those of FastAPI's own handler, which the same app runs while it has a dependency override."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from service_support import encode, photo

from service.frontend.access import api_routes
from service.frontend.routes import classify, direct, explain, health, v2
from service.frontend.routes.params import get_frontend, request_deadline

MODEL = "nano-test"
PNG = encode(photo(), "PNG")
JPEG = encode(photo((80, 60), seed=3), "JPEG")
RID = {"X-Request-ID": "direct-test-1"}


def _v2_json(**parameters: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PNG).decode()]}],
            "outputs": [{"name": "labels"}, {"name": "budget"}], **({"parameters": parameters} if parameters else {})}


def _v2_binary() -> tuple[bytes, dict[str, str]]:
    pixels = np.asarray(photo((40, 30), seed=5).convert("RGB"))[None]
    raw = pixels.tobytes()
    head = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    return head + raw, {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}


BINARY, BINARY_HEADERS = _v2_binary()
FILE = {"files": {"file": ("a.png", PNG, "image/png")}}
# (method, path, request kwargs): answers of every kind the binding touches (query, header, path, body)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/classify", FILE),
    ("POST", "/classify?top_k=2&keep_rate=0.5", {"files": {"file": ("a.jpg", JPEG, "image/jpeg")}}),
    ("POST", "/classify?top_k=1&top_k=3", FILE),
    ("POST", "/classify?top_k=abc", FILE),
    ("POST", "/classify?top_k=", FILE),
    ("POST", "/classify?keep_rate=0.5", {**FILE, "data": {"keep_rate": "0.6"}}),
    ("POST", "/classify?keep_rate=0.4&min_keep_rate=0.5", FILE),
    ("POST", "/classify", {**FILE, "headers": {"X-Request-Deadline-Ms": "soon"}}),
    ("POST", "/classify", {**FILE, "headers": {"X-Request-Deadline-Ms": "0"}}),
    ("POST", "/classify", {**FILE, "headers": {"X-Request-Deadline-Ms": "30000"}}),
    ("POST", "/classify", {"content": b"not an image", "headers": {"content-type": "text/plain"}}),
    ("POST", "/classify", {"content": b"\x00garbage", "headers": {"content-type": "image/png"}}),
    ("POST", f"/v2/models/{MODEL}/infer", {"json": _v2_json()}),
    ("POST", f"/v2/models/{MODEL}/infer", {"json": _v2_json(top_k=2, keep_rate=0.5)}),
    ("POST", f"/v2/models/{MODEL}/versions/1/infer", {"json": _v2_json()}),
    ("POST", f"/v2/models/{MODEL}/versions/7/infer", {"json": _v2_json()}),
    ("POST", "/v2/models/other/infer", {"json": _v2_json()}),
    ("POST", f"/v2/models/{MODEL}/infer", {"content": BINARY, "headers": BINARY_HEADERS}),
    ("POST", f"/v2/models/{MODEL}/infer", {"json": _v2_json(), "headers": {"X-Request-Deadline-Ms": "-1"}}),
    ("POST", f"/v2/models/{MODEL}/infer", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
]
KEYED_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/classify", FILE),
    ("POST", "/classify", {**FILE, "headers": {"Authorization": "Bearer wrong"}}),
    ("POST", "/classify", {**FILE, "headers": {"Authorization": "Bearer inference-key", "X-Request-Deadline-Ms": "x"}}),
    ("POST", f"/v2/models/{MODEL}/infer", {"json": _v2_json()}),
    ("POST", f"/v2/models/{MODEL}/infer", {"json": _v2_json(), "headers": {"Authorization": "Bearer inference-key"}}),
]


def _untimed(value: Any) -> Any:
    """An answer's JSON without its measured times (they differ from one call to the next)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k != "timings_ms"}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _answer(client: TestClient, method: str, path: str, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    kw = dict(kwargs)
    headers = {**RID, **kw.pop("headers", {})}
    r = client.request(method, path, headers=headers, **kw)
    head = sorted((k, v) for k, v in r.headers.items() if k != "content-length")
    if r.headers.get("content-type") == "application/json":
        return r.status_code, head, _untimed(r.json())
    return r.status_code, r.headers.get("content-length"), head, r.content


def _unused() -> None:
    """A dependency override nothing depends on: its presence makes the routes run FastAPI's handler."""


def _both(client: TestClient, cases: list[tuple[str, str, dict[str, Any]]]) -> Iterator[tuple[Any, Any]]:
    """(bound by hand, bound by FastAPI) answers of each case, from the same app."""
    for method, path, kwargs in cases:
        ours = _answer(client, method, path, kwargs)
        client.app.dependency_overrides[_unused] = _unused  # type: ignore[attr-defined]
        try:
            theirs = _answer(client, method, path, kwargs)
        finally:
            client.app.dependency_overrides.clear()  # type: ignore[attr-defined]
        yield ours, theirs


@pytest.fixture
def bound(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the requests the hand-written binding served."""
    seen: list[str] = []
    original = direct.request_deadline

    async def counted(request: Any, fe: Any, header: str | None) -> float:
        seen.append(request.url.path)
        return await original(request, fe, header)

    monkeypatch.setattr(direct, "request_deadline", counted)
    return seen


def test_answers_are_fastapis(client: TestClient, bound: list[str]) -> None:
    statuses = set()
    for ours, theirs in _both(client, CASES):
        assert ours == theirs
        statuses.add(ours[0])
    assert statuses >= {200, 404, 415, 422, 400}, statuses  # successes and each kind of refusal were compared
    assert len(bound) == len(CASES)  # every case ran the binder once (the other run was FastAPI's)


def test_access_key_is_checked_first(make_client: Callable[..., TestClient], bound: list[str]) -> None:
    keyed = make_client(api_key_inference="inference-key")
    answers = list(_both(keyed, KEYED_CASES))
    for ours, theirs in answers:
        assert ours == theirs
    assert [ours[0] for ours, _ in answers] == [401, 401, 422, 401, 200]
    assert len(bound) == 2  # a refused key never reaches the deadline header


def test_binders_read_every_declared_parameter(client: TestClient) -> None:
    app: Any = client.app
    routes = [r for r in api_routes(app.routes) if getattr(r.endpoint, direct.BINDER_ATTR, None)]
    assert {(r.path, *sorted(r.methods or ())) for r in routes} == {
        ("/classify", "POST"), ("/v2/models/{name}/infer", "POST"), ("/v2/models/{name}/versions/{version}/infer",
                                                                     "POST")}
    for route in routes:
        assert isinstance(route, APIRoute) and isinstance(route, direct.DirectRoute)
        own = route.dependant
        declared = {p.name for p in (*own.query_params, *own.path_params, *own.header_params, *own.cookie_params,
                                     *own.body_params)}
        assert declared <= set(getattr(route.endpoint, direct.READS_ATTR)), route.path
        # the only dependencies: the front end, the deadline (with its header), the access group's check
        calls = {d.call for d in own.dependencies}
        assert calls - {get_frontend, request_deadline} == {d.dependency for d in route.dependencies}, route.path


def test_inference_is_matched_first_and_documented_in_place(client: TestClient) -> None:
    """The hot routes' routers come first in the app (FastAPI tries included routers in turn); the
    docs still list v2 inference after the rest of v2, where it always was."""
    app: Any = client.app
    served = [getattr(r, "original_router", None) for r in app.routes]
    assert served.index(classify.router) < served.index(v2.infer_router) < min(
        served.index(r) for r in (explain.router, health.router, v2.router))
    paths = list(client.get("/openapi.json").json()["paths"])
    assert paths[0] == "/classify" and paths[-1] == "/v2/models/{name}/infer"
    assert paths.index("/v2/models/{name}/ready") == len(paths) - 2
