"""``patchlife eval``: accuracy bookkeeping, the table's rows, JSON output and errors."""

import argparse
import json

import pytest
import torch

from model import create_lifevit, save_checkpoint
from model.evaluation.evaluate import add_arguments, evaluate_model, materialise, run, spearman, top1, wilson_interval
from model.training.data import synthetic_class_names, synthetic_splits


def _constant_model(label: int = 3):
    """A nano LifeViT whose head ignores its input and always says ``label``."""
    torch.manual_seed(0)
    model = create_lifevit("vit_nano_patch8_32", 0.7, num_classes=6).eval()
    with torch.no_grad():
        model.backbone.head.weight.zero_()
        model.backbone.head.bias.zero_()
        model.backbone.head.bias[label] = 1.0
    return model


@pytest.fixture(scope="module")
def balanced():
    _, val = synthetic_splits(1, 120, seed=0, image_size=32)  # 20 images of each of 6 classes
    return materialise(val, 50)


def test_constant_prediction_scores_one_over_classes(balanced):
    assert top1(lambda x: torch.ones(len(x), 6) * torch.arange(6), balanced)[0] == pytest.approx(1 / 6)
    model = _constant_model()
    model.calibrate([b[0] for b in balanced])
    rows = evaluate_model(model, balanced, keep_rates=(0.5, 0.7))
    assert {(r.method, r.keep_rate, r.mode) for r in rows} == {
        ("dense", 1.0, "dense"), *{(m, k, "fixed") for m in ("life", "random", "topk") for k in (0.5, 0.7)},
        ("life", 0.5, "calibrated"), ("life", 0.7, "calibrated")}
    assert all(r.top1 == pytest.approx(1 / 6) for r in rows)
    assert all(r.n == 120 and r.ci95 == wilson_interval(20, 120) for r in rows)


def test_rows_at_equal_counts_and_flops_ordering(balanced):
    model = _constant_model()
    rows = evaluate_model(model, balanced, keep_rates=(0.5, 0.7))
    by = {(r.method, r.keep_rate): r for r in rows}
    for k in (0.5, 0.7):
        assert by["life", k].counts == by["random", k].counts == by["topk", k].counts
        assert by["random", k].gflops < by["life", k].gflops < by["dense", 1.0].gflops  # + life module
    assert by["life", 0.5].gflops < by["life", 0.7].gflops
    assert all(r.images_per_s > 0 for r in rows) and not any(r.mode == "calibrated" for r in rows)


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_json_prints_only_rows(tmp_path, capsys):
    model = _constant_model(5)
    _, val = synthetic_splits(1, 24, seed=0, image_size=32)
    model.calibrate([b[0] for b in materialise(val, 24)])
    meta = {"name": "tiny", "data": {"kind": "synthetic", "seed": 0, "train_size": 1, "val_size": 24}}
    save_checkpoint(model, tmp_path, class_names=synthetic_class_names(), metadata=meta)
    assert run(_parse("--checkpoint", str(tmp_path), "--json", "--keep-rates", "0.7")) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["images"] == 24 and body["interval"] == "wilson 95%"
    for row in body["rows"]:
        assert {"method", "keep_rate", "top1", "gflops", "images_per_s", "ci95", "n"} <= set(row)
        assert row["top1"] == pytest.approx(4 / 24)  # 24 balanced images: 4 of class 5
        lo, hi = row["ci95"]
        assert lo < 4 / 24 < hi and row["n"] == 24
    cal = [r for r in body["rows"] if r["mode"] == "calibrated"]
    assert len(cal) == 1 and cal[0]["budget"]["fraction_of_dense"]["max"] < 1.01  # life module on top
    b = cal[0]["budget"]
    f = b["fraction_of_dense"]
    assert f["p10"] <= f["p50"] <= f["p90"] and b["p90_over_p10"] == pytest.approx(f["p90"] / f["p10"], rel=1e-3)
    assert set(b["spearman_vs_content"]) == {"count", "objects", "target_patches"}
    assert all(-1 <= v <= 1 for v in b["spearman_vs_content"].values())
    assert run(_parse("--checkpoint", str(tmp_path), "--keep-rates", "0.7")) == 0
    table = capsys.readouterr().out
    assert "| topk | 0.7 | fixed |" in table and "Calibrated" in table and "Spearman vs count" in table


def test_wilson_interval_and_spearman():
    lo, hi = wilson_interval(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-3) and hi == pytest.approx(0.9448, abs=1e-3)  # textbook values
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(50, 50)[1] == 1.0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6*4/(5*24)
    assert spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(0.8944, abs=1e-4)  # ties share ranks
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert run(_parse("--checkpoint", str(tmp_path / "none"))) == 2
    assert "no patchlife checkpoint" in capsys.readouterr().err
    assert run(_parse("--checkpoint", str(tmp_path), "--keep-rates", "0,2")) == 2
    assert "--keep-rates" in capsys.readouterr().err
