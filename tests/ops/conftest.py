"""Fixtures of the ops checks: the dashboard, a tiny checkpoint, and a running service.

The service runs as a real ``patchlife serve`` process on a free loopback port with a tiny
checkpoint made here, so the static check (which metric names exist) and the Prometheus
integration test both see exactly what a deployment exports.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ops_support import DASHBOARD, N_IMAGES, REPO, Query, dashboard_queries
from PIL import Image

from bench.child import ServeChild, serve_child


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="session")
def queries(dashboard: dict[str, Any]) -> list[Query]:
    found = dashboard_queries(dashboard)
    assert found, f"{DASHBOARD} has no PromQL targets"
    return found


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-block 32x32 LifeViT with 5 classes, calibrated on random images (content-adaptive budgets)."""
    from tiny_models import tiny_checkpoint as make

    return make(tmp_path_factory.mktemp("ckpt") / "tiny", ["cat", "dog", "ship", "tree", "cup"], "ops-tiny")


@pytest.fixture(scope="session")
def service(tiny_checkpoint: Path) -> Iterator[ServeChild]:
    """``patchlife serve`` on free loopback ports (HTTP and gRPC), once /readyz answers 200."""
    # PATCHLIFE_MAX_BATCH_WASTE=0: an image always runs at its own bucket, so an answer never depends on what
    # else is queued (the client checks compare labels of the tiny model, whose near-ties a merge can flip)
    env = {"PATCHLIFE_CHECKPOINT": str(tiny_checkpoint), "PATCHLIFE_DEVICE": "cpu", "PATCHLIFE_DTYPE": "float32",
           "PATCHLIFE_WARMUP_BATCHES": "1", "OMP_NUM_THREADS": "1", "PATCHLIFE_MAX_BATCH_WASTE": "0",
           # the objective on (far above any answer's time: nothing is scaled), so that its attainment series
           # have data for the dashboard's queries
           "PATCHLIFE_LATENCY_OBJECTIVE_MS": "5000"}
    with serve_child(env, startup_s=90, cwd=str(REPO), grpc=True) as child:
        yield child


@pytest.fixture(scope="session")
def service_url(service: ServeChild) -> str:
    """The running service's base URL."""
    return service.url


@pytest.fixture(scope="session")
def grpc_target(service: ServeChild) -> str:
    """The running service's gRPC ``host:port``."""
    assert service.grpc_target is not None
    return service.grpc_target


# -- what the v2 client checks send (tritonclient and kserve over REST, tritonclient over gRPC) --------
@pytest.fixture(scope="session")
def pixels() -> np.ndarray:
    """20 synthetic task images, ``[20, 64, 64, 3]`` uint8."""
    from model.training.data import render_synthetic

    images, _ = render_synthetic(seed=7, indices=range(N_IMAGES), size=64)
    return images.permute(0, 2, 3, 1).contiguous().numpy()


@pytest.fixture(scope="session")
def pngs(pixels: np.ndarray) -> list[bytes]:
    out = []
    for arr in pixels:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def classify_top1(service_url: str, pngs: list[bytes]) -> list[str]:
    """What the native API answers for the same files: the reference, taken again by each module, since
    a near-tie can flip once earlier load (perf_analyzer's) has refitted the cost model that groups
    the batches, and so the patch counts an image runs at."""
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]
    r = httpx.post(f"{service_url}/classify", files=files, params={"top_k": 1}, timeout=60)
    assert r.status_code == 200, r.text
    labels = [res["labels"][0]["label"] for res in r.json()["results"]]
    assert len(labels) == N_IMAGES
    return labels
