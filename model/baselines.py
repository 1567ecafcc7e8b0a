"""Other ways to choose which tokens live, at the same per-stage counts as a LifeViT.

All run the LifeViT's own backbone blocks; they differ only in *which* patches survive:
  * ``oracle``: the first patches in raster order, no scoring at all. Not a sensible model, but the
    cost lower bound of any method that keeps these counts: pure truncation.
  * ``random``: a random order, fixed after block ``K``: what a life module that learned nothing gives.
  * ``topk`` (EViT-style): at each stage start, keep the patches the class token attended to most
    in the block before (mean over heads), then continue with the survivors. Scoring and a gather
    happen at every stage, which is the cost life regression avoids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .lifevit import LifeViT


def _tail_in_order(model: LifeViT, x: torch.Tensor, order: torch.Tensor,
                   patch_counts: Sequence[int]) -> torch.Tensor:
    """Reorder patches of ``x [B, T+P, C]`` by ``order [B, P]`` and run the sliced tail."""
    t = model.num_prefix_tokens
    patches = torch.gather(x[:, t:], 1, order[..., None].expand(-1, -1, x.shape[-1]))
    return model.tail(torch.cat([x[:, :t], patches], dim=1), patch_counts)


def oracle_forward(model: LifeViT, images: torch.Tensor, patch_counts: Sequence[int]) -> torch.Tensor:
    """Truncation without any scoring: stage ``s`` keeps the first ``patch_counts[s]`` patches."""
    x = model.first_blocks(images)
    return model.tail(x, patch_counts)


def random_forward(model: LifeViT, images: torch.Tensor, patch_counts: Sequence[int],
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A random survival order per image (drawn on the CPU for reproducibility)."""
    x = model.first_blocks(images)
    b, p = x.shape[0], x.shape[1] - model.num_prefix_tokens
    order = torch.rand(b, p, generator=generator).argsort(dim=1).to(x.device)
    return _tail_in_order(model, x, order, patch_counts)


class _ClsAttention:
    """Captures q and k of one timm Attention through forward hooks on its q_norm/k_norm, so the
    block itself runs unchanged (fused attention included) and the class-token row is recomputed
    cheaply: one query against all keys."""

    def __init__(self, attn: Any) -> None:  # a timm Attention
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self.scale = attn.scale
        self._handles = [attn.q_norm.register_forward_hook(self._grab("q")),
                         attn.k_norm.register_forward_hook(self._grab("k"))]

    def _grab(self, name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _inp: object, out: torch.Tensor) -> None:
            setattr(self, name, out[:, :, :1] if name == "q" else out)  # q: class-token row only
        return hook

    def cls_scores(self, num_prefix: int) -> torch.Tensor:
        """Mean over heads of the class token's attention to each patch: ``[B, P]``."""
        assert self.q is not None and self.k is not None
        attn = (self.q * self.scale) @ self.k.transpose(-2, -1)  # [B, H, 1, N]
        return attn.softmax(dim=-1).mean(dim=1)[:, 0, num_prefix:]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def topk_forward(model: LifeViT, images: torch.Tensor, patch_counts: Sequence[int]) -> torch.Tensor:
    """EViT-style token choice by class-token attention at every stage start."""
    starts, t = model.schedule.stage_starts, model.num_prefix_tokens
    blocks = model.backbone.blocks
    probes = {s - 1: _ClsAttention(blocks[s - 1].attn) for s in starts}  # type: ignore[union-attr]
    try:
        x = model.embed(images)
        for i, blk in enumerate(blocks):
            if i in starts:
                n = int(patch_counts[starts.index(i)])
                scores = probes[i - 1].cls_scores(t)
                keep = scores.topk(n, dim=1, sorted=False).indices  # [B, n]
                patches = torch.gather(x[:, t:], 1, keep[..., None].expand(-1, -1, x.shape[-1]))
                x = torch.cat([x[:, :t], patches], dim=1)
            x = blk(x)
        return model.backbone.forward_head(model.backbone.norm(x))
    finally:
        for p in probes.values():
            p.remove()
