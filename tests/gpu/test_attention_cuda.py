"""The masked (weighted) attention paths on CUDA: stage 1 trains, and the fused kernel agrees with MATH.

Stage 1 once crashed here ("LSE is not correctly aligned (strideH)" in the memory-efficient SDPA
backward, when only the mask needs a gradient), and bf16 masked attention has been reported wrong for
key lengths 1 mod 32 (pytorch#191937). N = 65 (8x8 patches of 64 px, 1 mod 32) and N = 197 (16x16
patches of 224 px) are the two lengths patchlife's models have. The CPU guard is
tests/model/test_masked_attention.py.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import create_lifevit
from model.lifevit import LifeViT
from model.training.train import RunState, Stage, TrainContext, add_arguments, run_stage, trainable_parameters

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
# name -> (timm kwargs, input size); sequence length N = patches + 1
MODELS = {65: ("vit_micro_patch8_64", {}, 64),
          197: ("vit_tiny_patch16_224", {"depth": 6, "embed_dim": 96, "num_heads": 3}, 224)}


def _model(n: int) -> tuple[LifeViT, torch.Tensor]:
    name, kwargs, size = MODELS[n]
    torch.manual_seed(0)
    model = create_lifevit(name, 0.7, num_classes=6, stage_starts=[1, 3, 5] if n == 197 else None, **kwargs)
    with torch.no_grad():
        model.backbone.head.weight.mul_(15.0)  # logits that differ clearly between images
    assert model.num_patches + model.num_prefix_tokens == n
    return model.to(CUDA), torch.randn(8, 3, size, size, device=CUDA)


def _stage1_pass(model: LifeViT, images: torch.Tensor, backend: SDPBackend) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward of the stage-1 path with only ``backend`` allowed: (logits, life gradients)."""
    trainable_parameters(model, "life")
    model.train().zero_grad(set_to_none=True)
    with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _ = model.forward_soft(images, 4.0)
        loss = logits.float().log_softmax(-1)[:, 0].mean()
    loss.backward()
    grads = [p.grad.detach().float().clone() for p in model.life.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return logits.detach().float(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("n", sorted(MODELS))
def test_efficient_attention_matches_math_on_the_weighted_tail(n: int) -> None:
    """Outputs and the life module's gradients of the weighted tail in bf16: the memory-efficient kernel
    (forced, so it cannot quietly fall back) against MATH, within bf16 tolerance."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16 support")
    model, images = _model(n)
    logits_eff, grads_eff = _stage1_pass(model, images, SDPBackend.EFFICIENT_ATTENTION)
    logits_math, grads_math = _stage1_pass(model, images, SDPBackend.MATH)
    assert _relative(logits_eff, logits_math) < 0.03, "forward differs beyond bf16 rounding"
    for g_eff, g_math in zip(grads_eff, grads_math, strict=True):
        assert g_math.abs().sum() > 0
        assert _relative(g_eff, g_math) < 0.05, "life-module gradient differs beyond bf16 rounding"
    with torch.no_grad(), sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), torch.autocast("cuda", torch.bfloat16):
        model.eval()
        weights = torch.zeros(model.depth - model.schedule.first_block, 8, model.num_patches, device=CUDA)
        weights[:, :, model.num_patches // 2:] = float("-inf")  # an inference mask that removes half the keys
        masked = model.forward_weighted(images, weights).float()
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), torch.autocast("cuda", torch.bfloat16):
        reference = model.forward_weighted(images, weights).float()
    assert _relative(masked, reference) < 0.03


@pytest.mark.parametrize("n", sorted(MODELS))
def test_stage1_steps_with_the_backbone_frozen(n: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two optimiser steps of stage 1 through ``run_stage`` (bf16 autocast, default kernels): only the
    life module moves."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16 support")
    model, images = _model(n)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--synthetic", "--device", "cuda", "--amp", "bf16", "--batch-size", "8",
                         "--out", str(tmp_path), "--distill", "0"])
    ctx = TrainContext(args)

    class Batches:  # the split interface run_stage reads: len() and batches(...)
        def __len__(self) -> int:
            return 16

        def batches(self, size: int, shuffle: bool = False, seed: int = 0, start: int = 0):  # type: ignore[no-untyped-def]
            for _ in range(start, 2):
                yield images.cpu(), torch.arange(8) % 6

    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = RunState()
    assert run_stage(model, Stage(1, "life", 2, 1e-2), Batches(), state, args, ctx)  # type: ignore[arg-type]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("life.") for k in changed)
    assert torch.isfinite(torch.tensor(state.history[-1]["final_loss"]))
