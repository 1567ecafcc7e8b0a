"""Accuracy scaling's terms: the keep rates an image may run at, its floor, and the default floor's rule.

A life-regression ViT runs at any keep rate from one set of weights, and the tail's cost falls with
the rate. When the queue would miss the latency objective (``PATCHLIFE_LATENCY_OBJECTIVE_MS``), the
batching policy (:func:`service.runtime.batching.scale_cap`) lowers a *cap* on the keep rate of the
tail batches about to run; each image then runs at the highest of its own rates under the cap, never
below its floor. This module says which rates those are. Pure, no torch, no clock.

An image's rates: the one it asked for (its request's ``keep_rate``, else the model's default), then
the tenths below it, then its floor. Its floor: the request's ``min_keep_rate``; else, for a request
that set ``keep_rate`` itself, that rate (it is never scaled below what it asked for); else the
server's floor (``PATCHLIFE_MIN_KEEP_RATE``, else :func:`default_floor`). A rate at or above the
requested one means no scaling for that image.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

# The caps the policy moves between, highest first: tenths (1.0 = nobody is scaled).
CAPS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10, 0, -1))
TOP1_MARGIN = 0.02  # the default floor's rule: within 2 points of top-1 at the default rate
_EPS = 1e-9


@dataclass(frozen=True)
class Scaling:
    """Accuracy scaling as configured for one served model.

    objective_s: the latency objective. default_rate: the keep rate of a request without one.
    floor: the server's floor (None: requests scale only with a ``min_keep_rate`` of their own).
    hysteresis: the cap moves back up only when the queue at the higher cap would finish within
        ``(1 - hysteresis)`` of the aim (it moves down as soon as it would miss it): no flapping.
    aim: the share of the objective the model's queue may take (the cap is decided against
        ``aim * objective_s``): the rest is left to what the queue does not see (decoding, the hand-off,
        the answer's way back) and to the cost model's error. The queue counts from a request's arrival
        in it, the client from its send.
    utilisation, window_s: the load rule: the cap moves (down on a miss, or back up) only to a cap at
        which the work that arrived in the last ``window_s`` would take at most ``utilisation`` of the
        device's time (1: no load rule). The queue drains now and then even under a sustained rate the
        requested keep rates cannot serve; on the queue alone the cap would go back up, the backlog
        would build again and the objective be missed again.
    """

    objective_s: float
    default_rate: float
    floor: float | None = None
    hysteresis: float = 0.25
    aim: float = 0.7
    utilisation: float = 0.85
    window_s: float = 1.0

    @property
    def aim_s(self) -> float:
        return self.aim * self.objective_s

    def __post_init__(self) -> None:
        if not (self.objective_s > 0 and 0 < self.default_rate <= 1 and 0 <= self.hysteresis < 1 and 0 < self.aim <= 1
                and 0 < self.utilisation <= 1 and self.window_s > 0):
            raise ValueError(f"invalid accuracy scaling: {self}")
        if self.floor is not None and not 0 < self.floor <= 1:
            raise ValueError(f"the floor must lie in (0, 1], got {self.floor}")

    def rates(self, keep_rate: float | None, min_keep_rate: float | None) -> tuple[float, ...]:
        """The rates an image of this request may run at, highest (the requested one) first."""
        requested = self.default_rate if keep_rate is None else keep_rate
        if min_keep_rate is not None:
            floor: float | None = min_keep_rate
        else:
            floor = self.floor if keep_rate is None else keep_rate
        return image_rates(requested, floor)


def scaling_for(settings: Settings, default_rate: float | None, checkpoint: Path,
                normalization: str) -> Scaling | None:
    """Accuracy scaling as the settings ask for it (None when ``PATCHLIFE_LATENCY_OBJECTIVE_MS`` is unset,
    or the model's schedule has no keep rate to scale from); the floor is ``PATCHLIFE_MIN_KEEP_RATE``,
    else :func:`default_floor`'s, never above the default rate."""
    if settings.latency_objective_ms is None or default_rate is None:
        return None
    floor = settings.min_keep_rate
    if floor is None:
        floor = default_floor(checkpoint, default_rate, normalization)
    return Scaling(settings.latency_objective_ms / 1000.0, default_rate,
                   None if floor is None else min(floor, default_rate))


def image_rates(requested: float, floor: float | None) -> tuple[float, ...]:
    """``requested``, the tenths strictly between it and ``floor``, then ``floor``: descending."""
    if floor is None or floor >= requested - _EPS:
        return (requested,)
    between = [c for c in CAPS if floor + _EPS < c < requested - _EPS]
    return (requested, *between, floor)


def at_cap(rates: tuple[float, ...], cap: float) -> int:
    """Index in ``rates`` of the rate an image runs at under ``cap``: the highest not above it, else
    the floor (the last)."""
    for i, rate in enumerate(rates):
        if rate <= cap + _EPS:
            return i
    return len(rates) - 1


def default_floor(checkpoint: Path, default_rate: float | None, normalization: str) -> float | None:
    """The default floor's rule: the lowest keep rate whose held-out top-1 in the checkpoint's own
    evaluation (``metrics.json``, ``eval.rows`` of method ``life``, in the checkpoint's normalisation
    when it was evaluated in it) is within :data:`TOP1_MARGIN` of the default rate's. None when the
    checkpoint has no such evaluation (or none of the default rate): then nothing is scaled unless a
    floor is set."""
    if default_rate is None:
        return None
    try:
        rows = json.loads((checkpoint / "metrics.json").read_text())["eval"]["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return floor_from_rows(rows, default_rate, normalization)


def floor_from_rows(rows: Any, default_rate: float, normalization: str) -> float | None:
    """:func:`default_floor` on the evaluation's rows (``method``, ``keep_rate``, ``top1``, ``mode``)."""
    if not isinstance(rows, list):
        return None
    life = [r for r in rows if isinstance(r, dict) and r.get("method") == "life"
            and _number(r.get("keep_rate")) and _number(r.get("top1"))]
    mode = "calibrated" if normalization == "calibrated" else "fixed"
    own = [r for r in life if r.get("mode") == mode]
    life = own or life
    at_default = [float(r["top1"]) for r in life if abs(float(r["keep_rate"]) - default_rate) < 1e-6]
    if not at_default:
        return None
    bar = max(at_default) - TOP1_MARGIN - _EPS
    good = [float(r["keep_rate"]) for r in life if float(r["top1"]) >= bar and float(r["keep_rate"]) <= default_rate]
    return min(good) if good else None


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
