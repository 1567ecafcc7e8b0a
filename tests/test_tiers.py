"""The gpu marker hook of tests/conftest.py: skip with the reason without CUDA, run with it, and refuse
unmarked tests under tests/gpu/ (or any skip when PATCHLIFE_REQUIRE_GPU=1)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch


def root_conftest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("root_conftest", Path(__file__).with_name("conftest.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Item:
    """The two things the hook reads of a pytest item, and what it adds."""

    def __init__(self, nodeid: str, gpu: bool) -> None:
        self.nodeid, self.gpu, self.added = nodeid, gpu, []  # type: ignore[var-annotated]

    def get_closest_marker(self, name: str) -> Any:
        return pytest.mark.gpu.mark if name == "gpu" and self.gpu else None

    def add_marker(self, marker: Any) -> None:
        self.added.append(marker)


def test_gpu_tests_skip_with_the_reason_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = root_conftest().pytest_collection_modifyitems
    monkeypatch.delenv("PATCHLIFE_REQUIRE_GPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu, cpu = Item("tests/gpu/test_a.py::test_x", True), Item("tests/model/test_b.py::test_y", False)
    hook(None, [gpu, cpu])
    assert cpu.added == [] and len(gpu.added) == 1
    assert gpu.added[0].name == "skip" and "needs a CUDA GPU" in gpu.added[0].kwargs["reason"]

    monkeypatch.setenv("PATCHLIFE_REQUIRE_GPU", "1")
    with pytest.raises(pytest.UsageError, match="PATCHLIFE_REQUIRE_GPU=1"):
        hook(None, [Item("tests/gpu/test_a.py::test_x", True)])


def test_gpu_tests_run_with_cuda_and_must_be_marked(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = root_conftest().pytest_collection_modifyitems
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = Item("tests/gpu/test_a.py::test_x", True)
    hook(None, [gpu])
    assert gpu.added == []
    with pytest.raises(pytest.UsageError, match="must be marked"):
        hook(None, [Item("tests/gpu/test_a.py::test_unmarked", False)])
