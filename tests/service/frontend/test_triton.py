"""Triton's model configuration and statistics extensions over REST: what they say, and that the
statistics move with the requests the server answers."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from service_support import encode, photo

from service.frontend.triton import DATA_TYPES
from service.runtime.graphs import batch_classes

MODEL = "nano-test"


def _stats(client: TestClient, path: str = f"/v2/models/{MODEL}/stats") -> dict[str, Any]:
    r = client.get(path)
    assert r.status_code == 200, r.text
    (entry,) = r.json()["model_stats"]
    return entry  # type: ignore[no-any-return]


def test_config_agrees_with_the_model_metadata(client: TestClient) -> None:
    settings = client.app.state.frontend.settings  # type: ignore[attr-defined]
    config = client.get(f"/v2/models/{MODEL}/config").json()
    meta = client.get(f"/v2/models/{MODEL}").json()
    assert config["name"] == meta["name"] == MODEL and config["platform"] == meta["platform"]
    assert config["max_batch_size"] == settings.max_images_per_request == 4
    for kind, key in (("input", "inputs"), ("output", "outputs")):
        from_config = {t["name"]: (t["data_type"], [-1, *t["dims"]]) for t in config[kind]}
        from_meta = {t["name"]: (DATA_TYPES[t["datatype"]], t["shape"]) for t in meta[key]}
        assert from_config == from_meta, kind
    assert all(t["optional"] for t in config["input"])  # images, pixels, or both
    batching = config["dynamic_batching"]
    assert batching["preferred_batch_size"] == list(batch_classes(settings.max_batch_size))
    assert batching["max_queue_delay_microseconds"] == round(settings.max_delay_ms * 1000) == 1000
    assert client.get(f"/v2/models/{MODEL}/versions/1/config").json() == config
    extensions = client.get("/v2").json()["extensions"]
    assert {"model_configuration", "statistics"} <= set(extensions)


def test_config_and_stats_of_an_unknown_model_are_404(client: TestClient) -> None:
    for path in ("/v2/models/nope/config", "/v2/models/nope/stats", f"/v2/models/{MODEL}/versions/2/stats"):
        r = client.get(path)
        assert r.status_code == 404 and "unknown model" in r.json()["error"], path


def test_stats_count_what_was_served(client: TestClient, metric: Callable[..., float]) -> None:
    png = encode(photo(seed=3), "PNG")
    before = _stats(client)
    r = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
        {"name": "images", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(png).decode()] * 2}]})
    assert r.status_code == 200, r.text
    assert client.post("/classify", files={"file": ("a.png", png, "image/png")}).status_code == 200
    bad = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
        {"name": "images", "datatype": "BYTES", "shape": [1], "data": ["***"]}]})
    assert bad.status_code == 400
    after = _stats(client)

    def grew(key: str) -> int:
        return int(after["inference_stats"][key]["count"] - before["inference_stats"][key]["count"])

    assert after["name"] == MODEL and after["version"] == "1"
    assert grew("success") == 2 and grew("fail") == 1
    assert after["inference_count"] - before["inference_count"] == 3
    assert 1 <= after["execution_count"] - before["execution_count"] <= 3
    # perf_analyzer refuses statistics whose compute counts differ; all count the images through the model
    counts = {k: after["inference_stats"][k]["count"] for k in ("queue", "compute_input", "compute_infer",
                                                                  "compute_output")}
    assert set(counts.values()) == {after["inference_count"]}
    for key in ("success", "fail", "compute_input", "compute_infer", "compute_output"):
        assert after["inference_stats"][key]["ns"] > before["inference_stats"][key]["ns"], key
    assert after["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0
    assert after["inference_count"] == metric(client, "patchlife_image_compute_seconds_count")
    assert after["execution_count"] == metric(client, "patchlife_batch_size_count", {"phase": "head"})


def test_stats_of_every_model(client: TestClient) -> None:
    every = client.get("/v2/models/stats").json()["model_stats"]
    assert [m["name"] for m in every] == [MODEL]
