"""Predicted budgets: per-image keep rates that follow what the image needs, at a schedule's mean cost.

Global thresholds on raw life scores (``calibrated``) give budgets that differ from image to image,
but mostly by how the scores of the whole image shift, not by what it shows (Spearman with the
target patches 0.27-0.29 on the counting task). This module asks instead how many patches *this
image* needs:

* **need**: for a training image, the smallest keep rate of a ladder (:data:`LADDER`) from which the
  model, running its life order at that rate's counts, gives the right answer at every larger rate;
  "never" if it is wrong even dense-ish. Measured on the frozen model (:func:`needs`).
* **predictor**: a small MLP on the image's life scores, sorted (so only their shape counts, not
  where the patches are), gives ``P(need <= r)`` for every ladder rate ``r`` (:func:`need_cdf`).
* **allocation**: each image takes the ladder rate that maximises ``P(need <= r) - lambda * cost(r)``;
  ``lambda`` is solved once per schedule on the calibration sample so that the *mean* tail cost equals
  the schedule's (:func:`solve_lambda`). A Lagrangian: the batch holds the schedule's mean, the
  images spread around it by need.

The result is an ordinary budget (per-stage patch counts, life order unchanged), so buckets, graphs
and the cost model serve it as they serve calibrated budgets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .schedule import KeepSchedule, stage_blocks

LADDER: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0
HIDDEN = 32
# the predictor's weights (LifeRegression buffers, empty until fitted), in the order need_cdf uses them
PARAM_NAMES = ("budget_mean", "budget_std", "budget_w1", "budget_b1", "budget_w2", "budget_b2")


def features(scores: torch.Tensor) -> torch.Tensor:
    """``scores [B, P]`` -> ``[B, P]``: sorted descending (the shape of the image's score profile)."""
    return scores.float().sort(dim=1, descending=True).values


def need_cdf(scores: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``P(need <= LADDER[j])`` for each image: ``[B, len(LADDER)]``, non-decreasing along ``j``."""
    mean, std, w1, b1, w2, b2 = params
    x = (features(scores) - mean) / std
    logits = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)  # last class: "never"
    return logits.softmax(dim=1)[:, : len(LADDER)].cumsum(dim=1)


def ladder_counts(schedule: KeepSchedule) -> list[tuple[int, ...]]:
    """Per-stage patch counts of every ladder rate at the schedule's stages."""
    return [KeepSchedule.from_keep_rate(r, schedule.num_patches, schedule.depth, schedule.stage_starts).patch_counts
            for r in LADDER]


def tail_cost(schedule: KeepSchedule, counts: Sequence[int]) -> float:
    """Patch-block products: the tail's token work (what ``BucketGrid.cost`` counts)."""
    return float(sum(c * w for c, w in zip(counts, stage_blocks(schedule), strict=True)))


def solve_lambda(cdf: torch.Tensor, costs: torch.Tensor, target: float, iters: int = 50) -> float:
    """The price ``lambda >= 0`` at which the images of ``cdf [N, R]`` spend ``target`` on average
    (the largest mean not above it; ``costs [R]``), 0 when the target is the top rate's cost.
    Bisection: the mean cost falls as ``lambda`` rises."""
    def mean_cost(lam: float) -> float:
        return float(costs[(cdf - lam * costs).argmax(dim=1)].mean())

    if target >= float(costs.max()):
        return 0.0  # the top rate for everyone
    lo, hi = 0.0, 1.0
    while mean_cost(hi) > target and hi < 1e6:
        hi *= 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_cost(mid) > target else (lo, mid)
    return hi


def allocate(cdf: torch.Tensor, costs: torch.Tensor, lam: float) -> torch.Tensor:
    """Ladder index per image: ``argmax_j P(need <= r_j) - lam * cost_j`` (``[B]`` int64); with no
    price (a schedule at or above the ladder's top) every image takes the top."""
    if lam <= 0:
        return torch.full(cdf.shape[:1], cdf.shape[1] - 1, dtype=torch.long, device=cdf.device)
    return (cdf - lam * costs).argmax(dim=1)
