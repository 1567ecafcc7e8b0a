"""``patchlife eval``: held-out accuracy, GFLOPs and speed of life regression against other token choices.

At each keep rate, three ways of choosing the surviving patches run at the *same* per-stage counts
(equal FLOPs): life regression (the model's own order, per-image normalisation), random drop, and
EViT-style attention top-k (``model/baselines.py``). With a calibrated checkpoint, the
content-adaptive mode is evaluated too, with the distribution of per-image budgets: there each image
runs at its own budget rounded up to the bucket grid, as the service runs it. Where the data says what
each image shows (the synthetic task's object counts), the calibrated rows also give the Spearman rank
correlation between an image's budget and its content. Every top-1 comes with a 95% Wilson interval.

Without arguments it evaluates the embedded default model on the held-out split it was trained for.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..baselines import random_forward, topk_forward
from ..checkpoint import CONFIG_FILE, DEFAULT_CHECKPOINT, LifeViTConfig, load_checkpoint
from ..defaults import GRID_SIZE
from ..device import resolve_device
from ..flops import dense_gflops, slimmed_gflops
from ..life import Normalization
from ..lifevit import LifeViT
from ..options import EVAL_KEEP_RATES as KEEP_RATES
from ..options import evaluate as add_arguments  # noqa: F401  (torch-free, for --help)
from ..schedule import BucketGrid
from ..training.data import DataConfigError, DataSplit, SyntheticShapes, folder_splits, synthetic_splits
from .bench import topk_gflops

Batches = list[tuple[torch.Tensor, torch.Tensor]]
Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Row:
    """One line of the table. ``gflops`` is the mean per image; ``keep_rate`` 1.0 for dense."""

    method: str            # dense | life | random | topk
    keep_rate: float
    top1: float            # 0-1
    gflops: float
    images_per_s: float
    mode: str              # dense | fixed (the schedule's counts for every image) | calibrated
    counts: list[int]      # per-stage patch counts (calibrated: the mean of the images' own budgets)
    budget: dict[str, Any] | None = None  # calibrated rows: distribution of per-image budgets
    n: int = 0             # images evaluated
    ci95: tuple[float, float] = (0.0, 1.0)  # Wilson 95% interval of top-1

    def __post_init__(self) -> None:
        if self.n:
            self.ci95 = wilson_interval(round(self.top1 * self.n), self.n)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["budget"] is None:
            del d["budget"]
        return d


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks ``0..n-1``, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson's r of tie-averaged ranks); 0 when either side is constant."""
    ra, rb = _ranks(np.asarray(a, dtype=float)), _ranks(np.asarray(b, dtype=float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def materialise(split: DataSplit, batch_size: int, limit: int | None = None,
                device: torch.device | str = "cpu") -> Batches:
    """Every batch of the split in memory (so timing measures the model, not data loading)."""
    out: Batches = []
    seen = 0
    for images, labels in split.batches(batch_size):
        if limit is not None and seen >= limit:
            break
        if limit is not None:
            images, labels = images[: limit - seen], labels[: limit - seen]
        out.append((images.to(device), labels.to(device)))
        seen += len(labels)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def top1(forward: Forward, batches: Batches) -> tuple[float, float]:
    """``(top-1 accuracy, images/s of the forward calls alone)`` over the batches."""
    correct = total = 0
    seconds = 0.0
    for images, labels in batches:
        _sync(images.device)
        t0 = time.perf_counter()
        logits = forward(images)
        _sync(images.device)
        seconds += time.perf_counter() - t0
        correct += int((logits.argmax(dim=-1) == labels).sum())
        total += len(labels)
    if total == 0:
        raise ValueError("no images to evaluate")
    return correct / total, total / max(seconds, 1e-9)


@contextmanager
def at_keep_rate(model: LifeViT, keep_rate: float, normalization: Normalization) -> Iterator[LifeViT]:
    """The model at another schedule (same stages) and normalisation (a view: the model is unchanged)."""
    yield model.at(model.schedule_for(keep_rate), normalization)


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    v = values.float()
    q = torch.quantile(v, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], device=v.device))
    return {"mean": round(float(v.mean()), 4), "std": round(float(v.std()) if v.numel() > 1 else 0.0, 4),
            "min": round(float(q[0]), 4), "p10": round(float(q[1]), 4), "p50": round(float(q[2]), 4),
            "p90": round(float(q[3]), 4), "max": round(float(q[4]), 4)}


