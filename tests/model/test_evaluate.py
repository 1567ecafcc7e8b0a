"""``patchlife eval``: accuracy bookkeeping, the table's rows, JSON output and errors."""

import argparse
import json

import pytest
import torch

from model import create_lifevit, save_checkpoint
from model.data import synthetic_class_names, synthetic_splits
from model.evaluate import add_arguments, evaluate_model, materialise, run, top1


def _constant_model(label: int = 3):
    """A nano LifeViT whose head ignores its input and always says ``label``."""
    torch.manual_seed(0)
    model = create_lifevit("vit_nano_patch8_32", 0.7, num_classes=12).eval()
    with torch.no_grad():
        model.backbone.head.weight.zero_()
        model.backbone.head.bias.zero_()
        model.backbone.head.bias[label] = 1.0
    return model


@pytest.fixture(scope="module")
def balanced():
    _, val = synthetic_splits(1, 120, seed=0, image_size=32)  # 10 images of each of 12 classes
    return materialise(val, 50)


def test_constant_prediction_scores_one_over_classes(balanced):
    assert top1(lambda x: torch.ones(len(x), 12) * torch.arange(12), balanced)[0] == pytest.approx(1 / 12)
    model = _constant_model()
    model.calibrate([b[0] for b in balanced])
    rows = evaluate_model(model, balanced, keep_rates=(0.5, 0.7))
    assert {(r.method, r.keep_rate, r.mode) for r in rows} == {
        ("dense", 1.0, "dense"), *{(m, k, "fixed") for m in ("life", "random", "topk") for k in (0.5, 0.7)},
        ("life", 0.5, "calibrated"), ("life", 0.7, "calibrated")}
    assert all(r.top1 == pytest.approx(1 / 12) for r in rows)


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
    assert list(body) == ["rows"]
    for row in body["rows"]:
        assert {"method", "keep_rate", "top1", "gflops", "images_per_s"} <= set(row)
        assert row["top1"] == pytest.approx(2 / 24)  # 24 balanced images: 2 of class 5
    cal = [r for r in body["rows"] if r["mode"] == "calibrated"]
    assert len(cal) == 1 and cal[0]["budget"]["fraction_of_dense"]["max"] < 1.01  # life module on top
    assert run(_parse("--checkpoint", str(tmp_path), "--keep-rates", "0.7")) == 0
    table = capsys.readouterr().out
    assert "| topk | 0.7 | fixed |" in table and "Calibrated" in table


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert run(_parse("--checkpoint", str(tmp_path / "none"))) == 2
    assert "no patchlife checkpoint" in capsys.readouterr().err
    assert run(_parse("--checkpoint", str(tmp_path), "--keep-rates", "0,2")) == 2
    assert "--keep-rates" in capsys.readouterr().err
