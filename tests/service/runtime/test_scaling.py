"""Accuracy scaling: the policy's cap (pure), an image's rates and floor, the default floor's rule, and
the worker under a burst with a fake clock (the stub engine advances it by what each batch costs).

The stub's budgets are its rate's schedule counts and its bucket grid has step 1, so an image's counts
say exactly which rate its tail ran at.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from service.protocol import ImageResult
from service.runtime.admission import Request
from service.runtime.batching import Load, Scalable, scale_cap
from service.runtime.costmodel import Timing
from service.runtime.handoff import HeadBatch, HostCopy, Rows
from service.runtime.scaling import CAPS, Scaling, at_cap, default_floor, floor_from_rows, image_rates
from service.runtime.worker import Worker, WorkerHooks
from service.settings import Settings

HEAD_FIXED, HEAD_PER_IMAGE = 0.001, 0.0001      # fake seconds
TAIL_FIXED, TAIL_PER_TOKEN = 0.001, 0.0001


# -- the policy ----------------------------------------------------------------------------------
def image(submitted: float, *per_rate: tuple[float, float]) -> Scalable:
    return Scalable(submitted, tuple(r for r, _ in per_rate), tuple(s for _, s in per_rate))


def test_cap_goes_down_at_once_to_the_highest_cap_that_meets_the_objective() -> None:
    # ten images at 0.5 (10 ms each) or 0.4 (8 ms) or 0.3 (6 ms); objective 90 ms
    queue = [image(0.0, (0.5, 0.010), (0.4, 0.008), (0.3, 0.006)) for _ in range(10)]
    assert scale_cap(1.0, queue, 0.0, 0.090) == 0.4           # 100 ms late at 0.5, 80 ms fits at 0.4
    assert scale_cap(1.0, queue, 0.0, 0.070) == 0.3           # only the floor fits
    assert scale_cap(1.0, queue, 0.0, 0.010) == CAPS[-1]       # nothing fits: everyone at their floor
    assert scale_cap(1.0, queue, 0.0, 0.200) == 1.0            # on time: nobody is scaled


def test_cap_goes_back_up_only_with_room_to_spare_and_an_empty_queue_resets_it() -> None:
    queue = [image(0.0, (0.5, 0.010), (0.3, 0.006)) for _ in range(10)]

    def served(cap: float) -> float:  # caps between 0.3 and 0.5 all run these images at 0.3
        return queue[0].rates[at_cap(queue[0].rates, cap)]

    # at 0.3 the queue fits in 90 ms; at 0.5 it would take 100 ms: late at 1.0, so stay
    assert served(scale_cap(0.3, queue, 0.0, 0.090)) == 0.3
    # 120 ms objective: 0.5 fits (100 ms) but not within 0.75 x 120 = 90 ms: hysteresis holds the rate
    assert served(scale_cap(0.3, queue, 0.0, 0.120)) == 0.3
    assert scale_cap(0.3, queue, 0.0, 0.140) == 1.0            # 100 <= 105: back up
    assert scale_cap(0.3, [], 5.0, 0.090) == 1.0               # the queue's end
    # no flapping: after a move, the same queue does not move it again
    for objective in (0.05, 0.08, 0.095, 0.11, 0.13, 0.2):
        cap = scale_cap(1.0, queue, 0.0, objective)
        assert scale_cap(cap, queue, 0.0, objective) == cap


def test_time_already_waited_counts_against_the_objective() -> None:
    queue = [image(0.0, (0.5, 0.010), (0.3, 0.006)) for _ in range(3)]
    assert scale_cap(1.0, queue, 0.0, 0.050) == 1.0            # 30 ms of work
    cap = scale_cap(1.0, queue, 0.025, 0.050)                  # waited 25 ms: 55 ms > 50 at 0.5, 43 at 0.3
    assert at_cap(queue[0].rates, cap) == 1


def test_the_load_rule_keeps_the_cap_down_while_the_arrival_rate_needs_it() -> None:
    """A sustained rate the default keep rate cannot serve: what arrived in the last second would take
    1.2 s at 0.5, 1.02 s at 0.4, 0.84 s at 0.3. The queue drains now and then all the same."""
    one = image(0.0, (0.5, 0.010), (0.4, 0.0085), (0.3, 0.007))
    load = Load([(one, 120)], window_s=1.0, utilisation=0.85)
    short = [one._replace(submitted=1.0)] * 2                   # 20 ms of work: on time at any cap
    late = [one._replace(submitted=0.0)] * 10                   # 100 ms of work against 90 ms
    # load alone never scales down (a closed loop keeps the device busy without any wait) ...
    assert scale_cap(1.0, short, 1.0, 0.100, load=load) == 1.0
    # ... but a miss goes down to a cap that also carries the arrivals: the floor, not 0.4
    assert scale_cap(1.0, late, 0.0, 0.090) == 0.4             # the queue alone would stop at 0.4
    cap = scale_cap(1.0, late, 0.0, 0.090, load=load)
    assert at_cap(one.rates, cap) == 2
    # the queue drained: without the load rule the cap would go back to the top, with it it stays
    assert scale_cap(cap, short, 1.0, 0.100) == 1.0
    assert scale_cap(cap, short, 1.0, 0.100, load=load) == cap
    assert scale_cap(cap, [], 1.0, 0.100, load=load) == cap
    # the rate falls: up as far as the arrivals fit (90 images: 0.77 s at 0.4, 0.9 s at 0.5), then all the way
    assert scale_cap(cap, [], 1.0, 0.100, load=Load([(one, 90)], 1.0, 0.85)) == 0.4
    assert scale_cap(cap, short, 1.0, 0.100, load=Load([(one, 80)], 1.0, 0.85)) == 1.0
    # nothing queued and nothing arrived: the top
    assert scale_cap(cap, [], 1.0, 0.100, load=Load([], 1.0, 0.85)) == 1.0


def test_a_cap_that_cannot_carry_the_arrivals_goes_down_before_the_queue_misses() -> None:
    """The backlog can only grow at a cap the arrivals outrun: the cap goes down once the queue would
    not finish within (1 - hysteresis) of the objective, the line it goes back up at, not only on a miss."""
    one = image(0.0, (0.5, 0.010), (0.4, 0.0085), (0.3, 0.007))
    queue = [one] * 8                                           # 80 ms at 0.5: within 100, not within 75
    outrun = Load([(one, 120)], window_s=1.0, utilisation=0.85)  # 1.2 s of work a second at 0.5
    carried = Load([(one, 60)], window_s=1.0, utilisation=0.85)  # 0.6 s
    assert scale_cap(1.0, queue, 0.0, 0.100) == 1.0             # the queue alone: on time
    assert scale_cap(1.0, queue, 0.0, 0.100, load=carried) == 1.0
    assert at_cap(one.rates, scale_cap(1.0, queue, 0.0, 0.100, load=outrun)) == 2
    assert scale_cap(1.0, queue[:7], 0.0, 0.100, load=outrun) == 1.0  # 70 ms: within the line, stays


def test_images_are_priced_at_the_batches_that_form_not_at_full_ones() -> None:
    """Accuracy scaling spreads a batch's fixed cost over the images batches of that phase have held
    lately; at full batches (the old price) a load of small batches looked a third cheaper than it was."""
    clock = Clock()
    engine = CostedEngine(clock)
    worker = Worker(engine, Settings(max_batch_size=8), WorkerHooks(), clock=clock,
                    timings=warm_timings(engine), scaling=Scaling(0.100, 0.5, 0.3))
    counts = engine.schedule_counts(0.3)
    for _ in range(400):                                         # the tail has been running pairs
        worker.cost.observe("tail", 2, engine.tail_tokens(counts), TAIL_FIXED + TAIL_PER_TOKEN * 2 *
                            engine.tail_tokens(counts), images=2)
    assert worker.cost.typical_images("tail") == pytest.approx(2.0, rel=0.01)
    priced = worker._seconds_per_image("tail", counts)
    assert priced == pytest.approx(worker.batch_seconds("tail", 2, counts) / 2)
    assert priced > worker.batch_seconds("tail", 8, counts) / 8


def test_the_queues_record_arrivals_for_the_window_only() -> None:
    clock = Clock()
    engine = CostedEngine(clock)
    worker = Worker(engine, Settings(max_batch_size=8), WorkerHooks(), clock=clock,
                    timings=warm_timings(engine), scaling=Scaling(0.100, 0.5, 0.3, window_s=1.0))
    queues = worker.queues
    assert queues.arrival_window_s == 1.0
    loop = asyncio.new_event_loop()
    try:
        for t, n in ((0.0, 3), (0.6, 2), (1.3, 1)):
            request = Request(loop.create_future(), loop, 1e9, [None] * n)
            queues.add(request, [torch.zeros(3, 2, 2)] * n, None, 1, t, (0.5, 0.4, 0.3))
    finally:
        loop.close()
    each = lambda phase, counts: 0.001  # noqa: E731
    queued, arrived = queues.scalables(each, now=1.3)
    assert len(queued) == 6                                    # the 3 images of t=0 left the window:
    assert arrived == [(Scalable(0.0, (0.5, 0.4, 0.3), (0.002,) * 3), 3)]  # head + tail, per image
    assert sum(n for _, n in queues.arrived.items()) == 3
    assert queues.scalables(each)[1] == []                     # no clock: no load view
    off = Worker(engine, Settings(max_batch_size=8), WorkerHooks(), clock=clock, timings=warm_timings(engine),
                 scaling=Scaling(0.100, 0.5, 0.3, utilisation=1.0))
    assert off.queues.arrival_window_s is None                 # no load rule: nothing recorded


def test_rates_and_floors() -> None:
    assert image_rates(0.5, 0.3) == (0.5, 0.4, 0.3)
    assert image_rates(0.65, 0.25) == (0.65, 0.6, 0.5, 0.4, 0.3, 0.25)
    assert image_rates(0.5, None) == image_rates(0.5, 0.5) == image_rates(0.5, 0.7) == (0.5,)
    s = Scaling(0.25, 0.5, 0.3)
    assert s.rates(None, None) == (0.5, 0.4, 0.3)              # the server's floor
    assert s.rates(0.7, None) == (0.7,)                        # an explicit keep rate is never scaled below
    assert s.rates(0.7, 0.5) == (0.7, 0.6, 0.5)                # ... unless the request sets a floor
    assert s.rates(None, 0.2) == (0.5, 0.4, 0.3, 0.2)          # a request may go below the server's floor
    assert Scaling(0.25, 0.5, None).rates(None, None) == (0.5,)  # no floor known: no scaling
    assert [at_cap((0.5, 0.4, 0.3), c) for c in (1.0, 0.5, 0.45, 0.4, 0.3, 0.1)] == [0, 0, 1, 1, 2, 2]


ROWS = [{"method": "life", "keep_rate": r, "mode": m, "top1": t} for r, m, t in (
    (0.3, "calibrated", 0.9092), (0.5, "calibrated", 0.9246), (0.7, "calibrated", 0.9296),
    (0.3, "fixed", 0.88), (0.5, "fixed", 0.9217))] + [{"method": "random", "keep_rate": 0.1, "top1": 0.95}]


def test_default_floor_rule() -> None:
    assert floor_from_rows(ROWS, 0.5, "calibrated") == 0.3     # 90.9% against 92.5%: within 2 points
    assert floor_from_rows(ROWS, 0.5, "per_image") == 0.5      # fixed: 88.0% against 92.2%: no lower rate
    assert floor_from_rows(ROWS, 0.7, "calibrated") == 0.5     # 0.3 is 2.04 points below 0.7: out
    assert floor_from_rows(ROWS, 0.4, "calibrated") is None    # the default rate was not evaluated
    assert floor_from_rows(None, 0.5, "calibrated") is None


def test_default_floor_reads_the_checkpoint(tmp_path: Path) -> None:
    assert default_floor(tmp_path, 0.5, "calibrated") is None  # no metrics.json
    (tmp_path / "metrics.json").write_text(json.dumps({"name": "x"}))
    assert default_floor(tmp_path, 0.5, "calibrated") is None  # no evaluation
    (tmp_path / "metrics.json").write_text(json.dumps({"eval": {"rows": ROWS}}))
    assert default_floor(tmp_path, 0.5, "calibrated") == 0.3
    assert default_floor(tmp_path, None, "calibrated") is None


# -- the worker under a burst, on a fake clock ---------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class CostedEngine:
    """A stub whose batches advance the fake clock by what they cost (tail: per token); each image's
    budget is its rate's schedule counts, its identity travels in its token and comes back in 'probs'."""

    head_tokens = 0
    asynchronous = False

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.gate = threading.Event()
        self.gate.set()
        self.extra_seen: list[tuple[float, ...]] = []
        self.holding = 0                    # images of the head batch waiting at the gate

    def schedule_counts(self, keep_rate: float | None) -> tuple[int, ...]:
        r = 0.5 if keep_rate is None else keep_rate
        return (round(40 * r), round(20 * r))

    def tail_tokens(self, counts: tuple[int, ...]) -> int:
        return sum(counts)

    def padded_rows(self, n: int) -> int:
        return n

    def gflops(self, counts: tuple[int, ...]) -> float:
        return float(sum(counts))

    def head(self, pixels: Sequence[torch.Tensor], keep_rates: Sequence[float | None],
             extra_rates: Sequence[float] = ()) -> HeadBatch:
        n = self.holding = len(pixels)
        assert self.gate.wait(10), "test gate never opened"
        self.clock.t += HEAD_FIXED + HEAD_PER_IMAGE * n
        self.extra_seen.append(tuple(extra_rates))
        budgets = torch.tensor([self.schedule_counts(r) for r in keep_rates]).float()
        cols = [torch.zeros(n, 4), budgets, budgets]
        for rate in extra_rates:
            at = torch.tensor([self.schedule_counts(rate)] * n).float()
            cols += [at, at]
        tokens = torch.tensor([[float(p[0, 0, 0])] for p in pixels])
        return HeadBatch(tokens, HostCopy(torch.cat(cols, dim=1)), [r or 0.5 for r in keep_rates], (2, 2), None,
                         tuple(extra_rates))

    def tail(self, parts: Sequence[Rows], counts: Sequence[int]) -> HostCopy:
        tokens = torch.cat([p.batch.tokens[p.index] for p in parts])
        self.clock.t += TAIL_FIXED + TAIL_PER_TOKEN * len(tokens) * sum(counts)
        return HostCopy(torch.cat([tokens, torch.tensor([[float(c) for c in counts]] * len(tokens))], dim=1))


