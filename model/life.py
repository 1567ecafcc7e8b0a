"""The life regression step: one bilinear score per patch token, turned into lives in layer units.

Shapes: ``B`` images, ``P`` patch tokens, ``C`` channels, ``S`` pruning stages.

    score_i = LN(x_i)^T W LN(c)                       x_i: patch token, c: class token (after block K)
    life_i  = a monotone map of score_i into [K, L]    (L = depth; token i runs in block l iff l < life_i)

The map depends on the normalisation mode:
  * training (paper): standardise scores per image, rescale to the mean/std of the schedule's ideal
    life distribution (differentiable, so ``W`` learns through soft keep masks);
  * ``per_image`` inference: thresholds at this image's own order statistics, so every image keeps
    exactly the schedule's counts (static shapes, the paper's inference);
  * ``calibrated`` inference: thresholds at quantiles of scores pooled over a calibration set, so an
    image with much background keeps fewer tokens than a busy one, and the *average* budget over
    the calibration data equals the schedule.
Both inference maps are piecewise linear through (threshold_s, stage_start_s), so
``life_i > stage_start_s  <=>  score_i > threshold_s`` and the heatmap agrees with what was pruned.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .budget import PARAM_NAMES as BUDGET_PARAMS
from .schedule import KeepSchedule, constant_like

Normalization = Literal["per_image", "calibrated"]
NUM_QUANTILES = 1025
NUM_SAMPLE_IMAGES = 512  # per-image score vectors kept from calibration (the budget distribution)


class LifeRegression(nn.Module):
    """Scores patch tokens against the class token with one bilinear form.

    Args:
        dim: token width ``C``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        # Start as a scaled dot product between normalised tokens: a sensible "similar to the class
        # token" prior, which stage 1 then refines.
        self.weight = nn.Parameter(torch.eye(dim) / dim**0.5)
        # Quantiles of raw scores over a calibration set (calibrated mode); empty until calibrated.
        self.register_buffer("score_quantiles", torch.zeros(0), persistent=True)
        # A sample of calibration images' scores ``[N, P]``, each row sorted descending: what a
        # server needs to know how budgets spread over images (its bucket grid); empty if unknown.
        self.register_buffer("score_samples", torch.zeros(0), persistent=True)
        # The budget predictor (``model/budget.py``), fitted after calibration; empty: none, and
        # calibrated budgets come from the pooled thresholds alone.
        for name in BUDGET_PARAMS:
            self.register_buffer(name, torch.zeros(0), persistent=True)
        self.budget_plans: dict[tuple, tuple[float, torch.Tensor, torch.Tensor]] = {}  # per schedule and device

    # buffers whose size depends on calibration and fitting (empty until then)
    SIZED_BUFFERS = ("score_quantiles", "score_samples", *BUDGET_PARAMS)

    def take_sized_buffers(self, state: dict[str, torch.Tensor], prefix: str = "life.") -> None:
        """Resize the calibration buffers to ``state``'s (a saved ``state_dict``), so a strict
        ``load_state_dict`` fits; a buffer the state lacks (an older checkpoint) becomes empty."""
        for name in self.SIZED_BUFFERS:
            value = state.setdefault(prefix + name, torch.zeros(0))
            setattr(self, name, value.clone())
        self.budget_plans = {}

    @property
    def has_budget_predictor(self) -> bool:
        weights: torch.Tensor = getattr(self, BUDGET_PARAMS[2])  # registered by name: mypy cannot see it
        return weights.numel() > 0 and self.score_samples.numel() > 0

    def budget_params(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in BUDGET_PARAMS)

    def set_budget_params(self, params: dict[str, torch.Tensor]) -> None:
        for name in BUDGET_PARAMS:
            setattr(self, name, params[name].detach().float().to(self.weight.device))
        self.budget_plans = {}

    def forward(self, patches: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """``patches [B, P, C]``, ``cls [B, C]`` -> scores ``[B, P]`` (float32)."""
        x, c = self.norm(patches), self.norm(cls)
        wc = c @ self.weight.T  # [B, C]: W c once per image, then one dot product per patch
        return torch.einsum("bpc,bc->bp", x, wc).float()

    @property
    def is_calibrated(self) -> bool:
        return self.score_quantiles.numel() > 0

    @torch.no_grad()
    def calibrate(self, scores: torch.Tensor) -> None:
        """Store the quantiles of raw scores pooled over a calibration set.

        ``scores [N, P]`` (one row per image) also keeps up to ``NUM_SAMPLE_IMAGES`` rows, evenly
        spaced, as the per-image sample; any other shape only sets the pooled quantiles.
        """
        if scores.dim() == 2 and scores.shape[0] > 0:
            rows = scores.detach().float()[:: max(1, scores.shape[0] // NUM_SAMPLE_IMAGES)][:NUM_SAMPLE_IMAGES]
            self.score_samples = rows.sort(dim=1, descending=True).values.to(self.weight.device)
        flat = scores.detach().float().flatten()
        if flat.numel() < 2:
            raise ValueError("calibration needs at least two scores")
        if flat.numel() > 8_000_000:  # torch.quantile's input limit is 16M; subsample evenly
            flat = flat[:: flat.numel() // 8_000_000 + 1]
        levels = torch.linspace(0, 1, NUM_QUANTILES, device=flat.device)
        self.score_quantiles = torch.quantile(flat, levels).to(self.weight.device)


def soft_lives(scores: torch.Tensor, schedule: KeepSchedule, per_image: bool = True) -> torch.Tensor:
    """Training-time lives (paper): per-image standardised scores rescaled to the ideal lives.

    ``scores [B, P]`` -> ``[B, P]`` in layer units (unclamped, differentiable). With
    ``per_image=False`` the scores are standardised over the whole batch instead, the training
    counterpart of ``calibrated`` inference: raw scores then mean the same in every image.
    """
    ideal = schedule.ideal_lives()  # on the CPU: two Python numbers, no copy to the scores' device
    mean, std = float(ideal.mean()), float(ideal.std())
    dim = 1 if per_image else None
    z = (scores - scores.mean(dim=dim, keepdim=True)) / (scores.std(dim=dim, keepdim=True) + 1e-6)
    return mean + std * z


def soft_keep_weights(lives: torch.Tensor, depth: int, first_block: int, tau: float) -> torch.Tensor:
    """Log keep weights ``log sigmoid(-tau (l - life))`` for blocks ``K..L-1``: ``[L-K, B, P]``."""
    blocks = torch.arange(first_block, depth, device=lives.device, dtype=lives.dtype)
    return F.logsigmoid(-tau * (blocks[:, None, None] - lives[None]))


def per_image_thresholds(scores: torch.Tensor, schedule: KeepSchedule) -> torch.Tensor:
    """Thresholds that keep exactly ``patch_counts[s]`` patches of each image: ``[B, S]``."""
    srt = scores.sort(dim=1, descending=True).values
    below = srt[:, -1:] - 1.0
    padded = torch.cat([srt, below], dim=1)  # index P = "below everything": keep all
    idx = constant_like(schedule.patch_counts, scores, torch.long)
    return (padded[:, idx - 1] + padded[:, idx]) / 2


def thresholds_at_counts(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-image thresholds that keep ``counts [B, S]`` patches of each image: ``[B, S]``."""
    srt = scores.sort(dim=1, descending=True).values
    padded = torch.cat([srt, srt[:, -1:] - 1.0], dim=1)  # index P = "below everything": keep all
    idx = counts.long().clamp(1, scores.shape[1])
    return (padded.gather(1, idx - 1) + padded.gather(1, idx)) / 2


def calibrated_thresholds(quantiles: torch.Tensor, schedule: KeepSchedule) -> torch.Tensor:
    """Dataset-level thresholds: the score quantile at level ``1 - p_s / P``: ``[S]``."""
    q = quantiles.float()
    levels = 1.0 - constant_like(schedule.patch_counts, q) / schedule.num_patches  # on q's device
    pos = levels * (q.numel() - 1)
    lo = pos.floor().long().clamp(max=q.numel() - 1)
    hi = (lo + 1).clamp(max=q.numel() - 1)
    frac = pos - lo.float()
    t = q[lo] + (q[hi] - q[lo]) * frac
    # keep_rate 1: level 0 must keep even the smallest calibration score
    return torch.where(levels <= 0, q[0] - 1.0, t)


def lives_from_thresholds(scores: torch.Tensor, thresholds: torch.Tensor, top: torch.Tensor,
                          schedule: KeepSchedule) -> torch.Tensor:
    """Piecewise-linear lives through the knots (threshold_s, start_s) and (top, L).

    Args:
        scores: ``[B, P]``; thresholds: ``[B, S]`` or ``[S]``; top: ``[B]`` or scalar, the score
            mapped to life ``L`` (larger scores are clamped).
    Returns:
        ``[B, P]`` lives in ``[K, L]`` with ``life > start_s`` exactly when ``score > threshold_s``.
    """
    B = scores.shape[0]
    t = thresholds.expand(B, -1) if thresholds.dim() == 1 else thresholds
    top = torch.as_tensor(top, device=scores.device, dtype=scores.dtype).expand(B)
    knots_x = torch.cat([t, torch.maximum(top, t[:, -1] + 1e-6)[:, None]], dim=1)  # [B, S+1]
    knots_y = constant_like([*schedule.stage_starts, schedule.depth], scores)
    lives = torch.full_like(scores, float(schedule.stage_starts[0]))
    for j in range(knots_x.shape[1] - 1):
        x0, x1 = knots_x[:, j : j + 1], knots_x[:, j + 1 : j + 2]
        width = x1 - x0
        ramp = ((scores - x0) / width.clamp(min=1e-12)).clamp(0, 1)
        step = (scores > x0).to(scores.dtype)  # zero-width segment (equal counts): a jump
        frac = torch.where(width > 0, ramp, step)
        lives = lives + (knots_y[j + 1] - knots_y[j]) * frac
    return lives


def inference_lives(scores: torch.Tensor, schedule: KeepSchedule, mode: Normalization,
                    quantiles: torch.Tensor | None = None) -> torch.Tensor:
    """Lives for serving/inference in either normalisation mode: ``[B, P]``."""
    if mode == "per_image":
        return lives_from_thresholds(scores, per_image_thresholds(scores, schedule),
                                     scores.max(dim=1).values, schedule)
    if mode == "calibrated":
        if quantiles is None or quantiles.numel() == 0:
            raise ValueError("calibrated normalisation needs calibration: run LifeViT.calibrate first")
        return lives_from_thresholds(scores, calibrated_thresholds(quantiles, schedule),
                                     quantiles[-1], schedule)
    raise ValueError(f"unknown normalisation {mode!r}: use 'per_image' or 'calibrated'")
