"""HEAD on every GET route (service/frontend/front_door.py): the GET's status and headers, no body; counted
in the HTTP metrics as HEAD under the GET route's template. A real server's HEAD is in
tests/service/test_access_serve.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import pytest
from fastapi.testclient import TestClient

from service.frontend.access import api_routes

MODEL = "nano-test"
FILL = {"name": MODEL, "version": "1", "file": "none.png"}
CHANGING = {"/metrics", "/v2/models/stats", f"/v2/models/{MODEL}/stats", f"/v2/models/{MODEL}/versions/1/stats"}


def _fill(values: dict[str, str], match: re.Match[str]) -> str:
    return values[match.group(1)]


def get_paths(client: TestClient) -> list[str]:
    """Every GET route of the app as a concrete path (the static and docs files by a real name)."""
    paths = []
    for route in api_routes(client.app.routes):  # type: ignore[attr-defined]
        if "GET" not in (route.methods or set()):
            continue
        fill = {**FILL, "name": "app.js" if route.path.startswith("/static") else
                "swagger-ui.css" if route.path.startswith("/docs-assets") else MODEL}
        paths.append(re.sub(r"\{(\w+)\}", partial(_fill, fill), route.path))
    return [*paths, "/openapi.json"]


def test_every_get_route_answers_head_like_get_without_a_body(client: TestClient) -> None:
    paths = get_paths(client)
    assert {"/healthz", "/readyz", "/metrics", "/", "/v2/health/ready", f"/v2/models/{MODEL}/config"} <= set(paths)
    for path in paths:
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code, (path, head.status_code, got.status_code)
        assert head.content == b"", path
        assert head.headers.get("content-type") == got.headers.get("content-type"), path
        if path not in CHANGING:  # the same answer twice: the same length
            assert head.headers.get("content-length") == str(len(got.content)), path


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_head_200(client: TestClient, path: str) -> None:
    r = client.head(path)
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0


def test_head_on_a_post_route_is_405_and_on_no_route_404(client: TestClient) -> None:
    r = client.head("/classify")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""
    assert client.head("/nowhere").status_code == 404


def test_head_is_counted_as_head_under_the_route_template(client: TestClient, metric: Callable[..., float]) -> None:
    labels = {"route": "/v2/models/{name}/ready", "method": "HEAD", "status": "200"}
    before = metric(client, "patchlife_http_request_duration_seconds_count", labels)
    assert client.head(f"/v2/models/{MODEL}/ready").status_code == 200
    assert metric(client, "patchlife_http_request_duration_seconds_count", labels) == before + 1