class Seen(WorkerHooks):
    def __init__(self) -> None:
        self.met: list[bool] = []
        self.scaled = 0

    def on_objective(self, met: bool) -> None:
        self.met.append(met)

    def on_image_done(self, result: ImageResult) -> None:
        self.scaled += result.scaled


def warm_timings(engine: CostedEngine) -> list[Timing]:
    """What the stub costs, as the engine's warm-up would have measured it."""
    tokens = engine.tail_tokens(engine.schedule_counts(0.5))
    return [Timing("head", n, 0, HEAD_FIXED + HEAD_PER_IMAGE * n) for n in (1, 8)] + \
        [Timing("tail", n, tokens, TAIL_FIXED + TAIL_PER_TOKEN * n * tokens) for n in (1, 8)]


def run_burst(scaling: Scaling | None, requests: list[tuple[float | None, float | None]],
              after: int = 1) -> tuple[list[ImageResult], list[ImageResult], Seen, Worker]:
    """``requests`` (keep_rate, min_keep_rate) of one image each, all queued before the first batch
    runs; then, once they are answered, ``after`` more default requests. Returns both answers."""
    clock = Clock()
    engine, seen = CostedEngine(clock), Seen()
    settings = Settings(max_batch_size=8, max_delay_ms=0, work_conserving=True, max_batch_waste=0)

    worker = Worker(engine, settings, seen, clock=clock, timings=warm_timings(engine), scaling=scaling)

    async def main() -> tuple[list[ImageResult], list[ImageResult]]:
        await worker.start()
        engine.gate.clear()
        tasks = [asyncio.ensure_future(worker.submit([torch.full((3, 2, 2), float(i))], rate, 1e9, floor))
                 for i, (rate, floor) in enumerate(requests)]
        while worker.queues.capacity.images + engine.holding < len(requests):  # some may be in the held head batch
            await asyncio.sleep(0.002)
        engine.gate.set()
        burst = [r for rs in await asyncio.gather(*tasks) for r in rs]
        later = [r for i in range(after)
                 for r in await worker.submit([torch.full((3, 2, 2), 1000.0 + i)], None, 1e9)]
        await worker.stop()
        return burst, later

    burst, later = asyncio.run(main())
    return burst, later, seen, worker


