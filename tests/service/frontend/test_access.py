"""Access keys per API group (service/frontend/access.py) on REST: each group's routes need their key
(401 + WWW-Authenticate + JSON without it or with a wrong one), probes, the page and /docs stay open,
the comparison is hmac.compare_digest's, and every route is either in a group or known to be open.
gRPC's side is in test_grpc_access.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_support import encode, photo

from service.frontend import access
from service.frontend.access import Group, Keys, bearer_token, open_groups_warning
from service.settings import Settings

MODEL = "nano-test"
KEYS = {Group.INFERENCE: "inference-key-1", Group.METADATA: "metadata-key-2", Group.METRICS: "metrics-key-3"}
PNG = encode(photo(), "PNG")
V2_BODY = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                       "data": [base64.b64encode(PNG).decode()]}], "outputs": [{"name": "labels"}]}

# (method, path, request kwargs) of every route of each group; the answer with the right key is 200.
CALLS: dict[Group, list[tuple[str, str, dict[str, Any]]]] = {
    Group.INFERENCE: [("POST", "/classify", {"files": {"file": ("a.png", PNG, "image/png")}}),
                      ("POST", "/explain", {"files": {"file": ("a.png", PNG, "image/png")}}),
                      ("POST", f"/v2/models/{MODEL}/infer", {"json": V2_BODY}),
                      ("POST", f"/v2/models/{MODEL}/versions/1/infer", {"json": V2_BODY})],
    Group.METADATA: [("GET", "/v1/models", {}), ("GET", "/v2", {}), ("GET", f"/v2/models/{MODEL}", {}),
                     ("GET", f"/v2/models/{MODEL}/versions/1", {}), ("GET", f"/v2/models/{MODEL}/config", {}),
                     ("GET", f"/v2/models/{MODEL}/versions/1/config", {}), ("GET", f"/v2/models/{MODEL}/stats", {}),
                     ("GET", f"/v2/models/{MODEL}/versions/1/stats", {}), ("GET", "/v2/models/stats", {})],
    Group.METRICS: [("GET", "/metrics", {})],
}
GROUPED = [(group, *call) for group, calls in CALLS.items() for call in calls]
OPEN_PATHS = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready",
              f"/v2/models/{MODEL}/versions/1/ready", "/", "/static/app.js", "/static/style.css", "/docs", "/redoc",
              "/openapi.json", "/v1/examples", "/docs-assets/swagger-ui.css"]


@pytest.fixture(scope="module")
def keyed(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(**{f"api_key_{g.value}": key for g, key in KEYS.items()})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(client: TestClient, method: str, path: str, kwargs: dict[str, Any],
         headers: dict[str, str] | None = None) -> Any:
    return client.request(method, path, headers=headers, **kwargs)


def assert_unauthorized(r: Any, path: str, error: bool) -> None:
    assert r.status_code == 401, r.text
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="patchlife"') and ('error="invalid_token"' in challenge) == error
    body = r.json()
    message = body["error"] if path.startswith("/v2") else body["error"]["message"]
    assert "key" in message
    if not path.startswith("/v2"):
        assert body["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(("group", "method", "path", "kwargs"), GROUPED,
                         ids=[f"{g.value}-{m}-{p}" for g, m, p, _ in GROUPED])
def test_each_group_needs_its_own_key(keyed: TestClient, metric: Callable[..., float], group: Group, method: str,
                                      path: str, kwargs: dict[str, Any]) -> None:
    before = metric(keyed, "patchlife_rejected_requests_total", {"reason": "unauthorized"})
    assert_unauthorized(call(keyed, method, path, kwargs), path, error=False)                     # missing
    assert_unauthorized(call(keyed, method, path, kwargs, bearer("wrong")), path, error=True)     # wrong
    assert_unauthorized(call(keyed, method, path, kwargs, bearer(KEYS[group] + "x")), path, error=True)
    other = next(g for g in Group if g != group)
    assert_unauthorized(call(keyed, method, path, kwargs, bearer(KEYS[other])), path, error=True)  # another group's
    assert_unauthorized(call(keyed, method, path, kwargs, {"Authorization": KEYS[group]}), path, error=False)
    assert metric(keyed, "patchlife_rejected_requests_total", {"reason": "unauthorized"}) == before + 5
    r = call(keyed, method, path, kwargs, bearer(KEYS[group]))
    assert r.status_code == 200, r.text
    r = call(keyed, method, path, kwargs, {"Authorization": f"bearer  {KEYS[group]} "})  # scheme: any case
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", OPEN_PATHS)
def test_probes_page_and_docs_stay_open(keyed: TestClient, path: str) -> None:
    r = keyed.get(path)
    assert r.status_code == 200, (path, r.text)


def test_without_keys_every_group_is_open(client: TestClient) -> None:
    for method, path, kwargs in [c for calls in CALLS.values() for c in calls]:
        assert call(client, method, path, kwargs).status_code == 200, path


def test_every_route_is_in_a_group_or_known_open(keyed: TestClient) -> None:
    """A new route must pick its group (or be added to the open list here, on purpose)."""
    open_templates = {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}/ready",
                      "/v2/models/{name}/versions/{version}/ready", "/", "/static/{name}", "/docs", "/redoc",
                      "/docs-assets/{name}", "/v1/examples", "/v1/examples/{file}"}
    grouped: dict[str, Group] = {}
    routes = list(access.api_routes(keyed.app.routes))  # type: ignore[attr-defined]  # /openapi.json: open
    assert len(routes) > 20
    for route in routes:
        group = access.route_group(route)
        if group is not None:
            grouped[route.path] = group
        else:
            assert route.path in open_templates, f"{route.path} has no access group and is not known to be open"
    assert {p for p, g in grouped.items() if g == Group.INFERENCE} == {
        "/classify", "/explain", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"}
    assert {p for p, g in grouped.items() if g == Group.METRICS} == {"/metrics"}


def test_openapi_declares_the_scheme_only_where_a_key_is_set(keyed: TestClient, client: TestClient,
                                                             make_client: Callable[..., TestClient]) -> None:
    spec = keyed.get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert spec["paths"]["/classify"]["post"]["security"] == [{"bearer": []}]
    assert "401" in spec["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    plain = client.get("/openapi.json").json()
    assert "securitySchemes" not in plain.get("components", {})
    assert all("security" not in op for ops in plain["paths"].values() for op in ops.values())
    only_inference = make_client(api_key_inference="k").get("/openapi.json").json()
    assert "security" in only_inference["paths"]["/classify"]["post"]
    assert "security" not in only_inference["paths"]["/v1/models"]["get"]


# -- the checker ---------------------------------------------------------------------------------
def test_the_comparison_is_hmac_compare_digest_on_equal_length_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", spy)
    keys = Keys.from_settings(Settings(api_key_inference="s3cret"))
    digest = hashlib.sha256(b"s3cret").digest()
    assert keys.allows(Group.INFERENCE, "Bearer s3cret")
    assert not keys.allows(Group.INFERENCE, "Bearer s3cre")
    assert not keys.allows(Group.INFERENCE, None)  # compared too: no shortcut for a missing token
    assert seen == [(digest, digest), (hashlib.sha256(b"s3cre").digest(), digest),
                    (hashlib.sha256(b"").digest(), digest)]
    assert all(len(a) == len(b) == 32 for a, b in seen)
    assert keys.allows(Group.METADATA, None) and len(seen) == 3  # an open group compares nothing


def test_keys_are_kept_as_digests_only() -> None:
    keys = Keys.from_settings(Settings(api_key_inference="s3cret", api_key_metrics=""))
    assert "s3cret" not in repr(keys) and keys.required(Group.INFERENCE)
    assert not keys.required(Group.METRICS)  # empty: no key
    assert "s3cret" not in repr(Settings(api_key_inference="s3cret"))


@pytest.mark.parametrize(("value", "token"), [("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER  abc ", "abc"),
                                              ("Basic abc", None), ("Bearer", None), ("Bearer ", None), ("abc", None),
                                              (None, None)])
def test_bearer_token(value: str | None, token: str | None) -> None:
    assert bearer_token(value) == token


# -- the warning at start ------------------------------------------------------------------------
@pytest.mark.parametrize(("host", "keys", "warned"), [
    ("127.0.0.1", {}, None), ("::1", {}, None), ("localhost", {}, None), ("127.0.0.2", {}, None),
    ("0.0.0.0", {}, ["inference", "metadata", "metrics"]), ("::", {}, ["inference", "metadata", "metrics"]),
    ("10.1.2.3", {"api_key_inference": "k"}, ["metadata", "metrics"]),
    ("0.0.0.0", {"api_key_inference": "a", "api_key_metadata": "b", "api_key_metrics": "c"}, None)])
def test_open_groups_warning(host: str, keys: dict[str, Any], warned: list[str] | None) -> None:
    message = open_groups_warning(Settings(host=host, **keys))
    if warned is None:
        assert message is None
        return
    assert message is not None and host in message
    for group in Group:
        assert (group.setting in message) == (group.value in warned)


def test_serve_logs_the_warning_at_start(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``patchlife serve`` warns once, before it starts any process (stopped here right after)."""
    import argparse

    from service import serve

    class Stop(Exception):
        pass

    def stop(*args: Any, **kwargs: Any) -> None:
        raise Stop

    monkeypatch.setenv("PATCHLIFE_HOST", "0.0.0.0")
    monkeypatch.setenv("PATCHLIFE_API_PROCESSES", "0")
    monkeypatch.setattr(serve.Engine, "from_settings", stop)
    monkeypatch.setattr(serve, "configure_logging", lambda *a, **k: None)  # keep pytest's capture handler
    with caplog.at_level(logging.WARNING, logger="patchlife.access"), pytest.raises(Stop):
        serve.run(argparse.Namespace(log_level="info"))
    warnings = [r for r in caplog.records if r.name == "patchlife.access"]
    assert len(warnings) == 1 and "PATCHLIFE_API_KEY_INFERENCE" in warnings[0].getMessage()
