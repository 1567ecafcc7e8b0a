"""Fixtures of the ops checks: the dashboard, a tiny checkpoint, and a running service.

The service runs as a real ``patchlife serve`` process on a free loopback port with a tiny
checkpoint made here, so the static check (which metric names exist) and the Prometheus
integration test both see exactly what a deployment exports.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ops_support import DASHBOARD, REPO, Query, dashboard_queries

from service.child import ServeChild, serve_child


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
    env = {"PATCHLIFE_CHECKPOINT": str(tiny_checkpoint), "PATCHLIFE_DEVICE": "cpu", "PATCHLIFE_DTYPE": "float32",
           "PATCHLIFE_WARMUP_BATCHES": "1", "OMP_NUM_THREADS": "1"}
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
