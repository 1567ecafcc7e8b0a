"""``patchlife bench --served``: the engine timed exactly as the server runs it, beside dense run alike.

The served path is what the worker does with a batch, without the thread and the queues: uint8
pixels to the device, the head (padded to its batch-size class, a CUDA graph replay on a GPU),
lives and budgets in one host sync, then one tail call per budget bucket of the grid (padded and
replayed likewise) with the probabilities copied back. Dense runs the same way: the same pixels
to the device, normalised there, the whole backbone captured per batch-size class and replayed,
probabilities copied back. Both are timed interleaved in one process (``model.bench``'s
``time_interleaved``), so the ratio compares like with like on CPU and GPU.

Without ``--checkpoint`` a LifeViT of ``--backbone`` with random weights is written to a temporary
directory (per-image normalisation: every image has the schedule's counts); with a calibrated
checkpoint the budgets vary per image and the tail runs once per bucket, as served.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from model import create_lifevit, save_checkpoint
from model.bench import Variant, time_interleaved

from .engine import Engine, HeadItem
from .settings import Settings


def _engine(args: argparse.Namespace, workdir: Path) -> Engine:
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is None:
        torch.manual_seed(0)
        model = create_lifevit(args.backbone, args.keep_rate, pretrained=args.pretrained or False)
        checkpoint = save_checkpoint(model, workdir / "random-weights", metadata={"name": args.backbone})
    defaults = Settings(device="cpu")  # grid knobs from their one home; device/dtype from the command line
    return Engine(checkpoint, args.device, args.dtype, args.keep_rate if args.checkpoint else None,
                  defaults.buckets, defaults.grid_keep_rates(), defaults.bucket_step,
                  "off" if args.no_graphs else "auto", max(args.batch_size, 1))


def served_forward(engine: Engine, pixels: torch.Tensor) -> list[HeadItem]:
    """One batch as the worker runs it: head, then a tail call per bucket (at most a class each)."""
    items = engine.head(pixels, [None] * pixels.shape[0])
    groups: dict[tuple[int, ...], list[HeadItem]] = {}
    for it in items:
        groups.setdefault(engine.bucket(it.budget), []).append(it)
    for counts, group in groups.items():
        engine.tail(group, counts)
    return items


def run_served(args: argparse.Namespace) -> tuple[list[Variant], dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="patchlife-bench-") as tmp:
        engine = _engine(args, Path(tmp))
    engine.capture()
    runner = engine.runner

    def dense_fn(px: torch.Tensor) -> tuple[torch.Tensor]:
        return (engine.model.backbone(engine.normalize(px)).float().softmax(dim=-1),)

    c, h, w = (int(v) for v in engine.config.preprocess.get("input_size", [3, 224, 224]))
    with torch.inference_mode():
        runner.capture(("dense",), dense_fn, (torch.zeros(1, c, h, w, dtype=torch.uint8, device=engine.device),))
    pixels = torch.randint(0, 256, (args.batch_size, c, h, w), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    if engine.device.type == "cuda":
        pixels = pixels.pin_memory()

    def dense() -> None:
        with torch.inference_mode():
            (probs,) = runner.run(("dense",), dense_fn, (pixels.to(engine.device, non_blocking=True),))
            probs.cpu()

    budgets: list[float] = []

    def served() -> None:
        items = served_forward(engine, pixels)
        if not budgets:
            budgets.extend(engine.gflops(engine.bucket(it.budget)) for it in items)

    times = time_interleaved({"dense": dense, "served": served}, args.rounds, args.warmup, engine.device)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    flops = {"dense": engine.dense_gflops, "served": statistics.fmean(budgets)}
    variants = [Variant(n, round(flops[n], 6), round(args.batch_size / med[n], 2), round(1e3 * med[n], 3),
                        round(med["dense"] / med[n], 3), 0.0) for n in ("dense", "served")]
    info = {"device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
            "graphs": runner.describe(), "buckets": len(engine.buckets.points) or None,
            "buckets_per_batch": len({engine.bucket(it.budget) for it in engine.head(pixels, [None] * len(pixels))})}
    return variants, info
