"""Open Inference Protocol v2 through clients nobody here wrote, against a real ``patchlife serve``.

``tritonclient[http]`` (Triton's Python client; binary tensor data by default) and the ``kserve`` SDK's
REST client send 20 synthetic images (tests/ops/conftest.py: model.training.data's renderer, PNG-encoded, and the same
pixels raw as UINT8) and must get the same top-1 labels as ``/classify`` on the same files; metadata, readiness and
errors go through the clients' own calls. Each client skips with the reason when it is not installed
(both are in the ``dev`` extra).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ops_support import N_IMAGES

pytestmark = pytest.mark.timeout(180)

MODEL = "ops-tiny"  # tests/ops/conftest.py's checkpoint


def _triton() -> Any:
    return pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed: the Triton "
                               "client checks did NOT run (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def triton(service_url: str) -> Any:
    http = _triton()
    client = http.InferenceServerClient(url=service_url.removeprefix("http://"), network_timeout=60.0)
    yield client
    client.close()


def _texts(arr: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in arr.ravel()]


# -- tritonclient -----------------------------------------------------------------------------
def test_triton_bytes_input_same_top1_as_classify(triton: Any, pngs: list[bytes], classify_top1: list[str]) -> None:
    """Default tritonclient use: binary BYTES input, no outputs named (so every output comes back binary)."""
    http = _triton()
    images = http.InferInput("images", [N_IMAGES], "BYTES")
    images.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    result = triton.infer(MODEL, [images], parameters={"top_k": 1})
    labels = result.as_numpy("labels")
    assert labels.shape == (N_IMAGES, 1)
    assert _texts(labels) == classify_top1
    probs = result.as_numpy("probabilities")
    names = triton.get_model_metadata(MODEL)["outputs"]
    assert probs.dtype == np.float32 and probs.shape == (N_IMAGES, int(names[0]["shape"][1]))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    lifespans, budget = result.as_numpy("lifespans"), result.as_numpy("budget")
    assert lifespans.dtype == np.float32 and lifespans.shape[0] == N_IMAGES and lifespans.ndim == 3
    assert budget.dtype == np.int32 and budget.shape[0] == N_IMAGES and (budget > 0).all()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_uint8_input_same_top1_as_classify(triton: Any, pixels: np.ndarray, classify_top1: list[str],
                                                  binary: bool) -> None:
    """Raw pixels, in binary and in JSON; the classification extension (class_count) gives top-1."""
    http = _triton()
    tensor = http.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    outputs = [http.InferRequestedOutput("probabilities", binary_data=binary, class_count=1),
               http.InferRequestedOutput("budget", binary_data=binary)]
    result = triton.infer(MODEL, [tensor], outputs=outputs)
    top = _texts(result.as_numpy("probabilities"))  # "score:index:label"
    assert [t.split(":", 2)[2] for t in top] == classify_top1
    assert result.as_numpy("budget").shape[0] == N_IMAGES
    assert result.as_numpy("labels") is None  # not asked for


def test_triton_metadata_and_readiness(triton: Any, service_url: str) -> None:
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    server = triton.get_server_metadata()
    assert server["name"] == "patchlife" and "binary_tensor_data" in server["extensions"]
    meta = triton.get_model_metadata(MODEL)
    assert meta["name"] == MODEL
    assert {t["name"]: t["datatype"] for t in meta["inputs"]} == {"images": "BYTES", "pixels": "UINT8"}
    assert {t["name"]: t["datatype"] for t in meta["outputs"]} == {
        "probabilities": "FP32", "labels": "BYTES", "lifespans": "FP32", "budget": "INT32"}
    native = httpx.get(f"{service_url}/v1/models", timeout=10).json()
    shapes = {t["name"]: t["shape"] for t in meta["outputs"]}
    assert shapes["lifespans"][1:] == native["grid"]
    assert shapes["budget"][1:] == [len(native["schedule"]["patch_counts"])]
    assert not triton.is_model_ready("nope")


def test_triton_errors(triton: Any) -> None:
    http = _triton()
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as missing:
        triton.get_model_metadata("nope")
    assert missing.value.status() == "404" and "unknown model" in missing.value.message()

    bad = http.InferInput("images", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as undecodable:
        triton.infer(MODEL, [bad])
    assert undecodable.value.status() == "400" and "images[0]" in undecodable.value.message()

    ok = http.InferInput("pixels", [1, 8, 8, 3], "UINT8")
    ok.set_data_from_numpy(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(InferenceServerException) as out_of_range:
        triton.infer(MODEL, [ok], parameters={"keep_rate": 1.5})
    assert out_of_range.value.status() == "422" and "keep_rate" in out_of_range.value.message()

    many = http.InferInput("pixels", [40, 8, 8, 3], "UINT8")
    many.set_data_from_numpy(np.zeros((40, 8, 8, 3), np.uint8))
    with pytest.raises(InferenceServerException) as too_many:
        triton.infer(MODEL, [many])
    assert too_many.value.status() == "413" and "PATCHLIFE_MAX_IMAGES_PER_REQUEST" in too_many.value.message()


# -- kserve -----------------------------------------------------------------------------------
def test_kserve_rest_client(service_url: str, pngs: list[bytes], pixels: np.ndarray, classify_top1: list[str],
                            tmp_path: Path) -> None:
    """In a process of its own (tests/ops/kserve_check.py says why): live, ready, BYTES and UINT8, a 404."""
    if importlib.util.find_spec("kserve") is None:
        pytest.skip("the kserve SDK is not installed: the KServe client checks did NOT run (pip install -e '.[dev]')")
    data = tmp_path / "data.npz"
    np.savez(data, pngs=np.array(pngs, dtype=np.object_), pixels=pixels)
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("kserve_check.py")), service_url, MODEL,
                          str(data)], capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["labels"] == classify_top1
    names = httpx.get(f"{service_url}/v1/models", timeout=10).json()["classes"]
    assert [names[i] for i in out["argmax"]] == classify_top1
    assert out["missing"]["status"] == 404 and "unknown model" in out["missing"]["error"]
