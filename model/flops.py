"""Analytic cost of a ViT forward as a function of the tokens each block sees.

Reported in GFLOPs with the convention of DeiT, DynamicViT, EViT and ToMe tables: one
multiply-accumulate counts as one FLOP (DeiT-S = 4.6 "GFLOPs"). ``torch.utils.flop_counter``
counts 2 per MAC; the tests compare against it with that factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .schedule import KeepSchedule


def _linear_macs_per_token(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def block_macs(block: Any, tokens: int) -> int:  # a timm Block (attributes are dynamic)
    """One transformer block on ``tokens`` tokens: every Linear per token + QK^T and AV."""
    attn = block.attn
    attn_dim = int(attn.qkv.out_features) // 3
    return tokens * _linear_macs_per_token(block) + 2 * tokens * tokens * attn_dim


def vit_macs(backbone: VisionTransformer, tokens_per_block: Sequence[int], life_module: bool = False) -> int:
    """Whole forward: patch embedding, the blocks, the classifier; optionally the life module."""
    pe = backbone.patch_embed
    conv = pe.proj
    patches = pe.num_patches
    macs = patches * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    macs += sum(block_macs(b, n) for b, n in zip(backbone.blocks, tokens_per_block, strict=True))
    if isinstance(backbone.head, nn.Linear):
        macs += backbone.head.in_features * backbone.head.out_features
    if life_module:
        dim = backbone.embed_dim
        macs += dim * dim + patches * dim  # W c once, then one dot product per patch
    return macs


def tokens_per_block(backbone: VisionTransformer, schedule: KeepSchedule,
                     patch_counts: Sequence[int] | None = None) -> list[int]:
    """Tokens each block sees when stage ``s`` keeps ``patch_counts[s]`` patches (+ prefix)."""
    counts = schedule.patch_counts if patch_counts is None else patch_counts
    prefix, full = backbone.num_prefix_tokens, schedule.num_patches
    out = []
    for i in range(len(backbone.blocks)):
        stage = schedule.stage_of_block(i)
        out.append(prefix + (full if stage is None else int(counts[stage])))
    return out


def dense_gflops(backbone: VisionTransformer) -> float:
    n = backbone.num_prefix_tokens + backbone.patch_embed.num_patches
    return vit_macs(backbone, [n] * len(backbone.blocks)) / 1e9


def slimmed_gflops(backbone: VisionTransformer, schedule: KeepSchedule,
                   patch_counts: Sequence[int] | None = None, life_module: bool = True) -> float:
    """Cost of LifeViT at a schedule, or at one image's budget (``patch_counts``)."""
    return vit_macs(backbone, tokens_per_block(backbone, schedule, patch_counts), life_module) / 1e9
