"""The batching policy with a fake clock and a simulated runner: no threads, no model."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from service.runtime.batching import Batch, BatchCost, BatchLimits, Waiting, max_counts, plan
from service.settings import Settings

Counts = tuple[int, ...]
A: Counts = (48, 40, 32)
B: Counts = (24, 16, 8)
C: Counts = (48, 48, 40)


def cost(counts: tuple[int, ...]) -> int:
    """Stand-in for Engine.tail_tokens: one token per kept patch per stage, plus the class token."""
    return sum(counts) + len(counts)


def head_q(*arrivals: float) -> list[Waiting]:
    return [Waiting(i, t, t) for i, t in enumerate(arrivals)]


def tail_q(*items: tuple[float, tuple[int, ...]], first_key: int = 100) -> list[Waiting]:
    return [Waiting(first_key + i, t, t, b) for i, (t, b) in enumerate(items)]


def test_nothing_queued_means_nothing_to_do() -> None:
    assert plan([], [], 5.0, BatchLimits(), cost) is None


def test_head_waits_for_its_delay_then_flushes() -> None:
    lim = BatchLimits(max_batch_size=4, max_delay_s=0.010)
    q = head_q(1.000, 1.004)
    busy = tail_q((1.003, A))  # the tail holds work (not yet due): the head batch may wait to fill
    assert plan(q, busy, 1.005, lim, cost) == pytest.approx(1.010)  # wake when the oldest is due
    batch = plan(q, busy, 1.010, lim, cost)
    assert isinstance(batch, Batch)
    assert (batch.phase, batch.keys, batch.reason) == ("head", (0, 1), "delay")


def test_head_flushes_at_once_when_full_and_takes_fifo_prefix() -> None:
    lim = BatchLimits(max_batch_size=3, max_delay_s=1.0)
    batch = plan(head_q(1.0, 1.1, 1.2, 1.3, 1.4), [], 1.4, lim, cost)
    assert isinstance(batch, Batch)
    assert (batch.keys, batch.reason) == ((0, 1, 2), "full")


def test_tail_groups_by_bucket_and_runs_at_the_bucket() -> None:
    lim = BatchLimits(max_batch_size=8, max_delay_s=0.010, max_waste=0.0)
    q = tail_q((1.000, A), (1.001, B), (1.002, A), (1.003, B))
    head = head_q(1.004)  # an image still to go through the head could join a bucket: buckets wait
    assert plan(head, q, 1.005, lim, cost) == pytest.approx(1.010)
    batch = plan(head, q, 1.010, lim, cost)
    assert isinstance(batch, Batch)
    assert (batch.phase, batch.keys, batch.counts, batch.reason) == ("tail", (100, 102), A, "delay")
    assert batch.tokens == 2 * cost(A)
    rest = plan(head, q[1::2], 1.012, lim, cost)  # the B bucket is due too (arrived 1.001)
    assert isinstance(rest, Batch) and rest.keys == (101, 103) and rest.counts == B


def test_full_bucket_flushes_before_its_delay() -> None:
    lim = BatchLimits(max_batch_size=2, max_delay_s=10.0, max_waste=1.0)  # full: no room to merge B
    q = tail_q((1.0, A), (1.1, B), (1.2, A))
    batch = plan([], q, 1.2, lim, cost)
    assert isinstance(batch, Batch)
    assert (batch.keys, batch.counts, batch.reason) == ((100, 102), A, "full")


def test_token_limit_caps_the_batch_and_flushes_it() -> None:
    # Two A images fit in the limit, a third would not: send two now, keep the third.
    lim = BatchLimits(max_batch_size=32, max_delay_s=10.0, max_batch_tokens=2 * cost(A) + 1)
    q = tail_q((1.0, A), (1.1, A), (1.2, A))
    batch = plan([], q, 1.2, lim, cost)
    assert isinstance(batch, Batch)
    assert (batch.keys, batch.reason, batch.tokens) == ((100, 101), "full", 2 * cost(A))
    # An image whose cost alone passes the limit still runs (alone), never blocks the queue forever.
    solo = plan([], tail_q((1.0, A)), 11.0, BatchLimits(max_batch_tokens=1), cost)
    assert isinstance(solo, Batch) and solo.keys == (100,)


def test_oldest_due_bucket_goes_before_newer_full_buckets() -> None:
    """No starvation: a rare bucket past its delay runs before full buckets of newer images."""
    lim = BatchLimits(max_batch_size=2, max_delay_s=0.010, max_waste=0.10)
    q = tail_q((1.000, B), (1.005, A), (1.006, A), (1.007, C), (1.008, C))
    head = head_q(1.008)
    batch = plan(head, q, 1.010, lim, cost)
    assert isinstance(batch, Batch) and batch.counts == B and batch.reason == "delay"
    # Before B is due, full buckets run, oldest first.
    early = plan(head, q, 1.008, lim, cost)
    assert isinstance(early, Batch) and early.counts == A and early.reason == "full"


def test_ready_batches_run_oldest_request_first_tail_before_head_on_ties() -> None:
    lim = BatchLimits(max_batch_size=2, max_delay_s=0.0)
    head = [Waiting(1, 2.0, 2.0)]
    tail = [Waiting(2, 1.0, 2.5, A)]  # submitted before the head image, entered the tail later
    batch = plan(head, tail, 3.0, lim, cost)
    assert isinstance(batch, Batch) and batch.phase == "tail"
    tie = plan([Waiting(1, 1.0, 1.0)], [Waiting(2, 1.0, 1.5, A)], 3.0, lim, cost)
    assert isinstance(tie, Batch) and tie.phase == "tail"


def test_idle_head_batch_goes_at_once_when_phase_b_is_empty() -> None:
    lim = BatchLimits(max_batch_size=8, max_delay_s=0.010)
    batch = plan(head_q(1.000, 1.001), [], 1.001, lim, cost)
    assert isinstance(batch, Batch)
    assert (batch.phase, batch.keys, batch.reason) == ("head", (0, 1), "idle")
    # With tail work queued (not yet due) the head batch waits to fill, as before.
    assert plan(head_q(1.000, 1.001), tail_q((1.0005, A)), 1.001, lim, cost) == pytest.approx(1.010)


def test_idle_buckets_go_at_once_when_nothing_waits_for_phase_a_oldest_first() -> None:
    lim = BatchLimits(max_batch_size=8, max_delay_s=0.010, max_waste=0.0)
    q = tail_q((1.001, B), (1.000, A), (1.002, B))
    batch = plan([], q, 1.003, lim, cost)
    assert isinstance(batch, Batch)
    assert (batch.phase, batch.keys, batch.counts, batch.reason) == ("tail", (101,), A, "idle")
    rest = plan([], [q[0], q[2]], 1.004, lim, cost)
    assert isinstance(rest, Batch) and (rest.keys, rest.counts, rest.reason) == ((100, 102), B, "idle")


def test_under_load_buckets_still_wait_for_images_in_phase_a() -> None:
    """Both queues hold work: nothing is due before the delay, whatever its phase."""
    lim = BatchLimits(max_batch_size=8, max_delay_s=0.010, max_waste=0.0)
    head, tail = head_q(1.004), tail_q((1.002, A), (1.003, B))
    assert plan(head, tail, 1.005, lim, cost) == pytest.approx(1.012)  # A's delay runs out first
    batch = plan(head, tail, 1.012, lim, cost)
    assert isinstance(batch, Batch) and (batch.counts, batch.reason) == (A, "delay")
    # Once the head image has gone through, the buckets have nothing left to wait for.
    later_tail = [*tail_q((1.003, B)), Waiting(0, 1.004, 1.0125, B)]
    batch = plan([], later_tail, 1.0125, lim, cost)  # B's delay would run out at 1.013
    assert isinstance(batch, Batch) and (batch.keys, batch.reason) == ((100, 0), "idle")


def test_single_image_flows_through_both_phases_without_waiting() -> None:
    limits = BatchLimits(max_batch_size=8, max_delay_s=0.010)
    for mode in ("budget", "fifo"):
        batches, waits = simulate(mode, [(1.0, A)], limits, batch_s=0.002)
        assert [(b.phase, b.reason) for b in batches] == [("head", "idle"), ("tail", "idle")]
        assert waits[0] == [0.0, 0.0]
    # Spaced-out requests (an idle server each time) never wait either.
    batches, waits = simulate("budget", [(0.1 * i, (A, B, C)[i % 3]) for i in range(10)], limits, batch_s=0.002)
    assert all(w == [0.0, 0.0] for w in waits.values()) and len(batches) == 20


def test_budget_batch_with_room_takes_covered_smaller_buckets_within_the_waste_cap() -> None:
    near, far, wider = (48, 40, 24), (24, 16, 8), (56, 16, 8)  # near and far are covered by A; wider is not
    q = [Waiting(100, 1.000, 1.000, A, need=cost(A)), Waiting(101, 1.001, 1.001, far, need=cost(far)),
         Waiting(102, 1.002, 1.002, near, need=cost(near)), Waiting(103, 1.003, 1.003, wider, need=cost(wider))]
    extra_near = cost(A) - cost(near)
    # A cap that admits `near` (waste extra_near / (cost(A) + cost(near))) but not `far` as well.
    cap = (extra_near + 1) / (cost(A) + cost(near))
    batch = plan([], q, 1.010, BatchLimits(max_batch_size=8, max_delay_s=0.010, max_waste=cap), cost)
    assert isinstance(batch, Batch) and batch.counts == A
    assert batch.keys == (100, 102) and batch.tokens == 2 * cost(A)
    # A generous cap takes `far` too; `wider` never (one of its stages is above A's).
    batch = plan([], q, 1.010, BatchLimits(max_batch_size=8, max_delay_s=0.010, max_waste=5.0), cost)
    assert isinstance(batch, Batch) and batch.keys == (100, 102, 101)
    # No merging at 0, or when the batch is already full.
    for lim in (BatchLimits(max_delay_s=0.010, max_waste=0.0),
                BatchLimits(max_batch_size=1, max_delay_s=0.010, max_waste=5.0)):
        batch = plan([], q, 1.010, lim, cost)
        assert isinstance(batch, Batch) and batch.keys == (100,)


def test_due_small_bucket_moves_up_to_a_larger_one_when_more_images_fit() -> None:
    small, big = (44, 36, 28), (48, 40, 32)  # cost 111 vs 123: 10.8% waste for small run at big
    q = [Waiting(100, 1.000, 1.000, small, need=cost(small)),
         Waiting(101, 1.005, 1.005, big, need=cost(big)), Waiting(102, 1.006, 1.006, big, need=cost(big))]
    lim = BatchLimits(max_batch_size=8, max_delay_s=0.010, max_waste=0.05)
    batch = plan([], q, 1.010, lim, cost)  # only the small one is due
    assert isinstance(batch, Batch) and batch.counts == big and set(batch.keys) == {100, 101, 102}
    assert batch.tokens - sum(cost(b) for b in (small, big, big)) <= 0.05 * sum(cost(b) for b in (small, big, big))
    # With a tighter cap moving up costs too much: the small image runs alone at its own bucket.
    batch = plan([], q, 1.010, BatchLimits(max_batch_size=8, max_delay_s=0.010, max_waste=0.01), cost)
    assert isinstance(batch, Batch) and batch.keys == (100,) and batch.counts == small


def test_fifo_runs_one_queue_at_the_largest_budget() -> None:
    lim = BatchLimits(max_batch_size=8, max_delay_s=0.010, mode="fifo")
    q = tail_q((1.000, A), (1.001, B), (1.002, C))
    batch = plan([], q, 1.010, lim, cost)
    assert isinstance(batch, Batch)
    assert batch.keys == (100, 101, 102)
    assert batch.counts == max_counts([A, B, C]) == (48, 48, 40)
    assert batch.tokens == 3 * cost((48, 48, 40))


def test_fifo_token_limit_counts_every_image_at_the_largest_budget() -> None:
    # B alone is cheap; B then C costs 2 x cost(C) which passes the limit, so B goes alone.
    lim = BatchLimits(max_batch_size=8, max_delay_s=10.0, max_batch_tokens=2 * cost(C) - 1, mode="fifo")
    batch = plan([], tail_q((1.0, B), (1.1, C)), 1.1, lim, cost)
    assert isinstance(batch, Batch) and batch.keys == (100,) and batch.counts == B and batch.reason == "full"


def test_unbatched_runs_one_image_at_once() -> None:
    lim = BatchLimits(max_batch_size=32, max_delay_s=1.0, mode="unbatched")
    batch = plan(head_q(1.0, 1.0), [], 1.0, lim, cost)
    assert isinstance(batch, Batch) and batch.keys == (0,)
    batch = plan([], tail_q((1.0, A), (1.0, A)), 1.0, lim, cost)
    assert isinstance(batch, Batch) and batch.keys == (100,)


def test_drain_sends_everything_without_waiting() -> None:
    lim = BatchLimits(max_batch_size=8, max_delay_s=10.0)
    batch = plan(head_q(1.0), tail_q((0.5, A)), 1.0, lim, cost, drain=True)
    assert isinstance(batch, Batch) and batch.phase == "tail" and batch.reason == "drain"


def test_limits_from_settings_and_validation() -> None:
    from service.settings import Settings
    lim = BatchLimits.from_settings(Settings(max_batch_size=5, max_delay_ms=7, max_batch_tokens=99, batching="fifo"))
    assert (lim.max_batch_size, lim.max_delay_s, lim.max_batch_tokens, lim.mode) == (5, 0.007, 99, "fifo")
    with pytest.raises(ValueError):
        BatchLimits(max_batch_size=0)


# -- a simulated worker: fake clock, stub runner --------------------------------------------------
def simulate(mode: str, arrivals: list[tuple[float, tuple[int, ...]]], limits: BatchLimits,
             batch_s: float, price: BatchCost | None = None) -> tuple[list[Batch], dict[int, list[float]]]:
    """Drive ``plan`` like the worker does; every batch takes ``batch_s``.

    Returns the batches in order and, per image, its waits ``[head, tail]``.
    """
    lim = replace(limits, mode=mode)
    pending = sorted(enumerate(arrivals), key=lambda kv: kv[1][0])
    head: list[Waiting] = []
    tail: list[Waiting] = []
    buckets: dict[int, tuple[int, ...]] = {}
    waits: dict[int, list[float]] = {}
    batches: list[Batch] = []
    now = 0.0
    while pending or head or tail:
        while pending and pending[0][1][0] <= now:
            key, (t, bucket) = pending.pop(0)
            head.append(Waiting(key, t, t))
            buckets[key] = bucket
        decision = plan(head, tail, now, lim, cost, cost=price)
        if not isinstance(decision, Batch):
            nxt = [pending[0][1][0]] if pending else []
            now = min([*nxt, *([decision] if decision is not None else [])])
            continue
        batches.append(decision)
        queue = head if decision.phase == "head" else tail
        taken = [w for w in queue if w.key in decision.keys]
        queue[:] = [w for w in queue if w.key not in decision.keys]
        for w in taken:
            waits.setdefault(w.key, []).append(now - w.arrived)
        now += batch_s
        if decision.phase == "head":
            tail.extend(Waiting(w.key, w.submitted, now, buckets[w.key]) for w in taken)
    return batches, waits


def random_arrivals(n: int, seed: int) -> list[tuple[float, tuple[int, ...]]]:
    rng = random.Random(seed)
    common, rare = [A, B], [C]
    t, out = 0.0, []  # type: tuple[float, list[tuple[float, Counts]]]
    for _ in range(n):
        t += rng.expovariate(2000.0)
        out.append((t, rng.choice(rare) if rng.random() < 0.03 else rng.choice(common)))
    return out


@pytest.mark.parametrize("mode,max_waste", [("budget", 0.0), ("budget", 0.3), ("fifo", 0.0), ("unbatched", 0.0)])
def test_simulation_runs_every_image_once_at_counts_that_cover_it(mode: str, max_waste: float) -> None:
    arrivals = random_arrivals(400, seed=1)
    limits = BatchLimits(max_batch_size=16, max_delay_s=0.005, max_batch_tokens=16 * cost(A), max_waste=max_waste)
    batches, _ = simulate(mode, arrivals, limits, batch_s=0.002)
    for phase in ("head", "tail"):
        keys = [k for b in batches if b.phase == phase for k in b.keys]
        assert sorted(keys) == list(range(len(arrivals))), f"{phase}: every image exactly once"
    for b in batches:
        assert len(b.keys) <= (1 if mode == "unbatched" else 16)
        if b.phase == "tail":
            assert b.counts is not None and b.tokens <= max(limits.max_batch_tokens, cost(b.counts))
            own = [arrivals[k][1] for k in b.keys]
            needed = sum(cost(o) for o in own)
            if mode == "budget" and max_waste == 0:
                assert set(own) == {b.counts}, "budget batches hold one bucket, run at that bucket"
            elif mode == "budget":
                assert b.counts == max_counts(own) and b.counts in own, "run at a bucket in the batch"
                assert len(set(own)) == 1 or b.tokens - needed <= max_waste * needed, "merging keeps the cap"
            else:
                assert b.counts == max_counts(own), "fifo batches run at the largest budget in them"
    if mode != "unbatched":
        assert max(len(b.keys) for b in batches) > 1, "the load is high enough to form batches"
    if mode == "budget" and max_waste > 0:
        assert any(len({arrivals[k][1] for k in b.keys}) > 1 for b in batches if b.phase == "tail")


def test_simulation_rare_bucket_is_not_starved_under_steady_full_batches() -> None:
    """A rare image waits at most its delay plus the batches that were older than it."""
    limits = BatchLimits(max_batch_size=4, max_delay_s=0.010)
    # 4 A images every 4 ms: a full head batch then a full tail batch, 2 ms each, keep the worker
    # busy all the time with full batches (a full-first policy would never run the C image).
    arrivals = [(0.004 * (i // 4), A) for i in range(400)] + [(0.0301, C)]
    batches, waits = simulate("budget", arrivals, limits, batch_s=0.002)
    rare_key = len(arrivals) - 1
    rare_batch = next(b for b in batches if b.phase == "tail" and rare_key in b.keys)
    assert rare_batch.counts == C and rare_batch.reason == "delay"
    # After its delay it waits for at most the batch already running and one older ready batch.
    assert max(waits[rare_key]) <= limits.max_delay_s + 2 * 0.002 + 1e-9
    assert max(max(w) for w in waits.values()) <= limits.max_delay_s + 2 * 0.002 + 1e-9


# -- the cost model prices merges ------------------------------------------------------------------
def linear_price(fixed: float, per_token: float) -> BatchCost:
    """A device where a tail batch costs ``fixed + per_token * images * tokens`` (head: per image)."""
    def seconds(phase: str, images: int, counts: Counts | None) -> float:
        return fixed + per_token * images * (cost(counts) if counts is not None else 100)
    return seconds


SMALL, MID = (24, 16, 8), (40, 32, 16)  # both covered by A


def mixed_tail() -> list[Waiting]:
    return [Waiting(100, 1.000, 1.000, SMALL, need=cost(SMALL)), Waiting(101, 1.001, 1.001, A, need=cost(A)),
            Waiting(102, 1.002, 1.002, MID, need=cost(MID)), Waiting(103, 1.003, 1.003, SMALL, need=cost(SMALL)),
            Waiting(104, 1.004, 1.004, C, need=cost(C))]


def test_fixed_cost_dominated_device_merges_buckets_like_fifo() -> None:
    lim = BatchLimits(max_batch_size=8, max_delay_s=0.010, max_waste=10.0)
    batch = plan([], mixed_tail(), 1.010, lim, cost, cost=linear_price(fixed=0.010, per_token=1e-7))
    # One call at C (it covers every queued bucket) beats four calls: everything goes at once.
    assert isinstance(batch, Batch) and batch.counts == C and set(batch.keys) == {100, 101, 102, 103, 104}


def test_token_dominated_device_keeps_buckets_apart() -> None:
    lim = BatchLimits(max_batch_size=8, max_delay_s=0.010, max_waste=10.0)
    batch = plan([], mixed_tail(), 1.010, lim, cost, cost=linear_price(fixed=0.0, per_token=1e-4))
    # Running SMALL images at a larger bucket only adds tokens: the oldest bucket runs on its own.
    assert isinstance(batch, Batch) and batch.counts == SMALL and batch.keys == (100, 103)


def test_in_between_device_merges_only_near_buckets() -> None:
    # Fixed cost worth ~60 tokens: MID images at A (+24 tokens each) pay, SMALL at A (+72) does not.
    lim = BatchLimits(max_batch_size=8, max_delay_s=0.010, max_waste=10.0)
    q = [w for w in mixed_tail() if w.bucket != C]
    batch = plan([], q[1:], 1.010, lim, cost, cost=linear_price(fixed=60e-6, per_token=1e-6))
    assert isinstance(batch, Batch) and batch.counts == A and set(batch.keys) == {101, 102}


def test_cost_merges_still_respect_the_waste_cap_and_size() -> None:
    price = linear_price(fixed=0.010, per_token=1e-7)
    batch = plan([], mixed_tail(), 1.010, BatchLimits(max_batch_size=8, max_delay_s=0.010, max_waste=0.0), cost,
                 cost=price)
    assert isinstance(batch, Batch) and batch.counts == SMALL and batch.keys == (100, 103)
    batch = plan([], mixed_tail(), 1.010, BatchLimits(max_batch_size=2, max_delay_s=0.010, max_waste=10.0), cost,
                 cost=price)
    assert isinstance(batch, Batch) and len(batch.keys) <= 2 and 100 in batch.keys


def test_work_conserving_runs_the_oldest_batch_instead_of_waiting() -> None:
    q, busy = head_q(1.000, 1.004), tail_q((1.003, A))
    lazy = BatchLimits(max_batch_size=4, max_delay_s=0.010)
    assert plan(q, busy, 1.005, lazy, cost) == pytest.approx(1.010)
    batch = plan(q, busy, 1.005, replace(lazy, work_conserving=True), cost)
    assert isinstance(batch, Batch) and (batch.phase, batch.keys, batch.reason) == ("head", (0, 1), "idle")


@pytest.mark.parametrize("fixed,per_token", [(0.010, 1e-7), (0.0, 1e-4), (60e-6, 1e-6)])
@pytest.mark.parametrize("work_conserving", [False, True])
def test_simulation_with_costs_runs_every_image_once_and_never_starves(fixed: float, per_token: float,
                                                                       work_conserving: bool) -> None:
    arrivals = random_arrivals(400, seed=2)
    limits = BatchLimits(max_batch_size=16, max_delay_s=0.005, max_batch_tokens=16 * cost(A), max_waste=10.0,
                    work_conserving=work_conserving)
    batches, waits = simulate("budget", arrivals, limits, batch_s=0.002, price=linear_price(fixed, per_token))
    for phase in ("head", "tail"):
        keys = [k for b in batches if b.phase == phase for k in b.keys]
        assert sorted(keys) == list(range(len(arrivals))), f"{phase}: every image exactly once"
    for b in batches:
        if b.phase == "tail":
            own = [arrivals[k][1] for k in b.keys]
            assert b.counts is not None and all(all(c >= o for c, o in zip(b.counts, bk, strict=True))
                                                for bk in own), "the counts run cover every image"
    # Every wait is bounded by the delay plus the batches older than it (here a few 2 ms batches).
    assert max(max(w) for w in waits.values()) <= limits.max_delay_s + 4 * 0.002 + 1e-9


def test_the_policys_defaults_are_the_settings_defaults() -> None:
    """One home for each default: ``BatchLimits()`` is what the service runs with when nothing is set."""
    assert BatchLimits() == BatchLimits.from_settings(Settings.model_construct())
