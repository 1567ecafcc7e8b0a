import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import create_lifevit, dense_gflops, slimmed_gflops


def _counted_gmacs(fn) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 2e9  # the counter counts 2 FLOPs per multiply-accumulate


@pytest.mark.parametrize("name,kwargs", [("deit_small_patch16_224", {}), ("vit_micro_patch8_64", {}),
                                         ("vit_tiny_patch16_224", {"img_size": 96, "reg_tokens": 4})])
def test_dense_and_slimmed_flops_match_torch_flop_counter(name, kwargs):
    model = create_lifevit(name, 0.7, num_classes=10, **kwargs).eval()
    for blk in model.backbone.blocks:  # the counter does not see inside the CPU flash-attention kernel
        blk.attn.fused_attn = False
    h, w = model.backbone.patch_embed.img_size
    x = torch.randn(1, 3, h, w)
    dense = _counted_gmacs(lambda: model.backbone(x))
    assert abs(dense_gflops(model.backbone) - dense) / dense <= 0.02
    slim = _counted_gmacs(lambda: model(x))
    assert abs(slimmed_gflops(model.backbone, model.schedule) - slim) / slim <= 0.02


def test_deit_small_costs_match_published_figures():
    model = create_lifevit("deit_small_patch16_224", 0.7)
    assert dense_gflops(model.backbone) == pytest.approx(4.6, abs=0.05)  # DeiT paper
    got = {r: slimmed_gflops(model.backbone, model.schedule_for(r)) for r in (0.7, 0.8, 0.9)}
    assert got[0.7] == pytest.approx(3.2, abs=0.05)  # same counts as EViT at keep 0.7 (3.0 + head/embed)
    assert got[0.7] < got[0.8] < got[0.9] < dense_gflops(model.backbone)