def pattern(n: int) -> list[tuple[float | None, float | None]]:
    """Every 4th request sets keep_rate 0.5 (no floor), every 4th+1 a floor of 0.4, the rest default."""
    return [((0.5, None), (None, 0.4), (None, None), (None, None))[i % 4] for i in range(n)]


def test_a_burst_scales_down_within_floors_and_the_queues_end_scales_back() -> None:
    requests = pattern(48)
    burst, later, seen, worker = run_burst(Scaling(0.100, 0.5, 0.3), requests)
    engine_counts = CostedEngine(Clock()).schedule_counts
    for (rate, floor), r in zip(requests, burst, strict=True):
        assert r.requested_keep_rate == 0.5
        assert r.counts == engine_counts(r.keep_rate)          # it ran at the rate it reports
        assert r.budget == engine_counts(r.keep_rate)
        assert r.scaled == (r.keep_rate < 0.5)
        lowest = 0.5 if rate is not None else (floor or 0.3)   # a floor is never crossed
        assert r.keep_rate >= lowest - 1e-9
    scaled = [r for r in burst if r.scaled]
    assert scaled, "the burst would miss the objective at 0.5: some images must be scaled"
    assert any(r.keep_rate == 0.3 for r in scaled), "the default floor was reached"
    assert not any(r.scaled for r, (rate, _) in zip(burst, requests, strict=True) if rate is not None)
    # no flapping: in the order they ran, the default images' rates move down once at most and stay
    # there (every image of the burst arrived at once: there is no slack to go back up before its end)
    ran = [r.keep_rate for r, (rate, floor) in sorted(zip(burst, requests, strict=True), key=lambda p: p[0].queue_ms)
           if rate is floor is None]
    assert sum(1 for a, b in zip(ran, ran[1:], strict=False) if a != b) <= 1, ran
    assert ran == sorted(ran, reverse=True)
    # the queue's end: the next request, on the drained queue, runs at its own rate again
    assert [r.scaled for r in later] == [False] and later[0].keep_rate == 0.5 and worker.cap == 1.0
    assert seen.scaled == len(scaled) and len(seen.met) == len(requests) + 1


