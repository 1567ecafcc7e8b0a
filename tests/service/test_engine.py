"""The engine on CPU: uint8 input path, bucket grid, one lives pass per keep rate, and the padded
shape path that CUDA graphs use (emulated: same buffers and padding, no graphs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.engine import Engine
from service.graphs import batch_classes
from service.settings import Settings


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def eager(checkpoint_dir: Path) -> Engine:
    return Engine.from_settings(Settings(checkpoint=checkpoint_dir, device="cpu"))


@pytest.fixture(scope="module")
def padded(checkpoint_dir: Path) -> Engine:
    engine = Engine(checkpoint_dir, device="cpu", cuda_graphs="emulate", max_batch_size=8)
    engine.capture()
    return engine


def test_auto_dtype_is_float32_on_cpu_and_graphs_are_off(eager: Engine) -> None:
    assert eager.dtype == torch.float32 and not eager.runner.enabled and eager.padded_rows(3) == 3
    assert eager.info()["graphs"]["enabled"] is False


def test_uint8_input_matches_timm_float_preprocessing(eager: Engine) -> None:
    from PIL import Image
    from timm.data import create_transform
    img = Image.fromarray(pixels(1, seed=3)[0].permute(1, 2, 0).numpy())
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    reference = create_transform(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in eager.config.preprocess.items() if k in keys})(img)
    mine = eager.preprocess(img)
    assert mine.dtype == torch.uint8
    torch.testing.assert_close(eager.normalize(mine[None])[0], reference, rtol=0, atol=1e-5)


def test_bucket_grid_is_fitted_and_small(eager: Engine) -> None:
    points = eager.buckets.points
    assert 2 <= len(points) <= 9  # 8 fitted (fewer if they coincide) + the full budget
    assert points[-1] == (eager.model.num_patches,) * len(points[0])
    items = eager.head(pixels(16), [None, 0.5, 0.7, 0.9] * 4)
    for it in items:
        counts = eager.bucket(it.budget)
        assert counts in points and all(c >= b for c, b in zip(counts, it.budget, strict=True))


def test_head_runs_one_lives_pass_per_distinct_keep_rate(eager: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = eager.model.lives

    def counting(scores: torch.Tensor, schedule: object = None) -> torch.Tensor:
        calls.append(scores.shape[0])
        return real(scores, schedule)  # type: ignore[arg-type]

    monkeypatch.setattr(eager.model, "lives", counting)
    eager.head(pixels(6), [0.9, 0.5, 0.9, 0.9, None, 0.5])
    # Three values (0.9, 0.5, default), each schedule_for(0.9) a new object: grouped by value.
    assert sorted(calls) == [1, 2, 3]
    calls.clear()
    eager.head(pixels(3), [0.7, None, 0.7])  # the default schedule is keep 0.7: same counts, one pass
    assert calls == [3]


def test_padded_shapes_equal_eager_for_every_captured_class(eager: Engine, padded: Engine) -> None:
    assert batch_classes(8) == (1, 2, 4, 8)
    points = padded.buckets.points
    assert padded.runner.describe()["captured"] == len(batch_classes(8)) * (1 + len(points))
    for n in (1, 2, 3, 5, 8):  # 3 and 5 run padded to 4 and 8
        x, rates = pixels(n, seed=n), [None] * n
        a, b = eager.head(x, rates), padded.head(x, rates)
        assert len(b) == n and padded.padded_rows(n) == next(c for c in (1, 2, 4, 8) if c >= n)
        for ia, ib in zip(a, b, strict=True):
            assert ia.budget == ib.budget
            torch.testing.assert_close(ib.tokens, ia.tokens, rtol=0, atol=1e-5)
            torch.testing.assert_close(ib.lives, ia.lives, rtol=0, atol=1e-5)
        for counts in {padded.bucket(it.budget) for it in b} | {points[0], points[-1]}:
            # The emulated replay fills the padding rows with NaN: any leak would show in the answer.
            pb = padded.tail(b, counts)
            assert pb.shape[0] == n and torch.isfinite(pb).all()
            torch.testing.assert_close(pb, eager.tail(a, counts), rtol=0, atol=1e-5)
    assert padded.runner.eager_fallbacks == 0


def test_uncaptured_shapes_fall_back_to_eager_and_are_counted(eager: Engine, padded: Engine) -> None:
    before = padded.runner.eager_fallbacks
    x = pixels(9, seed=9)  # larger than the largest class (8)
    items = padded.head(x, [None] * 9)
    assert padded.runner.eager_fallbacks == before + 1 and padded.padded_rows(9) == 9
    odd = tuple(p - 1 for p in padded.buckets.points[-1])  # not a grid point
    probs = padded.tail(items[:2], odd)
    assert padded.runner.eager_fallbacks == before + 2
    torch.testing.assert_close(probs, eager.tail(eager.head(x[:2], [None, None]), odd), rtol=0, atol=1e-5)
    assert padded.info()["graphs"]["eager_fallbacks"] == before + 2


def test_warmup_times_both_phases_for_the_cost_model(padded: Engine) -> None:
    timings = padded.warmup(batches=1)
    phases = {(t.phase, t.rows) for t in timings}
    assert {("head", 1), ("head", 8), ("tail", 1), ("tail", 8)} <= phases
    assert all(t.seconds > 0 for t in timings) and {t.tokens_per_row for t in timings if t.phase == "tail"} \
        == {padded.tail_tokens(padded.buckets.points[0]), padded.tail_tokens(padded.buckets.points[-1])}


def test_calibration_statistics_stay_float32_whatever_the_model_dtype(checkpoint_dir: Path) -> None:
    # On CPU only float32 runs, so check the rule directly: the buffers the engine restores are the
    # checkpoint's float32 values, not a round trip through the model's dtype.
    engine = Engine(checkpoint_dir, device="cpu")
    life = engine.model.life
    assert life.score_quantiles.dtype == torch.float32 and life.score_samples.dtype == torch.float32
    assert life.score_samples.shape[0] > 0
