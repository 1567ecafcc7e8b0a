"""The engine owns the model: the only module of ``service/`` that imports ``model/``.

It exposes the two halves the batching worker schedules separately:

    items = engine.head(pixels, keep_rates)   # phase A: every image costs the same
    probs = engine.tail(items, counts)        # phase B: one static shape per budget bucket

Pixels arrive as ``uint8`` (resized and cropped on the CPU, normalised on the device, so a GPU gets
a quarter of the bytes, from pinned memory). A batch makes one host sync in phase A (lives and
budgets together) and one in phase B (the probabilities). Budgets run at the cheapest point of a
small bucket grid fitted to the model's budgets (``BucketGrid``); on a GPU each (phase, bucket,
batch-size class) is a captured CUDA graph (:mod:`service.graphs`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import Compose, Normalize, PILToTensor

from model import LifeViT, load_checkpoint, slimmed_gflops
from model.checkpoint import DEFAULT_CHECKPOINT, LifeViTConfig
from model.device import resolve_device, resolve_dtype
from model.flops import dense_gflops, tokens_per_block
from model.schedule import KeepSchedule, host_to_device

from .graphs import GraphMode, ShapeRunner

if TYPE_CHECKING:
    from .settings import Settings



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


@dataclass(frozen=True)
class Timing:
    """One measured batch: what the cost model learns from (see :mod:`service.costmodel`)."""

    phase: Literal["head", "tail"]
    rows: int                 # as run, padding included
    tokens_per_row: int       # tail tokens per image (0 for phase A)
    seconds: float


def uint8_transform(preprocess: dict[str, Any]) -> tuple[Compose, torch.Tensor, torch.Tensor]:
    """timm's eval transform split in two: resize/crop to ``uint8 [3, H, W]`` on the CPU, and the
    (mean, std) the device applies after scaling to [0, 1] (what ToTensor + Normalize did)."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    pre: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess.items() if k in keys}
    full = create_transform(**pre)
    geometric = [t for t in full.transforms if not isinstance(t, Normalize) and "ToTensor" not in type(t).__name__]
    norm = next(t for t in full.transforms if isinstance(t, Normalize))
    return Compose([*geometric, PILToTensor()]), torch.as_tensor(norm.mean), torch.as_tensor(norm.std)


