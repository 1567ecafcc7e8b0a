"""The tensor paths with the model and its inputs on PyTorch's ``meta`` device: shapes, no data.

A tensor made without ``device=`` lands on the CPU; as soon as it meets the model's tensors on
``meta``, PyTorch raises "Tensor on device meta is not on the expected device cpu!", the same bug
that on a GPU reads "Expected all tensors to be on the same device, cuda:0 and cpu". So this tier
finds stray CPU tensors in CI, on a machine without a GPU, in a few seconds.

What meta cannot run: anything that reads a value on the host (``.item()``, ``.tolist()``,
``float(t)``). That leaves out ``LifeViT.tail_grouped`` (it groups images by their buckets on the host),
hence the calibrated ``forward``; ``patchlife eval``'s ``top1``/``calibrated_row`` (they count correct
answers and budgets); and the training loop's progress bar (``_Meter.values``). Their tensor parts run
here piece by piece (head, budgets, tail at given counts, one optimiser step). Every op the model
uses had a meta kernel in torch 2.14, the newest this project allows and what CI installs: fused
attention with and without a mask, stable argsort, gather, quantile (calibration), AdamW's foreach
update. (An op without one would raise NotImplementedError naming it.)
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

from model import create_lifevit
from model.baselines import oracle_forward, random_forward, topk_forward
from model.lifevit import LifeViT
from model.schedule import round_up_budget
from model.training.train import STAGES, Stage, StageRunner, add_arguments, make_optimizer, trainable_parameters

META = torch.device("meta")
B = 3


@pytest.fixture(scope="module")
def cpu_model() -> LifeViT:
    """vit_nano_patch8_32 (4x4 patches, 6 blocks, 3 stages), calibrated on the CPU."""
    torch.manual_seed(0)
    model = create_lifevit("vit_nano_patch8_32", 0.7, num_classes=5).eval()
    model.calibrate(torch.randn(16, 3, 32, 32))
    return model


def on_meta(model: LifeViT, normalization: str = "per_image", dtype: torch.dtype = torch.float32) -> LifeViT:
    m = copy.deepcopy(model).to(META, dtype)
    m.normalization = normalization  # type: ignore[assignment]
    return m


def images(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(B, 3, 32, 32, device=META, dtype=dtype)


def assert_meta(t: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert t.device == META and tuple(t.shape) == shape, (t.device, tuple(t.shape), shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("normalization", ["per_image", "calibrated"])
def test_head_lives_budgets_tail(cpu_model: LifeViT, normalization: str, dtype: torch.dtype) -> None:
    model = on_meta(cpu_model, normalization, dtype)
    assert model.life.score_quantiles.device == META and model.life.is_calibrated
    P, T, S = model.num_patches, model.num_prefix_tokens, len(model.schedule.stage_starts)
    with torch.no_grad():
        state = model.head(images(dtype))
        assert_meta(state.tokens, (B, T + P, model.backbone.embed_dim))
        assert_meta(state.scores, (B, P))
        assert state.tokens.dtype == dtype and state.scores.dtype == torch.float32
        for sched in (model.schedule, model.schedule_for(0.5), model.schedule_for(1.0)):
            lives = model.lives(state.scores, sched)
            assert_meta(lives, (B, P))
            budgets = model.budgets(state.scores, sched)
            assert_meta(budgets, (B, S))
            assert budgets.dtype == torch.int64
            # the explain heatmap's grid: the engine reshapes the lives to the patch grid
            assert_meta(lives.reshape(B, *model.backbone.patch_embed.grid_size), (B, 4, 4))
        counts = round_up_budget(model.schedule.patch_counts, model.schedule, step=4)
        for c in (model.schedule.patch_counts, counts, (P,) * S, (1,) * S):
            logits = model.tail(state.tokens, c)
            assert_meta(logits, (B, 5))
            assert logits.dtype == dtype


def test_per_image_forward_and_the_baselines(cpu_model: LifeViT) -> None:
    model = on_meta(cpu_model)
    x, counts = images(), model.schedule.patch_counts
    with torch.no_grad():
        assert_meta(model(x), (B, 5))  # per_image: one static shape, no host read
        assert_meta(model.forward_dense(x), (B, 5))
        assert_meta(oracle_forward(model, x, counts), (B, 5))
        assert_meta(random_forward(model, x, counts, torch.Generator().manual_seed(0)), (B, 5))
        assert_meta(topk_forward(model, x, counts), (B, 5))


@pytest.mark.parametrize("per_image", [True, False])
def test_soft_and_weighted_forwards(cpu_model: LifeViT, per_image: bool) -> None:
    model = on_meta(cpu_model)
    with torch.no_grad():
        logits, lives = model.forward_soft(images(), tau=4.0, per_image=per_image)
        assert_meta(logits, (B, 5))
        assert_meta(lives, (B, model.num_patches))
        log_w = torch.zeros(model.depth - model.schedule.first_block, B, model.num_patches, device=META)
        assert_meta(model.forward_weighted(images(), log_w), (B, 5))


def test_calibration_runs_on_the_device(cpu_model: LifeViT) -> None:
    model = on_meta(cpu_model)
    model.calibrate([images(), images()])
    assert model.normalization == "calibrated"
    assert_meta(model.life.score_quantiles, (1025,))
    with torch.no_grad():
        assert_meta(model.budgets(model.head(images()).scores), (B, 3))


def _train_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--backbone", "vit_nano_patch8_32", "--distill", "0.5", "--stage2-keep-rates", "0.5,0.9"])


@pytest.mark.parametrize("stage", STAGES)
def test_one_training_step(cpu_model: LifeViT, stage: str) -> None:
    """Forward, loss (with distillation), backward, clipping, AdamW: everything but the progress bar."""
    model = on_meta(cpu_model).train()
    teacher = on_meta(cpu_model).requires_grad_(False)
    args = _train_args()
    params = trainable_parameters(model, stage)
    opt = make_optimizer(params, 1e-3, args.weight_decay)
    runner = StageRunner(model, Stage(STAGES.index(stage), stage, 2, 1e-3), args, teacher)
    labels = torch.zeros(B, dtype=torch.long, device=META)
    x = images()
    logits, life = runner.forward(x, step=0)
    assert_meta(logits, (B, 5))
    assert (life is None) == (stage == "dense")
    if life is not None:
        assert_meta(life, ())
    loss = runner.loss(x, logits, labels)
    assert_meta(loss, ())
    loss.backward()
    assert all(p.grad is not None and p.grad.device == META for p in params)
    torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
    opt.step()
    assert all(p.device == META for p in model.parameters())
    assert all(s["exp_avg"].device == META for s in opt.state.values())
