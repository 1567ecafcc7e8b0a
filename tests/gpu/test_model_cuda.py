"""model/ on CUDA: no host syncs on the hot paths, ``patchlife eval``, and training with AMP."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from model import load_checkpoint
from model.evaluation.evaluate import add_arguments as eval_arguments
from model.evaluation.evaluate import run as eval_run
from model.lifevit import LifeViT
from model.schedule import host_to_device
from model.training.data import synthetic_splits
from model.training.setup import build_model
from model.training.train import RunState, Stage, StageRunner, TrainContext, _Meter, add_arguments, main, run_stage

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
TINY = ["--synthetic", "--backbone", "vit_nano_patch8_32", "--train-size", "96", "--val-size", "32",
        "--batch-size", "16", "--calibrate", "32", "--device", "cuda", "--amp", "bf16"]


def _hot_paths(model: LifeViT, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        state = model.head(x)
        out = {"lives": model.lives(state.scores, model.schedule_for(0.5)), "budgets": model.budgets(state.scores),
               "logits": model.tail(state.tokens, model.schedule.patch_counts)}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out["soft"], out["soft_lives"] = model.forward_soft(x, 4.0)
    return out


@pytest.mark.parametrize("mode", ["per_image", "calibrated"])
def test_hot_paths_do_not_wait_for_the_gpu(checkpoints: dict[str, Path], mode: str) -> None:
    """Head, lives, budgets, tail and the training forward only queue kernels: a host sync (``.item()``,
    ``torch.tensor(..., device="cuda")``, a blocking copy) raises under sync debug mode "error"."""
    model, config = load_checkpoint(checkpoints[mode], device=CUDA)
    classes = len(config.class_names)  # from the checkpoint: the tiny one's class count has changed before
    x = torch.randn(4, 3, 64, 64, device=CUDA)
    _hot_paths(model, x)  # warm-up: lazy initialisation (cuBLAS handles, ...) may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _hot_paths(model, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out["lives"].shape == (4, 64) and out["budgets"].shape == (4, 3)
    assert out["logits"].shape == out["soft"].shape == (4, classes) and classes == model.backbone.num_classes
    assert all(t.device.type == "cuda" for t in out.values())


@pytest.mark.parametrize("stage", ["dense", "life", "tail"])
def test_a_training_step_does_not_wait_for_the_gpu(stage: str, tmp_path: Path) -> None:
    """Forward, loss and the progress meter of a step under bf16 autocast: no host sync (the meter is
    read only when the bar redraws)."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16 support")
    args = _args("--out", str(tmp_path), "--distill", "0.5")
    model = build_model(args).to(CUDA).train()
    ctx = TrainContext(args)
    runner = StageRunner(model, Stage(0, stage, 2, 1e-3), args, build_model(args).to(CUDA).eval())
    meter = _Meter()
    train, _ = synthetic_splits(16, 16, 0, 32)
    images, labels = (host_to_device(t, CUDA) for t in next(iter(train.batches(8))))

    def step() -> None:
        with ctx.autocast():
            logits, life = runner.forward(images, 0)
            loss = runner.loss(images, logits, labels)
        meter.add(loss, logits, labels, life, 0.1)

    step()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    values = meter.values()
    assert len(meter.steps) == 2 and values["loss"] > 0 and 0 <= values["acc"] <= 1


def _eval(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    eval_arguments(p)
    return p.parse_args(list(argv))


def test_patchlife_eval_on_cuda_matches_the_cpu(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    common = ["--checkpoint", str(checkpoints["calibrated"]), "--synthetic", "--val-size", "96",
              "--keep-rates", "0.5,0.7", "--batch-size", "32", "--json"]
    rows = {}
    for device in ("cuda", "cpu"):
        assert eval_run(_eval(*common, "--device", device)) == 0, capsys.readouterr().err
        body = json.loads(capsys.readouterr().out)
        rows[device] = {(r["method"], r["keep_rate"], r["mode"]): r for r in body["rows"]}
    assert rows["cuda"].keys() == rows["cpu"].keys()
    assert ("life", 0.7, "calibrated") in rows["cuda"]
    for key, row in rows["cuda"].items():
        ref = rows["cpu"][key]
        assert abs(row["top1"] - ref["top1"]) <= 3 / 96, key  # a near-tie may flip an answer or three
        assert row["gflops"] == pytest.approx(ref["gflops"], rel=0.05), key
        if "budget" in row:
            mean, mean_ref = row["budget"]["patches_per_stage_mean"], ref["budget"]["patches_per_stage_mean"]
            assert all(abs(a - b) <= 1.0 for a, b in zip(mean, mean_ref, strict=True)), (key, mean, mean_ref)


def _args(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args([*TINY, *extra])


@pytest.mark.parametrize("stage", ["dense", "life", "tail"])
def test_two_training_steps_with_bf16_autocast(stage: str, tmp_path: Path) -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16 support")
    args = _args("--out", str(tmp_path), "--distill", "0.5")
    torch.manual_seed(0)
    model = build_model(args)
    train, _ = synthetic_splits(96, 32, 0, 32)
    ctx = TrainContext(args)
    assert ctx.device.type == "cuda" and ctx.amp_dtype == torch.bfloat16
    model.to(ctx.device)
    ctx.teacher = build_model(args).to(ctx.device).eval().requires_grad_(False)
    with ctx.autocast():  # autocast really engages: the matmuls run in bfloat16
        runner = StageRunner(model, Stage(0, stage, 2, 1e-3), args, ctx.teacher)
        logits, _ = runner.forward(next(iter(train.batches(4)))[0].to(ctx.device), 0)
    assert logits.dtype == torch.bfloat16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = RunState()
    assert run_stage(model, Stage(["dense", "life", "tail"].index(stage), stage, 2, 1e-2), train, state, args, ctx)
    assert state.step == 2
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(torch.isfinite(p).all() for p in model.parameters())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trained
    assert torch.isfinite(torch.tensor(state.history[-1]["final_loss"]))


def test_patchlife_train_on_cuda_calibrates_on_the_device(tmp_path: Path) -> None:
    """All stages, calibration and the calibrated held-out evaluation on the GPU (the crash of issue #9)."""
    rc = main([*TINY, "--stage0-steps", "2", "--stage1-steps", "2", "--stage2-steps", "2", "--out", str(tmp_path)])
    assert rc == 0
    model, cfg = load_checkpoint(tmp_path)
    assert cfg.normalization == "calibrated" and model.life.is_calibrated
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["machine"]["device"] == "cuda"
    assert [h["after"] for h in metrics["history"] if "after" in h] == ["dense", "life", "tail", "calibrated"]
