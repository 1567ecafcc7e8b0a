"""The Open Inference Protocol over gRPC, in-process: Triton's gRPC client (and the raw messages for
what it never sends) against an app whose lifespan started the gRPC listener on a free port.

A real ``patchlife serve`` is driven over gRPC in tests/ops/test_grpc_clients.py.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_support import CLASSES, encode, photo

from bench.child import free_port
from service.frontend import errors
from service.frontend.grpc import grpc_service_pb2 as pb
from service.frontend.grpc.server import SERVICE, _failure
from service.protocol import Lifecycle

tg = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed: the gRPC client "
                         "checks did NOT run (pip install -e '.[dev]')")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "nano-test"


@pytest.fixture(scope="module")
def app_client(make_client: Callable[..., TestClient]) -> tuple[TestClient, str]:
    port = free_port()
    return make_client(grpc_port=port), f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def triton(app_client: tuple[TestClient, str]) -> Iterator[Any]:
    client = tg.InferenceServerClient(app_client[1])
    yield client
    client.close()


@pytest.fixture
def http(app_client: tuple[TestClient, str]) -> TestClient:
    return app_client[0]


def pngs(n: int) -> list[bytes]:
    return [encode(photo(seed=i), "PNG") for i in range(n)]


def classify_top1(client: TestClient, files: list[bytes]) -> list[str]:
    r = client.post("/classify", files=[("files", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)])
    assert r.status_code == 200, r.text
    return [res["labels"][0]["label"] for res in r.json()["results"]]


def images_input(files: list[bytes]) -> Any:
    tensor = tg.InferInput("images", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_))
    return tensor


def raw_call(target: str, method: str, request: Any, response_cls: Any) -> Any:
    """One RPC with this repo's own messages (for what tritonclient never sends, e.g. typed contents)."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=type(request).SerializeToString,
                                   response_deserializer=response_cls.FromString)
        return call(request, timeout=30)


# -- health, metadata, configuration, statistics ----------------------------------------------
def test_readiness_and_metadata(triton: Any, http: TestClient) -> None:
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    assert not triton.is_model_ready("nope")
    server = triton.get_server_metadata(as_json=True)
    assert server["name"] == "patchlife" and "statistics" in server["extensions"]
    meta = triton.get_model_metadata(MODEL, as_json=True)
    rest = http.get(f"/v2/models/{MODEL}").json()
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"] + meta["outputs"]] == \
        [(t["name"], t["datatype"], t["shape"]) for t in rest["inputs"] + rest["outputs"]]


def test_config_and_statistics_are_the_rest_ones(triton: Any, http: TestClient) -> None:
    config = triton.get_model_config(MODEL, as_json=True)["config"]
    rest = http.get(f"/v2/models/{MODEL}/config").json()
    assert config["max_batch_size"] == rest["max_batch_size"]
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"] + config["output"]] \
        == [(t["name"], t["data_type"], t["dims"]) for t in rest["input"] + rest["output"]]
    assert [int(b) for b in config["dynamic_batching"]["preferred_batch_size"]] == \
        rest["dynamic_batching"]["preferred_batch_size"]
    before = triton.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    triton.infer(MODEL, [images_input(pngs(1))])
    after = triton.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(after["inference_stats"]["success"]["count"]) == \
        int(before["inference_stats"]["success"].get("count", 0)) + 1
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 1
    assert [m["name"] for m in triton.get_inference_statistics(as_json=True)["model_stats"]] == [MODEL]


# -- inference --------------------------------------------------------------------------------
def test_bytes_input_same_top1_as_classify(triton: Any, http: TestClient) -> None:
    files = pngs(3)
    result = triton.infer(MODEL, [images_input(files)], parameters={"top_k": 2}, request_id="r-1")
    labels = result.as_numpy("labels")
    assert labels.shape == (3, 2) and [v.decode() for v in labels[:, 0]] == classify_top1(http, files)
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (3, len(CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert result.as_numpy("lifespans").shape == (3, 4, 4) and result.as_numpy("budget").dtype == np.int32
    assert result.get_response().id == "r-1"


def test_uint8_input_with_classification(triton: Any, http: TestClient) -> None:
    files = pngs(2)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in files])
    tensor = tg.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = triton.infer(MODEL, [tensor], outputs=[tg.InferRequestedOutput("probabilities", class_count=1)])
    top = [v.decode().split(":", 2)[2] for v in result.as_numpy("probabilities").ravel()]
    assert top == classify_top1(http, files)
    assert result.as_numpy("labels") is None


def test_typed_contents_as_well_as_raw(app_client: tuple[TestClient, str]) -> None:
    """``contents`` (bytes_contents, uint_contents) instead of raw_input_contents: the same answer."""
    http, target = app_client
    files = pngs(1)
    pixels = np.asarray(Image.open(io.BytesIO(files[0])).convert("RGB"))[None]
    request = pb.ModelInferRequest(model_name=MODEL, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(
        name="labels")])
    request.parameters["top_k"].int64_param = 1
    request.inputs.add(name="images", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(
        bytes_contents=files))
    request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape), contents=pb.InferTensorContents(
        uint_contents=pixels.ravel().tolist()))
    response = raw_call(target, "ModelInfer", request, pb.ModelInferResponse)
    (out,) = response.outputs
    assert out.name == "labels" and list(out.shape) == [2, 1]
    raw = response.raw_output_contents[0]
    labels = []
    while raw:
        n = int.from_bytes(raw[:4], "little")
        labels.append(raw[4:4 + n].decode())
        raw = raw[4 + n:]
    assert labels == classify_top1(http, files) * 2


