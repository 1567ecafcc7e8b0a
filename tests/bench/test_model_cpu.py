"""``python -m bench.model_cpu``: the model process alone (``bench/standin_host.py``), loaded over the
wire from several connections; a short run on a tiny checkpoint gives rows that add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import tiny_checkpoint

from bench import model_cpu


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model-cpu") / "tiny", ["a", "b", "c"], "model-cpu-test")


def test_a_short_run_reports_cpu_per_image_against_the_batches_run(checkpoint: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = model_cpu.main(["--checkpoint", str(checkpoint), "--images-per-request", "1,4", "--max-batch-size", "8",
                           "--connections", "2", "--in-flight", "8", "--duration", "1", "--warmup", "0.5", "--json"])
    body = json.loads(capsys.readouterr().out)
    assert code == 0, body
    assert [r["images_per_request"] for r in body["rows"]] == [1, 4] and body["max_batch_size"] == 8
    for row in body["rows"]:
        assert row["errors"] == 0 and row["images_per_s"] > 0 and row["in_flight"] == 16
        assert 0 < row["model_cpu_ms_per_image"] < 1000
        # every image the client counted went through one head and one tail batch of at most 8
        for phase in ("mean_head_batch", "mean_tail_batch"):
            assert 1 <= row[phase] <= 8
        assert row["model_cpu_ms_per_tail_batch"] == pytest.approx(
            row["model_cpu_ms_per_image"] * row["mean_tail_batch"], rel=0.35)


def test_the_table_names_each_column_and_the_target() -> None:
    row = {"images_per_request": 1, "in_flight": 256, "images_per_s": 5000.0, "model_cpu_ms_per_image": 0.09,
           "model_cpu_ms_per_tail_batch": 5.8, "mean_head_batch": 64.0, "mean_tail_batch": 63.8,
           "model_cpu_share": 0.45, "model_cores_at_rate": 1.22, "errors": 0, "error_kinds": {}}
    text = model_cpu.table({"table": "t.json", "model": "m", "max_batch_size": 64, "connections": 4, "rate": 13600.0,
                            "rows": [row, {**row, "model_cpu_ms_per_image": None, "mean_tail_batch": None}]})
    assert "CPU ms/img" in text and "0.0900" in text and "63.8" in text and "n/a" in text
    assert "target <= 0.10 ms/image at batch 64" in text


def test_bad_options_are_refused() -> None:
    with pytest.raises(SystemExit):
        model_cpu.parse(["--connections", "0"])
