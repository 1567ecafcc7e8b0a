"""Accuracy scaling through the API: the min_keep_rate field (form, query, JSON, v2, gRPC), what every
answer says it got (budget.keep_rate / scaled / requested_keep_rate, v2 answer parameters, the
/explain PNG's headers) and the metrics.

The objective here is one nanosecond, which no queue meets: every image that may be scaled runs at
its floor. The test checkpoint has no evaluation (no metrics.json), so without PATCHLIFE_MIN_KEEP_RATE
only requests that set their own floor are scaled. Its default keep rate is 0.7.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_support import encode, photo

from bench.child import free_port

MODEL = "nano-test"
INFER = f"/v2/models/{MODEL}/infer"
NEVER_MET = 1e-6  # ms


def png(seed: int = 0) -> bytes:
    return encode(photo((48, 40), seed), "PNG")


def classify(client: TestClient, **kw: Any) -> Any:
    return client.post("/classify", files=[("files", ("0.png", png(), "image/png"))], **kw)


def budget_of(client: TestClient, **kw: Any) -> dict[str, Any]:
    r = classify(client, **kw)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["budget"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def scaling(make_client: Callable[..., TestClient]) -> tuple[TestClient, str]:
    port = free_port()
    return make_client(latency_objective_ms=NEVER_MET, grpc_port=port), f"127.0.0.1:{port}"


def test_without_an_objective_nothing_is_scaled_and_the_answer_says_so(client: TestClient) -> None:
    b = budget_of(client, data={"min_keep_rate": "0.3"})
    assert b["scaled"] is False and b["keep_rate"] == b["requested_keep_rate"] == pytest.approx(0.7)


def test_a_request_floor_is_where_a_late_queue_runs_it(scaling: tuple[TestClient, str],
                                                       metric: Callable[..., float]) -> None:
    client = scaling[0]
    before = {name: metric(client, name, labels) for name, labels in (
        ("patchlife_scaled_images_total", None), ("patchlife_objective_answers_total", {"met": "false"}),
        ("patchlife_served_keep_rate_count", None), ("patchlife_served_keep_rate_bucket", {"le": "0.3"}))}
    unscaled = budget_of(client)                          # no evaluation in the checkpoint: no floor
    assert unscaled["scaled"] is False and unscaled["keep_rate"] == pytest.approx(0.7)
    for kw in ({"data": {"min_keep_rate": "0.3"}}, {"params": {"min_keep_rate": 0.3}}):
        b = budget_of(client, **kw)
        assert b["scaled"] is True and b["keep_rate"] == pytest.approx(0.3)
        assert b["requested_keep_rate"] == pytest.approx(0.7)
        assert sum(b["counts_run"]) < sum(unscaled["counts_run"])
    b = budget_of(client, data={"keep_rate": "0.9", "min_keep_rate": "0.5"})
    assert b["scaled"] is True and b["keep_rate"] == pytest.approx(0.5) and b["requested_keep_rate"] == 0.9
    data = base64.b64encode(png()).decode()
    r = client.post("/classify", json={"images": [data], "min_keep_rate": 0.6})
    assert r.json()["results"][0]["budget"]["keep_rate"] == pytest.approx(0.6)
    assert metric(client, "patchlife_scaled_images_total") - before["patchlife_scaled_images_total"] == 4
    assert metric(client, "patchlife_objective_answers_total", {"met": "false"}) - \
        before["patchlife_objective_answers_total"] == 5
    assert metric(client, "patchlife_served_keep_rate_count") - before["patchlife_served_keep_rate_count"] == 5
    assert metric(client, "patchlife_served_keep_rate_bucket", {"le": "0.3"}) - \
        before["patchlife_served_keep_rate_bucket"] == 2


def test_the_server_floor_scales_default_requests_but_not_an_explicit_keep_rate(
        make_client: Callable[..., TestClient]) -> None:
    client = make_client(latency_objective_ms=NEVER_MET, min_keep_rate=0.4)
    b = budget_of(client)
    assert b["scaled"] is True and b["keep_rate"] == pytest.approx(0.4)
    explicit = budget_of(client, params={"keep_rate": 0.6})
    assert explicit["scaled"] is False and explicit["keep_rate"] == pytest.approx(0.6)


@pytest.mark.parametrize("kw,why", [
    ({"data": {"keep_rate": "0.5", "min_keep_rate": "0.6"}}, "above keep_rate"),
    ({"data": {"min_keep_rate": "0.8"}}, "above the model's default"),
    ({"data": {"min_keep_rate": "0"}}, "min_keep_rate"),
    ({"params": {"min_keep_rate": "1.5"}}, "min_keep_rate"),
    ({"params": {"min_keep_rate": "abc"}}, "min_keep_rate"),
    ({"params": {"min_keep_rate": "0.3"}, "data": {"min_keep_rate": "0.4"}}, "given twice"),
])
def test_a_bad_floor_is_a_4xx_that_names_it(client: TestClient, kw: dict[str, Any], why: str) -> None:
    r = classify(client, **kw)
    assert 400 <= r.status_code < 500, r.text
    assert why in r.json()["error"]["message"] and "min_keep_rate" in r.text


def test_explain_says_what_it_got(scaling: tuple[TestClient, str]) -> None:
    client = scaling[0]
    files = [("file", ("0.png", png(), "image/png"))]
    r = client.post("/explain", files=files, data={"min_keep_rate": "0.4"}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-patchlife-scaled"] == "true" and float(r.headers["x-patchlife-keep-rate"]) == 0.4
    assert float(r.headers["x-patchlife-requested-keep-rate"]) == pytest.approx(0.7)
    body = client.post("/explain", files=files, data={"min_keep_rate": "0.4"}, params={"format": "json"}).json()
    assert body["budget"]["scaled"] is True and body["budget"]["keep_rate"] == pytest.approx(0.4)


def v2(client: TestClient, parameters: dict[str, Any]) -> Any:
    data = base64.b64encode(png()).decode()
    return client.post(INFER, json={"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                                "data": [data]}], "parameters": parameters})


def test_v2_rest_parameter_and_answer_parameters(scaling: tuple[TestClient, str], client: TestClient) -> None:
    r = v2(scaling[0], {"min_keep_rate": 0.3})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"] == {"keep_rate": pytest.approx(0.3), "scaled": True,
                                      "requested_keep_rate": pytest.approx(0.7)}
    plain = v2(client, {}).json()["parameters"]
    assert plain == {"keep_rate": pytest.approx(0.7), "scaled": False, "requested_keep_rate": pytest.approx(0.7)}
    bad = v2(client, {"keep_rate": 0.5, "min_keep_rate": 0.9})
    assert bad.status_code == 422 and "min_keep_rate" in bad.text


tg = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")


@pytest.fixture(scope="module")
def triton(scaling: tuple[TestClient, str]) -> Iterator[Any]:
    client = tg.InferenceServerClient(scaling[1])
    yield client
    client.close()


def test_grpc_parameter_and_answer_parameters(triton: Any) -> None:
    tensor = tg.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([png()], dtype=np.object_))
    result = triton.infer(MODEL, [tensor], parameters={"min_keep_rate": 0.4})
    params = result.get_response().parameters
    assert params["scaled"].bool_param is True
    assert params["keep_rate"].double_param == pytest.approx(0.4)
    assert params["requested_keep_rate"].double_param == pytest.approx(0.7)
    plain = triton.infer(MODEL, [tensor]).get_response().parameters
    assert plain["scaled"].bool_param is False and plain["keep_rate"].double_param == pytest.approx(0.7)


def test_models_says_whether_scaling_is_on(scaling: tuple[TestClient, str], client: TestClient) -> None:
    on = scaling[0].get("/v1/models").json()["batching"]["accuracy_scaling"]
    assert on["latency_objective_ms"] == pytest.approx(NEVER_MET)
    assert on["floor"] is None and on["default_keep_rate"] == 0.7
    assert client.get("/v1/models").json()["batching"]["accuracy_scaling"] is None