class Engine:
    """Loads a checkpoint (or the embedded default) and runs head/tail under inference mode.

    Args:
        checkpoint: checkpoint directory; None for the embedded default model.
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16`` (half precision on a GPU only).
        keep_rate: default keep rate; None keeps the checkpoint's schedule.
        buckets: points of the bucket grid fitted to the model's budgets.
        bucket_keep_rates: keep rates (besides the default) whose budgets the grid is fitted to.
        bucket_step: the grid's per-stage step for checkpoints without a calibration sample.
        cuda_graphs: ``auto`` (graphs on a GPU), ``off``, or ``emulate`` (the padded path without
            graphs, for tests on any device).
        max_batch_size: the largest batch-size class captured.
    """

    def __init__(self, checkpoint: Path | None = None, device: str = "auto", dtype: str = "auto",
                 keep_rate: float | None = None, buckets: int | None = None,
                 bucket_keep_rates: Sequence[float] | None = None, bucket_step: int | None = None,
                 cuda_graphs: str = "auto", max_batch_size: int = 32) -> None:
        path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
        if not (path / "config.json").is_file():
            hint = ("run `make run` or `patchlife ensure-default` to create it" if checkpoint is None
                    else "point PATCHLIFE_CHECKPOINT at a directory written by `patchlife train`")
            raise FileNotFoundError(f"no patchlife checkpoint at {path}: {hint}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device.type == "cuda":  # TF32 products for float32: ~8x the matmul rate, 10-bit mantissa
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        model, cfg = load_checkpoint(path, device="cpu")
        calibration = {k: v.clone() for k, v in model.life.named_buffers()}
        self.model: LifeViT = model.to(self.device, self.dtype).eval()
        for name, value in calibration.items():  # score statistics stay float32: bf16 would move thresholds
            setattr(self.model.life, name, value.to(self.device))
        self.config: LifeViTConfig = cfg
        self.checkpoint = path
        self.default_schedule = self.model.schedule_for(keep_rate)
        self.class_names: list[str] = list(cfg.class_names)
        self.grid: tuple[int, int] = tuple(self.model.backbone.patch_embed.grid_size)  # type: ignore[assignment]
        self.transform, mean, std = uint8_transform(cfg.preprocess)
        # x / 255 then (x - mean) / std, folded into one multiply-add on the device
        self._scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, -1, 1, 1).to(self.device)
        self.dense_gflops = dense_gflops(self.model.backbone)
        grid = {k: v for k, v in (("size", buckets), ("keep_rates", bucket_keep_rates), ("step", bucket_step))
                if v is not None}  # unset: LifeViT.bucket_grid's defaults (Settings gives all three)
        self.buckets = self.model.bucket_grid(**grid, default=self.default_schedule)  # type: ignore[arg-type]
        mode: GraphMode = ("graphs" if self.device.type == "cuda" else "off") if cuda_graphs == "auto" else \
            "off" if cuda_graphs == "off" else "emulate"
        self.runner = ShapeRunner(self.device, max_batch_size, mode)

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        s = settings
        return cls(s.checkpoint, s.device, s.dtype, s.keep_rate, s.buckets, s.grid_keep_rates(), s.bucket_step,
                   s.cuda_graphs, s.max_batch_size)

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
                "dense_gflops": self.dense_gflops, "crop_pct": self.config.preprocess.get("crop_pct"),
                "buckets": [list(p) for p in self.buckets.points] or {"step": self.buckets.step},
                "graphs": self.runner.describe()}

    # -- preprocessing -----------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> ``uint8 [3, H, W]`` resized and cropped as the backbone expects."""
        return self.transform(image.convert("RGB"))

    def schedule(self, keep_rate: float | None) -> KeepSchedule:
        return self.default_schedule if keep_rate is None else self.model.schedule_for(keep_rate)

    def schedule_counts(self, keep_rate: float | None) -> tuple[int, ...]:
        """Patches per stage at ``keep_rate`` (None: the default): an image's budget before phase A."""
        return self.schedule(keep_rate).patch_counts

    @property
    def head_tokens(self) -> int:
        """Tokens one image costs in phase A: (prefix + patches) x the first K blocks."""
        m = self.model
        return int(m.schedule.first_block * (m.num_prefix_tokens + m.num_patches))

    # -- the two phases ----------------------------------------------------------------------
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, 3, H, W]`` on the device -> the model's input (mean/std-normalised, its dtype)."""
        return (pixels.float() * self._scale + self._shift).to(self.dtype)

    def _head_fn(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``uint8 [B, 3, H, W]`` on the device -> (tokens sorted by life, raw scores float32)."""
        state = self.model.head(self.normalize(pixels))
        return state.tokens, state.scores

    def _tail_fn(self, counts: tuple[int, ...]) -> Any:
        def run(tokens: torch.Tensor) -> tuple[torch.Tensor]:
            logits = self.model.tail(tokens, counts)
            return (logits.float().softmax(dim=-1),)
        return run

    @torch.inference_mode()
    def head(self, pixels: torch.Tensor, keep_rates: Sequence[float | None]) -> list[HeadItem]:
        """Phase A for ``uint8 pixels [B, 3, H, W]``: lives and budgets at each image's keep rate."""
        n = pixels.shape[0]
        if len(keep_rates) != n:
            raise ValueError("one keep rate (or None) per image")
        tokens, scores = self.runner.run(("head",), self._head_fn, (host_to_device(pixels, self.device),))
        schedules = [self.schedule(r) for r in keep_rates]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, sched in enumerate(schedules):  # by value: schedule_for builds a new object per call
            groups.setdefault(sched.patch_counts, []).append(i)
        stages = len(self.model.schedule.stage_starts)
        out = scores.new_empty(n, scores.shape[1] + stages)  # lives, then budgets: one copy to the host
        for idx in groups.values():
            sched = schedules[idx[0]]
            rows = slice(None) if len(idx) == n else host_to_device(torch.tensor(idx), self.device)
            lives = self.model.lives(scores[rows], sched)
            out[rows] = torch.cat([lives, self.model.budgets(scores[rows], sched, lives).float()], dim=1)
        host = out.cpu()  # the one host sync of phase A
        lives_cpu = host[:, :-stages].reshape(n, *self.grid)
        budgets = [tuple(int(v) for v in row) for row in host[:, -stages:].tolist()]
        return [HeadItem(tokens[i], lives_cpu[i], budgets[i], float(schedules[i].keep_rate or 0.0),
                         self.gflops(budgets[i])) for i in range(n)]

    @torch.inference_mode()
    def tail(self, items: Sequence[HeadItem], counts: Sequence[int]) -> torch.Tensor:
        """Phase B: blocks ``K..L-1`` for a batch at one static ``counts``; probabilities on the CPU."""
        counts = tuple(int(c) for c in counts)
        keep = self.model.num_prefix_tokens + counts[0]  # the tail starts by cutting to this length
        tokens = torch.stack([it.tokens[:keep] for it in items])
        (probs,) = self.runner.run(("tail", counts), self._tail_fn(counts), (tokens,))
        return probs.cpu()  # the one host sync of phase B

    def padded_rows(self, n: int) -> int:
        """Rows a batch of ``n`` images runs as (its captured batch-size class, or ``n``)."""
        return self.runner.padded_rows(n) if self.runner.shapes else n

    # -- budgets -----------------------------------------------------------------------------
    def bucket(self, budget: Sequence[int]) -> tuple[int, ...]:
        """The budget rounded up to the bucket grid (never down)."""
        return self.buckets.round_up(budget)

    @lru_cache(maxsize=4096)  # noqa: B019 - one engine per process; budgets repeat
    def tail_tokens(self, counts: tuple[int, ...]) -> int:
        """Tokens one image costs in the tail at ``counts``: sum over tail blocks of sequence length."""
        per_block = tokens_per_block(self.model.backbone, self.model.schedule, counts)
        return sum(per_block[self.model.schedule.first_block:])

    @lru_cache(maxsize=4096)  # noqa: B019
    def gflops(self, counts: tuple[int, ...]) -> float:
        return slimmed_gflops(self.model.backbone, self.model.schedule, counts)

    # -- start-up ----------------------------------------------------------------------------
    def _example_pixels(self, rows: int) -> torch.Tensor:
        c, h, w = (int(v) for v in self.config.preprocess.get("input_size", [3, 224, 224]))
        return torch.zeros(rows, c, h, w, dtype=torch.uint8)

    @property
    def tail_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The counts the tail is captured (and timed) at: the grid's points, or with a stepped grid
        the default schedule's bucket."""
        return self.buckets.points or (self.bucket(self.default_schedule.patch_counts),)

    def capture(self) -> dict[str, Any]:
        """Capture the head for every batch-size class and the tail for every (grid point, class)."""
        if not self.runner.enabled:
            return self.runner.describe()
        with torch.inference_mode():
            pixels = self._example_pixels(1).to(self.device)
            self.runner.capture(("head",), self._head_fn, (pixels,))
            tokens, _ = self._head_fn(pixels)
            for counts in self.tail_shapes:
                keep = self.model.num_prefix_tokens + counts[0]
                self.runner.capture(("tail", counts), self._tail_fn(counts), (tokens[:, :keep],))
        return self.runner.describe()

    def warmup(self, batches: int = 2) -> list[Timing]:
        """Capture (on a GPU), run ``batches`` forwards so lazy initialisation happens before /readyz,
        then time batches at two sizes per phase for the cost model's first estimate."""
        self.capture()
        for _ in range(batches):
            items = self.head(self._example_pixels(2), [None, None])
            self.tail(items, self.bucket(items[0].budget))
        timings: list[Timing] = []
        points = self.tail_shapes
        sizes = sorted({1, min(8, self.runner.classes[-1] if self.runner.classes else 8)})
        for rows in sizes:
            for _ in range(2):
                t0 = time.perf_counter()
                items = self.head(self._example_pixels(rows), [None] * rows)
                timings.append(Timing("head", self.padded_rows(rows), 0, time.perf_counter() - t0))
            for counts in (points[0], points[-1]):
                for _ in range(2):
                    t0 = time.perf_counter()
                    self.tail(items, counts)
                    timings.append(Timing("tail", self.padded_rows(rows), self.tail_tokens(counts),
                                          time.perf_counter() - t0))
        return timings
