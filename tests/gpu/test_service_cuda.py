"""The HTTP service end to end on CUDA: it becomes ready, and answers as the CPU service does."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.gpu

K, L, GRID = 4, 12, 8


@contextmanager
def serving(**settings: Any) -> Iterator[TestClient]:
    """A TestClient whose app has passed /readyz (warm-up, and graph capture on a GPU, included)."""
    app = create_app(Settings(warmup_batches=1, max_delay_ms=1.0, max_batch_size=8, grpc_port=0,
                                **settings))
    with TestClient(app) as client:
        end = time.monotonic() + 180
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end, f"not ready after 180 s: {client.get('/readyz').text}"
            time.sleep(0.1)
        yield client


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def classify(client: TestClient, images: list[bytes]) -> list[dict[str, Any]]:
    r = client.post("/classify", params={"top_k": 3},
                    files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)])
    assert r.status_code == 200, r.text
    return list(r.json()["results"])


def test_http_service_on_cuda_answers_like_the_cpu(checkpoints: dict[str, Path], photos: list[Image.Image]) -> None:
    images = [png(p) for p in photos[:4]]
    with serving(checkpoint=checkpoints["calibrated"], device="cpu", dtype="float32") as cpu:
        expected = classify(cpu, images)
    with serving(checkpoint=checkpoints["calibrated"], device="cuda") as gpu:
        info = gpu.get("/v1/models").json()
        assert info["device"].startswith("cuda") and info["normalization"] == "calibrated"
        got = classify(gpu, images)
        explain = gpu.post("/explain", files={"file": ("0.png", images[0], "image/png")})
        assert explain.status_code == 200 and explain.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(explain.content)).format == "PNG"
        assert gpu.get("/metrics").status_code == 200
    assert len(got) == len(expected) == 4
    clear = 0
    for res, ref in zip(got, expected, strict=True):
        life = res["lifespans"]
        assert (life["rows"], life["cols"]) == (GRID, GRID)
        assert all(K <= v <= L for row in life["values"] for v in row)
        p_gpu = {x["label"]: x["probability"] for x in res["labels"]}
        p_cpu = {x["label"]: x["probability"] for x in ref["labels"]}
        common = p_gpu.keys() & p_cpu.keys()
        assert common and all(abs(p_gpu[k] - p_cpu[k]) <= 0.1 for k in common), (res["labels"], ref["labels"])
        if ref["labels"][0]["probability"] - ref["labels"][1]["probability"] > 0.1:  # a clear winner on the CPU
            clear += 1
            assert res["labels"][0]["label"] == ref["labels"][0]["label"], (res["labels"], ref["labels"])
    assert clear >= 1, "no image has a clear winner: the label comparison above checked nothing"
