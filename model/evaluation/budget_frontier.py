"""Budget policies on a frozen checkpoint, at the mean tail cost of fixed keep rates (a study, not served).

    python -m model.evaluation.budget_frontier [CHECKPOINT] [--train-images N] [--val-images N]

The tail runs once per ladder rate (``model/budget.py``) on every image, so any policy that gives each
image a ladder rate is scored exactly, without running the model again. Each policy estimates, per
image, ``P(need <= r)`` from training images and takes the Lagrangian allocation at the mean cost of
fixed keep 0.3 / 0.5 / 0.7 (the price solved on the training images). Policies:

* ``constant``: no information (the fixed count, up to the ladder's rounding);
* ``bins of X``: ``P(need | decile of X)`` for a scalar X of the scores (thresholds, spread, ...);
* ``mlp on sorted scores``: the predictor ``train --fit-budget`` fits;
* ``oracle by count`` / ``by target patches``: the true content (an upper bound for content-aware
  budgets on this model), and ``oracle``: each image's own need (the bound of any budget).

Top-1 comes with its 95% Wilson interval; Spearman is between the budget's cost and target patches.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch

from ..budget import LADDER, ladder_counts, need_cdf, tail_cost
from ..checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from ..lifevit import LifeViT
from ..training.budget_fit import fit_predictor, measure_needs
from ..training.data import SyntheticShapes, synthetic_splits
from .evaluate import spearman, wilson_interval

RATES = (0.3, 0.5, 0.7)


def _measure(model: LifeViT, split: SyntheticShapes, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Scores, needs and the right/wrong matrix ``[N, R]`` of every image at every ladder rate."""
    batches = []
    for i in range(0, len(idx), 256):
        images, labels = split.render(idx[i:i + 256])
        batches.append((split.normalize(images), labels))
    scores, need, right = measure_needs(model, batches, with_right=True)
    return {"scores": scores.numpy(), "need": need.numpy(), "right": right.numpy(),
            **{k: np.asarray(v) for k, v in split.content(idx).items()}}


def _allocate(cdf: np.ndarray, costs: np.ndarray, lam: float) -> np.ndarray:
    return (cdf - lam * costs[None]).argmax(axis=1)


def _solve(cdf: np.ndarray, costs: np.ndarray, target: float) -> float:
    lo, hi = 0.0, 1.0
    while costs[_allocate(cdf, costs, hi)].mean() > target:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if costs[_allocate(cdf, costs, mid)].mean() > target else (lo, mid)
    return hi


def _cdf_rows(need: np.ndarray) -> np.ndarray:
    return np.array([(need <= r).mean() for r in range(len(LADDER))])


def by_groups(tr: dict[str, np.ndarray], g_tr: np.ndarray, g_va: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``P(need <= r | group)`` from the training images, for both splits' rows."""
    table = {g: _cdf_rows(tr["need"][g_tr == g]) for g in np.unique(g_tr)}
    fallback = _cdf_rows(tr["need"])
    return np.stack([table[g] for g in g_tr]), np.stack([table.get(g, fallback) for g in g_va])


def deciles(x_tr: np.ndarray, x_va: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    edges = np.quantile(x_tr, np.linspace(0, 1, 11)[1:-1])
    return np.searchsorted(edges, x_tr), np.searchsorted(edges, x_va)


def _above_z2(s: np.ndarray) -> np.ndarray:
    return ((s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True) > 2).sum(1)


def policies(tr: dict[str, np.ndarray], va: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    s_tr, s_va = tr["scores"], va["scores"]
    q = np.quantile(s_tr, [0.7, 0.85])
    scalars: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "patches above the pooled 70% score": lambda s: (s > q[0]).sum(1),
        "patches above the pooled 85% score": lambda s: (s > q[1]).sum(1),
        "mean score": lambda s: s.mean(1), "score spread (std)": lambda s: s.std(1),
        "patches with z > 2 in the image": _above_z2,
    }
    prior = _cdf_rows(tr["need"])
    out = {"constant": (np.tile(prior, (len(s_tr), 1)), np.tile(prior, (len(s_va), 1)))}
    for name, f in scalars.items():
        out[f"bins of {name}"] = by_groups(tr, *deciles(f(s_tr), f(s_va)))
    params = fit_predictor(torch.from_numpy(s_tr), torch.from_numpy(tr["need"]))
    out["mlp on sorted scores"] = tuple(need_cdf(torch.from_numpy(s), tuple(params.values())).numpy()
                                        for s in (s_tr, s_va))  # type: ignore[assignment]
    out["oracle by count"] = by_groups(tr, tr["count"], va["count"])
    out["oracle by target patches"] = by_groups(tr, np.minimum(tr["target_patches"], 20),
                                                np.minimum(va["target_patches"], 20))
    own = lambda need: (np.arange(len(LADDER))[None] >= need[:, None]).astype(float)  # noqa: E731
    out["oracle (own need)"] = (own(tr["need"]), own(va["need"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.evaluation.budget_frontier")
    p.add_argument("checkpoint", nargs="?", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--train-images", type=int, default=6000)
    p.add_argument("--val-images", type=int, default=2400)
    args = p.parse_args(argv)
    model, cfg = load_checkpoint(args.checkpoint)
    spec, pre = cfg.metadata["data"], cfg.preprocess
    train, val = synthetic_splits(int(spec["train_size"]), int(spec["val_size"]), int(spec["seed"]),
                                  int(pre["input_size"][-1]), pre["mean"], pre["std"])
    pick = np.random.default_rng(1).choice(len(train), min(args.train_images, len(train)), replace=False)
    tr = _measure(model, train, pick)
    va = _measure(model, val, np.arange(min(args.val_images, len(val))))
    costs = np.array([tail_cost(model.schedule, c) for c in ladder_counts(model.schedule)])
    print(f"{len(tr['need'])} training / {len(va['need'])} held-out images; top-1 (95% CI), tail work / fixed, "
          "Spearman(budget, target patches)\n")
    print("| policy | " + " | ".join(f"at fixed {r}" for r in RATES) + " |\n|---|" + "---|" * len(RATES))
    fixed_row = []
    for r in RATES:
        k = LADDER.index(r)
        acc = va["right"][:, k].mean()
        lo, hi = wilson_interval(int(va["right"][:, k].sum()), len(va["need"]))
        fixed_row.append(f"{100 * acc:.2f}% ({100 * lo:.1f}-{100 * hi:.1f})")
    print("| fixed count | " + " | ".join(fixed_row) + " |")
    n = len(va["need"])
    for name, (cdf_tr, cdf_va) in policies(tr, va).items():
        cells = []
        for r in RATES:
            target = tail_cost(model.schedule, model.schedule_for(r).patch_counts)
            idx = _allocate(cdf_va, costs, _solve(cdf_tr, costs, target))
            ok = int(va["right"][np.arange(n), idx].sum())
            lo, hi = wilson_interval(ok, n)
            rho = spearman(costs[idx], va["target_patches"])
            cells.append(f"{100 * ok / n:.2f}% ({100 * lo:.1f}-{100 * hi:.1f}), {costs[idx].mean() / target:.2f}x, "
                         f"rho {rho:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
