"""``patchlife bench --served``: the engine timed exactly as the server runs it, beside dense run alike.

The served path is what the worker does with a batch, without the thread and the queues: uint8
pixels to the device, the head (padded to its batch-size class, a CUDA graph replay on a GPU)
with lives, budgets and buckets, then one tail call per budget bucket of the grid (each gathering its
rows straight into the graph's input, padded and replayed likewise), and the probabilities of every
bucket copied back in one transfer. Dense runs the same way: the same pixels to the device,
normalised there, the whole backbone captured per batch-size class and replayed, probabilities
copied back. Both are timed interleaved in one process (``model.evaluation.bench``'s ``time_interleaved``), so
the ratio compares like with like on CPU and GPU.

Without ``--checkpoint`` a LifeViT of ``--backbone`` with random weights is written to a temporary
directory: per-image normalisation (every image has the schedule's counts: one bucket), or with
``--calibrated`` calibrated on noise images at five contrasts and timed on a batch at the middle one,
so budgets vary per image and the tail runs once per bucket, as served (the batch's bucket count is
printed). A calibrated ``--checkpoint`` behaves likewise.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from model import create_lifevit, save_checkpoint
from model.evaluation.bench import Variant, time_interleaved
from service.runtime.engine import Engine
from service.settings import Settings

CONTRASTS = (4.0, 12.0, 30.0, 60.0, 110.0)  # std of the noise images around mid-grey, in uint8 steps
TIMED_CONTRASTS = CONTRASTS[2:3]  # the timed batch: one level; budgets still vary image by image


def contrast_pixels(n: int, shape: tuple[int, int, int], seed: int = 0,
                    contrasts: tuple[float, ...] = CONTRASTS) -> torch.Tensor:
    """``uint8 [n, C, H, W]`` noise around mid-grey, image ``i`` at contrast ``contrasts[i % len]``: the
    life scores, hence the calibrated budgets, differ between them."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor(contrasts)[torch.arange(n) % len(contrasts)].view(n, 1, 1, 1)
    return (128.0 + scale * torch.randn(n, *shape, generator=g)).clamp(0, 255).to(torch.uint8)


def _engine(args: argparse.Namespace, workdir: Path) -> Engine:
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is None:
        torch.manual_seed(0)
        model = create_lifevit(args.backbone, args.keep_rate, pretrained=args.pretrained or False).eval()
        if args.calibrated:
            h, w = (int(v) for v in model.backbone.patch_embed.img_size)
            c = 3
            cfg: dict[str, Any] = dict(getattr(model.backbone, "pretrained_cfg", None) or {})
            mean = torch.tensor(cfg.get("mean", (0.5,) * c)).view(1, -1, 1, 1)
            std = torch.tensor(cfg.get("std", (0.5,) * c)).view(1, -1, 1, 1)
            calib = contrast_pixels(8 * len(CONTRASTS), (c, h, w), seed=1).float() / 255.0
            model.calibrate(list(((calib - mean) / std).split(8)))
        checkpoint = save_checkpoint(model, workdir / "random-weights", metadata={"name": args.backbone})
    defaults = Settings(device="cpu")  # grid knobs from their one home; device/dtype from the command line
    return Engine(checkpoint, args.device, args.dtype, args.keep_rate if args.checkpoint else None,
                  defaults.buckets, defaults.grid_keep_rates(), defaults.bucket_step,
                  "off" if args.no_graphs else "auto", max(args.batch_size, 1))


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
    pixels = contrast_pixels(args.batch_size, (c, h, w), contrasts=TIMED_CONTRASTS) if args.calibrated else \
        torch.randint(0, 256, (args.batch_size, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if engine.device.type == "cuda":
        pixels = pixels.pin_memory()

    def dense() -> None:
        with torch.inference_mode():
            (probs,) = runner.run(("dense",), dense_fn, (pixels.to(engine.device, non_blocking=True),))
            probs.cpu()

    buckets: list[tuple[int, ...]] = []

    def served() -> None:
        hb, _ = engine.run_batch(pixels)
        if not buckets:
            buckets.extend(tuple(b) for b in hb.buckets.tolist())

    times = time_interleaved({"dense": dense, "served": served}, args.rounds, args.warmup, engine.device)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    flops = {"dense": engine.dense_gflops, "served": statistics.fmean(engine.gflops(b) for b in buckets)}
    variants = [Variant(n, round(flops[n], 6), round(args.batch_size / med[n], 2), round(1e3 * med[n], 3),
                        round(med["dense"] / med[n], 3), 0.0) for n in ("dense", "served")]
    info = {"device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
            "graphs": runner.describe(), "buckets": len(engine.bucket_grid.points) or None,
            "buckets_per_batch": len(set(buckets)), "normalization": engine.model.normalization}
    return variants, info