@torch.inference_mode()
def calibrated_row(model: LifeViT, batches: Batches, keep_rate: float, grid: BucketGrid | None = None,
                   content: dict[str, np.ndarray] | None = None) -> Row:
    """Life regression with content-adaptive budgets, each image at its budget rounded up to ``grid``
    (default: ``model.bucket_grid()``, the grid a server fits to this model).

    ``content`` (per image, in batch order, e.g. ``{"count": [N]}``) adds the Spearman correlation
    between each image's budget (fraction of dense GFLOPs) and each content measure.
    """
    bb = model.backbone
    grid = grid or model.bucket_grid()
    with at_keep_rate(model, keep_rate, "calibrated") as m:
        budgets: list[torch.Tensor] = []

        def forward(images: torch.Tensor) -> torch.Tensor:
            state = m.head(images)
            b = m.budgets(state.scores).cpu()  # one copy: tail_grouped groups images by budget on the host
            budgets.append(b)
            return m.tail_grouped(state, b, grid)

        acc, ips = top1(forward, batches)
        own = torch.cat(budgets)  # [N, S]
        run = [grid.round_up(b) for b in own.tolist()]
        flops = torch.tensor([slimmed_gflops(bb, m.schedule, c) for c in run])
        own_flops = torch.tensor([slimmed_gflops(bb, m.schedule, b) for b in own.tolist()])
        dense = dense_gflops(bb)
        fraction = own_flops / dense
        q = _quantiles(fraction)
        budget: dict[str, Any] = {
                  "fraction_of_dense": q, "p90_over_p10": round(q["p90"] / max(q["p10"], 1e-9), 3),
                  "patches_last_stage": _quantiles(own[:, -1]),
                  "patches_per_stage_mean": [round(float(v), 2) for v in own.float().mean(dim=0)],
                  "buckets": len(set(run)), "grid_points": len(grid.points) or None,
                  "tail_cost_vs_fixed": _tail_cost_vs_fixed(grid, own, run, m.schedule.patch_counts),
                  "predictor": m.life.has_budget_predictor}
        if content:
            budget["spearman_vs_content"] = {k: round(spearman(fraction.numpy(), v[: len(fraction)]), 4)
                                             for k, v in content.items()}
        counts = [round(float(v), 1) for v in own.float().mean(dim=0)]
        return Row("life", keep_rate, acc, float(flops.mean()), ips, "calibrated", counts,  # type: ignore[arg-type]
                   budget, n=len(fraction))


def _tail_cost_vs_fixed(grid: BucketGrid, own: torch.Tensor, run: list[tuple[int, ...]],
                       fixed: Sequence[int]) -> dict[str, float]:
    """Mean tail work (patch-block products) of the images' own budgets and of the buckets they ran
    at, over the fixed schedule's: 1.0 is the same mean compute as the fixed-count row."""
    base = grid.cost(fixed)
    return {"own": round(sum(grid.cost(b) for b in own.tolist()) / len(run) / base, 4),
            "run": round(sum(grid.cost(c) for c in run) / len(run) / base, 4)}


def evaluate_model(model: LifeViT, batches: Batches, keep_rates: Sequence[float] = KEEP_RATES,
                   buckets: int = GRID_SIZE, seed: int = 0,
                   content: dict[str, np.ndarray] | None = None) -> list[Row]:
    """The whole table for one model on in-memory batches (``content``: see :func:`calibrated_row`)."""
    model.eval()
    n = sum(len(b[1]) for b in batches)
    bb = model.backbone
    full = [model.num_patches] * len(model.schedule.stage_starts)
    acc, ips = top1(model.forward_dense, batches)
    rows = [Row("dense", 1.0, acc, dense_gflops(bb), ips, "dense", full, n=n)]
    calibrated = model.life.is_calibrated
    grid = model.bucket_grid(size=buckets) if calibrated else None
    for rate in keep_rates:
        with at_keep_rate(model, rate, "per_image") as m:
            counts = list(m.schedule.patch_counts)
            gen = torch.Generator().manual_seed(seed)
            methods: dict[str, tuple[Forward, float]] = {
                "life": (m, slimmed_gflops(bb, m.schedule)),
                "random": (partial(random_forward, m, patch_counts=counts, generator=gen),
                           slimmed_gflops(bb, m.schedule, life_module=False)),
                "topk": (partial(topk_forward, m, patch_counts=counts), topk_gflops(m)),
            }
            for name, (fn, flops) in methods.items():
                acc, ips = top1(fn, batches)
                rows.append(Row(name, rate, acc, flops, ips, "fixed", counts, n=n))
        if calibrated:
            rows.append(calibrated_row(model, batches, rate, grid, content))
    return rows


# --- command line -----------------------------------------------------------------------------
def held_out_split(args: argparse.Namespace, cfg: LifeViTConfig) -> tuple[DataSplit, str]:
    """The split to evaluate and a one-line description of it."""
    spec = dict(cfg.metadata.get("data", {}))
    pre = cfg.preprocess
    val: DataSplit
    if args.data is not None:
        _, val = folder_splits(args.data, pre, workers=2)
        return val, f"{args.data}/val ({len(val)} images)"
    if args.synthetic or spec.get("kind", "synthetic") == "synthetic":
        seed = args.seed if args.seed is not None else int(spec.get("seed", 0))
        size = args.val_size or int(spec.get("val_size", 2400))
        _, val = synthetic_splits(1, size, seed, int(pre["input_size"][-1]), pre["mean"], pre["std"])
        return val, f"synthetic held-out split (seed {seed}, {size} images)"
    root = spec.get("root")
    if not root:
        raise DataConfigError("the checkpoint does not say which data it was trained on: pass --data ROOT")
    _, val = folder_splits(root, pre, workers=2)
    return val, f"{root}/val ({len(val)} images)"


