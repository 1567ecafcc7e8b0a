"""What ``patchlife train`` needs around its loop: option checks, model and data, evaluation, metrics.

Bad configuration stops here, before any training, with a :class:`ConfigError` saying what to change.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from ..backbones import PretrainedUnavailable, preprocess_config
from ..checkpoint import create_lifevit
from ..evaluation.evaluate import calibrated_row, materialise, top1
from ..lifevit import LifeViT
from .data import (
    DataConfigError,
    DataSplit,
    FolderSplit,
    SyntheticShapes,
    folder_splits,
    synthetic_class_names,
    synthetic_splits,
)


class ConfigError(ValueError):
    """The run cannot start as configured; the message says what to change."""


def check_args(args: argparse.Namespace) -> None:
    """Reject options that cannot work before anything is built."""
    problems = _rate_problems(args)
    if args.data is not None and args.synthetic:
        problems.append("give either --data or --synthetic, not both")
    if args.batch_size < 1:
        problems.append("--batch-size must be >= 1")
    if not 0 <= args.warmup < 1:
        problems.append("--warmup is a fraction of each stage in [0, 1)")
    if not 0 < args.crop_scale <= 1:
        problems.append(f"--crop-scale is a fraction of the image in (0, 1], got {args.crop_scale}")
    if args.tau <= 0:
        problems.append("--tau must be > 0")
    if not 0 <= args.label_smoothing < 1 or not 0 <= args.distill <= 1:
        problems.append("--label-smoothing must be in [0, 1) and --distill in [0, 1]")
    if getattr(args, "fit_budget", 0) < 0 or (getattr(args, "fit_budget", 0) > 0 and args.calibrate == 0):
        problems.append("--fit-budget must be >= 0, and needs --calibrate > 0 (it fits calibrated budgets)")
    if args.calibrate < 0 or args.save_every < 1 or args.train_size < 1 or args.val_size < 1:
        problems.append("--calibrate must be >= 0; --save-every, --train-size and --val-size >= 1")
    problems += [p for s in range(3) for p in _stage_problems(args, s)]
    if args.resume and args.out is not None and not (Path(args.out) / "resume.pt").is_file():
        problems.append(f"--resume: nothing to resume in {args.out} (no resume.pt); drop --resume")
    if problems:
        raise ConfigError("; ".join(problems))


def _rate_problems(args: argparse.Namespace) -> list[str]:
    out = []
    if not 0 < args.keep_rate <= 1:
        out.append(f"--keep-rate must be in (0, 1], got {args.keep_rate}")
    if any(not 0 < r <= 1 for r in args.stage2_keep_rates or []):
        out.append(f"--stage2-keep-rates must lie in (0, 1], got {args.stage2_keep_rates}")
    return out


def _stage_problems(args: argparse.Namespace, s: int) -> list[str]:
    steps, epochs = getattr(args, f"stage{s}_steps"), getattr(args, f"stage{s}_epochs")
    out = []
    if steps is not None and epochs is not None:
        out.append(f"give --stage{s}-steps or --stage{s}-epochs, not both")
    if (steps is not None and steps < 0) or (epochs is not None and epochs < 0):
        out.append(f"stage {s} length must be >= 0")
    if getattr(args, f"stage{s}_lr") <= 0:
        out.append(f"--stage{s}-lr must be > 0")
    return out


def _class_names(args: argparse.Namespace) -> list[str]:
    if args.data is None:
        return synthetic_class_names()
    root = Path(args.data)
    names = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(f"{root / split} is not a folder: --data needs an ImageFolder root with train/ "
                              "and val/ (one sub-folder of images per class in each)")
        names[split] = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    if not names["train"]:
        raise ConfigError(f"{root / 'train'} has no class sub-folders")
    if names["train"] != names["val"]:
        only_t = sorted(set(names["train"]) - set(names["val"]))
        only_v = sorted(set(names["val"]) - set(names["train"]))
        raise ConfigError(f"train/ and val/ under {root} have different classes: only in train/: "
                          f"{only_t or '-'}; only in val/: {only_v or '-'}. Give both splits the same class folders")
    return names["train"]


@torch.no_grad()
def mimetic_init_(backbone: VisionTransformer, seed: int = 0, qk: tuple[float, float] = (0.7, 0.7),
                  vp: tuple[float, float] = (0.4, 0.4)) -> None:
    """Mimetic initialisation of every attention layer (Trockman & Kolter, ICML 2023).

    Sets each head's ``Wq^T Wk`` to a rank-``d/heads`` approximation of ``a Z + b I`` and the value
    and output projections to ``Wv^T Wp^T = a' Z' - b' I`` (``Z`` Gaussian with variance ``1/d``), so
    attention starts out preferring similar tokens, as in trained ViTs. From scratch on the synthetic
    task this took a micro ViT from 26% to 92% held-out top-1 after the same 9.6k images.
    """
    g = torch.Generator().manual_seed(seed)

    def factors(alpha: float, beta: float, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = alpha * torch.randn(d, d, generator=g) / d**0.5 + beta * torch.eye(d)
        return torch.linalg.svd(m)

    for blk in backbone.blocks:
        attn: Any = blk.attn
        d, heads = attn.qkv.in_features, attn.num_heads
        dh = d // heads
        w = attn.qkv.weight  # [3d, d]: rows are q, k, v output features
        for h in range(heads):
            u, s, vh = factors(qk[0], qk[1], d)
            rows = slice(h * dh, (h + 1) * dh)
            w[rows] = (u[:, :dh] * s[:dh].sqrt()).T.to(w)
            w[d:][rows] = (s[:dh].sqrt()[:, None] * vh[:dh]).to(w)
        u, s, vh = factors(vp[0], -vp[1], d)
        w[2 * d:] = (u * s.sqrt()).T.to(w)
        attn.proj.weight.copy_((s.sqrt()[:, None] * vh).T)


def build_model(args: argparse.Namespace) -> LifeViT:
    """The LifeViT to train, with as many classes as the data has."""
    classes = _class_names(args)
    pretrained: bool | str = False
    if args.pretrained:
        pretrained = True if args.pretrained == "hub" else args.pretrained
    try:
        model = create_lifevit(args.backbone, args.keep_rate, stage_starts=args.stage_starts,
                               patch_counts=args.patch_counts, pretrained=pretrained, num_classes=len(classes))
    except PretrainedUnavailable as exc:
        raise ConfigError(str(exc)) from exc
    except (ValueError, TypeError) as exc:  # unknown backbone, schedule that does not fit
        raise ConfigError(f"{exc} (check --backbone, --keep-rate, --stage-starts, --patch-counts)") from exc
    if not pretrained and args.init == "mimetic":
        mimetic_init_(model.backbone, seed=args.seed)
    if args.data is None:
        # Synthetic images are rendered at the input size: serve them without a resize/crop either.
        bb: Any = model.backbone
        bb.pretrained_cfg = {**bb.pretrained_cfg, "crop_pct": 1.0}
    return model


def build_data(args: argparse.Namespace, model: LifeViT) -> tuple[DataSplit, DataSplit]:
    pre = preprocess_config(model.backbone)
    if args.data is not None:
        try:
            return folder_splits(args.data, pre, workers=args.workers, crop_scale=args.crop_scale)
        except DataConfigError as exc:
            raise ConfigError(str(exc)) from exc
    size = int(pre["input_size"][-1])
    return synthetic_splits(args.train_size, args.val_size, args.seed, size, pre["mean"], pre["std"])


def data_spec(args: argparse.Namespace, train: DataSplit, val: DataSplit) -> dict[str, Any]:
    """Recorded in the checkpoint, so ``patchlife eval`` finds the held-out split by itself."""
    if isinstance(train, FolderSplit):
        return {"kind": "folder", "root": str(Path(args.data).resolve()), "train_size": len(train),
                "val_size": len(val)}
    assert isinstance(train, SyntheticShapes)
    return {"kind": "synthetic", "seed": args.seed, "train_size": len(train), "val_size": len(val)}


def quick_eval(model: LifeViT, val: DataSplit, after: str, device: torch.device, batch_size: int) -> dict[str, Any]:
    """Held-out top-1 after a stage: dense, life at the model's schedule, and calibrated when set."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    batches = materialise(val, batch_size, device=device)
    out: dict[str, Any] = {"after": after}
    out["val_top1_dense"] = round(top1(model.forward_dense, batches)[0], 4)
    if after != "dense":
        out["val_top1_life"] = round(top1(model.at(normalization="per_image"), batches)[0], 4)
    if after == "calibrated":
        row = calibrated_row(model, batches, model.schedule.keep_rate or 1.0)
        out["val_top1_life_calibrated"] = round(row.top1, 4)
        out["budget"] = row.budget
    out["seconds"] = round(time.perf_counter() - t0, 1)
    model.train(was_training)
    summary = ", ".join(f"{k.removeprefix('val_top1_')} {100 * v:.2f}%" for k, v in out.items()
                        if k.startswith("val_top1_"))
    print(f"held-out after {after}: {summary}", flush=True)
    return out


def write_metrics(out: Path, args: argparse.Namespace, state: Any, meta: dict[str, Any]) -> Path:
    body = {
        "name": meta["name"], "description": meta.get("description", ""), "command": meta["command"],
        "data": meta["data"], "wall_seconds": round(state.wall_seconds, 1), "train_seconds": round(state.seconds, 1),
        # CPU time of this process (all its threads): on a shared machine, wall time alone overstates the cost
        "process_cpu_seconds": round(time.process_time(), 1),
        "history": state.history,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in ("resume", "stop_after", "argv", "original_argv")},
        "machine": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
                    "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
                    "processor": platform.processor() or platform.machine(),
                    # the kernels torch picked (AVX512, AVX2, ...): with a different set, the same command,
                    # seed and thread count trains different weights (issue 29: 98.83% against 91.37% dense)
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()},
    }
    path = Path(out) / "metrics.json"
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path
