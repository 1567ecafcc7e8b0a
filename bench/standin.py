"""A stand-in device for measuring the service around the model: never used to serve answers.

    python -m bench.standin_serve [--table FILE] serve [serve options]   # patchlife serve, engine stood in

:class:`StandInEngine` is the real :class:`~service.runtime.engine.Engine` (the checkpoint gives it
the card, schedules, bucket grid, token and GFLOP counts, so the worker batches exactly as it would)
with ``head`` and ``tail`` replaced: instead of running the model, each call books the time a
measured :class:`Table` gives for its batch size and tail tokens on a :class:`DeviceQueue`, and
returns at once, as a GPU launch does. Its answers are host copies whose ``event`` completes at that
deadline (:class:`Deadline`, the duck type of ``torch.cuda.Event`` that ``HostCopy`` reads), so the
worker overlaps launches and waits exactly as on a GPU, and waiting sleeps: the stand-in uses no CPU
for the device's time. What it still does on the host is what a GPU host's model process does: the
pixels are stacked into one staging buffer (the real engine's copy into pinned memory), and the
plan and probabilities are made as tensors of the real shapes (lives, budgets and buckets ``[B, ...]``,
probabilities ``[n, K]`` summing to 1). The probabilities do not depend on the image, so the answers
are shaped right and mean nothing.

Budgets are each keep rate's schedule counts (the paper's fixed counts), each run at its bucket on
the grid: one tail call per keep rate in a batch. A calibrated model's content-dependent spread over
several buckets is not reproduced.

How ``serve`` gets it: ``python -m bench.standin_serve`` calls :func:`install`, which replaces
``Engine.from_settings`` in that process only, then runs ``patchlife serve``, whose model process
(the single process, or with API processes the model process, which is this process) builds its
engine through that method. Nothing in ``service/`` reads a setting, an environment variable or a
checkpoint marker for it, so no production path can take it by mistake; the API processes (spawned,
never loading an engine) run the production code unchanged. The price: a rename of that method
breaks the bench, which tests/bench/test_standin.py then says.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.api_errors import ApiError
from service.decode import open_header
from service.protocol import ModelCard
from service.runtime.engine import Engine
from service.runtime.gpu_decode import DecodeQueue
from service.runtime.graphs import batch_classes
from service.runtime.handoff import HeadBatch, HostCopy, Rows, stack_into
from service.runtime.local import LocalModel
from service.settings import Settings

TABLES = Path(__file__).parent / "tables"
DEFAULT_TABLE = TABLES / "h200_deit_small.json"


@dataclass(frozen=True)
class Curve:
    """Milliseconds per batch at some batch sizes (rows), linear between them and beyond the last two."""

    rows: tuple[int, ...]
    ms: tuple[float, ...]

    @classmethod
    def read(cls, d: dict[str, Any], what: str) -> Curve:
        rows, ms = tuple(int(r) for r in d["rows"]), tuple(float(m) for m in d["ms"])
        if not rows or len(rows) != len(ms) or list(rows) != sorted(set(rows)) or rows[0] < 1 or min(ms) <= 0:
            raise ValueError(f"{what}: 'rows' increasing from >= 1 and one positive 'ms' each")
        return cls(rows, ms)

    def seconds(self, rows: int) -> float:
        if len(self.rows) == 1:
            return self.ms[0] * rows / self.rows[0] / 1000.0
        i = min(max(bisect.bisect_left(self.rows, rows), 1), len(self.rows) - 1)
        (r0, r1), (m0, m1) = self.rows[i - 1:i + 1], self.ms[i - 1:i + 1]
        return max(m0 + (m1 - m0) * (rows - r0) / (r1 - r0), 1e-3) / 1000.0


@dataclass(frozen=True)
class Table:
    """A measured device: the head's time per batch size, the tail's per batch size at
    ``tail_tokens`` tokens per image (other counts take their share of it). A JSON file::

        {"name": ..., "source": ..., "head": {"rows": [1, 64], "ms": [0.6, 1.8]},
         "tail": {"tokens_per_row": 864, "rows": [1, 64], "ms": [0.65, 1.95]}}
    """

    name: str
    source: str
    head: Curve
    tail: Curve
    tail_tokens: int

    @classmethod
    def load(cls, path: Path = DEFAULT_TABLE) -> Table:
        try:
            d = json.loads(Path(path).read_text())
            tokens = int(d["tail"]["tokens_per_row"])
            if tokens < 1:
                raise ValueError("tail: tokens_per_row >= 1")
            return cls(str(d.get("name", Path(path).stem)), str(d.get("source", "")),
                       Curve.read(d["head"], "head"), Curve.read(d["tail"], "tail"), tokens)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"stand-in table {path}: {exc}") from None

    def seconds(self, phase: str, rows: int, tokens_per_row: int = 0) -> float:
        if phase == "head":
            return self.head.seconds(rows)
        return self.tail.seconds(rows) * tokens_per_row / self.tail_tokens


class Deadline:
    """What ``HostCopy.event`` is on a GPU (``query``, ``synchronize``), completing at a time on
    ``time.monotonic``; waiting for it sleeps (no CPU), as a blocking CUDA sync would."""

    def __init__(self, at: float) -> None:
        self.at = at

    def query(self) -> bool:
        return time.monotonic() >= self.at

    def synchronize(self) -> None:
        delay = self.at - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class DeviceQueue:
    """One stream: work launched runs after what was launched before it, each for its table time."""

    def __init__(self) -> None:
        self._free_at = 0.0
        self._lock = threading.Lock()  # the warm-up and the worker thread may both launch
        self.busy_s = 0.0

    def launch(self, seconds: float) -> Deadline:
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + seconds
            self.busy_s += seconds
            return Deadline(self._free_at)


class StandInEngine(Engine):
    """:class:`Engine` with the model's time taken from ``table`` instead of spent (see the module)."""

    def __init__(self, table: Table, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.table = table
        self.queue = DeviceQueue()
        self._classes = batch_classes(self.max_batch_size)
        k = len(self.class_names)
        # fixed, not uniform, so that top-k has an order: the answers are shaped, not meaningful
        self._probs = torch.softmax(-torch.arange(k, dtype=torch.float32) / max(k, 1), dim=0)
        self._lives: dict[float | None, torch.Tensor] = {}  # keep rate -> [P] lives of its schedule
        self._staging: torch.Tensor | None = None

    @classmethod
    def from_table(cls, table: Table, settings: Settings) -> StandInEngine:
        s = settings
        return cls(table, s.checkpoint, "cpu", "float32", s.keep_rate, s.buckets, s.grid_keep_rates(), s.bucket_step,
                   "off", s.max_batch_size)

    @property
    def asynchronous(self) -> bool:
        return True  # launches return at once; reading a copy waits (as on a GPU)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "stand_in": {"table": self.table.name, "source": self.table.source}}

    def padded_rows(self, n: int) -> int:
        """The batch-size class a GPU's captured graphs would run ``n`` images as."""
        return next((c for c in self._classes if c >= n), n)

    def _stage(self, pixels: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Copy the pixels into one staging buffer, as the real engine copies them into pinned memory."""
        if isinstance(pixels, torch.Tensor):
            return
        n, first = len(pixels), pixels[0]
        if self._staging is None or self._staging.shape[0] < n or self._staging.shape[1:] != first.shape:
            self._staging = torch.empty((max(n, self.max_batch_size), *first.shape), dtype=first.dtype)
        stack_into(pixels, self._staging[:n])  # as the engine stages them (no intra-op thread team)

    def _lives_of(self, rate: float | None) -> torch.Tensor:
        if rate not in self._lives:
            lives = self.schedule(rate).ideal_lives()  # descending; as a grid, any order is a valid answer
            self._lives[rate] = lives[:self.grid[0] * self.grid[1]].float()
        return self._lives[rate]

    def head(self, pixels: torch.Tensor | Sequence[torch.Tensor], keep_rates: Sequence[float | None],
             extra_rates: Sequence[float] = ()) -> HeadBatch:
        n = len(pixels)
        if len(keep_rates) != n:
            raise ValueError("one keep rate (or None) per image")
        self._stage(pixels)
        distinct = set(keep_rates)
        if len(distinct) == 1:  # one request's batch: no loop over images
            (rate,) = distinct
            counts = torch.tensor(self.schedule_counts(rate)).expand(n, -1)
            lives = self._lives_of(rate).expand(n, -1)
        else:
            counts = torch.tensor([self.schedule_counts(r) for r in keep_rates])
            lives = torch.stack([self._lives_of(r) for r in keep_rates])
        buckets = self.bucket_grid.round_up_rows(counts, self._host_points)
        plan = torch.cat([lives, counts.float(), buckets.float()], dim=1)
        for extra in extra_rates:  # accuracy scaling's lower rates: that schedule's counts for every image
            at = torch.tensor(self.schedule_counts(extra)).expand(n, -1)
            plan = torch.cat([plan, at.float(), self.bucket_grid.round_up_rows(at, self._host_points).float()], dim=1)
        deadline = self.queue.launch(self.table.seconds("head", self.padded_rows(n)))
        rate_of = {r: float(self.schedule(r).keep_rate or 0.0) for r in distinct}
        rates = [rate_of[r] for r in keep_rates]
        tokens = torch.empty((n, 0, 0))  # on a GPU they stay on the device; nothing here reads them
        # as the real engine: with per-image normalisation budgets are known before the head has run
        known = (counts, buckets) if self.model.normalization == "per_image" else None
        return HeadBatch(tokens, HostCopy(plan, deadline), rates, self.grid, known, tuple(extra_rates))

    def _tail_launch(self, n: int, counts: tuple[int, ...]) -> Deadline:
        return self.queue.launch(self.table.seconds("tail", self.padded_rows(n), self.tail_tokens(counts)))

    def tail(self, parts: Sequence[Rows], counts: Sequence[int]) -> HostCopy:
        if not parts:
            raise ValueError("a tail call needs at least one row")
        n = sum(len(p) for p in parts)
        return HostCopy(self._answer(n), self._tail_launch(n, tuple(int(c) for c in counts)))

    def tail_by_bucket(self, hb: HeadBatch) -> HostCopy:
        keys, sizes = torch.unique(hb.buckets, dim=0, return_counts=True)
        deadline = None
        for counts, size in zip(keys.tolist(), sizes.tolist(), strict=True):
            deadline = self._tail_launch(int(size), tuple(counts))
        return HostCopy(self._answer(len(hb)), deadline)

    def _answer(self, n: int) -> torch.Tensor:
        """``[n, K]`` probabilities of its own, as a GPU's copy lands them in host memory: one memcpy
        (numpy: ``clone`` would wake the intra-op thread team, which the real engine's copy does not)."""
        return torch.from_numpy(np.repeat(self._probs.numpy()[None], n, axis=0))


class StandInDecoder:
    """What :class:`~service.runtime.gpu_decode.BatchDecoder` is to its :class:`DecodeQueue` (``device``,
    ``each``) for a model process that decodes JPEGs on its device: each image's header is read and
    checked on the host as there (``open_header``: the limits, a bad file fails only its request), then the
    batch takes ``seconds_per_image`` per image of device time, slept (no CPU), and comes back as the
    model's input, ``uint8 [3, side, side]`` of zeros (the answers are shaped, not meaningful). On a GPU
    host the pixels stay on the device; here the head's staging copy reads them on the host (about 14 µs
    per image of model-process CPU a GPU host does not spend)."""

    device = torch.device("cpu")

    def __init__(self, side: int, seconds_per_image: float, max_pixels: int) -> None:
        self.seconds_per_image, self.max_pixels = seconds_per_image, max_pixels
        self._pixels = torch.zeros((3, side, side), dtype=torch.uint8)

    def each(self, images: Sequence[bytes], sources: Sequence[str] | None = None) -> list[Any]:
        names = list(sources) if sources is not None else [f"images[{i}]" for i in range(len(images))]
        out: list[Any] = []
        for data, name in zip(images, names, strict=True):
            try:
                open_header(data, self.max_pixels, name)
                out.append(self._pixels)
            except ApiError as exc:
                out.append(exc)
        time.sleep(self.seconds_per_image * len(images))
        return out


def install(table: Table, decode_ms: float | None = None) -> None:
    """Every engine this process builds from settings is a stand-in (``patchlife serve`` builds one);
    with ``decode_ms``, its model process also decodes JPEGs "on the device" (:class:`StandInDecoder`, that
    many ms per image), so the API processes pass them on undecoded, as beside a GPU with
    ``PATCHLIFE_DECODE=auto``."""
    Engine.from_settings = classmethod(  # type: ignore[method-assign, assignment]
        lambda cls, settings: StandInEngine.from_table(table, settings))
    if decode_ms is None:
        return

    def device_decoder(self: LocalModel, card: ModelCard) -> DecodeQueue:
        side = int(card.preprocess["input_size"][-1])
        logging.getLogger("patchlife.standin").warning("JPEGs are decoded on the stand-in device, %g ms per image",
                                                       decode_ms)
        return DecodeQueue(StandInDecoder(side, decode_ms / 1000.0, self.settings.max_image_pixels))  # type: ignore[arg-type]

    LocalModel._device_decoder = device_decoder  # type: ignore[method-assign]
