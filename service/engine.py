"""The engine owns the model: the only module of ``service/`` that imports ``model/``.

It exposes the two halves the batching worker schedules separately:

    items = engine.head(pixels, keep_rates)   # phase A: every image costs the same
    probs = engine.tail(items, counts)        # phase B: one static shape per budget bucket
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform

from model import LifeViT, load_checkpoint, round_up_budget, slimmed_gflops
from model.checkpoint import DEFAULT_CHECKPOINT, LifeViTConfig
from model.flops import dense_gflops, tokens_per_block
from model.lifevit import HeadState
from model.schedule import KeepSchedule

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class HeadItem:
    """One image after phase A.

    tokens: ``[T+P, C]`` on the model's device, prefix first, patches by descending life.
    lives: ``[rows, cols]`` float32 on the CPU, layer units, patch-grid order.
    budget: patches alive per stage for the image's keep rate (its own counts).
    """

    tokens: torch.Tensor
    lives: torch.Tensor
    budget: tuple[int, ...]
    keep_rate: float
    gflops: float


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PATCHLIFE_DEVICE=cuda but torch sees no GPU; use auto or cpu")
    return torch.device(device)


class Engine:
    """Loads a checkpoint (or the embedded default) and runs head/tail under inference mode.

    Args:
        checkpoint: checkpoint directory; None for the embedded default model.
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: ``float32``, ``float16`` or ``bfloat16`` (half precision on a GPU only).
        bucket_step: budget buckets are multiples of this many patches.
        keep_rate: default keep rate; None keeps the checkpoint's schedule.
    """

    def __init__(self, checkpoint: Path | None = None, device: str = "auto", dtype: str = "float32",
                 bucket_step: int = 8, keep_rate: float | None = None) -> None:
        path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
        if not (path / "config.json").is_file():
            hint = ("run `make run` or `patchlife ensure-default` to create it" if checkpoint is None
                    else "point PATCHLIFE_CHECKPOINT at a directory written by `patchlife train`")
            raise FileNotFoundError(f"no patchlife checkpoint at {path}: {hint}")
        self.device = resolve_device(device)
        if dtype != "float32" and self.device.type != "cuda":
            raise ValueError(f"dtype {dtype} needs a GPU; the model runs on {self.device}")
        self.dtype = DTYPES[dtype]
        model, cfg = load_checkpoint(path, device="cpu")
        self.model: LifeViT = model.to(self.device, self.dtype).eval()
        self.config: LifeViTConfig = cfg
        self.checkpoint = path
        self.bucket_step = bucket_step
        self.default_schedule = self.model.schedule_for(keep_rate)
        self.class_names: list[str] = list(cfg.class_names)
        self.grid: tuple[int, int] = tuple(self.model.backbone.patch_embed.grid_size)  # type: ignore[assignment]
        keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
        pre: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                               for k, v in cfg.preprocess.items() if k in keys}
        self.transform = create_transform(**pre)
        self.dense_gflops = dense_gflops(self.model.backbone)

    # -- description -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.config.metadata.get("name", self.checkpoint.name))

    def info(self) -> dict[str, Any]:
        s = self.default_schedule
        return {"name": self.name, "description": str(self.config.metadata.get("description", "")),
                "backbone": self.config.backbone, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "normalization": self.model.normalization,
                "num_classes": len(self.class_names), "classes": self.class_names,
                "grid": list(self.grid), "input_size": list(self.config.preprocess.get("input_size", [])),
                "schedule": {"keep_rate": s.keep_rate, "stage_starts": list(s.stage_starts),
                             "patch_counts": list(s.patch_counts), "depth": s.depth},
                "dense_gflops": self.dense_gflops}

    # -- preprocessing -----------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> ``[3, H, W]`` float32 with the backbone's resize/crop/normalisation."""
        return self.transform(image.convert("RGB"))

    def schedule(self, keep_rate: float | None) -> KeepSchedule:
        return self.default_schedule if keep_rate is None else self.model.schedule_for(keep_rate)

    # -- the two phases ----------------------------------------------------------------------
    @torch.inference_mode()
    def head(self, pixels: torch.Tensor, keep_rates: Sequence[float | None]) -> list[HeadItem]:
        """Phase A for ``pixels [B, 3, H, W]``: lives and budgets at each image's keep rate."""
        if len(keep_rates) != pixels.shape[0]:
            raise ValueError("one keep rate (or None) per image")
        state = self.model.head(pixels.to(self.device, self.dtype, non_blocking=True))
        scores = state.scores.float()
        lives = torch.empty_like(scores)
        budgets: list[tuple[int, ...]] = [()] * len(keep_rates)
        rates = [self.schedule(r) for r in keep_rates]
        for sched in {id(s): s for s in rates}.values():  # one pass per distinct keep rate
            idx = [i for i, s in enumerate(rates) if s is sched]
            lv = self.model.lives(scores[idx], sched)
            lives[idx] = lv
            for i, b in zip(idx, self.model.budgets(scores[idx], sched).tolist(), strict=True):
                budgets[i] = tuple(b)
        lives_cpu = lives.cpu().reshape(-1, *self.grid)
        return [HeadItem(state.tokens[i], lives_cpu[i], budgets[i], float(rates[i].keep_rate or 0.0),
                         self.gflops(budgets[i]))
                for i in range(pixels.shape[0])]

    @torch.inference_mode()
    def tail(self, items: Sequence[HeadItem], counts: Sequence[int]) -> torch.Tensor:
        """Phase B: blocks ``K..L-1`` for a batch at one static ``counts``; probabilities on the CPU."""
        tokens = torch.stack([it.tokens for it in items])
        logits = self.model.tail(HeadState(tokens, tokens.new_zeros(0)), tuple(counts))  # tail ignores scores
        return logits.float().softmax(dim=-1).cpu()  # .cpu() synchronises a GPU

    # -- budgets -----------------------------------------------------------------------------
    def bucket(self, budget: Sequence[int]) -> tuple[int, ...]:
        """The budget rounded up to the bucket grid (never down)."""
        return round_up_budget(budget, self.model.schedule, self.bucket_step)

    @lru_cache(maxsize=4096)  # noqa: B019 - one engine per process; budgets repeat
    def tail_tokens(self, counts: tuple[int, ...]) -> int:
        """Tokens one image costs in the tail at ``counts``: sum over tail blocks of sequence length."""
        per_block = tokens_per_block(self.model.backbone, self.model.schedule, counts)
        return sum(per_block[self.model.schedule.first_block:])

    @lru_cache(maxsize=4096)  # noqa: B019
    def gflops(self, counts: tuple[int, ...]) -> float:
        return slimmed_gflops(self.model.backbone, self.model.schedule, counts)

    def warmup(self, batches: int = 2) -> float:
        """Run full forwards so lazy initialisation happens before /readyz; returns seconds."""
        t0 = time.perf_counter()
        c, h, w = (int(v) for v in self.config.preprocess.get("input_size", [3, 224, 224]))
        x = torch.zeros(2, c, h, w)
        for _ in range(batches):
            items = self.head(x, [None, None])
            self.tail(items, self.bucket(items[0].budget))
        return time.perf_counter() - t0
