"""``patchlife bench``: the speed table, from the model alone (``model/evaluation/bench.py``) or through
the served path (``served.py``). The command lives here, outside model/, so that the method never
imports the service: the served variant needs the engine.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from model.evaluation.bench import run_bench


def run(args: argparse.Namespace) -> int:
    if not 0 < args.keep_rate <= 1 or args.batch_size < 1 or args.rounds < 1:
        print("patchlife bench: need 0 < --keep-rate <= 1, --batch-size >= 1, --rounds >= 1", file=sys.stderr)
        return 2
    if args.calibrated and (not args.served or args.checkpoint):
        print("patchlife bench: --calibrated goes with --served and without --checkpoint", file=sys.stderr)
        return 2
    extra: dict[str, object] = {}
    if args.served:  # the service's engine and web stack: imported only for this variant
        from .served import run_served
        variants, extra = run_served(args)
    else:
        variants = run_bench(args)
    if args.json:
        print(json.dumps({"variants": [asdict(v) for v in variants],
                          "config": {k: v for k, v in vars(args).items() if k != "json"},
                          "torch_threads": torch.get_num_threads(), **extra}))
        return 0
    print(f"{args.checkpoint or args.backbone}  keep={args.keep_rate}  batch={args.batch_size}  "
          f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()}")
    if extra:
        g = extra["graphs"]
        print(f"served on {extra['device']} {extra['dtype']}, {extra['normalization']}: {extra['buckets']} buckets "
              f"({extra['buckets_per_batch']} in this batch); CUDA graphs {g['mode']}, "  # type: ignore[index]
              f"{g['captured']} captured, {g['eager_fallbacks']} eager fallbacks")  # type: ignore[index]
    print(f"{'variant':<8} {'GFLOPs':>8} {'img/s':>9} {'ms/batch':>9} {'vs dense':>9} {'vs oracle':>10}")
    for v in variants:
        vs_oracle = f"{v.speed_vs_oracle:>9.2f}x" if not args.served else f"{'-':>10}"
        print(f"{v.name:<8} {v.gflops:>8.3f} {v.images_per_s:>9.1f} {v.ms_per_batch:>9.1f} "
              f"{v.speedup_vs_dense:>8.2f}x {vs_oracle}")
    return 0
