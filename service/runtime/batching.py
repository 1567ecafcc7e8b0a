"""The batching policy: which images run next, pure and clock-free.

The worker keeps two queues and asks :func:`plan` what to do whenever something changes:

* the head: first in, first out, up to ``max_batch_size`` images, or fewer once the oldest
  has waited ``max_delay``; every image costs the same there.
* the tail: images wait per *bucket* (their budget rounded up to the bucket grid). A bucket
  is sent when the next image would not fit (``max_batch_size`` images or ``max_batch_tokens``
  tokens), or when its oldest image has waited ``max_delay``.

Idle flush: waiting only pays while something else can happen meanwhile. A head batch is also
due at once when the tail holds nothing (the worker would sit idle, and the images would wait a
second delay in the tail anyway); a tail batch is due at once when no image waits for the head
(nothing queued could still join it). So one request on an idle server runs through both phases
without waiting, while under load, with both queues holding work, batches still fill for up to
``max_delay``.

Among the batches that are ready, the one holding the image submitted first goes first, so a rare
bucket that has waited its delay is never overtaken by newer full buckets: the oldest waiting image
bounds everyone's delay. Nothing here sleeps, locks or touches a model; ``now`` is passed in, so the
tests drive it with a fake clock.

Modes (``BatchLimits.mode``):

* ``budget``: the above; each tail batch runs at its bucket. A batch with room left also takes
  waiting images of *smaller* buckets (their counts are covered: running them at the larger counts
  only keeps a few more tokens alive, in life order), closest first, as long as the batch's waste
  (tokens computed beyond the images' own budgets, over those budgets) stays within ``max_waste``;
  it may move up to a larger queued bucket when that lets more images run together within the cap.
  Many sparse buckets would otherwise each run as a batch of one or two, which a CPU or GPU runs at
  a fraction of its batched speed. ``max_waste=0`` never mixes buckets: then an image's answer
  does not depend on what else is queued.
  With a cost model (``plan(..., cost=...)``, the worker's measured :mod:`service.runtime.costmodel`),
  merges are priced by the device's time instead: a covered bucket joins the batch when running its
  images at the batch's counts costs less than running them as a batch of their own would (the
  fixed cost per call against the extra tokens), and the batch's counts are chosen, among its own
  bucket and the larger queued ones, to save the most device time. A fixed-cost-bound device thus
  merges up to FIFO-like batches, a FLOP-bound one keeps buckets apart; ``max_waste`` still caps it.
* ``fifo``: the tail is one first-in-first-out queue, each batch run at the element-wise maximum of
  the buckets in it (the largest budget); same size, delay and token limits.
* ``unbatched``: one image per batch, no waiting.

Accuracy scaling (:func:`scale_cap`, with ``PATCHLIFE_LATENCY_OBJECTIVE_MS``): before each plan the
worker asks for a cap on the keep rate of the tail batches about to run, and re-buckets the tail's
images at their rates under it. Only the tail is scaled: the head costs the same at any rate, and
after it each image's budget at every rate it may run at is known, so a lower rate changes the
tail's counts and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from service.runtime.costmodel import Phase
from service.runtime.scaling import CAPS, at_cap
from service.settings import Settings

Mode = Literal["budget", "fifo", "unbatched"]
Counts = tuple[int, ...]
# Predicted device seconds of a batch: (phase, images, counts or None for the head). Padding to a
# captured batch-size class is the caller's business (see Worker.batch_seconds).
BatchCost = Callable[[Phase, int, "Counts | None"], float]


_DEFAULT = {name: field.default for name, field in Settings.model_fields.items()}  # one home: the settings


@dataclass(frozen=True)
class BatchLimits:
    """The knobs of the policy (from :class:`service.settings.Settings`, whose defaults these are)."""

    max_batch_size: int = _DEFAULT["max_batch_size"]
    max_delay_s: float = _DEFAULT["max_delay_ms"] / 1000.0
    max_batch_tokens: int = _DEFAULT["max_batch_tokens"]
    mode: Mode = _DEFAULT["batching"]
    max_waste: float = _DEFAULT["max_batch_waste"]
    work_conserving: bool = _DEFAULT["work_conserving"]  # run the oldest batch rather than leave the device idle

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_batch_tokens < 1 or self.max_delay_s < 0 or self.max_waste < 0:
            raise ValueError(f"invalid batching limits: {self}")
        if self.mode not in ("budget", "fifo", "unbatched"):
            raise ValueError(f"unknown batching mode {self.mode!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchLimits:
        return cls(max_batch_size=settings.max_batch_size, max_delay_s=settings.max_delay_ms / 1000.0,
                   max_batch_tokens=settings.max_batch_tokens, mode=settings.batching,
                   max_waste=settings.max_batch_waste, work_conserving=settings.work_conserving)

    @property
    def size(self) -> int:
        return 1 if self.mode == "unbatched" else self.max_batch_size

    @property
    def delay(self) -> float:
        return 0.0 if self.mode == "unbatched" else self.max_delay_s


@dataclass(frozen=True)
class Waiting:
    """One queued image as the policy sees it.

    key: the worker's id for the image. submitted: when its request arrived (orders batches).
    arrived: when it entered this phase's queue (starts its delay). bucket: the tail only, the
    image's budget rounded up to the bucket grid. need: the tail only, tail tokens of the image's own
    (unrounded) budget; 0 counts it at its bucket.
    """

    key: int
    submitted: float
    arrived: float
    bucket: Counts = ()
    need: int = 0


@dataclass(frozen=True)
class Batch:
    """A decision: run ``keys`` (queue order) in ``phase``; tail batches run at ``counts``.

    ``tokens`` is the tail-token cost at ``counts`` (0 for head batches); ``reason`` says why it was
    sent now: ``full`` (size or token limit reached), ``delay``, ``idle`` (the other phase's queue is
    empty, see the module docstring) or ``drain``.
    """

    phase: Phase
    keys: tuple[int, ...]
    counts: Counts | None
    tokens: int
    reason: str
    first_submitted: float


def max_counts(buckets: Sequence[Counts]) -> Counts:
    """Element-wise maximum of budgets: the counts that serve all of them (FIFO batching)."""
    return tuple(max(col) for col in zip(*buckets, strict=True))


def covers(counts: Counts, bucket: Counts) -> bool:
    return all(c >= b for c, b in zip(counts, bucket, strict=True))


def _fill_at(counts: Counts, base: Sequence[Waiting], tail: Sequence[Waiting], need: dict[int, int],
             limits: BatchLimits, tail_tokens: Callable[[Counts], int], strict: bool) -> list[Waiting] | None:
    """``base`` plus covered waiting images, least waste first, run at ``counts``; None if it cannot be.

    Takes the longest run of candidates after which the batch's waste (tokens beyond the images' own
    budgets, over those budgets) is within the cap. ``strict``: ``base`` alone may not exceed it
    either (False for the base's own bucket: its rounding is a given).
    """
    per_image = tail_tokens(counts)
    room = min(limits.size, max(1, limits.max_batch_tokens // per_image)) - len(base)
    if room < 0:
        return None
    taken = {w.key for w in base}
    others = sorted((w for w in tail if w.key not in taken and covers(counts, w.bucket)),
                    key=lambda w: (-need[w.key], w.submitted))[:room]
    needed = sum(need[w.key] for w in base)
    extra = len(base) * per_image - needed
    best = None if strict and extra > limits.max_waste * needed else 0
    for k, w in enumerate(others, start=1):
        needed, extra = needed + need[w.key], extra + per_image - need[w.key]
        if extra <= limits.max_waste * needed:
            best = k
    return None if best is None else [*base, *others[:best]]


def _fill(batch: Batch, tail: Sequence[Waiting], limits: BatchLimits,
          tail_tokens: Callable[[Counts], int], max_options: int = 16) -> Batch:
    """Top a budget batch up with images of covered buckets while its waste stays within the cap.

    The batch may also move up to a larger bucket present in the queue (one that covers its own)
    when that lets more images run together within the cap; fewer tokens break ties.
    """
    assert batch.counts is not None
    need = {w.key: w.need or tail_tokens(w.bucket) for w in tail}
    base = [w for w in tail if w.key in set(batch.keys)]
    larger = sorted({w.bucket for w in tail if w.bucket != batch.counts and covers(w.bucket, batch.counts)},
                    key=tail_tokens)[:max_options]
    best_counts, best = batch.counts, _fill_at(batch.counts, base, tail, need, limits, tail_tokens, False)
    assert best is not None
    for counts in larger:
        chosen = _fill_at(counts, base, tail, need, limits, tail_tokens, True)
        if chosen is not None and len(chosen) > len(best):
            best_counts, best = counts, chosen
    if len(best) == len(batch.keys):
        return batch
    return Batch("tail", tuple(w.key for w in best), best_counts, len(best) * tail_tokens(best_counts),
                 batch.reason, min(w.submitted for w in best))


def _merge_at(counts: Counts, base: Sequence[Waiting], groups: dict[Counts, list[Waiting]], limits: BatchLimits,
              tail_tokens: Callable[[Counts], int], cost: BatchCost) -> tuple[list[Waiting], float] | None:
    """``base`` (cut to the room at ``counts``) plus every covered group that is cheaper to run here
    than on its own, nearest buckets first, within the waste cap; returns (images, device seconds
    saved against running them apart), or None when ``base`` itself would pass the cap there."""
    per_image = tail_tokens(counts)
    room = min(limits.size, max(1, limits.max_batch_tokens // per_image))
    chosen = list(base[:room])
    needed = sum(w.need or tail_tokens(w.bucket) for w in chosen)
    if counts != chosen[0].bucket and len(chosen) * per_image - needed > limits.max_waste * needed:
        return None
    apart = cost("tail", len(chosen), chosen[0].bucket)
    keys = {w.key for w in chosen}
    near_first = sorted((b for b in groups if covers(counts, b)), key=tail_tokens, reverse=True)
    for bucket in near_first:
        group = [w for w in groups[bucket] if w.key not in keys][:room - len(chosen)]
        if not group:
            continue
        joined = cost("tail", len(chosen) + len(group), counts) - cost("tail", len(chosen), counts)
        alone = cost("tail", len(group), bucket)
        need = needed + sum(w.need or tail_tokens(w.bucket) for w in group)
        if joined <= alone and (len(chosen) + len(group)) * per_image - need <= limits.max_waste * need:
            chosen += group
            keys.update(w.key for w in group)
            apart, needed = apart + alone, need
    return chosen, apart - cost("tail", len(chosen), counts)


def _merge_by_cost(batch: Batch, tail: Sequence[Waiting], limits: BatchLimits,
                   tail_tokens: Callable[[Counts], int], cost: BatchCost, max_options: int = 16) -> Batch:
    """The budget batch re-planned by device time: its counts (own bucket or a larger queued one)
    and the covered buckets that join it, whichever saves the most seconds (see module docstring)."""
    assert batch.counts is not None
    groups: dict[Counts, list[Waiting]] = {}
    for w in tail:
        groups.setdefault(w.bucket, []).append(w)
    base = [w for w in tail if w.key in set(batch.keys)]
    options = [batch.counts] + sorted((b for b in groups if b != batch.counts and covers(b, batch.counts)),
                                      key=tail_tokens)[:max_options]
    best: tuple[float, int, int] | None = None
    chosen: tuple[Counts, list[Waiting]] = (batch.counts, base)
    for counts in options:
        merged = _merge_at(counts, base, groups, limits, tail_tokens, cost)
        if merged is None:
            continue
        images, saved = merged
        score = (saved, len(images), -tail_tokens(counts))
        if best is None or score > best:
            best, chosen = score, (counts, images)
    counts, images = chosen
    if counts == batch.counts and len(images) == len(batch.keys):
        return batch
    return Batch("tail", tuple(w.key for w in images), counts, len(images) * tail_tokens(counts),
                 batch.reason, min(w.submitted for w in images))


def _take_tail(group: Sequence[Waiting], limits: BatchLimits,
               tail_tokens: Callable[[Counts], int]) -> tuple[int, Counts, int]:
    """Longest prefix of ``group`` within the size and token limits (at least one image).

    Returns (images taken, counts to run at, tail tokens at those counts).
    """
    counts: Counts = group[0].bucket
    n, tokens = 1, tail_tokens(counts)
    for w in group[1:limits.size]:
        c = counts if limits.mode == "budget" else max_counts([counts, w.bucket])
        t = (n + 1) * tail_tokens(c)
        if t > limits.max_batch_tokens:
            break
        n, counts, tokens = n + 1, c, t
    return n, counts, tokens


def _tail_groups(tail: Sequence[Waiting], mode: Mode) -> list[list[Waiting]]:
    """Tail queues: one per bucket (budget mode), else a single FIFO queue."""
    if mode != "budget":
        return [list(tail)] if tail else []
    groups: dict[Counts, list[Waiting]] = {}
    for w in tail:
        groups.setdefault(w.bucket, []).append(w)
    return list(groups.values())


def _candidates(head: Sequence[Waiting], tail: Sequence[Waiting], limits: BatchLimits,
                tail_tokens: Callable[[Counts], int]) -> list[tuple[Batch, bool, float, bool]]:
    """Every batch that could be sent: (batch, is it full, when its delay runs out, is the other
    phase's queue empty)."""
    out: list[tuple[Batch, bool, float, bool]] = []
    if head:
        taken = head[:limits.size]
        out.append((Batch("head", tuple(w.key for w in taken), None, 0, "full",
                          min(w.submitted for w in taken)),
                    len(head) >= limits.size, head[0].arrived + limits.delay, not tail))
    for group in _tail_groups(tail, limits.mode):
        n, counts, tokens = _take_tail(group, limits, tail_tokens)
        taken = group[:n]
        out.append((Batch("tail", tuple(w.key for w in taken), counts, tokens, "full",
                          min(w.submitted for w in taken)),
                    n < len(group) or n >= limits.size, min(w.arrived for w in group) + limits.delay, not head))
    return out


def _reason(full: bool, due: float, idle: bool, drain: bool, now: float) -> str | None:
    """Why a candidate batch goes now, or None if it should keep waiting."""
    if full:
        return "full"
    if due <= now:
        return "delay"
    if idle:
        return "idle"
    return "drain" if drain else None


def plan(head: Sequence[Waiting], tail: Sequence[Waiting], now: float, limits: BatchLimits,
         tail_tokens: Callable[[Counts], int], drain: bool = False,
         cost: BatchCost | None = None) -> Batch | float | None:
    """The next batch to run, else the time to look again, else None (nothing queued).

    Args:
        head: images waiting for the head, in arrival order.
        tail: images waiting for the tail, in arrival order, each with its ``bucket``.
        now: the current time on the worker's clock (seconds).
        tail_tokens: tokens one image costs in the tail at given counts (``Engine.tail_tokens``).
        drain: shutting down: send whatever is queued without waiting.
        cost: the device's predicted seconds per batch; budget mode then merges buckets by it.
    """
    ready: list[Batch] = []
    waiting: list[Batch] = []
    wake: float | None = None
    for batch, full, due, idle in _candidates(head, tail, limits, tail_tokens):
        reason = _reason(full, due, idle, drain, now)
        if reason is not None:
            ready.append(replace(batch, reason=reason))
        else:
            waiting.append(replace(batch, reason="idle"))
            wake = due if wake is None else min(wake, due)
    if not ready and limits.work_conserving:
        ready = waiting  # the worker only asks when the device is free: never leave it idle
    if not ready:
        return wake
    # Oldest request first; on a tie, finish work (tail) before starting more (head).
    best = min(ready, key=lambda b: (b.first_submitted, b.phase == "head"))
    if best.phase == "tail" and limits.mode == "budget" and limits.max_waste > 0:
        best = _fill(best, tail, limits, tail_tokens) if cost is None else \
            _merge_by_cost(best, tail, limits, tail_tokens, cost)
    return best


# -- accuracy scaling ----------------------------------------------------------------------------
class Scalable(NamedTuple):
    """One queued image as accuracy scaling sees it: when its request reached the queue, the keep
    rates it may run at (highest first, :mod:`service.runtime.scaling`) and the device seconds its
    remaining work costs at each (a head image: the head plus its tail estimated at that rate's
    schedule; a tail image: its tail at its bucket for that rate, known since the head ran). A
    named tuple: the worker makes one per queued image before every batch."""

    submitted: float
    rates: tuple[float, ...]
    seconds: tuple[float, ...]


def _misses(queued: Sequence[Scalable], now: float, cap: float, within_s: float,
            rungs: dict[tuple[float, ...], dict[float, int]]) -> bool:
    """Whether the queue, run in arrival order at ``cap``, would answer some image later than
    ``within_s`` after its request arrived. ``rungs``: each distinct rate ladder's index at each cap."""
    t = now
    for image in queued:
        t += image.seconds[rungs[image.rates][cap]]
        if t - image.submitted > within_s:
            return True
    return False


def _load(arrived: Sequence[tuple[Scalable, int]], cap: float,
          rungs: dict[tuple[float, ...], dict[float, int]]) -> float:
    """Device seconds the images of ``arrived`` cost, all of them run at ``cap``."""
    return sum(image.seconds[rungs[image.rates][cap]] * n for image, n in arrived)


@dataclass(frozen=True)
class Load:
    """The arrival side of accuracy scaling: the images whose requests arrived in the last ``window_s``
    (a price per image, head and tail, at each rate, with the number of images priced so) and the share
    of the device's time their work may take at a cap the policy moves up to. A queue drains now and
    then even while arrivals outrun the device at the requested rates; going back up on the queue alone
    would then rebuild the backlog, miss again and flap."""

    arrived: Sequence[tuple[Scalable, int]]
    window_s: float
    utilisation: float


def scale_cap(cap: float, queued: Sequence[Scalable], now: float, objective_s: float,
              hysteresis: float = 0.25, caps: Sequence[float] = CAPS, load: Load | None = None) -> float:
    """The keep-rate cap for the batch about to run (``caps`` highest first; ``cap`` the current one).

    Down at once: when the queued work at ``cap`` would finish after some request's objective, the
    highest lower cap at which it would not (the lowest cap when none would do: every image then runs
    at its floor). Up with hysteresis: the highest higher cap at which the queue would finish within
    ``(1 - hysteresis)`` of the objective; else ``cap`` stays. With ``load``, a cap it moves to must
    also carry the window's arrivals within ``utilisation`` of the device's time: the queue decides
    when to scale, the arrival rate how far back up; and where the current cap does not carry them,
    it goes down already when the queue would not finish within ``(1 - hysteresis)`` of the objective.
    Load alone never scales down: a closed loop of one client keeps the device busy without any wait.
    Nothing queued and nothing arrived goes back to the top. ``queued`` in arrival order; pure: ``now``
    is passed in. Only caps that change some image's rate (and the current one) are priced: a few per
    decision, whatever the grid.
    """
    arrived = load.arrived if load is not None else ()
    if not queued and not arrived:
        return caps[0]
    ladders = {image.rates for image in queued} | {image.rates for image, _ in arrived}
    useful = {caps[0], caps[-1], cap} | {c for c in caps if any(r == c for ladder in ladders for r in ladder)}
    options = sorted(useful, reverse=True)
    rungs = {ladder: {c: at_cap(ladder, c) for c in options} for ladder in ladders}

    def carries(c: float) -> bool:
        return load is None or _load(arrived, c, rungs) <= load.utilisation * load.window_s

    i = options.index(cap)
    # Where the arrivals outrun the current cap, the backlog can only grow: the hysteresis band, there
    # to keep a cap near its boundary from flapping, would only let it take the objective's slack first.
    # So the cap goes down as soon as the queue crosses the line it would go back up at.
    down_at = objective_s if carries(cap) else (1.0 - hysteresis) * objective_s
    if _misses(queued, now, cap, down_at, rungs):
        for lower in options[i + 1:]:
            if carries(lower) and not _misses(queued, now, lower, objective_s, rungs):
                return lower
        return options[-1]
    for higher in options[:i]:
        if carries(higher) and not _misses(queued, now, higher, (1.0 - hysteresis) * objective_s, rungs):
            return higher
    return cap
