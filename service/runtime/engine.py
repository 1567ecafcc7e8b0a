"""The engine owns the model: the only module of ``service/`` that runs ``model/`` (the settings read
only the grid's torch-free defaults, ``model/defaults.py``).

It exposes the two halves the batching worker schedules separately (types in :mod:`service.runtime.handoff`):

    hb = engine.head(pixels, keep_rates)             # the head: every image costs the same
    copy = engine.tail([Rows(hb, idx)], counts)       # the tail: one static shape per budget bucket
    copy = engine.tail_by_bucket(hb)                 # the tail for a whole head batch, one call per bucket

Pixels arrive as ``uint8`` (resized and cropped on the CPU, normalised on the device, so a GPU gets
a quarter of the bytes, from pinned memory). The head is one replay on a GPU: blocks ``0..K-1``, the
life scores, and for the default keep rate the lives, budgets and buckets (``BucketGrid.round_up_rows``),
packed into one tensor whose copy to the host is queued, not waited for; its answer is a
:class:`HeadBatch` of arrays, never an object per image (with per-image normalisation every image
keeps its rate's counts, so budgets and buckets are known on the host at once, and the tail can be
launched before the head has run). The tail gathers each bucket's rows with one
``index_select`` straight into the captured graph's input buffer and queues the probabilities' copy
to the host. So a batch costs the host a fixed number of ops whatever its size (a CI test counts
them), and nothing here waits for the GPU: the caller does, when it reads a copy. Budgets run at the
cheapest point of a small bucket grid fitted to the model's budgets; on a GPU each (phase, bucket,
batch-size class) is a captured CUDA graph (:mod:`service.runtime.graphs`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from model import LifeViT, load_checkpoint, slimmed_gflops
from model.checkpoint import DEFAULT_CHECKPOINT, LifeViTConfig
from model.device import resolve_device, resolve_dtype
from model.flops import dense_gflops, tokens_per_block
from model.lifevit import by_bucket
from model.schedule import KeepSchedule, host_to_device

from ..protocol import ModelCard
from ..transforms import uint8_transform
from .costmodel import Timing
from .graphs import GraphMode, ShapeRunner, batch_classes
from .handoff import HeadBatch, HostCopy, Rows, stack_into

if TYPE_CHECKING:
    from ..settings import Settings




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
        self.bucket_grid = self.model.bucket_grid(**grid, default=self.default_schedule)  # type: ignore[arg-type]
        self._points = self.bucket_grid.table(self.device)  # made once: a table per call would be a blocking copy
        self._host_points = self.bucket_grid.table()
        mode: GraphMode = ("graphs" if self.device.type == "cuda" else "off") if cuda_graphs == "auto" else \
            "off" if cuda_graphs == "off" else "emulate"
        self.max_batch_size = max_batch_size
        self.runner = ShapeRunner(self.device, max_batch_size, mode)
        # uploads of pixels run on a stream of their own, so they overlap the batch computing before them
        self._upload_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def to(self, device: torch.device | str) -> Engine:
        """Move the model and the engine's device constants (the tests' ``meta`` tier; graphs must be off)."""
        if self.runner.enabled:
            raise ValueError("move the engine before capturing graphs, with cuda_graphs off")
        self.device = torch.device(device)
        self.model.to(self.device)
        self._scale, self._shift, self._points = (t.to(self.device) for t in (self._scale, self._shift, self._points))
        self.runner = ShapeRunner(self.device, 1, "off")
        self._upload_stream = None
        return self

    @property
    def asynchronous(self) -> bool:
        """Whether ``head``/``tail`` only queue work (a GPU): the worker may launch ahead, then wait."""
        return self.device.type == "cuda"

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
                "buckets": [list(p) for p in self.bucket_grid.points] or {"step": self.bucket_grid.step},
                "graphs": self.runner.describe()}

    def card(self) -> ModelCard:
        """The plain description the front end reads (it crosses to the API processes)."""
        info = {k: v for k, v in self.info().items() if k != "graphs"}  # graphs change at warm-up: ModelStatus
        return ModelCard(name=self.name, info=info, class_names=tuple(self.class_names),
                         preprocess=dict(self.config.preprocess), grid=self.grid, dense_gflops=float(self.dense_gflops),
                         first_block=self.default_schedule.first_block, depth=self.default_schedule.depth,
                         checkpoint=str(self.checkpoint), batch_classes=tuple(batch_classes(self.max_batch_size)))

    # -- preprocessing -----------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> ``uint8 [3, H, W]`` resized and cropped as the backbone expects."""
        return self.transform(image.convert("RGB"))

    def schedule(self, keep_rate: float | None) -> KeepSchedule:
        return self.default_schedule if keep_rate is None else self.model.schedule_for(keep_rate)

    def schedule_counts(self, keep_rate: float | None) -> tuple[int, ...]:
        """Patches per stage at ``keep_rate`` (None: the default): an image's budget before the head."""
        return self.schedule(keep_rate).patch_counts

    @property
    def head_tokens(self) -> int:
        """Tokens one image costs in the head: (prefix + patches) x the first K blocks."""
        m = self.model
        return int(m.schedule.first_block * (m.num_prefix_tokens + m.num_patches))

    # -- the two phases ----------------------------------------------------------------------
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, 3, H, W]`` on the device -> the model's input (mean/std-normalised, its dtype)."""
        return pixels.float().mul_(self._scale).add_(self._shift).to(self.dtype)  # in place: half the passes

    def _plan(self, scores: torch.Tensor, schedule: KeepSchedule) -> torch.Tensor:
        """``scores [B, P]`` -> float32 ``[B, P + 2S]``: lives, budgets, buckets (see ``HeadBatch.plan``)."""
        lives = self.model.lives(scores, schedule)
        budgets = self.model.budgets(scores, schedule, lives)
        buckets = self.bucket_grid.round_up_rows(budgets, self._points)
        return torch.cat([lives, budgets.float(), buckets.float()], dim=1)

    def _head_fn(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``uint8 [B, 3, H, W]`` on the device -> (tokens sorted by life, raw scores float32, the plan
        at the default schedule): one captured graph on a GPU."""
        state = self.model.head(self.normalize(pixels))
        return state.tokens, state.scores, self._plan(state.scores, self.default_schedule)

    def _tail_fn(self, counts: tuple[int, ...]) -> Any:
        def run(tokens: torch.Tensor) -> tuple[torch.Tensor]:
            logits = self.model.tail(tokens, counts)
            return (logits.float().softmax(dim=-1),)
        return run

    def _upload(self, pixels: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Pixels (a batch, or one ``[3, H, W]`` tensor per image) on the device. On a GPU they are
        stacked straight into pinned memory and copied on the upload stream, which the compute stream
        then waits for (an event, not the host); pixels already on the device stay there."""
        if isinstance(pixels, torch.Tensor) and pixels.device == self.device:
            return pixels
        if not isinstance(pixels, torch.Tensor) and self.device.type != "cpu" and \
                any(p.device == self.device for p in pixels):
            # decoded on the device (service/runtime/gpu_decode.py): stacked there; slot pixels of the
            # same batch, if any, are copied up one by one
            return torch.stack([p if p.device == self.device else p.to(self.device) for p in pixels])
        if self._upload_stream is None:
            batch = pixels if isinstance(pixels, torch.Tensor) else torch.stack(list(pixels))
            return host_to_device(batch, self.device)
        if isinstance(pixels, torch.Tensor):
            staged = pixels.pin_memory()
        else:
            first = pixels[0]
            staged = stack_into(pixels, torch.empty((len(pixels), *first.shape), dtype=first.dtype,
                                                    pin_memory=True))
        compute = torch.cuda.current_stream(self.device)
        # No wait on compute first: the upload stream allocates from its own pool, so the copy runs
        # while the batch before it computes; the host block stays held until its copy has run.
        with torch.cuda.stream(self._upload_stream):
            on_device = staged.to(self.device, non_blocking=True)
        compute.wait_stream(self._upload_stream)
        on_device.record_stream(compute)  # the allocator must not reuse it before compute has read it
        return on_device

    @torch.inference_mode()
    def head(self, pixels: torch.Tensor | Sequence[torch.Tensor], keep_rates: Sequence[float | None],
             extra_rates: Sequence[float] = ()) -> HeadBatch:
        """The head for ``uint8`` pixels (``[B, 3, H, W]``, or B tensors ``[3, H, W]``) at each image's
        keep rate. Returns at once on a GPU: the plan's copy to the host is queued, not waited for.
        ``extra_rates``: also plan every image's budget and bucket at these rates (accuracy scaling
        may run its tail at one of them: ``HeadBatch.at_rate``), in the same copy."""
        n = len(pixels)
        if len(keep_rates) != n:
            raise ValueError("one keep rate (or None) per image")
        tokens, scores, plan = self.runner.run(("head",), self._head_fn, (self._upload(pixels),))
        if self.runner.holds(("head",), n):
            tokens = tokens.clone()  # the tail reads it after later replays have reused the buffer
        default = self.default_schedule
        rates = [float(default.keep_rate or 0.0)] * n
        static = self.model.normalization == "per_image"  # budgets = each rate's counts: known now
        budgets = torch.tensor(default.patch_counts).expand(n, -1).clone() if static else None
        for rate, rows in _rows_by_rate(keep_rates).items():  # one pass per rate besides the default
            schedule = self.schedule(rate)
            value = float(schedule.keep_rate or 0.0)
            if len(rows) == n:
                rates = [value] * n
            else:
                for i in rows:
                    rates[i] = value
            if schedule.patch_counts != default.patch_counts:  # by value: schedule_for makes new objects
                index = host_to_device(torch.tensor(rows), self.device)
                plan[index] = self._plan(scores[index], schedule)
                if budgets is not None:
                    budgets[rows] = torch.tensor(schedule.patch_counts)
        known = None if budgets is None else (budgets, self.bucket_grid.round_up_rows(budgets, self._host_points))
        if extra_rates:
            plan = torch.cat([plan, *self._extra_plans(scores, extra_rates)], dim=1)
        return HeadBatch(tokens, HostCopy.start(plan), rates, self.grid, known, tuple(extra_rates))

    def _extra_plans(self, scores: torch.Tensor, rates: Sequence[float]) -> list[torch.Tensor]:
        """Budgets and buckets (float32 ``[B, S]`` each) of every image at each of ``rates``: the lives
        are known after the head, so the tail can be re-bucketed at a lower rate without the device."""
        out: list[torch.Tensor] = []
        for rate in rates:
            budgets = self.model.budgets(scores, self.schedule(rate))
            out += [budgets.float(), self.bucket_grid.round_up_rows(budgets, self._points).float()]
        return out

    def _tail_probs(self, parts: Sequence[Rows], counts: tuple[int, ...]) -> torch.Tensor:
        """Probabilities ``[n, K]`` on the device for the rows of ``parts`` (in order) at ``counts``: each
        part one ``index_select`` into the captured input buffer, then one replay."""
        keep = self.model.num_prefix_tokens + counts[0]  # the tail starts by cutting to this length
        n = sum(len(p) for p in parts)
        key = ("tail", counts)
        statics = self.runner.static_inputs(key, n)
        if statics is None:
            self.runner.count_eager()
            width = parts[0].batch.tokens.shape[-1]
            dest = torch.empty(n, keep, width, dtype=self.dtype, device=self.device)
        else:
            dest = statics[0]
        offset = 0
        for part in parts:
            index = host_to_device(part.index, self.device)
            rows = len(part)
            torch.index_select(part.batch.tokens[:, :keep], 0, index, out=dest[offset:offset + rows])
            offset += rows
        (probs,) = self._tail_fn(counts)(dest) if statics is None else self.runner.replay(key, n)
        return probs

    @torch.inference_mode()
    def tail(self, parts: Sequence[Rows], counts: Sequence[int]) -> HostCopy:
        """The tail at one static ``counts`` for the rows of ``parts`` (possibly of several head batches):
        the probabilities ``[n, K]`` on their way to the host, rows in part order."""
        if not parts:
            raise ValueError("a tail call needs at least one row")
        return HostCopy.start(self._tail_probs(parts, tuple(int(c) for c in counts)))

    @torch.inference_mode()
    def tail_by_bucket(self, hb: HeadBatch) -> HostCopy:
        """The tail for every image of ``hb`` at its bucket: one tail call per bucket, the answers of all
        of them in one tensor ``[B, K]`` (input order) and one copy to the host. Reads ``hb.buckets``."""
        return HostCopy.start(by_bucket(hb.buckets, lambda index, counts: self._tail_probs([Rows(hb, index)], counts),
                                        self.device))

    def run_batch(self, pixels: torch.Tensor | Sequence[torch.Tensor],
                  keep_rates: Sequence[float | None] | None = None) -> tuple[HeadBatch, torch.Tensor]:
        """One batch as the worker runs it, without its queues: the head, one tail call per bucket,
        the probabilities ``[B, K]`` read on the host (waits for them). The offline runner that the
        benches, the load test's reference and the warm-up share; ``keep_rates`` None: the default."""
        hb = self.head(pixels, [None] * len(pixels) if keep_rates is None else keep_rates)
        return hb, self.tail_by_bucket(hb).get()

    def padded_rows(self, n: int) -> int:
        """Rows a batch of ``n`` images runs as (its captured batch-size class, or ``n``)."""
        return self.runner.padded_rows(n) if self.runner.shapes else n

    # -- budgets -----------------------------------------------------------------------------
    def bucket(self, budget: Sequence[int]) -> tuple[int, ...]:
        """The budget rounded up to the bucket grid (never down)."""
        return self.bucket_grid.round_up(budget)

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
        return self.bucket_grid.points or (self.bucket(self.default_schedule.patch_counts),)

    def capture(self) -> dict[str, Any]:
        """Capture the head for every batch-size class and the tail for every (grid point, class)."""
        if not self.runner.enabled:
            return self.runner.describe()
        with torch.inference_mode():
            pixels = self._example_pixels(1).to(self.device)
            self.runner.capture(("head",), self._head_fn, (pixels,))
            tokens, _, _ = self._head_fn(pixels)
            for counts in self.tail_shapes:
                keep = self.model.num_prefix_tokens + counts[0]
                self.runner.capture(("tail", counts), self._tail_fn(counts), (tokens[:, :keep],))
        return self.runner.describe()

    def warmup(self, batches: int = 2) -> list[Timing]:
        """Capture (on a GPU), run ``batches`` forwards so lazy initialisation happens before /readyz,
        then time batches at two sizes per phase for the cost model's first estimate."""
        self.capture()
        for _ in range(batches):
            self.run_batch(self._example_pixels(2))
        timings: list[Timing] = []
        points = self.tail_shapes
        sizes = sorted({1, min(8, self.runner.classes[-1] if self.runner.classes else 8)})
        for rows in sizes:  # each timed to its host copy, as the worker times a batch
            for _ in range(2):
                t0 = time.perf_counter()
                hb = self.head(self._example_pixels(rows), [None] * rows)
                hb.plan.get()
                timings.append(Timing("head", self.padded_rows(rows), 0, time.perf_counter() - t0))
            every = [Rows(hb, torch.arange(rows))]
            for counts in (points[0], points[-1]):
                for _ in range(2):
                    t0 = time.perf_counter()
                    self.tail(every, counts).get()
                    timings.append(Timing("tail", self.padded_rows(rows), self.tail_tokens(counts),
                                          time.perf_counter() - t0))
        return timings


def _rows_by_rate(keep_rates: Sequence[float | None]) -> dict[float, list[int]]:
    """Rows per keep rate other than None (the default). A batch from one request has one rate: then
    no loop over its images."""
    distinct = set(keep_rates)
    if distinct == {None}:
        return {}
    if len(distinct) == 1:
        (rate,) = distinct
        return {rate: list(range(len(keep_rates)))}  # type: ignore[dict-item]
    out: dict[float, list[int]] = {}
    for i, rate in enumerate(keep_rates):
        if rate is not None:
            out.setdefault(rate, []).append(i)
    return out
