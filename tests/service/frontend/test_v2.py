"""Open Inference Protocol v2 routes in-process: metadata, tensors in JSON and binary, errors, limits.

The clients nobody here wrote (tritonclient, kserve) run against a real server in tests/ops/test_v2_clients.py.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_support import CLASSES, encode, photo

from service.frontend import oip
from service.protocol import Lifecycle

MODEL = "nano-test"
INFER = f"/v2/models/{MODEL}/infer"


def pngs(n: int) -> list[bytes]:
    return [encode(photo(seed=i), "PNG") for i in range(n)]


def images_input(files: list[bytes]) -> dict[str, Any]:
    return {"name": "images", "datatype": "BYTES", "shape": [len(files)],
            "data": [base64.b64encode(f).decode() for f in files]}


def binary_request(inputs: list[tuple[dict[str, Any], bytes]], **extra: Any) -> tuple[bytes, dict[str, str]]:
    """The binary tensor data extension: JSON header, then each input's bytes."""
    tensors = [{**t, "parameters": {"binary_data_size": len(raw)}} for t, raw in inputs]
    head = json.dumps({"inputs": tensors, **extra}).encode()
    return head + b"".join(raw for _, raw in inputs), {oip.HEADER_LENGTH: str(len(head)),
                                                        "content-type": "application/octet-stream"}


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def outputs(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["name"]: o for o in body["outputs"]}


