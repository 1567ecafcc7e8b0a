"""Test tiers. ``@pytest.mark.gpu`` tests need CUDA: where torch sees no GPU they are skipped, and say
why. ``PATCHLIFE_REQUIRE_GPU=1`` (``patchlife gpu-check`` sets it) turns that skip into an error, so a
GPU machine whose torch cannot see its GPU does not pass by skipping everything. Every test under
``tests/gpu/`` must carry the marker."""

from __future__ import annotations

import os

import pytest

GPU_DIR = "tests/gpu/"


def no_cuda_reason() -> str | None:
    """Why the gpu tier cannot run here, or None when it can."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, {build})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [i.nodeid for i in items if i.nodeid.startswith(GPU_DIR) and i.get_closest_marker("gpu") is None]
    if unmarked:
        raise pytest.UsageError(f"tests in {GPU_DIR} must be marked @pytest.mark.gpu: {unmarked}")
    gpu = [i for i in items if i.get_closest_marker("gpu") is not None]
    reason = no_cuda_reason() if gpu else None
    if reason is None:
        return
    if os.environ.get("PATCHLIFE_REQUIRE_GPU") == "1":
        raise pytest.UsageError(f"PATCHLIFE_REQUIRE_GPU=1 but the gpu tests cannot run: {reason}")
    skip = pytest.mark.skip(reason=reason)
    for item in gpu:
        item.add_marker(skip)
