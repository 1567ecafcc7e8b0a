"""The Open Inference Protocol over gRPC against a real ``patchlife serve``, through Triton's gRPC client.

The same 20 synthetic images as the REST client checks (PNG-encoded as BYTES, and raw as UINT8) must get
the same top-1 labels as ``/classify``; metadata, configuration and readiness go through the client's
own calls. Skips with the reason when ``tritonclient[grpc]`` is not installed (it is in the dev extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ops_support import N_IMAGES, REPO

from bench.child import serve_child, stop

pytestmark = pytest.mark.timeout(180)

MODEL = "ops-tiny"


def _grpc() -> Any:
    return pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed: the gRPC client "
                               "checks did NOT run (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def client(grpc_target: str) -> Iterator[Any]:
    client = _grpc().InferenceServerClient(grpc_target)
    yield client
    client.close()


def test_bytes_and_uint8_same_top1_as_classify(client: Any, service_url: str, pngs: list[bytes],
                                               pixels: np.ndarray, classify_top1: list[str]) -> None:
    g = _grpc()
    images = g.InferInput("images", [N_IMAGES], "BYTES")
    images.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    result = client.infer(MODEL, [images], parameters={"top_k": 1})
    assert [v.decode() for v in result.as_numpy("labels").ravel()] == classify_top1

    raw = g.InferInput("pixels", list(pixels.shape), "UINT8")
    raw.set_data_from_numpy(pixels)
    result = client.infer(MODEL, [raw], outputs=[g.InferRequestedOutput("probabilities")])
    probs = result.as_numpy("probabilities")
    classes = httpx.get(f"{service_url}/v1/models", timeout=10).json()["classes"]
    assert probs.shape == (N_IMAGES, len(classes))
    assert [classes[i] for i in probs.argmax(axis=1)] == classify_top1


def _ints(values: list[Any]) -> list[int]:
    """gRPC's JSON writes 64-bit integers as strings."""
    return [int(v) for v in values]


def test_metadata_configuration_and_readiness(client: Any, service_url: str) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata(MODEL, as_json=True)
    rest = httpx.get(f"{service_url}/v2/models/{MODEL}", timeout=10).json()
    assert [(t["name"], t["datatype"], _ints(t["shape"])) for t in meta["inputs"] + meta["outputs"]] == \
        [(t["name"], t["datatype"], t["shape"]) for t in rest["inputs"] + rest["outputs"]]
    config = client.get_model_config(MODEL, as_json=True)["config"]
    rest_config = httpx.get(f"{service_url}/v2/models/{MODEL}/config", timeout=10).json()
    assert (config["name"], config["platform"], config["backend"], config["max_batch_size"]) == \
        (rest_config["name"], rest_config["platform"], rest_config["backend"], rest_config["max_batch_size"])
    assert [(t["name"], t["data_type"], _ints(t["dims"])) for t in config["input"] + config["output"]] == \
        [(t["name"], t["data_type"], t["dims"]) for t in rest_config["input"] + rest_config["output"]]
    batching = config["dynamic_batching"]
    assert _ints(batching["preferred_batch_size"]) == rest_config["dynamic_batching"]["preferred_batch_size"]
    assert int(batching["max_queue_delay_microseconds"]) == \
        rest_config["dynamic_batching"]["max_queue_delay_microseconds"]


def test_sigterm_exits_cleanly_with_grpc(tiny_checkpoint: Path) -> None:
    """A second server: gRPC answers, then SIGTERM drains and stops both listeners; exit status 0."""
    g = _grpc()
    env = {"PATCHLIFE_CHECKPOINT": str(tiny_checkpoint), "PATCHLIFE_DEVICE": "cpu", "PATCHLIFE_WARMUP_BATCHES": "1",
           "OMP_NUM_THREADS": "1"}
    with serve_child(env, startup_s=90, cwd=str(REPO), grpc=True) as child:
        assert child.grpc_target is not None
        client = g.InferenceServerClient(child.grpc_target)
        assert client.is_model_ready(MODEL)
        client.close()
        stop(child.proc)  # SIGTERM
        log = child.log()
    assert child.proc.returncode == 0, log[-2000:]
    assert "gRPC (Open Inference Protocol v2) on 127.0.0.1" in log
