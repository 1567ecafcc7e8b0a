import random

import pytest
import torch

from model.schedule import (
    KeepSchedule,
    budgets_from_lives,
    constant_like,
    default_stage_starts,
    host_to_device,
    round_up_budget,
)

PAPER = {0.7: (140, 100, 72), 0.8: (159, 129, 105), 0.9: (179, 163, 148)}


@pytest.mark.parametrize("rate", sorted(PAPER))
def test_paper_schedules_for_deit(rate):
    s = KeepSchedule.from_keep_rate(rate, num_patches=196, depth=12)
    assert s.stage_starts == (4, 7, 10)
    assert tuple(c + 1 for c in s.patch_counts) == PAPER[rate]  # + class token


def test_keep_rate_one_keeps_everything_and_rule_is_monotone():
    assert KeepSchedule.from_keep_rate(1.0, 196, 12).patch_counts == (196, 196, 196)
    prev = None
    for r in [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]:
        counts = KeepSchedule.from_keep_rate(r, 64, 12).patch_counts
        assert all(b <= a for a, b in zip(counts, counts[1:]))
        if prev is not None:
            assert all(c >= p for c, p in zip(counts, prev))
        prev = counts


def test_explicit_counts_and_bad_schedules():
    s = KeepSchedule(64, 12, (4, 8), (40, 10))
    assert s.stage_of_block(3) is None and s.stage_of_block(4) == 0 and s.stage_of_block(11) == 1
    for bad in [dict(stage_starts=(4, 8), patch_counts=(10, 40)),  # increasing counts
                dict(stage_starts=(8, 4), patch_counts=(40, 10)),  # decreasing starts
                dict(stage_starts=(4, 12), patch_counts=(40, 10)),  # start past the last block
                dict(stage_starts=(4,), patch_counts=(65,))]:      # more than all patches
        with pytest.raises(ValueError):
            KeepSchedule(64, 12, **bad)
    with pytest.raises(ValueError):
        KeepSchedule.from_keep_rate(0.0, 64, 12)
    assert default_stage_starts(12) == (4, 7, 10)


def test_ideal_lives_match_counts():
    s = KeepSchedule.from_keep_rate(0.7, 196, 12)
    lives = s.ideal_lives()
    assert lives.numel() == 196
    for start, count in zip(s.stage_starts, s.patch_counts):
        assert int((lives > start).sum()) == count


def test_budgets_from_lives_counts_alive_patches():
    s = KeepSchedule(6, 12, (4, 7, 10), (4, 2, 1))
    lives = torch.tensor([[12.0, 9.0, 7.5, 5.0, 4.0, 4.0]])
    assert budgets_from_lives(lives, s).tolist() == [[4, 3, 1]]


def test_bucketing_never_rounds_down():
    rng = random.Random(0)
    s = KeepSchedule.from_keep_rate(0.7, 196, 12)
    for _ in range(2000):
        a = rng.randint(1, 196)
        b = rng.randint(1, a)
        c = rng.randint(1, b)
        step = rng.choice([1, 3, 8, 16, 50])
        out = round_up_budget((a, b, c), s, step)
        assert all(o >= v for o, v in zip(out, (a, b, c)))
        assert all(y <= x for x, y in zip(out, out[1:]))
        assert all(o == 196 or o % step == 0 for o in out)
        assert all(o - v < step for o, v in zip(out, (a, b, c)))  # the smallest bucket above


def test_fitted_grid_covers_every_sampled_budget_with_few_points():
    import torch

    from model.schedule import BucketGrid, stage_blocks
    rng = random.Random(1)
    s = KeepSchedule.from_keep_rate(0.7, 196, 12)
    rows = []
    for _ in range(600):
        a = rng.randint(20, 196)
        b = rng.randint(10, a)
        rows.append((a, b, rng.randint(1, b)))
    grid = BucketGrid.fitted(torch.tensor(rows), s, size=8)
    assert stage_blocks(s) == (3, 3, 2) and len(grid.points) <= 9
    assert grid.points[-1] == (196, 196, 196)
    waste = []
    for r in rows:
        p = grid.round_up(r)
        assert p in grid.points and all(c >= v for c, v in zip(p, r))
        waste.append(grid.cost(p) / grid.cost(r) - 1)
    # Quantile bins: a budget wastes only what separates it from its bin's largest members.
    assert sum(waste) / len(waste) < 0.5
    # Budgets never sampled still get a covering point, at worst the full budget.
    assert grid.round_up((196, 1, 1)) == (196, 196, 196) or grid.round_up((196, 1, 1))[0] == 196
    fewer = BucketGrid.fitted(torch.tensor(rows), s, size=2)
    assert len(fewer.points) <= 3
    assert sum(fewer.cost(fewer.round_up(r)) for r in rows) > sum(grid.cost(grid.round_up(r)) for r in rows)


def test_per_image_model_grid_is_its_schedules():
    import torch

    from model import create_lifevit
    from model.schedule import BucketGrid
    m = create_lifevit("vit_nano_patch8_32", num_classes=3)
    sample = torch.cat([m.budget_sample(m.schedule_for(r)) for r in (0.5, 0.7, 0.9)])
    grid = BucketGrid.fitted(sample, m.schedule, size=8)
    assert set(grid.points) == {m.schedule_for(r).patch_counts for r in (0.5, 0.7, 0.9)} | {(16, 16, 16)}
    assert grid.round_up(m.schedule_for(0.5).patch_counts) == m.schedule_for(0.5).patch_counts


def test_constant_like_takes_the_device_and_dtype_of_its_model_tensor():
    like = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(constant_like([1, 2.5, 3], like), torch.tensor([1, 2.5, 3], dtype=torch.float64))
    counts = constant_like((139, 99, 71), like, torch.long)
    assert counts.dtype == torch.long and counts.tolist() == [139, 99, 71]
    assert constant_like([4], torch.empty(1, device="meta")).device.type == "meta"
    assert constant_like([], like).shape == (0,)


def test_host_to_device_moves_without_pinning_off_the_gpu():
    t = torch.arange(3)
    assert host_to_device(t, torch.device("cpu")) is t
    moved = host_to_device(t, torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == (3,)