def markdown(rows: list[Row], title: str) -> str:
    lines = [title, "", "| method | keep rate | mode | patches per stage | top-1 (95% CI) | GFLOPs | images/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        counts = "/".join(f"{c:g}" for c in r.counts)
        lines.append(f"| {r.method} | {r.keep_rate:g} | {r.mode} | {counts} | {100 * r.top1:.2f}% "
                     f"({100 * r.ci95[0]:.1f}-{100 * r.ci95[1]:.1f}) | {r.gflops:.4f} | {r.images_per_s:.0f} |")
    cal = [r for r in rows if r.budget]
    if cal:
        keys = sorted({k for r in cal for k in (r.budget or {}).get("spearman_vs_content", {})})
        lines += ["", "Calibrated (content-adaptive) per-image budgets:", "",
                  "| keep rate | top-1 | budget / dense GFLOPs: min / p10 / p50 / p90 / max (mean) | p90/p10 "
                  "| last-stage patches: min / p10 / p50 / p90 / max | buckets run | tail work / fixed: own, run |"
                  + "".join(f" Spearman vs {k} |" for k in keys), "|---|---|---|---|---|---|---|" + "---|" * len(keys)]
        for r in cal:
            b = r.budget or {}
            f, p = b["fraction_of_dense"], b["patches_last_stage"]
            rho = b.get("spearman_vs_content", {})
            lines.append(f"| {r.keep_rate:g} | {100 * r.top1:.2f}% | {f['min']:.2f} / {f['p10']:.2f} / "
                         f"{f['p50']:.2f} / {f['p90']:.2f} / {f['max']:.2f} ({f['mean']:.3f}) | "
                         f"{b['p90_over_p10']:.2f} | "
                         f"{p['min']:g} / {p['p10']:g} / {p['p50']:g} / {p['p90']:g} / {p['max']:g} | "
                         f"{b['buckets']} | {_work(b)} |"
                         + "".join(f" {rho[k]:.3f} |" if k in rho else " - |" for k in keys))
    return "\n".join(lines)


def _work(budget: dict[str, Any]) -> str:
    work = budget.get("tail_cost_vs_fixed")
    return f"{work['own']:.2f}, {work['run']:.2f}" if work else "-"


def _parse(args: argparse.Namespace) -> tuple[list[float], torch.device]:
    try:
        rates = [float(v) for v in args.keep_rates.split(",") if v.strip()]
    except ValueError as exc:
        raise DataConfigError(f"--keep-rates must be comma-separated numbers: {exc}") from exc
    if not rates or any(not 0 < r <= 1 for r in rates):
        raise DataConfigError(f"--keep-rates must lie in (0, 1], got {args.keep_rates}")
    if args.batch_size < 1 or args.buckets < 1 or (args.limit is not None and args.limit < 1):
        raise DataConfigError("--batch-size, --buckets and --limit must be >= 1")
    try:
        return rates, resolve_device(args.device)
    except (RuntimeError, ValueError) as exc:
        raise DataConfigError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    path = args.checkpoint or DEFAULT_CHECKPOINT
    try:
        rates, device = _parse(args)
        if not (Path(path) / CONFIG_FILE).is_file():
            hint = "run `patchlife ensure-default`" if args.checkpoint is None else "pass a `patchlife train` output"
            raise DataConfigError(f"no patchlife checkpoint at {path}: {hint}")
        model, cfg = load_checkpoint(path, device=device)
        split, where = held_out_split(args, cfg)
        if split.class_names != cfg.class_names:
            raise DataConfigError(f"the data's classes ({len(split.class_names)}) are not the checkpoint's "
                                  f"({len(cfg.class_names)}): evaluate on data with the training classes")
        batches = materialise(split, args.batch_size, args.limit, device)
        content = split.content() if isinstance(split, SyntheticShapes) else None
    except (DataConfigError, FileNotFoundError, ValueError) as exc:
        print(f"patchlife eval: error: {exc}", file=sys.stderr)
        return 2
    rows = evaluate_model(model, batches, rates, args.buckets, content=content)
    n = sum(len(b[1]) for b in batches)
    if args.json:
        print(json.dumps({"model": cfg.metadata.get("name", Path(path).name), "data": where, "images": n,
                          "interval": "wilson 95%", "rows": [r.to_dict() for r in rows]}))
        return 0
    title = (f"**{cfg.metadata.get('name', Path(path).name)}** ({cfg.backbone}, {len(cfg.class_names)} classes, "
             f"{model.normalization}) on {where}, {n} images evaluated; device {device}, "
             f"{torch.get_num_threads()} threads, batch {args.batch_size}")
    print(markdown(rows, title))
    return 0
