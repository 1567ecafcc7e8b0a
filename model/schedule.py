"""Keep schedules, per-image budgets (patch counts per stage) and the bucket grid.

A schedule says, for each pruning *stage*, the block where it starts and how many patch tokens
stay alive from that block on. Prefix tokens (the class token, register tokens) are never counted
here and never dropped: "tokens kept" in the paper's tables = patches kept + prefix tokens.

The rule for an arbitrary keep rate ``r`` is EViT's (which the life-regression paper reuses):
``p_s = min(p_{s-1}, ceil(r * p_{s-1}) + 1)`` with ``p_0`` = number of patches. For DeiT (196
patches, class token) and r = 0.7 / 0.8 / 0.9 it gives the paper's 140/100/72, 159/129/105 and
179/163/148 tokens. (EViT fuses the dropped tokens into one extra token; here that slot is one more
kept patch, so the token counts, and hence the FLOPs, are equal.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

PAPER_KEEP_RATES = (0.7, 0.8, 0.9)


def default_stage_starts(depth: int) -> tuple[int, ...]:
    """Blocks where pruning stages start: 4/7/10 for 12 blocks, scaled for other depths."""
    if depth < 4:
        raise ValueError(f"life regression needs at least 4 blocks, the backbone has {depth}")
    first, step = depth // 3, max(1, depth // 4)
    starts = sorted({min(first + i * step, depth - 1) for i in range(3)})
    return tuple(starts)


@dataclass(frozen=True)
class KeepSchedule:
    """Per-stage patch counts.

    Args:
        num_patches: patch tokens entering the first pruning stage.
        depth: number of transformer blocks ``L``.
        stage_starts: block index where each stage starts, increasing; the first is ``K``.
        patch_counts: patches kept in each stage, non-increasing, between 1 and ``num_patches``.
        keep_rate: the rate the counts were made from, if any (for display only).
    """

    num_patches: int
    depth: int
    stage_starts: tuple[int, ...]
    patch_counts: tuple[int, ...]
    keep_rate: float | None = None

    def __post_init__(self) -> None:
        starts, counts = self.stage_starts, self.patch_counts
        if len(starts) == 0 or len(starts) != len(counts):
            raise ValueError(f"need one count per stage: starts={starts}, counts={counts}")
        if list(starts) != sorted(set(starts)) or starts[0] < 1 or starts[-1] >= self.depth:
            raise ValueError(f"stage starts must increase within [1, {self.depth - 1}], got {starts}")
        if any(b > a for a, b in zip(counts, counts[1:])) or counts[-1] < 1 or counts[0] > self.num_patches:
            raise ValueError(
                f"patch counts must be non-increasing within [1, {self.num_patches}], got {counts}")

    @classmethod
    def from_keep_rate(cls, keep_rate: float, num_patches: int, depth: int,
                       stage_starts: Sequence[int] | None = None) -> KeepSchedule:
        """EViT's rule (see module docstring); keep_rate 1.0 means no pruning."""
        if not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        starts = tuple(stage_starts) if stage_starts is not None else default_stage_starts(depth)
        counts, prev = [], num_patches
        for _ in starts:
            prev = min(prev, math.ceil(keep_rate * prev - 1e-9) + 1)
            counts.append(prev)
        return cls(num_patches, depth, starts, tuple(counts), keep_rate)

    @property
    def first_block(self) -> int:
        """``K``: the life module runs after blocks ``0..K-1``."""
        return self.stage_starts[0]

    def stage_of_block(self, block: int) -> int | None:
        """Index of the stage that block ``block`` belongs to, None before ``K``."""
        stage = None
        for s, start in enumerate(self.stage_starts):
            if block >= start:
                stage = s
        return stage

    def ideal_lives(self) -> torch.Tensor:
        """Lives implied by the schedule, one per patch, sorted descending: ``[num_patches]``.

        A patch dropped when stage ``s`` starts lives ``stage_starts[s]`` layers; survivors live
        ``depth``. Their mean and std are the per-image normalisation targets.
        """
        counts = self.patch_counts
        lives = [torch.full((counts[-1],), float(self.depth))]
        for s in range(len(counts) - 1, -1, -1):
            before = self.num_patches if s == 0 else counts[s - 1]
            lives.append(torch.full((before - counts[s],), float(self.stage_starts[s])))
        return torch.cat(lives)

    def to_dict(self) -> dict:
        return {"num_patches": self.num_patches, "depth": self.depth,
                "stage_starts": list(self.stage_starts), "patch_counts": list(self.patch_counts),
                "keep_rate": self.keep_rate}

    @classmethod
    def from_dict(cls, d: dict) -> KeepSchedule:
        return cls(d["num_patches"], d["depth"], tuple(d["stage_starts"]), tuple(d["patch_counts"]),
                   d.get("keep_rate"))


def constant_like(values: Sequence[float], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(values)`` on ``like``'s device (and dtype unless given), without a host sync.

    ``torch.tensor(values, device="cuda")`` is a blocking copy: the host waits until the GPU has run
    everything queued so far (pytorch/pytorch#120996), and so is ``out[i] = v`` (it copies a CPU
    scalar tensor into one element). ``fill_`` of a slice with a Python number only queues a kernel,
    and is allowed during a CUDA-graph capture.
    """
    out = torch.empty(len(values), dtype=dtype or like.dtype, device=like.device)
    for i, v in enumerate(values):
        out[i : i + 1].fill_(v)
    return out


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to a GPU through pinned memory, so the copy is only queued.

    A copy from pageable memory, ``non_blocking`` or not, may wait for all queued GPU work.
    """
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)  # the caching host allocator keeps the block until copied


