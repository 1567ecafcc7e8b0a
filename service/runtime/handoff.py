"""What the engine hands the worker: a batch as a few arrays, and host copies still in flight.

    hb = engine.head(pixels, keep_rates)       # HeadBatch: tokens on the device, its plan on its way to the host
    hb.budgets, hb.buckets                     # [B, S] int64 on the CPU: reading them waits for the copy
    copy = engine.tail([Rows(hb, idx)], counts)   # HostCopy of the probabilities, rows in part order
    probs = copy.get()                         # waits for that copy only

No object per image: the head's answer is one token tensor ``[B, N, D]`` and one packed host tensor
(lives, budgets, buckets), so a batch of 64 costs the host what a batch of 8 does. On a GPU each
host copy is queued from pinned memory and marked with an event, so the worker can launch the next
batch before it waits for this one (:mod:`service.runtime.worker`); on the CPU the copy is done at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class HostCopy:
    """A device tensor on its way to the host; ``get()`` waits until it has landed (at once on the CPU).

    ``tensor``: the host tensor (pinned on a GPU), being written until ``event`` completes.
    """

    tensor: torch.Tensor
    event: Any = None  # torch.cuda.Event recorded after the copy, or None when it is done

    @classmethod
    def start(cls, t: torch.Tensor) -> HostCopy:
        """Queue ``t``'s copy to the host. A CPU tensor is cloned (it may be a buffer that the next
        replay overwrites: under inference mode a view does not say so by its ``_base``); a ``meta``
        one is kept as it is (shapes only, for tests)."""
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(t.device))
            return cls(host, event)
        return cls(t if t.device.type == "meta" else t.clone())

    def ready(self) -> bool:
        """Whether ``get()`` would return without waiting."""
        return self.event is None or bool(self.event.query())

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.tensor


@dataclass
class HeadBatch:
    """The head's answer for ``B`` images, as arrays.

    tokens: ``[B, T+P, C]`` on the model's device, prefix first, patches by descending life.
    plan: float32 ``[B, P + 2S]`` on its way to the host: lives (patch-grid order, layer units),
        then each image's budget (patches per stage at its keep rate), then its bucket (the budget
        rounded up to the grid). Integers below 2**24 are exact in float32.
    keep_rates: the keep rate each image ran at (the default schedule's for None).
    grid: the patch grid ``(rows, cols)``.
    known: ``(budgets, buckets)`` on the host when they did not need the device (per-image
        normalisation: every image keeps its rate's counts), so reading them waits for nothing.
    extra_rates: keep rates (accuracy scaling's) at which every image's budget and bucket were also
        planned: ``plan`` then ends with ``[budgets, buckets]`` for each, in this order (:meth:`at_rate`).
    """

    tokens: torch.Tensor
    plan: HostCopy
    keep_rates: list[float]
    grid: tuple[int, int]
    known: tuple[torch.Tensor, torch.Tensor] | None = None
    extra_rates: tuple[float, ...] = ()
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _life_rows: list[torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, tokens: torch.Tensor, lives: torch.Tensor, budgets: torch.Tensor, buckets: torch.Tensor,
           keep_rates: list[float]) -> HeadBatch:
        """One from host tensors (tests' stub engines): ``lives [B, rows, cols]``, ``budgets/buckets [B, S]``."""
        n = lives.shape[0]
        plan = torch.cat([lives.reshape(n, -1).float(), budgets.float(), buckets.float()], dim=1)
        return cls(tokens, HostCopy(plan), keep_rates, (int(lives.shape[1]), int(lives.shape[2])))

    def __len__(self) -> int:
        return len(self.keep_rates)

    @property
    def stages(self) -> int:
        return (self.plan.tensor.shape[1] - self.grid[0] * self.grid[1]) // (2 * (1 + len(self.extra_rates)))

    def at_rate(self, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(budgets, buckets)`` ``[B, S]`` int64 on the CPU at one of ``extra_rates`` (waits for the copy)."""
        i = self.extra_rates.index(rate)
        p, s = self.grid[0] * self.grid[1], self.stages
        start = p + 2 * s * (1 + i)
        host = self.plan.get()
        return host[:, start:start + s].long(), host[:, start + s:start + 2 * s].long()

    def _part(self, name: str) -> torch.Tensor:
        if name != "lives" and self.known is not None:
            return self.known[0 if name == "budgets" else 1]
        if name not in self._cache:
            host, p, s = self.plan.get(), self.grid[0] * self.grid[1], self.stages
            self._cache.update(lives=host[:, :p].reshape(-1, *self.grid), budgets=host[:, p:p + s].long(),
                               buckets=host[:, p + s:p + 2 * s].long())
        return self._cache[name]

    @property
    def lives(self) -> torch.Tensor:
        """``[B, rows, cols]`` float32 on the CPU (waits for the copy)."""
        return self._part("lives")

    @property
    def life_rows(self) -> list[torch.Tensor]:
        """``lives`` as one view per image (made once: indexing a tensor per image costs microseconds each)."""
        if self._life_rows is None:
            self._life_rows = list(self.lives.unbind(0))
        return self._life_rows

    @property
    def budgets(self) -> torch.Tensor:
        """``[B, S]`` int64 on the CPU: each image's own patches per stage (waits for the copy unless known)."""
        return self._part("budgets")

    @property
    def buckets(self) -> torch.Tensor:
        """``[B, S]`` int64 on the CPU: the budgets rounded up to the bucket grid (waits for the copy unless known)."""
        return self._part("buckets")


@dataclass(frozen=True)
class Rows:
    """Some rows of a head batch, for a tail call: ``index`` int64 ``[k]`` (CPU or the device)."""

    batch: HeadBatch
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])


def stack_into(pixels: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``torch.stack(pixels, out=out)`` for CPU tensors, one plain memcpy per image (numpy), and ``out``.

    Why not ``torch.stack``: it splits a copy this large over the intra-op thread team, whose threads
    spin while they wait for cores the API processes keep busy. Measured on 2 busy cores, 64 images of
    ``uint8 [3, 224, 224]``: about 96 ms of CPU per batch with a team of 2 against 1 ms this way
    (0.8 ms for a team of 1). Anything but same-dtype CPU tensors goes to ``torch.stack``."""
    dtype = out.dtype
    if out.device.type != "cpu" or any(p.dtype is not dtype for p in pixels):
        return torch.stack(list(pixels), out=out)
    try:
        arrays = [p.numpy() for p in pixels]
    except (TypeError, RuntimeError):  # not on the CPU: torch copies it
        return torch.stack(list(pixels), out=out)
    dest = out.numpy()
    row = dest.shape[1:]
    if len(arrays) != len(dest) or any(a.shape != row for a in arrays):  # copyto would broadcast
        raise ValueError(f"{len(pixels)} tensors do not fill {list(out.shape)}")
    for d, a in zip(dest, arrays, strict=True):
        np.copyto(d, a)
    return out
