"""``patchlife bench-frontend``: the target verdicts, and its plumbing on the CPU against a tiny model
(the offline served path, one server, a load pass per photo size and images per request)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from bench_support import parsed
from tiny_models import tiny_checkpoint

from bench import frontend


def args(**kw: object) -> argparse.Namespace:
    return parsed(frontend.add_arguments, **kw)


def _pass(images_per_s: float, open_p99_ms: float) -> dict[str, object]:
    return {"images_per_s": images_per_s, "p50_ms": 2.0, "p99_ms": 9.0, "errors": 0, "server_cpu_ms_per_image": 1.0,
            "client_busy_max": 0.4, "open_loop": {"rate_per_s": 0.7 * images_per_s, "p99_ms": open_p99_ms,
                                                  "errors": 1, "client_busy_max": 0.8}}


def test_rows_say_which_target_they_miss() -> None:
    hit = frontend.row("224px", 1, _pass(9000.0, 50.0), offline=12000.0)
    assert hit["target_misses"] == [] and hit["over_offline"] == 0.75 and hit["client_busy_max"] == 0.8
    assert hit["errors"] == 1  # the open loop's count too
    slow = frontend.row("224px", 1, _pass(7000.0, 150.0), offline=12000.0)
    assert slow["target_misses"] == ["images/s 7000.0 vs >= 8000", "open p99 ms 150.0 vs <= 100.0"]
    batched = frontend.row("224px", 16, _pass(13000.0, 500.0), offline=30000.0)
    assert batched["target_misses"] == ["over offline 0.4333 vs >= 0.5"]
    assert "target" not in frontend.row("1000px", 1, _pass(100.0, 500.0), offline=None)


def test_bad_options_and_no_cuda_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    assert frontend.run(args(photos="224px,4k")) == 2
    assert "--photos: from 224px,1000px" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert frontend.run(args()) == 2
        assert "torch sees no CUDA GPU (--device cpu runs the plumbing on the CPU)" in capsys.readouterr().err


def test_the_plumbing_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHLIFE_WARMUP_BATCHES", "1")
    checkpoint = tiny_checkpoint(tmp_path / "tiny", ["a", "b"], "tiny")
    code = frontend.run(args(checkpoint=checkpoint, device="cpu", photos="224px", images_per_request="1,2",
                             processes=2, clients=4, duration=1.0, offline_batch=2, api_processes="0", json=True))
    body = json.loads(capsys.readouterr().out)
    assert code == 0 and body["offline_images_per_s"] > 0
    assert [(r["photos"], r["images_per_request"]) for r in body["rows"]] == [("224px", 1), ("224px", 2)]
    for r in body["rows"]:
        assert r["errors"] == 0 and r["images_per_s"] > 0 and r["server_cpu_ms_per_image"] > 0
        assert r["open_p99_ms"] is not None and r["open_rate_per_s"] > 0
        assert r["over_offline"] == pytest.approx(r["images_per_s"] / body["offline_images_per_s"], rel=1e-3)
    # the verdict follows from the row's own figures, whichever way they fall on this machine
    first = body["rows"][0]
    assert first["target"] == {"images_per_s": 8000, "open_p99_ms": 100.0}
    missed = {m.split(" ")[0] for m in first["target_misses"]}
    assert ("images/s" in missed) == (first["images_per_s"] < 8000), first
    assert ("open" in missed) == (first["open_p99_ms"] > 100.0), first
    assert "target" not in body["rows"][1]  # 224px at 2 images per request has no target
