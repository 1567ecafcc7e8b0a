"""LifeViT: a timm VisionTransformer whose blocks after ``K`` run on shorter, life-sorted sequences.

The backbone's own modules do all the work (patch embedding, blocks with LayerScale, q/k norms and
fused attention, final norm, pooling and head); this module only decides which tokens each block
sees. Two halves, so a server can batch them differently:

    state  = model.head(images)            # blocks 0..K-1, life scores, tokens sorted by life
    logits = model.tail(state.tokens, counts)  # blocks K..L-1, stage s sees prefix + counts[s] tokens

Training uses ``forward_soft``: no token removed, keep weights enter every attention from ``K`` on
as a weighted softmax, i.e. ``softmax(a + log w)``, which timm's blocks accept as an additive mask.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .budget import allocate, ladder_counts, need_cdf, solve_lambda, tail_cost
from .defaults import GRID_KEEP_RATES, GRID_SIZE, GRID_STEP
from .life import (
    LifeRegression,
    Normalization,
    calibrated_thresholds,
    inference_lives,
    lives_from_thresholds,
    soft_keep_weights,
    soft_lives,
    thresholds_at_counts,
)
from .schedule import BucketGrid, Counts, KeepSchedule, budgets_from_lives, constant_like, host_to_device


@dataclass
class HeadState:
    """What the head hands to the tail.

    tokens: ``[B, T+P, C]`` prefix tokens first, then patches by descending score (= life).
    scores: ``[B, P]`` raw life scores in patch-grid order.
    """

    tokens: torch.Tensor
    scores: torch.Tensor

    def select(self, index: torch.Tensor | Sequence[int]) -> HeadState:
        return HeadState(self.tokens[index], self.scores[index])


def attention_pad(n: int, device: torch.device) -> int:
    """Masked tokens to append to a length-``n`` sequence before an attention with an additive mask.

    On CUDA the sequence goes to a multiple of 8, the memory-efficient SDPA kernel's alignment: its
    output with a bf16 mask has been reported wrong for key lengths 1 mod 32 (pytorch#191937; 65, the
    8x8-patch 64-px models, is one), and an unaligned mask is padded and copied by the kernel in every
    block anyway. Elsewhere no padding, so CPU runs keep their exact numbers.
    """
    return -n % 8 if device.type == "cuda" else 0


def masked_attention_input(x: torch.Tensor, mask_needs_grad: bool) -> tuple[torch.Tensor, int]:
    """``x [B, N, C]`` made safe for timm's blocks with an additive ``attn_mask``: ``(x', pad)``.

    ``x'`` has ``pad`` zero tokens appended (``attention_pad``; the caller masks them as keys and drops
    them after the blocks). When only the mask needs a gradient (stage 1: the backbone frozen, the life
    module trained), ``x'`` is given one too: with no gradient for query, key or value, CUDA's
    memory-efficient SDPA keeps no log-sum-exp for the backward and fails in it ("LSE is not correctly
    aligned", pytorch#148476), at any sequence length. The extra gradient is thrown away; on the CPU
    it changes no number of the life module's.
    """
    pad = attention_pad(x.shape[1], x.device)
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    if mask_needs_grad and torch.is_grad_enabled() and not x.requires_grad:
        x = x.detach().requires_grad_(True)
    return x, pad


class LifeViT(nn.Module):
    """Life-regression patch slimming around a timm ``VisionTransformer``.

    Args:
        backbone: a timm ViT/DeiT with a class token.
        schedule: the default keep schedule (``KeepSchedule.from_keep_rate``).
        normalization: ``per_image`` (paper: fixed counts) or ``calibrated`` (content-adaptive).
        backbone_name, backbone_kwargs: how ``create_backbone`` rebuilds the backbone (a checkpoint
            records them); None for a backbone given as an instance.
    """

    def __init__(self, backbone: VisionTransformer, schedule: KeepSchedule,
                 normalization: Normalization = "per_image", backbone_name: str | None = None,
                 backbone_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"LifeViT wraps timm VisionTransformer models, got {type(backbone).__name__}")
        if not getattr(backbone, "has_class_token", backbone.cls_token is not None):
            raise ValueError("life regression scores patches against the class token: "
                             "the backbone has none (class_token=False)")
        depth, patches = len(backbone.blocks), backbone.patch_embed.num_patches
        if schedule.depth != depth or schedule.num_patches != patches:
            raise ValueError(f"schedule is for {schedule.depth} blocks / {schedule.num_patches} patches, "
                             f"the backbone has {depth} / {patches}")
        self.backbone = backbone
        self.life = LifeRegression(backbone.embed_dim)
        self.schedule = schedule
        self.normalization: Normalization = normalization
        self.num_prefix_tokens: int = backbone.num_prefix_tokens
        self.backbone_name = backbone_name
        self.backbone_kwargs: dict[str, Any] = dict(backbone_kwargs or {})

    # -- schedules -------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    @property
    def num_patches(self) -> int:
        return self.schedule.num_patches

    def schedule_for(self, keep_rate: float | None) -> KeepSchedule:
        """The default schedule, or the same stages at another keep rate (per-request knob)."""
        if keep_rate is None:
            return self.schedule
        return KeepSchedule.from_keep_rate(keep_rate, self.num_patches, self.depth,
                                           self.schedule.stage_starts)

    def at(self, schedule: KeepSchedule | None = None, normalization: Normalization | None = None) -> LifeViT:
        """This model (the same modules and weights, shared) with another schedule of the same stages
        and/or normalisation; the model itself is left as it is."""
        view = copy.copy(self)  # a shallow copy shares the parameter, buffer and module dicts
        view.schedule = schedule or self.schedule
        view.normalization = normalization or self.normalization
        return view

    # -- two halves --------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> tokens ``[B, T+P, C]`` exactly as timm's ``forward_features`` starts."""
        bb = self.backbone
        x = bb.patch_embed(images)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        return bb.norm_pre(x)

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        t = self.num_prefix_tokens
        return self.life(x[:, t:], x[:, 0])

    def head(self, images: torch.Tensor) -> HeadState:
        """Blocks ``0..K-1`` and the life module; tokens sorted once by life (prefix first)."""
        x = self.first_blocks(images)
        scores = self._scores(x)
        order = scores.argsort(dim=1, descending=True, stable=True)
        t = self.num_prefix_tokens
        patches = torch.gather(x[:, t:], 1, order[..., None].expand(-1, -1, x.shape[-1]))
        return HeadState(torch.cat([x[:, :t], patches], dim=1), scores)

    def tail(self, tokens: torch.Tensor, patch_counts: Sequence[int]) -> torch.Tensor:
        """Blocks ``K..L-1`` on ``tokens [B, T+P', C]`` (prefix first, patches in keep order, at
        least ``patch_counts[0]`` of them): stage ``s`` sees the first ``prefix + patch_counts[s]``."""
        x, t, starts = tokens, self.num_prefix_tokens, self.schedule.stage_starts
        if len(patch_counts) != len(starts):
            raise ValueError(f"need {len(starts)} stage counts, got {len(patch_counts)}")
        stage = 0
        for i in range(starts[0], self.depth):
            while stage + 1 < len(starts) and i >= starts[stage + 1]:
                stage += 1
            x = x[:, : t + int(patch_counts[stage])]  # a slice: no scoring, no gather
            x = self.backbone.blocks[i](x)
        return self.backbone.forward_head(self.backbone.norm(x))

    # -- lives and budgets -------------------------------------------------------------------
    def lives(self, scores: torch.Tensor, schedule: KeepSchedule | None = None) -> torch.Tensor:
        """Inference lives ``[B, P]`` in layer units, in patch-grid order.

        Calibrated with a budget predictor (``model/budget.py``): each image's lives cross the stage
        starts at its predicted budget, so ``budgets`` reads that budget back from them."""
        schedule = schedule or self.schedule
        if self.normalization == "calibrated" and self.life.has_budget_predictor:
            counts = self.predicted_budgets(scores, schedule)
            return lives_from_thresholds(scores, thresholds_at_counts(scores, counts),
                                         scores.max(dim=1).values, schedule)
        return inference_lives(scores, schedule or self.schedule, self.normalization,
                               self.life.score_quantiles)

    def budgets(self, scores: torch.Tensor, schedule: KeepSchedule | None = None,
                lives: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image patch counts per stage ``[B, S]`` (the schedule's in ``per_image`` mode).

        ``lives``: ``self.lives(scores, schedule)`` if the caller has it already.
        """
        schedule = schedule or self.schedule
        if self.normalization == "per_image":
            return constant_like(schedule.patch_counts, scores, torch.long).expand(scores.shape[0], -1)
        return budgets_from_lives(self.lives(scores, schedule) if lives is None else lives, schedule)

    def predicted_budgets(self, scores: torch.Tensor, schedule: KeepSchedule | None = None) -> torch.Tensor:
        """The budget predictor's per-image counts ``[B, S]`` int64: each image's ladder rate by need,
        at the schedule's mean tail cost over the calibration sample (see ``model/budget.py``)."""
        schedule = schedule or self.schedule
        lam, costs, table = self._budget_plan(schedule, scores.device)
        cdf = need_cdf(scores, self.life.budget_params())
        return table[allocate(cdf, costs, lam)]

    def _budget_plan(self, schedule: KeepSchedule, device: torch.device) -> tuple[float, torch.Tensor, torch.Tensor]:
        """``(lambda, ladder costs [R], ladder counts [R, S])`` for a schedule, solved once per schedule
        and device (a server's first calls: the host waits for the solve, never inside a graph)."""
        key = (schedule.patch_counts, schedule.stage_starts, str(device))
        plan = self.life.budget_plans.get(key)
        if plan is None:
            counts = ladder_counts(schedule)
            costs = torch.tensor([tail_cost(schedule, c) for c in counts])
            sample_cdf = need_cdf(self.life.score_samples, self.life.budget_params()).cpu()
            lam = solve_lambda(sample_cdf, costs, tail_cost(schedule, schedule.patch_counts))
            plan = (lam, host_to_device(costs, device), host_to_device(torch.tensor(counts), device))
            self.life.budget_plans[key] = plan
        return plan

    def budget_sample(self, schedule: KeepSchedule | None = None) -> torch.Tensor:
        """Budgets ``[N, S]`` the calibration images would get at ``schedule`` (empty if unknown).

        ``per_image``: the schedule's counts (one row). ``calibrated``: from the stored per-image
        score sample, since ``life > start_s`` exactly when ``score > threshold_s``.
        """
        schedule = schedule or self.schedule
        if self.normalization == "per_image":
            return torch.tensor([schedule.patch_counts])
        samples = self.life.score_samples
        if samples.numel() == 0:
            return torch.zeros(0, len(schedule.patch_counts), dtype=torch.long)
        if self.life.has_budget_predictor:
            return self.predicted_budgets(samples, schedule).cpu()
        t = calibrated_thresholds(self.life.score_quantiles, schedule)
        return (samples[:, :, None] > t).sum(dim=1).clamp(min=1).cpu()

    def bucket_grid(self, size: int = GRID_SIZE, keep_rates: Sequence[float] = GRID_KEEP_RATES, step: int = GRID_STEP,
                    default: KeepSchedule | None = None) -> BucketGrid:
        """The budgets a server (and ``patchlife eval``) runs the tail at: ``size`` points fitted to the
        calibration sample's budgets at ``default`` (the model's schedule) and at ``keep_rates``; a
        per-stage ``step`` for calibrated checkpoints stored without a sample."""
        schedules = [default or self.schedule, *(self.schedule_for(r) for r in keep_rates)]
        sample = torch.cat([self.budget_sample(s) for s in schedules])
        if sample.numel() == 0:
            return BucketGrid.stepped(self.schedule, step)
        return BucketGrid.fitted(sample, self.schedule, size)

    # -- whole forwards ----------------------------------------------------------------------
    def forward(self, images: torch.Tensor, schedule: KeepSchedule | None = None,
                grid: BucketGrid | int = 1) -> torch.Tensor:
        """Hard-pruned inference. Images run at their own budget, rounded up to ``grid`` (a bucket
        grid, or a per-stage step)."""
        state = self.head(images)
        if self.normalization == "per_image":  # every image has the schedule's counts: one batch
            return self.tail(state.tokens, (schedule or self.schedule).patch_counts)
        return self.tail_grouped(state, self.budgets(state.scores, schedule), grid)

    def tail_grouped(self, state: HeadState, budgets: torch.Tensor, grid: BucketGrid | int = 1) -> torch.Tensor:
        """The tail once per bucket (``budgets [B, S]`` rounded up to ``grid``), logits ``[B, K]`` in input order."""
        grid = grid if isinstance(grid, BucketGrid) else BucketGrid.stepped(self.schedule, grid)
        buckets = grid.round_up_rows(budgets.cpu())
        return by_bucket(buckets, lambda index, counts: self.tail(state.tokens[index], counts), state.tokens.device)

    def forward_dense(self, images: torch.Tensor) -> torch.Tensor:
        """The unpruned backbone, through timm's own forward."""
        return self.backbone(images)

    def forward_weighted(self, images: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
        """Masked path: no token removed; block ``K+j`` weights key ``i`` by ``exp(log_weights[j, :, i])``.

        ``log_weights [L-K, B, P]`` in patch-grid order; ``-inf`` removes a key, 0 keeps it.
        """
        return self._weighted_tail(self.first_blocks(images), log_weights)

    def forward_soft(self, images: torch.Tensor, tau: float,
                     per_image: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage-1 training forward: ``(logits, training lives [B, P])``; see ``soft_lives``."""
        x = self.first_blocks(images)
        lives = soft_lives(self._scores(x), self.schedule, per_image)
        weights = soft_keep_weights(lives, self.depth, self.schedule.first_block, tau)
        return self._weighted_tail(x, weights), lives

    def first_blocks(self, images: torch.Tensor) -> torch.Tensor:
        """Embedding and blocks ``0..K-1``: ``[B, T+P, C]`` tokens in patch-grid order."""
        x = self.embed(images)
        for blk in self.backbone.blocks[: self.schedule.first_block]:
            x = blk(x)
        return x

    def _weighted_tail(self, x: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        x, pad = masked_attention_input(x, log_weights.requires_grad)
        prefix = log_weights.new_zeros(x.shape[0], self.num_prefix_tokens)
        hidden = log_weights.new_full((x.shape[0], pad), float("-inf"))  # padding is never a key
        for j, blk in enumerate(self.backbone.blocks[self.schedule.first_block :]):
            bias = torch.cat([prefix, log_weights[j], hidden], dim=1).to(x.dtype)
            x = blk(x, attn_mask=bias[:, None, None, :])  # [B, 1, 1, N]: same for every head/query
        return self.backbone.forward_head(self.backbone.norm(x[:, :n]))

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Set dataset-level score statistics from calibration images and switch to ``calibrated``."""
        batches = [images] if isinstance(images, torch.Tensor) else list(images)
        scores = torch.cat([self.head(b).scores for b in batches])
        self.life.calibrate(scores)
        self.normalization = "calibrated"


def by_bucket(buckets: torch.Tensor, tail: Callable[[torch.Tensor, Counts], torch.Tensor],
              device: torch.device) -> torch.Tensor:
    """Head, bucket, tail's last two steps, written once: ``tail(index, counts)`` for each distinct row
    ``counts`` of ``buckets`` (int64 ``[B, S]`` on the host), ``index`` the int64 rows holding it (on
    ``device``, ascending); each answer ``[n, K]`` goes back to its rows of the result ``[B, K]``.

    ``LifeViT.tail_grouped`` and the served engine's ``tail_by_bucket`` both run through it. The groups
    come from a few tensor ops and one copy to ``device``, never a loop over images.
    """
    keys, inverse = torch.unique(buckets, dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    sizes = torch.bincount(inverse, minlength=keys.shape[0]).tolist()
    order_dev = host_to_device(order, device)
    out: torch.Tensor | None = None
    offset = 0
    for counts, size in zip(keys.tolist(), sizes, strict=True):
        index = order_dev[offset:offset + size]
        answer = tail(index, tuple(counts))
        if out is None:
            out = answer.new_empty(buckets.shape[0], answer.shape[-1])
        out.index_copy_(0, index, answer)
        offset += size
    if out is None:
        raise ValueError("no rows to run")
    return out