def test_a_burst_at_fixed_rates_misses_the_objective_that_scaling_meets() -> None:
    requests: list[tuple[float | None, float | None]] = [(None, None)] * 40
    fixed, _, seen_fixed, _ = run_burst(Scaling(0.100, 0.5, None), requests)   # no floor: nothing scales
    scaled, _, seen_scaled, _ = run_burst(Scaling(0.100, 0.5, 0.3), requests)
    assert not any(r.scaled for r in fixed)
    assert seen_scaled.met.count(True) > seen_fixed.met.count(True)


def test_objective_off_changes_nothing() -> None:
    requests = pattern(24)
    off, later, seen, worker = run_burst(None, requests)
    assert not any(r.scaled for r in off + later) and seen.met == [] and seen.scaled == 0
    assert [r.keep_rate for r in off] == [0.5] * len(off)
    assert [r.requested_keep_rate for r in off] == [0.5] * len(off)


@pytest.mark.parametrize("objective_s", [1e3])
def test_an_objective_never_missed_scales_nothing(objective_s: float) -> None:
    burst, _, seen, _ = run_burst(Scaling(objective_s, 0.5, 0.3), pattern(24))
    assert not any(r.scaled for r in burst) and all(seen.met)


def test_the_cap_is_decided_against_the_aim_not_the_whole_objective() -> None:
    """The queue sees only part of a request's time: a queue that would finish at 80% of the objective
    is already a miss at the default aim (70%), and must be scaled; with the whole objective it is not."""
    s = Scaling(objective_s=1.0, default_rate=0.5, floor=0.3)
    assert s.aim_s == pytest.approx(0.7)
    queued = [Scalable(0.0, (0.5, 0.4, 0.3), (0.8, 0.6, 0.4))]
    assert scale_cap(1.0, queued, 0.0, 1.0) == 1.0
    assert scale_cap(1.0, queued, 0.0, s.aim_s) < 0.5
    with pytest.raises(ValueError):
        Scaling(objective_s=1.0, default_rate=0.5, aim=0.0)
