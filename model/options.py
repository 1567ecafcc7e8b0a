"""Command-line options of the method's own programs (``patchlife train``, ``patchlife eval``), torch-free
so that ``--help`` answers at once: the training loop and the evaluation import them as their
``add_arguments``, and ``cli/`` lists them beside the other commands' options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .defaults import GRID_SIZE

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the keys of model.device.DTYPES
EVAL_KEEP_RATES = (0.3, 0.5, 0.7, 0.9)  # patchlife eval's default table rows


def ints(text: str) -> list[int]:
    """``"1,4,7"`` -> ``[1, 4, 7]``."""
    return [int(v) for v in text.split(",") if v.strip()]


def floats(text: str) -> list[float]:
    """``"0.5,0.7"`` -> ``[0.5, 0.7]``."""
    return [float(v) for v in text.split(",") if v.strip()]


def evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--data", type=Path, default=None, help="ImageFolder root: evaluates its val/ split")
    p.add_argument("--synthetic", action="store_true", help="the synthetic task's held-out split")
    p.add_argument("--val-size", type=int, default=None, help="synthetic: held-out images (default: the training one)")
    p.add_argument("--seed", type=int, default=None, help="synthetic: data seed (default: the training one)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images (default: all)")
    p.add_argument("--keep-rates", default=",".join(map(str, EVAL_KEEP_RATES)), help="comma-separated keep rates")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument("--buckets", type=int, default=GRID_SIZE,
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
    d.add_argument("--crop-scale", type=float, default=0.08,
                   help="ImageFolder: smallest area of the random training crop, as a fraction of the image "
                        "(timm's 0.08; on a small tree, 0.5 or more keeps the object in the crop)")
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
    t.add_argument("--fit-budget", type=int, default=0, metavar="N",
                   help="after calibrating, fit the budget predictor on N training images: per-image "
                        "budgets by what each image needs, at each schedule's mean cost (0: off)")
    r = p.add_argument_group("run")
    r.add_argument("--out", type=Path, default=Path("runs/patchlife"), help="output checkpoint folder")
    r.add_argument("--seed", type=int, default=0, help="seeds the model, the data and its order")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="mixed precision (GPU only): auto picks bf16 where supported")
    r.add_argument("--resume", action="store_true",
                   help="continue from the state saved in --out (OUT/resume.pt): the original command plus --resume")
    r.add_argument("--save-every", type=int, default=200,
                   help="steps between resumable saves (also at each stage's end, its middle, and on Ctrl-C)")
    r.add_argument("--stop-after", type=int, default=None, help="stop (resumably) after this many steps")
    r.add_argument("--name", default=None, help="model name recorded in the checkpoint (default: --out's name)")
    r.add_argument("--description", default=None,
                   help="what the model recognises, recorded in the checkpoint (default: said from the data)")
    r.add_argument("--save-dense", type=Path, default=None, metavar="DIR",
                   help="after stage 0, also save the dense model as a checkpoint in DIR (for --init-from)")