def budgets_from_lives(lives: torch.Tensor, schedule: KeepSchedule) -> torch.Tensor:
    """Per-image budget: patches alive at each stage start.

    Args:
        lives: ``[B, P]`` lives in layer units.
    Returns:
        ``[B, S]`` int64 patch counts (at least 1 per stage, non-increasing).
    """
    starts = constant_like(schedule.stage_starts, lives)
    counts = (lives.unsqueeze(-1) > starts).sum(dim=1)  # [B, S]
    return counts.clamp(min=1)


def round_up_budget(budget: Sequence[int] | torch.Tensor, schedule: KeepSchedule,
                    step: int) -> tuple[int, ...]:
    """Round a budget up, per stage, to multiples of ``step``; never down, always non-increasing.

    Rounding up only keeps a few more tokens alive (the next ones in life order), so a batch of
    images in the same bucket runs with one static shape and no padding or masks.
    """
    return BucketGrid.stepped(schedule, step).round_up(budget)

Counts = tuple[int, ...]


def stage_blocks(schedule: KeepSchedule) -> tuple[int, ...]:
    """Blocks in each stage (stage ``s`` runs from ``stage_starts[s]`` to the next start or the end)."""
    ends = (*schedule.stage_starts[1:], schedule.depth)
    return tuple(e - s for s, e in zip(schedule.stage_starts, ends, strict=True))


@dataclass(frozen=True)
class BucketGrid:
    """The budgets a server runs the tail at: a budget runs at the cheapest grid point covering it.

    Either ``points`` (a few budgets fitted to where the model's budgets fall, see ``fitted``; the
    last one keeps every patch, so every budget has a point) or, without a sample of budgets to fit
    to, per-stage rounding up to multiples of ``step``. Points are what a GPU captures graphs for.
    """

    num_patches: int
    weights: tuple[int, ...]            # blocks per stage: the tail cost of one patch in each stage
    points: tuple[Counts, ...] = ()
    step: int = 1

    def cost(self, counts: Sequence[int]) -> int:
        """Patch-block products of ``counts``: proportional to the tail's token work."""
        return sum(int(c) * w for c, w in zip(counts, self.weights, strict=True))

    def round_up(self, budget: Sequence[int] | torch.Tensor) -> Counts:
        values = tuple(int(v) for v in budget)
        if len(values) != len(self.weights):
            raise ValueError(f"budget has {len(values)} stages, the grid has {len(self.weights)}")
        if not self.points:  # rounding up is monotone: non-increasing counts stay non-increasing
            return tuple(min(self.num_patches, -(-v // self.step) * self.step) for v in values)
        covering = [p for p in self.points if all(c >= v for c, v in zip(p, values, strict=True))]
        return min(covering, key=self.cost)

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The points as ``int64 [G, S]`` on ``device``, cheapest first (what ``round_up_rows`` reads)."""
        if not self.points:  # a stepped grid: no points
            return torch.zeros(0, len(self.weights), dtype=torch.long, device=device)
        return torch.tensor(self.points, dtype=torch.long, device=device)

    def round_up_rows(self, budgets: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """``round_up`` of every row of ``budgets [B, S]`` at once, on their device, without a host
        sync: ``[B, S]`` int64. ``table``: ``self.table(device)`` made once by the caller.

        With points, a budget's point is the first covering one in cost order, i.e. the cheapest
        (ties: the first, as ``round_up``'s ``min``); with one stage this is a ``searchsorted``.
        """
        if not self.points:
            up = torch.div(budgets + (self.step - 1), self.step, rounding_mode="floor") * self.step
            return up.clamp(max=self.num_patches).long()
        table = self.table(budgets.device) if table is None else table
        covering = (table[None] >= budgets[:, None]).all(dim=-1)  # [B, G]; the full point covers all
        return table[covering.to(torch.int32).argmax(dim=1)]     # argmax: the first maximum

    @classmethod
    def stepped(cls, schedule: KeepSchedule, step: int) -> BucketGrid:
        if step < 1:
            raise ValueError(f"bucket step must be >= 1, got {step}")
        return cls(schedule.num_patches, stage_blocks(schedule), (), step)

    @classmethod
    def fitted(cls, budgets: torch.Tensor, schedule: KeepSchedule, size: int) -> BucketGrid:
        """At most ``size`` points placed at quantiles of ``budgets [N, S]`` (plus the full budget).

        The budgets are sorted by tail cost and cut into ``size`` equal-count bins; each bin's point
        is the element-wise maximum of its budgets, so every sampled budget is covered by its bin's
        point and wastes only what separates it from the bin's largest members.
        """
        if size < 1:
            raise ValueError(f"need at least one bucket, got {size}")
        grid = cls(schedule.num_patches, stage_blocks(schedule))
        rows = sorted((tuple(int(v) for v in b) for b in budgets.tolist()), key=grid.cost)
        points: list[Counts] = []
        bins = min(size, len(rows))
        for i in range(bins):
            lo, hi = i * len(rows) // bins, (i + 1) * len(rows) // bins
            points.append(tuple(max(col) for col in zip(*rows[lo:hi], strict=True)))
        points.append((schedule.num_patches,) * len(schedule.patch_counts))
        unique = sorted(set(points), key=grid.cost)
        return cls(grid.num_patches, grid.weights, tuple(unique), 1)
