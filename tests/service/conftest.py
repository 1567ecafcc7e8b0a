"""Fixtures of the service tests: a tiny real checkpoint and apps under TestClient (with lifespan)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_support import CLASSES, wait_ready
from tiny_models import tiny_checkpoint

from service.app import create_app
from service.settings import Settings

# Small limits so that the limit tests need small bodies; the batching delay short so tests are fast.
# grpc_port=0: the apps stay open side by side for the whole session (gRPC is tested on real servers).
BASE = dict(device="cpu", warmup_batches=1, max_delay_ms=1.0, max_upload_bytes=200_000,
            max_request_bytes=1_000_000, max_images_per_request=4, max_top_k=5, grpc_port=0)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vit_nano_patch8_32 (4x4 patches, 6 blocks), 5 classes, calibrated: budgets vary per image."""
    return tiny_checkpoint(tmp_path_factory.mktemp("checkpoint"), CLASSES, "nano-test",
                           description="a nano test model")


@pytest.fixture(scope="session")
def make_client(checkpoint_dir: Path) -> Iterator[Callable[..., TestClient]]:
    """``make_client(**settings)``: a ready TestClient for an app with those settings (closed at the end)."""
    opened: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        settings = Settings(checkpoint=checkpoint_dir, **{**BASE, **overrides})
        client = TestClient(create_app(settings))
        client.__enter__()
        opened.append(client)
        wait_ready(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def client(make_client: Callable[..., TestClient]) -> TestClient:
    """The shared app (default test settings). Server exceptions are raised, so a 500 fails loudly."""
    return make_client()


@pytest.fixture
def metric() -> Callable[..., float]:
    """``metric(client, name, labels)``: a sample's current value in that app's registry (0 if absent)."""

    def read(client: TestClient, name: str, labels: dict[str, str] | None = None) -> float:
        registry = client.app.state.frontend.metrics.registry  # type: ignore[attr-defined]
        return registry.get_sample_value(name, labels or {}) or 0.0

    return read
