"""What a batch costs on this device: a fixed part per call plus a part per unit of work, per phase.

    seconds(head batch)  = fixed_head + per_image * rows
    seconds(tail batch)  = fixed_tail + per_token * rows * tail_tokens(counts)

``rows`` is the batch as the device runs it (padded up to its captured batch-size class when CUDA
graphs are on). The fixed part is what makes many small batches slow (Python, kernel launches, a
thread team waking up); the per-unit part is the FLOPs. The batching planner merges budget buckets
only when running images together costs less than running them apart, which only these two numbers
can say, so they are measured: a few batches at warm-up, then every batch the worker runs, with
older observations fading (exponentially weighted least squares), so the model follows the
machine's load. Pure arithmetic, no torch and no clock: tests feed it synthetic timings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Phase = Literal["head", "tail"]


@dataclass(frozen=True)
class Timing:
    """One measured batch, what the cost model learns from (the engine's warm-up makes the first ones)."""

    phase: Phase
    rows: int                 # as run, padding included
    tokens_per_row: int       # tail tokens per image (0 for the head)
    seconds: float


@dataclass
class LinearFit:
    """``seconds = fixed + slope * units`` fitted by exponentially weighted least squares.

    Args:
        decay: weight kept by past observations at each new one (0.98: ~50 batches of memory).
        fixed, slope: the prior, used until two different unit counts have been seen.
    """

    decay: float = 0.98
    fixed: float = 0.0
    slope: float = 0.0
    n: int = 0
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def observe(self, units: float, seconds: float) -> None:
        if not (math.isfinite(units) and math.isfinite(seconds)) or units < 0 or seconds < 0:
            return
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + units
        self._y = d * self._y + seconds
        self._xx = d * self._xx + units * units
        self._xy = d * self._xy + units * seconds
        self.n += 1
        self._refit()

    def _refit(self) -> None:
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var > 1e-12 * max(1.0, mx * mx):  # unit counts differ: both parameters are identified
            slope = (self._xy / self._w - mx * my) / var
            self.slope = max(slope, 0.0)
        # One unit count only (or a negative slope, i.e. noise): keep the slope, fit the level.
        self.fixed = max(my - self.slope * mx, 0.0)

    def predict(self, units: float) -> float:
        return self.fixed + self.slope * units


class CostModel:
    """Per-phase :class:`LinearFit`; ``seconds(phase, rows, tokens_per_row)`` is what the planner asks.

    It also follows how many images the batches of each phase hold (:meth:`typical_images`, faded like
    the fits): accuracy scaling prices an image's share of the fixed cost at the batches that actually
    form, not at full ones (budget buckets split the tail into batches far below the size limit)."""

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self.fits: dict[Phase, LinearFit] = {"head": LinearFit(decay), "tail": LinearFit(decay)}
        self._images: dict[Phase, tuple[float, float]] = {"head": (0.0, 0.0), "tail": (0.0, 0.0)}  # faded sums

    @staticmethod
    def units(phase: Phase, rows: int, tokens_per_row: int) -> int:
        return rows if phase == "head" else rows * tokens_per_row

    def seconds(self, phase: Phase, rows: int, tokens_per_row: int = 0) -> float:
        return self.fits[phase].predict(self.units(phase, rows, tokens_per_row))

    def observe(self, phase: Phase, rows: int, tokens_per_row: int, seconds: float, images: int | None = None) -> None:
        """One batch: ``rows`` as run (padding included), ``images`` of them real (default: all)."""
        self.fits[phase].observe(self.units(phase, rows, tokens_per_row), seconds)
        n, w = self._images[phase]
        self._images[phase] = (self.decay * n + (rows if images is None else images), self.decay * w + 1.0)

    def typical_images(self, phase: Phase) -> float | None:
        """The faded mean of images per batch of ``phase`` (None before the first batch)."""
        n, w = self._images[phase]
        return n / w if w > 0 else None

    def learn(self, timings: Sequence[Timing]) -> None:
        """Observe each of ``timings`` (the engine's warm-up batches), in order."""
        for t in timings:
            self.observe(t.phase, t.rows, t.tokens_per_row, t.seconds)

    @property
    def ready(self) -> bool:
        return all(f.n > 0 for f in self.fits.values())

    def describe(self) -> dict[str, Any]:
        """What the scheduler believes, for /v1/models and the metrics."""
        h, t = self.fits["head"], self.fits["tail"]
        return {"head": {"fixed_ms": round(1e3 * h.fixed, 4), "per_image_ms": round(1e3 * h.slope, 6),
                         "observations": h.n},
                "tail": {"fixed_ms": round(1e3 * t.fixed, 4), "per_kilotoken_ms": round(1e6 * t.slope, 6),
                         "observations": t.n}}
