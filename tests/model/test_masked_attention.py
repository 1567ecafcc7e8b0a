"""Guards, on the CPU, for the ways CUDA's fused attention fails on the masked (weighted) paths.

Stage 1 trains the life module alone, so in the first weighted block the gradient reaches the
attention only through its additive mask. With no gradient for query, key or value, CUDA's
memory-efficient SDPA keeps no log-sum-exp for the backward and raises "LSE is not correctly aligned
(strideH)" there (first seen on an H200; pytorch#148476), unless the sequence length happens to suit
it. CI has no GPU, so ``test_no_attention_call_leaves_only_the_mask_with_a_gradient`` wraps
``F.scaled_dot_product_attention`` during a real training step of every path that passes a mask and
fails on any call that would take that route on CUDA.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from model import create_lifevit
from model import lifevit as lifevit_module
from model.lifevit import LifeViT
from model.training.train import Stage, StageRunner, add_arguments, trainable_parameters


@dataclass
class Call:
    mask_grad: bool
    qkv_grad: bool
    length: int
    mem_efficient_may_run: bool

    @property
    def fails_on_cuda(self) -> bool:
        return self.mask_grad and not self.qkv_grad and self.length % 8 != 0 and self.mem_efficient_may_run


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Call]]:
    """Every ``F.scaled_dot_product_attention`` call with a mask (timm's fused attention calls it through ``F``)."""
    calls: list[Call] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        if attn_mask is not None:
            calls.append(Call(mask_grad=attn_mask.requires_grad,
                              qkv_grad=any(t.requires_grad for t in (q, k, v)),
                              length=k.shape[-2],
                              # what an sdpa_kernel(...) context left enabled (the CPU ignores the flag)
                              mem_efficient_may_run=torch.backends.cuda.mem_efficient_sdp_enabled()))
        return real(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    yield calls


def _args(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--synthetic", "--backbone", "vit_nano_patch8_32", *extra])


def _model() -> LifeViT:
    torch.manual_seed(0)
    return create_lifevit("vit_nano_patch8_32", 0.7, num_classes=5)  # 16 patches: N = 17, not a multiple of 8


def _life_step(model: LifeViT, step: callable) -> dict[str, torch.Tensor]:  # type: ignore[valid-type]
    """One stage-1 backward (the backbone frozen): the life module's gradients."""
    params = trainable_parameters(model, "life")
    model.train()
    step().backward()
    grads = {n: p.grad.clone() for n, p in model.life.named_parameters() if p.grad is not None}
    assert len(grads) == len(params) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    return grads


@pytest.mark.parametrize("stage1_norm", ["per_image", "batch"])
def test_no_attention_call_leaves_only_the_mask_with_a_gradient(sdpa_calls: list[Call], stage1_norm: str) -> None:
    """Stage 1 through the trainer's own forward and loss, and the masked baseline path with trainable weights."""
    model = _model()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    runner = StageRunner(model, Stage(1, "life", 1, 1e-3), _args("--stage1-norm", stage1_norm), None)
    _life_step(model, lambda: runner.loss(images, runner.forward(images, 0)[0], labels))
    weights = torch.zeros(model.depth - model.schedule.first_block, 4, model.num_patches, requires_grad=True)
    model.requires_grad_(False)
    model.forward_weighted(images, weights).sum().backward()
    assert weights.grad is not None
    assert len(sdpa_calls) >= 2 * (model.depth - model.schedule.first_block), "the spy saw no masked attention"
    bad = [c for c in sdpa_calls if c.fails_on_cuda]
    assert not bad, (f"{len(bad)} masked attention calls would fail in CUDA's memory-efficient backward: "
                     f"only the mask needs a gradient at sequence length {bad[0].length}")


def test_the_fix_changes_no_number_of_the_life_module() -> None:
    """Giving the first weighted block's input a gradient only adds work: the life module's gradients are
    the same bit for bit (so a CPU run of ``ensure-default`` still reproduces the shipped weights)."""
    model, images = _model(), torch.randn(4, 3, 32, 32)
    fixed = _life_step(model, lambda: model.forward_soft(images, 4.0)[0].square().mean())
    model.zero_grad(set_to_none=True)
    original = lifevit_module.masked_attention_input
    try:  # today's input as it was before the fix: no gradient, no padding
        lifevit_module.masked_attention_input = lambda x, _grad: (x, 0)  # type: ignore[assignment]
        before = _life_step(model, lambda: model.forward_soft(images, 4.0)[0].square().mean())
    finally:
        lifevit_module.masked_attention_input = original  # type: ignore[assignment]
    assert fixed.keys() == before.keys()
    assert all(torch.equal(fixed[k], before[k]) for k in fixed)


def test_cuda_padding_masks_the_extra_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The padding CUDA gets (to a multiple of 8) changes neither the logits nor the life module's
    gradients beyond float rounding: padded tokens are never keys and are dropped before the head."""
    model, images = _model(), torch.randn(4, 3, 32, 32)
    plain = _life_step(model, lambda: model.forward_soft(images, 4.0)[0].square().mean())
    with torch.no_grad():
        logits = model.forward_soft(images, 4.0)[0]
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(lifevit_module, "attention_pad", lambda n, _device: -n % 8)
    x, pad = lifevit_module.masked_attention_input(torch.zeros(2, 17, 3), True)
    assert pad == 7 and x.shape == (2, 24, 3) and x.requires_grad
    padded = _life_step(model, lambda: model.forward_soft(images, 4.0)[0].square().mean())
    with torch.no_grad():
        torch.testing.assert_close(model.forward_soft(images, 4.0)[0], logits, rtol=1e-5, atol=1e-5)
    for k in plain:
        torch.testing.assert_close(padded[k], plain[k], rtol=1e-4, atol=1e-6)


def test_padding_is_for_cuda_only() -> None:
    assert lifevit_module.attention_pad(65, torch.device("cuda")) == 7
    assert lifevit_module.attention_pad(200, torch.device("cuda")) == 0
    assert lifevit_module.attention_pad(65, torch.device("cpu")) == 0
    assert lifevit_module.attention_pad(65, torch.device("meta")) == 0


def test_padded_training_step_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-only padding path has no stray CPU tensor: stage 1 forward and backward on ``meta``
    (see test_meta_device.py) with the padding CUDA gets, in bfloat16."""
    monkeypatch.setattr(lifevit_module, "attention_pad", lambda n, _device: -n % 8)
    model = _model().to(torch.device("meta"), torch.bfloat16)
    trainable_parameters(model, "life")
    logits, lives = model.forward_soft(torch.empty(3, 3, 32, 32, device="meta", dtype=torch.bfloat16), 4.0)
    assert logits.device.type == "meta" and tuple(logits.shape) == (3, 5) and tuple(lives.shape) == (3, 16)
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.life.parameters())
