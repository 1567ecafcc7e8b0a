"""Fit the budget predictor (``model/budget.py``) on the frozen, calibrated model: ``train --fit-budget N``.

For ``N`` training images: the head once, then the tail at every ladder rate's counts; an image's
*need* is the smallest ladder rate from which every larger rate answers it right ("never" if even the
top rate does not). A small MLP on the sorted life scores then learns ``P(need)`` by cross-entropy.
The backbone and the life module do not change, so the life order, the dense and the fixed-count
answers stay exactly those of the model as it was.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..budget import HIDDEN, LADDER, PARAM_NAMES, features, ladder_counts
from ..lifevit import LifeViT
from .data import DataSplit


@torch.no_grad()
def measure_needs(model: LifeViT, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  with_right: bool = False) -> Any:
    """``(scores [N, P], need [N])``: need is a ladder index, ``len(LADDER)`` for never; with
    ``with_right`` also ``right [N, R]``, whether each ladder rate answered each image right."""
    scores, right = [], []
    counts = ladder_counts(model.schedule)
    for images, labels in batches:
        state = model.head(images)
        scores.append(state.scores.float().cpu())
        answers = {c: model.tail(state.tokens, c).argmax(dim=-1) for c in dict.fromkeys(counts)}
        right.append(torch.stack([answers[c] == labels for c in counts], dim=1).cpu())
    ok = torch.cat(right)                                          # [N, R]
    ok_from = ok.flip(1).int().cumprod(dim=1).flip(1).bool()       # right at r and at every larger rate
    need = torch.where(ok_from.any(dim=1), ok_from.int().argmax(dim=1), torch.tensor(len(LADDER)))
    return (torch.cat(scores), need, ok) if with_right else (torch.cat(scores), need)


def fit_predictor(scores: torch.Tensor, need: torch.Tensor, seed: int = 0, epochs: int = 400,
                  lr: float = 3e-3, weight_decay: float = 1e-3) -> dict[str, torch.Tensor]:
    """Full-batch AdamW on cross-entropy over need classes; the buffers ``PARAM_NAMES`` name."""
    gen = torch.Generator().manual_seed(seed)
    x = features(scores.detach())
    mean, std = x.mean(dim=0), x.std(dim=0) + 1e-6
    x = (x - mean) / std
    first, second = nn.Linear(x.shape[1], HIDDEN), nn.Linear(HIDDEN, len(LADDER) + 1)
    for layer in (first, second):  # seeded here, so the fit does not depend on the global RNG's state
        nn.init.normal_(layer.weight, std=layer.in_features ** -0.5, generator=gen)
        nn.init.zeros_(layer.bias)
    params = [*first.parameters(), *second.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            loss = F.cross_entropy(second(F.gelu(first(x))), need)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    values = (mean, std, first.weight, first.bias, second.weight, second.bias)
    return {name: v.detach().clone() for name, v in zip(PARAM_NAMES, values, strict=True)}


def fit_budget(model: LifeViT, split: DataSplit, images: int, batch_size: int, seed: int,
               device: torch.device) -> dict[str, float]:
    """Measure needs on ``images`` training images (an order of their own) and fit the predictor into
    ``model``; returns what the history records."""
    t0 = time.perf_counter()
    model.eval()
    batches = []
    for x, y in split.batches(batch_size, shuffle=True, seed=seed * 1000 + 998):
        batches.append((x.to(device), y.to(device)))
        if sum(len(b[1]) for b in batches) >= images:
            break
    scores, need = measure_needs(model, batches)
    model.life.set_budget_params(fit_predictor(scores, need, seed))
    never = float((need == len(LADDER)).float().mean())
    return {"images": int(len(need)), "mean_need_rate": round(float(torch.tensor(
        [LADDER[min(int(n), len(LADDER) - 1)] for n in need]).mean()), 4),
        "never_right": round(never, 4), "seconds": round(time.perf_counter() - t0, 1)}
