"""The speed bench of the method: dense vs LifeViT vs oracle truncation vs attention top-k (``patchlife bench``).

All variants share one set of weights and one input batch, and are timed interleaved in one process
(round-robin, a rotating start so no variant always runs first after another), so the ratios are
side by side under the same machine load. LifeViT runs with the schedule's fixed counts
(``per_image``), the same counts the oracle and top-k keep, so the table compares equal FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..baselines import oracle_forward, topk_forward
from ..checkpoint import create_lifevit, load_checkpoint
from ..device import resolve_device, resolve_dtype
from ..flops import dense_gflops, slimmed_gflops
from ..lifevit import LifeViT


@dataclass
class Variant:
    name: str
    gflops: float
    images_per_s: float = 0.0
    ms_per_batch: float = 0.0
    speedup_vs_dense: float = 0.0
    speed_vs_oracle: float = 0.0


def topk_gflops(model: LifeViT) -> float:
    """Oracle cost plus the class-token attention row recomputed at each stage start."""
    bb, sched = model.backbone, model.schedule
    attn_dim = int(bb.blocks[0].attn.qkv.out_features) // 3  # type: ignore[union-attr,arg-type]
    prev = [sched.num_patches, *sched.patch_counts[:-1]]
    extra = sum((p + bb.num_prefix_tokens) * attn_dim for p in prev)
    return slimmed_gflops(bb, sched, life_module=False) + extra / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin."""
    names = list(fns)
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        _sync(device)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                _sync(device)
                t0 = time.perf_counter()
                fns[n]()
                _sync(device)
                times[n].append(time.perf_counter() - t0)
    return times


def bench_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> LifeViT:
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
        model = model.at(model.schedule_for(args.keep_rate))
    else:
        model = create_lifevit(args.backbone, args.keep_rate, pretrained=args.pretrained or False)
    return model.at(normalization="per_image").to(device, dtype).eval()  # fixed counts: FLOPs equal oracle's


def run_bench(args: argparse.Namespace) -> list[Variant]:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    model = bench_model(args, device, dtype)
    h, w = (int(v) for v in model.backbone.patch_embed.img_size)
    x = torch.randn(args.batch_size, 3, h, w, device=device, dtype=dtype)
    counts = model.schedule.patch_counts
    fns: dict[str, Callable[[], object]] = {
        "dense": lambda: model.forward_dense(x),
        "life": lambda: model(x),
        "oracle": lambda: oracle_forward(model, x, counts),
        "topk": lambda: topk_forward(model, x, counts),
    }
    flops = {"dense": dense_gflops(model.backbone), "life": slimmed_gflops(model.backbone, model.schedule),
             "oracle": slimmed_gflops(model.backbone, model.schedule, life_module=False),
             "topk": topk_gflops(model)}
    times = time_interleaved(fns, args.rounds, args.warmup, device)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    return [Variant(n, round(flops[n], 6), round(args.batch_size / med[n], 2), round(1e3 * med[n], 2),
                    round(med["dense"] / med[n], 3), round(med["oracle"] / med[n], 3)) for n in fns]