# -- errors -----------------------------------------------------------------------------------
def _error(fn: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        fn()
    return caught.value


def test_errors_carry_the_rest_message_and_the_mapped_code(triton: Any, http: TestClient,
                                                           metric: Callable[..., float]) -> None:
    e = _error(lambda: triton.get_model_metadata("nope"))
    assert e.status() == "StatusCode.NOT_FOUND" and "unknown model" in e.message()

    before = metric(http, "patchlife_rejected_requests_total", {"reason": "bad_image"})
    bad = tg.InferInput("images", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    e = _error(lambda: triton.infer(MODEL, [bad]))
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "images[0]" in e.message()
    assert metric(http, "patchlife_rejected_requests_total", {"reason": "bad_image"}) == before + 1

    e = _error(lambda: triton.infer(MODEL, [images_input(pngs(1))], parameters={"keep_rate": 1.5}))
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "keep_rate" in e.message()

    many = tg.InferInput("pixels", [5, 8, 8, 3], "UINT8")  # the test app allows 4 images a request
    many.set_data_from_numpy(np.zeros((5, 8, 8, 3), np.uint8))
    e = _error(lambda: triton.infer(MODEL, [many]))
    assert e.status() == "StatusCode.RESOURCE_EXHAUSTED" and "PATCHLIFE_MAX_IMAGES_PER_REQUEST" in e.message()

    odd = tg.InferInput("logits", [1], "FP32")
    odd.set_data_from_numpy(np.zeros(1, np.float32))
    e = _error(lambda: triton.infer(MODEL, [odd]))
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "unknown input" in e.message()

    e = _error(lambda: triton.infer("nope", [images_input(pngs(1))]))
    assert e.status() == "StatusCode.NOT_FOUND"


def test_malformed_messages(app_client: tuple[TestClient, str]) -> None:
    target = app_client[1]
    cases: list[tuple[pb.ModelInferRequest, str]] = []
    two_raw = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[b"a", b"b"])
    two_raw.inputs.add(name="images", datatype="BYTES", shape=[1])
    cases.append((two_raw, "raw_input_contents has 2 entries"))
    no_data = pb.ModelInferRequest(model_name=MODEL)
    no_data.inputs.add(name="images", datatype="BYTES", shape=[1])
    cases.append((no_data, "no data"))
    big = pb.ModelInferRequest(model_name=MODEL)
    big.inputs.add(name="pixels", datatype="UINT8", shape=[1, 1, 1, 3], contents=pb.InferTensorContents(
        uint_contents=[0, 1, 256]))
    cases.append((big, "0 to 255"))
    for request, words in cases:
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(target, "ModelInfer", request, pb.ModelInferResponse)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()


def test_draining_server_is_unavailable(triton: Any, http: TestClient) -> None:
    rt = http.app.state.frontend  # type: ignore[attr-defined]
    rt.state = Lifecycle.DRAINING
    try:
        assert not triton.is_server_ready() and not triton.is_model_ready(MODEL)
        e = _error(lambda: triton.infer(MODEL, [images_input(pngs(1))]))
        assert e.status() == "StatusCode.UNAVAILABLE" and "shutting down" in e.message()
        assert triton.is_server_live()
    finally:
        rt.state = Lifecycle.READY


@pytest.mark.parametrize("error,code", [
    (errors.Overloaded("queue full", headers={"Retry-After": "2"}), grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.TooLarge("big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnsupportedMediaType("text"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelUnavailable("down", headers={"Retry-After": "5"}), grpc.StatusCode.UNAVAILABLE),
    (errors.ClientDisconnected("gone"), grpc.StatusCode.CANCELLED),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else "")
def test_http_statuses_map_to_grpc_codes(http: TestClient, error: errors.ApiError, code: grpc.StatusCode) -> None:
    got, message, trailer = _failure(http.app.state.frontend, error)  # type: ignore[attr-defined]
    assert got == code and message == error.message
    assert dict(trailer).get("retry-after") == error.headers.get("Retry-After")


def test_calls_show_in_the_metrics(triton: Any, http: TestClient, metric: Callable[..., float]) -> None:
    labels = {"method": "ModelInfer", "code": "OK"}
    before = metric(http, "patchlife_grpc_request_duration_seconds_count", labels)
    triton.infer(MODEL, [images_input(pngs(1))])
    assert metric(http, "patchlife_grpc_request_duration_seconds_count", labels) == before + 1
    missing = {"method": "ModelMetadata", "code": "NOT_FOUND"}
    before = metric(http, "patchlife_grpc_request_duration_seconds_count", missing)
    _error(lambda: triton.get_model_metadata("nope"))
    assert metric(http, "patchlife_grpc_request_duration_seconds_count", missing) == before + 1


def test_an_output_named_twice_or_unknown_is_invalid_argument(triton: Any) -> None:
    """As over REST (400): each output at most once bounds the answer's size."""
    for outputs, words in (([tg.InferRequestedOutput("lifespans")] * 3, "requested twice"),
                           ([tg.InferRequestedOutput("logits")], "unknown output")):
        with pytest.raises(InferenceServerException) as info:
            triton.infer(MODEL, [images_input(pngs(1))], outputs=outputs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and words in str(info.value.message())