def split_binary(response: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    n = int(response.headers[oip.HEADER_LENGTH])
    head = json.loads(response.content[:n])
    blobs, offset = {}, n
    for o in head["outputs"]:
        size = o["parameters"]["binary_data_size"]
        blobs[o["name"]] = response.content[offset:offset + size]
        offset += size
    assert offset == len(response.content)
    return head, blobs


def classify_top1(client: TestClient, files: list[bytes]) -> list[str]:
    r = client.post("/classify", files=[("files", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)])
    assert r.status_code == 200, r.text
    return [res["labels"][0]["label"] for res in r.json()["results"]]


# -- server and model metadata ----------------------------------------------------------------
def test_health_and_server_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "patchlife" and meta["version"] == client.app.version  # type: ignore[attr-defined]
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_describes_the_tensors(client: TestClient) -> None:
    info = client.get("/v1/models").json()
    meta = client.get(f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["inputs"]} == {
        ("images", "BYTES", (-1, 1)), ("pixels", "UINT8", (-1, -1, -1, 3))}
    out = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert out == {"probabilities": ("FP32", [-1, len(CLASSES)]), "labels": ("BYTES", [-1, -1]),
                   "lifespans": ("FP32", [-1, *info["grid"]]),
                   "budget": ("INT32", [-1, len(info["schedule"]["patch_counts"])])}
    assert client.get(f"/v2/models/{MODEL}/versions/1").json() == meta
    assert client.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready", f"/v2/models/{MODEL}/versions/2"])
def test_unknown_model_is_404_in_protocol_form(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str) and "unknown model" in r.json()["error"]


# -- inference --------------------------------------------------------------------------------
def test_json_infer_matches_classify(client: TestClient) -> None:
    files = pngs(4)
    r = client.post(INFER, json={"id": "req-1", "inputs": [images_input(files)], "parameters": {"top_k": 3}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == MODEL and body["id"] == "req-1"
    out = outputs(body)
    assert set(out) == set(oip.OUTPUTS)
    probs = np.array(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    assert probs.shape == (4, len(CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    labels = np.array(out["labels"]["data"]).reshape(out["labels"]["shape"])
    assert labels.shape == (4, 3)
    assert [CLASSES[i] for i in probs.argmax(1)] == list(labels[:, 0]) == classify_top1(client, files)
    assert out["lifespans"]["datatype"] == "FP32" and out["lifespans"]["shape"] == [4, 4, 4]
    assert out["budget"]["datatype"] == "INT32" and out["budget"]["shape"][0] == 4


def test_binary_inputs_and_outputs(client: TestClient) -> None:
    """Encoded images and raw pixels in one request, binary both ways; results in input order."""
    files = pngs(2)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in files[::-1]])
    body, headers = binary_request(
        [({"name": "images", "datatype": "BYTES", "shape": [2]}, length_prefixed(files)),
         ({"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape)}, pixels.tobytes())],
        parameters={"binary_data_output": True, "top_k": 1})
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 200, r.text
    head, blobs = split_binary(r)
    shapes = {o["name"]: o["shape"] for o in head["outputs"]}
    probs = np.frombuffer(blobs["probabilities"], "<f4").reshape(shapes["probabilities"])
    assert probs.shape == (4, len(CLASSES))
    np.testing.assert_allclose(probs[2:], probs[1::-1], atol=1e-5)  # the same pixels, sent both ways
    budget = np.frombuffer(blobs["budget"], "<i4").reshape(shapes["budget"])
    assert (budget[2:] == budget[1::-1]).all()
    raw, labels = blobs["labels"], []
    while raw:
        (n,), raw = struct.unpack("<I", raw[:4]), raw[4:]
        labels.append(raw[:n].decode())
        raw = raw[n:]
    top1 = classify_top1(client, files)
    assert labels == top1 + top1[::-1]


def test_json_pixels_and_selected_outputs(client: TestClient) -> None:
    files = pngs(2)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in files])
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.tolist()}
    r = client.post(INFER, json={"inputs": [tensor], "outputs": [
        {"name": "probabilities", "parameters": {"classification": 2}}, {"name": "budget"}]})
    assert r.status_code == 200, r.text
    out = outputs(r.json())
    assert set(out) == {"probabilities", "budget"}
    assert out["probabilities"]["datatype"] == "BYTES" and out["probabilities"]["shape"] == [2, 2]
    first = [s.split(":") for s in out["probabilities"]["data"][::2]]
    assert [label for _, _, label in first] == classify_top1(client, files)
    assert all(CLASSES[int(i)] == label and 0 < float(p) <= 1 for p, i, label in first)


def test_keep_rate_parameter_changes_the_budget(client: TestClient) -> None:
    files = pngs(1)

    def budget(rate: float) -> list[int]:
        r = client.post(INFER, json={"inputs": [images_input(files)], "outputs": [{"name": "budget"}],
                                     "parameters": {"keep_rate": rate}})
        assert r.status_code == 200, r.text
        return list(r.json()["outputs"][0]["data"])

    assert sum(budget(0.3)) < sum(budget(1.0))


# -- errors -----------------------------------------------------------------------------------
def _tensor(name: str = "images", datatype: str = "BYTES", shape: list[int] | None = None, **kw: Any) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [1], **kw}


ONE = base64.b64encode(pngs(1)[0]).decode()
ERROR_CASES: list[tuple[str, Any, int, str]] = [
    ("malformed JSON", b"{nope", 400, "not valid JSON"),
    ("no inputs", {"inputs": []}, 422, "inputs"),
    ("unknown input", {"inputs": [_tensor("x", data=[ONE])]}, 422, "unknown input"),
    ("wrong datatype", {"inputs": [_tensor(datatype="FP32", data=[1.0])]}, 422, "datatype BYTES"),
    ("wrong pixel shape", {"inputs": [_tensor("pixels", "UINT8", [1, 4, 4], data=[0] * 48)]}, 422, "shape"),
    ("pixel value range", {"inputs": [_tensor("pixels", "UINT8", [1, 2, 2, 3], data=[256] * 12)]}, 422, "0 to 255"),
    ("data count", {"inputs": [_tensor(shape=[2], data=[ONE])]}, 422, "2 base64"),
    ("bad image", {"inputs": [_tensor(data=[base64.b64encode(b"not an image").decode()])]}, 400, "images[0]"),
    ("bad base64", {"inputs": [_tensor(data=["***"])]}, 400, "base64"),
    ("unknown output", {"inputs": [_tensor(data=[ONE])], "outputs": [{"name": "logits"}]}, 400, "unknown output"),
    ("output named twice", {"inputs": [_tensor(data=[ONE])], "outputs": [{"name": "lifespans"}] * 3}, 400,
     "requested twice"),
    ("true in UINT8 data", {"inputs": [_tensor("pixels", "UINT8", [1, 2, 2, 3], data=[True] + [0] * 11)]}, 422,
     "found bool"),
    ("float in UINT8 data", {"inputs": [_tensor("pixels", "UINT8", [1, 2, 2, 3], data=[1.0] * 12)]}, 422,
     "integers from 0 to 255"),
    ("ragged UINT8 data", {"inputs": [_tensor("pixels", "UINT8", [1, 2, 2, 3], data=[[0] * 6, [0] * 5, 0])]}, 422,
     "integers from 0 to 255"),
    ("images nested deeper than [1]", {"inputs": [_tensor(data=[[[[[[ONE]]]]]])]}, 422, "nested"),
    ("pixels nested deeper than the shape", {"inputs": [_tensor("pixels", "UINT8", [1, 1, 1, 3],
                                                                data=[[[[[0], [0], [0]]]]])]}, 422, "nested"),
    ("pixels nested unlike the shape", {"inputs": [_tensor("pixels", "UINT8", [1, 2, 2, 3],
                                                           data=[[0] * 3] * 4)]}, 422, "nested"),
    ("top_k range", {"inputs": [_tensor(data=[ONE])], "parameters": {"top_k": 99}}, 422, "top_k"),
    ("keep_rate range", {"inputs": [_tensor(data=[ONE])], "parameters": {"keep_rate": 2}}, 422, "keep_rate"),
    ("too many images", {"inputs": [_tensor(shape=[5], data=[ONE] * 5)]}, 413, "PATCHLIFE_MAX_IMAGES_PER_REQUEST"),
    ("pixel bomb", {"inputs": [_tensor("pixels", "UINT8", [1, 100_000, 100_000, 3], data=[])]}, 413,
     "PATCHLIFE_MAX_IMAGE_PIXELS"),
    ("raw image bytes", {"inputs": [_tensor("pixels", "UINT8", [1, 300, 300, 3], data=[])]}, 413,
     "PATCHLIFE_MAX_UPLOAD_BYTES"),
]


@pytest.mark.parametrize("body,status,words", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors_in_protocol_form(client: TestClient, metric: Callable[..., float], body: Any, status: int,
                                 words: str) -> None:
    reason = {400: None, 413: None, 422: "invalid_request"}[status]
    before = metric(client, "patchlife_rejected_requests_total", {"reason": reason}) if reason else 0.0
    r = client.post(INFER, content=body) if isinstance(body, bytes) else client.post(INFER, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and words in r.json()["error"], r.json()
    if reason:
        assert metric(client, "patchlife_rejected_requests_total", {"reason": reason}) == before + 1


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "image/png"])
def test_a_body_declared_as_another_type_is_415(client: TestClient, content_type: str) -> None:
    body = json.dumps({"inputs": [_tensor(data=[ONE])]})
    r = client.post(INFER, content=body, headers={"content-type": content_type})
    assert r.status_code == 415, r.text
    assert set(r.json()) == {"error"} and "Content-Type" in r.json()["error"]


@pytest.mark.parametrize("content_type", [None, "application/json", "Application/JSON; charset=utf-8",
                                          "application/octet-stream"])
def test_json_bodies_as_clients_declare_them_are_served(client: TestClient, content_type: str | None) -> None:
    body = json.dumps({"inputs": [_tensor(data=[ONE])], "outputs": [{"name": "labels"}]})
    headers = {"content-type": content_type} if content_type else {}
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 200, r.text


def test_pixels_nested_as_the_shape_or_flat_give_the_same_answer(client: TestClient) -> None:
    pixels = np.asarray(Image.open(io.BytesIO(pngs(1)[0])).convert("RGB"))[None]
    answers = []
    for data in (pixels.tolist(), pixels.ravel().tolist()):
        r = client.post(INFER, json={"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                                 "data": data}], "outputs": [{"name": "probabilities"}]})
        assert r.status_code == 200, r.text
        answers.append(r.json()["outputs"][0]["data"])
    assert answers[0] == answers[1]


def test_binary_framing_errors(client: TestClient) -> None:
    good, headers = binary_request([({"name": "images", "datatype": "BYTES", "shape": [1]},
                                     length_prefixed(pngs(1)))])
    assert client.post(INFER, content=good, headers=headers).status_code == 200
    cases = [
        (good + b"x", headers, "belong to no input"),
        (good[:-3], headers, "does not fit"),
        (good, {**headers, oip.HEADER_LENGTH: str(len(good) + 1)}, oip.HEADER_LENGTH),
        (good, {**headers, oip.HEADER_LENGTH: "abc"}, oip.HEADER_LENGTH),
    ]
    for body, hdrs, words in cases:
        r = client.post(INFER, content=body, headers=hdrs)
        assert r.status_code == 400 and words in r.json()["error"], r.text
    huge = struct.pack("<I", 10**9)  # an element claiming 1 GB: refused from its length prefix
    body, hdrs = binary_request([({"name": "images", "datatype": "BYTES", "shape": [1]}, huge)])
    r = client.post(INFER, content=body, headers=hdrs)
    assert r.status_code == 413 and "PATCHLIFE_MAX_UPLOAD_BYTES" in r.json()["error"]


def test_body_limit_and_deadline_header(client: TestClient) -> None:
    r = client.post(INFER, content=b"{" + b" " * 1_000_001 + b"}")
    assert r.status_code == 413 and "PATCHLIFE_MAX_REQUEST_BYTES" in r.json()["error"]
    r = client.post(INFER, json={"inputs": [_tensor(data=[ONE])]}, headers={"X-Request-Deadline-Ms": "-1"})
    assert r.status_code == 422 and set(r.json()) == {"error"}


def test_unknown_model_infer_is_404(client: TestClient) -> None:
    r = client.post("/v2/models/nope/infer", json={"inputs": [_tensor(data=[ONE])]})
    assert r.status_code == 404 and "unknown model" in r.json()["error"]


def test_draining_server_is_not_ready(client: TestClient) -> None:
    c = client
    rt = c.app.state.frontend  # type: ignore[attr-defined]
    rt.state = Lifecycle.DRAINING
    try:
        for path in ("/v2/health/ready", f"/v2/models/{MODEL}/ready"):
            r = c.get(path)
            assert r.status_code == 503 and "shutting down" in r.json()["error"]
        r = c.post(INFER, json={"inputs": [_tensor(data=[ONE])]})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]
        assert c.get("/v2/health/live").status_code == 200
    finally:
        rt.state = Lifecycle.READY


def test_v2_requests_show_in_the_http_metrics(client: TestClient) -> None:
    """The same middleware labels v2 requests by their route template (found by label, not by metric name)."""
    r = client.post(INFER, json={"inputs": [_tensor(data=[ONE])], "outputs": [{"name": "labels"}]})
    assert r.status_code == 200
    registry = client.app.state.frontend.metrics.registry  # type: ignore[attr-defined]
    routes = {s.labels["route"]: s.value for family in registry.collect() for s in family.samples
              if "route" in s.labels and s.name.endswith("_count") and s.labels.get("status") == "200"}
    assert routes.get("/v2/models/{name}/infer", 0) >= 1, sorted(routes)
