"""bench/gpu_decode_check.py without a server: the verdict (the
GPU-host run is ``patchlife gpu-check``'s; ``python -m bench.gpu_decode_check --device cpu --modes cpu``
runs it on a CPU)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import gpu_decode_check


def test_verdict_and_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_ms = {"gpu": 0.8, "cpu": 4.0}

    def fake(decode: str, *_: Any, **__: Any) -> dict[str, Any]:
        return {"decode": decode, "requests": 100, "errors": 0, "requests_per_s": 50.0,
                "server_cpu_ms_per_request": cpu_ms[decode]}

    monkeypatch.setattr(gpu_decode_check, "measure_mode", fake)
    out = gpu_decode_check.measure("cuda", seconds=0.1)
    assert out["target_met"] and out["gpu_over_cpu"] == 0.2
    assert "target met" in gpu_decode_check.table(out)
    cpu_ms["gpu"] = 1.5
    assert not gpu_decode_check.measure("cuda", seconds=0.1)["target_met"]
    assert "target_met" not in gpu_decode_check.measure("cpu", modes=("cpu",))
