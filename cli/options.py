"""Command-line options of the commands whose code imports torch or the web stack: one function per
command, torch-free, so that ``patchlife CMD --help`` answers at once. The command's module (bench,
evaluate, train, serve, bench-overhead) imports the heavy code; it is loaded only to run.

Commands whose module is light to import (ensure-default, loadtest, gpu-check) keep their
``add_arguments`` beside their code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the keys of model.device.DTYPES
EVAL_KEEP_RATES = (0.3, 0.5, 0.7, 0.9)  # patchlife eval's default table rows
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def ints(text: str) -> list[int]:
    """``"1,4,7"`` -> ``[1, 4, 7]``."""
    return [int(v) for v in text.split(",") if v.strip()]


def floats(text: str) -> list[float]:
    """``"0.5,0.7"`` -> ``[0.5, 0.7]``."""
    return [float(v) for v in text.split(",") if v.strip()]


def bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="deit_small_patch16_224", help="timm ViT/DeiT name or a small config")
    p.add_argument("--checkpoint", default=None, help="a patchlife checkpoint folder instead of --backbone")
    p.add_argument("--pretrained", default=None, help="local weights file (speed does not depend on it)")
    p.add_argument("--keep-rate", type=float, default=0.7, help="keep rate of the LifeViT schedule")
    p.add_argument("--batch-size", type=int, default=32, help="images per timed call")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the GPU when torch sees one, else the CPU")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--served", action="store_true",
                   help="time the service's engine as the server runs it (uint8 input, bucket grid, padding, "
                        "CUDA graphs on a GPU) beside dense run the same way (graphed)")
    p.add_argument("--calibrated", action="store_true",
                   help="--served without --checkpoint: calibrate the random model on noise images at five "
                        "contrasts and time such a batch, so budgets vary and the tail runs once per bucket")
    p.add_argument("--no-graphs", action="store_true", help="--served: run both eagerly (PATCHLIFE_CUDA_GRAPHS=off)")
    p.add_argument("--rounds", type=int, default=7, help="timed calls per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    p.add_argument("--json", action="store_true", help="print only a JSON object on stdout")


def evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--data", type=Path, default=None, help="ImageFolder root: evaluates its val/ split")
    p.add_argument("--synthetic", action="store_true", help="the synthetic task's held-out split")
    p.add_argument("--val-size", type=int, default=None, help="synthetic: held-out images (default: the training one)")
    p.add_argument("--seed", type=int, default=None, help="synthetic: data seed (default: the training one)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images (default: all)")
    p.add_argument("--keep-rates", default=",".join(map(str, EVAL_KEEP_RATES)), help="comma-separated keep rates")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument("--buckets", type=int, default=8,
                   help="calibrated mode: points of the bucket grid fitted to the model's budgets (as served)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print only the JSON object on stdout")


def train(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data (one of)")
    d.add_argument("--synthetic", action="store_true", help="the built-in synthetic shapes task (the default)")
    d.add_argument("--data", type=Path, help="ImageFolder root with train/ and val/ (one folder per class)")
    d.add_argument("--train-size", type=int, default=60_000, help="synthetic: training images")
    d.add_argument("--val-size", type=int, default=2_400, help="synthetic: held-out images")
    d.add_argument("--workers", type=int, default=2, help="ImageFolder: DataLoader workers")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="vit_micro_patch8_64", help="timm ViT/DeiT name or a small config")
    m.add_argument("--pretrained", default=None, metavar="hub|FILE",
                   help="start from pretrained weights: 'hub' or a local weights file (skips stage 0)")
    m.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                   help="start from the weights of a patchlife checkpoint with the same backbone and classes "
                        "(e.g. one written by --save-dense; then usually --stage0-steps 0)")
    m.add_argument("--init", choices=("mimetic", "timm"), default="mimetic",
                   help="initialisation without --pretrained: mimetic attention (learns much faster) or timm's")
    m.add_argument("--keep-rate", type=float, default=0.7, help="the model's default keep schedule")
    m.add_argument("--stage-starts", type=ints, default=None,
                   help="blocks where pruning stages start, comma-separated (default: the backbone's)")
    m.add_argument("--patch-counts", type=ints, default=None,
                   help="explicit patches kept per stage, comma-separated (default: from --keep-rate)")
    t = p.add_argument_group("schedule")
    for s, name, lr in ((0, "dense", 1e-3), (1, "life", 3e-3), (2, "tail", 5e-4)):
        t.add_argument(f"--stage{s}-steps", type=int, default=None, help=f"optimiser steps of stage {s} ({name})")
        t.add_argument(f"--stage{s}-epochs", type=float, default=None, help="or its length in epochs")
        t.add_argument(f"--stage{s}-lr", type=float, default=lr, help="peak learning rate")
    t.add_argument("--batch-size", type=int, default=64, help="images per optimiser step")
    t.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of each stage")
    t.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    t.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    t.add_argument("--tau", type=float, default=4.0, help="stage 1 soft-mask temperature")
    t.add_argument("--stage1-norm", choices=("per_image", "batch"), default="per_image",
                   help="stage 1 score standardisation: per image (paper) or over the batch (scores "
                        "comparable across images: better content-adaptive budgets)")
    t.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    t.add_argument("--distill", type=float, default=0.0,
                   help="weight of distillation from the dense model in stages 1-2 (0: off)")
    t.add_argument("--stage2-keep-rates", type=floats, default=None,
                   help="keep rates drawn per step in stage 2 (default: --keep-rate only)")
    t.add_argument("--calibrate", type=int, default=2048,
                   help="training images for calibrated (content-adaptive) budgets; 0 keeps per-image")
    r = p.add_argument_group("run")
    r.add_argument("--out", type=Path, default=Path("runs/patchlife"), help="output checkpoint folder")
    r.add_argument("--seed", type=int, default=0, help="seeds the model, the data and its order")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="mixed precision (GPU only): auto picks bf16 where supported")
    r.add_argument("--resume", action="store_true", help="continue from the resumable state saved in --out")
    r.add_argument("--save-every", type=int, default=200, help="steps between resumable saves")
    r.add_argument("--stop-after", type=int, default=None, help="stop (resumably) after this many steps")
    r.add_argument("--name", default=None, help="model name recorded in the checkpoint (default: --out's name)")
    r.add_argument("--description", default=None,
                   help="what the model recognises, recorded in the checkpoint (default: said from the data)")
    r.add_argument("--save-dense", type=Path, default=None, metavar="DIR",
                   help="after stage 0, also save the dense model as a checkpoint in DIR (for --init-from)")


def serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="bind address (default: PATCHLIFE_HOST, see docs/api.md#settings)")
    p.add_argument("--port", type=int, help="bind port (default: PATCHLIFE_PORT)")
    p.add_argument("--checkpoint", type=Path,
                   help="checkpoint directory (default: PATCHLIFE_CHECKPOINT, else the embedded model)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn's and patchlife's log level")


def bench_overhead(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: a random-weight "
                                                   "LifeViT of --backbone in a temporary directory)")
    p.add_argument("--backbone", default="deit_small_patch16_224", help="timm name, without --checkpoint")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where the server runs the model")
    p.add_argument("--requests", type=int, default=60, help="timed requests (and compute runs)")
    p.add_argument("--rounds", type=int, default=6, help="alternating compute / request rounds")
    p.add_argument("--image-size", default="500x375", help="WxH of the JPEG sent")
    p.add_argument("--max-delay-ms", type=float,
                   help="PATCHLIFE_MAX_DELAY_MS of the server (default: the settings default)")
    p.add_argument("--json", action="store_true", help="print only a JSON object")


def bench_decode(p: argparse.ArgumentParser) -> None:
    from bench.photos import PHOTO_SIZES  # numpy and Pillow only

    p.add_argument("--images", type=Path, help="a folder of images to time instead of the generated photos")
    p.add_argument("--sizes", default=",".join(n for n, _, _ in PHOTO_SIZES),
                   help="generated photo sizes to time (comma-separated)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "none"), default="auto",
                   help="where the batched decoder runs: auto is cuda when there is one, else none (CPU path only)")
    p.add_argument("--batch-sizes", default="1,16,64", help="batched decoder batch sizes (comma-separated)")
    p.add_argument("--seconds", type=float, default=1.0, help="time spent on each measurement")
    p.add_argument("--checkpoint", type=Path, help="take the preprocessing (and, with --equivalence, the model) "
                                                   "from this checkpoint; default: a timm ViT at 224 px")
    p.add_argument("--equivalence", action="store_true",
                   help="also compare the batched decoder with the CPU path through a model (top-1, budgets)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
