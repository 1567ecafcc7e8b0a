"""GET /v1/models: the served model as Engine.info() describes it."""

from __future__ import annotations

from fastapi.testclient import TestClient
from service_support import CLASSES


def test_models_describes_the_checkpoint(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    info = r.json()
    assert info["name"] == "nano-test" and info["backbone"] == "vit_nano_patch8_32"
    assert info["description"] == "a nano test model"  # the checkpoint's metadata, as written
    assert info["classes"] == CLASSES and info["num_classes"] == 5
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["normalization"] == "calibrated"
    assert info["grid"] == [4, 4] and info["input_size"] == [3, 32, 32]
    assert info["schedule"]["stage_starts"] == [2, 3, 4] and info["schedule"]["depth"] == 6
    assert info["schedule"]["keep_rate"] == 0.7 and info["dense_gflops"] > 0
    engine = client.app.state.frontend.model.engine  # type: ignore[attr-defined]
    batching = info.pop("batching")
    expected = engine.info()
    assert batching["bucket_grid"] == expected.pop("buckets") == [list(p) for p in engine.bucket_grid.points]
    assert info == expected
    # The scheduler's beliefs: the cost model was fitted from warm-up timings of both phases.
    cost = batching["cost_model"]
    assert cost["head"]["observations"] > 0 and cost["tail"]["observations"] > 0
    assert cost["head"]["fixed_ms"] >= 0 and cost["tail"]["per_kilotoken_ms"] >= 0
    assert 0 < info["crop_pct"] <= 1 and info["crop_pct"] == engine.config.preprocess.get("crop_pct")


def test_openapi_documents_the_endpoints(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/classify", "/explain", "/healthz", "/readyz", "/v1/models", "/v1/examples",
                 "/v1/examples/{file}", "/metrics"):
        assert path in spec["paths"]
    body = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert spec["components"]["schemas"]["ClassifyResponse"]["examples"]


def test_openapi_says_what_the_served_model_recognises(client: TestClient) -> None:
    about = client.get("/openapi.json").json()["info"]["description"]
    assert "`nano-test`" in about and "a nano test model" in about  # its name and the checkpoint's description
    assert f"Its {len(CLASSES)} classes: " in about and all(f"`{c}`" in about for c in CLASSES)


def test_openapi_lists_at_most_20_classes() -> None:
    from service.frontend.openapi import about_served_model

    about = about_served_model("m", "", [f"c{i}" for i in range(25)])
    assert "`c19`" in about and "`c20`" not in about and "and 5 more" in about
    assert "records no description" in about
