"""The engine on CPU: uint8 input path, bucket grid, one lives pass per keep rate, and the padded
shape path that CUDA graphs use (emulated: same buffers and padding, no graphs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from model.schedule import BucketGrid
from service.runtime.engine import Engine
from service.runtime.graphs import batch_classes
from service.runtime.handoff import HostCopy, Rows
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
    points = eager.bucket_grid.points
    assert 2 <= len(points) <= 9  # 8 fitted (fewer if they coincide) + the full budget
    assert points[-1] == (eager.model.num_patches,) * len(points[0])
    hb = eager.head(pixels(16), [None, 0.5, 0.7, 0.9] * 4)
    for budget, bucket in zip(hb.budgets.tolist(), hb.buckets.tolist(), strict=True):
        counts = eager.bucket(budget)  # the host rule, one budget at a time
        assert tuple(bucket) == counts  # ... is what the head assigned to the whole batch at once
        assert counts in points and all(c >= b for c, b in zip(counts, budget, strict=True))


def test_vectorised_round_up_equals_the_rule_on_every_budget(eager: Engine) -> None:
    g = torch.Generator().manual_seed(0)
    S, P = len(eager.bucket_grid.weights), eager.model.num_patches
    budgets = torch.randint(1, P + 1, (500, S), generator=g).sort(dim=1, descending=True).values
    stepped = BucketGrid.stepped(eager.model.schedule, 4)  # a checkpoint stored without a budget sample
    assert tuple(stepped.table().shape) == (0, S)
    for grid in (eager.bucket_grid, stepped):
        rows = grid.round_up_rows(budgets, grid.table())
        assert rows.dtype == torch.int64 and [tuple(r) for r in rows.tolist()] == \
            [grid.round_up(b) for b in budgets.tolist()]


def test_head_runs_one_lives_pass_per_distinct_keep_rate(eager: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = eager.model.lives

    def counting(scores: torch.Tensor, schedule: object = None) -> torch.Tensor:
        calls.append(scores.shape[0])
        return real(scores, schedule)  # type: ignore[arg-type]

    monkeypatch.setattr(eager.model, "lives", counting)
    hb = eager.head(pixels(6), [0.9, 0.5, 0.9, 0.9, None, 0.5])
    # The default pass covers every row (inside the head's graph on a GPU), then one pass per other
    # value (0.9, 0.5), each schedule_for(0.9) a new object: grouped by value.
    assert calls == [6, 3, 2] and hb.keep_rates == [0.9, 0.5, 0.9, 0.9, 0.7, 0.5]
    for rate, row in ((0.9, 0), (0.5, 1), (None, 4)):  # each row's plan is its own rate's
        alone = eager.head(pixels(6)[row:row + 1], [rate])
        assert torch.equal(hb.budgets[row], alone.budgets[0]) and torch.equal(hb.buckets[row], alone.buckets[0])
        torch.testing.assert_close(hb.lives[row], alone.lives[0], rtol=0, atol=1e-5)
    calls.clear()
    eager.head(pixels(3), [0.7, None, 0.7])  # the default schedule is keep 0.7: same counts, one pass
    assert calls == [3]


def test_padded_shapes_equal_eager_for_every_captured_class(eager: Engine, padded: Engine) -> None:
    assert batch_classes(8) == (1, 2, 4, 8)
    points = padded.bucket_grid.points
    assert padded.runner.describe()["captured"] == len(batch_classes(8)) * (1 + len(points))
    for n in (1, 2, 3, 5, 8):  # 3 and 5 run padded to 4 and 8
        x, rates = pixels(n, seed=n), [None] * n
        a, b = eager.head(x, rates), padded.head(x, rates)
        assert len(b) == n and padded.padded_rows(n) == next(c for c in (1, 2, 4, 8) if c >= n)
        assert torch.equal(a.budgets, b.budgets) and torch.equal(a.buckets, b.buckets)
        torch.testing.assert_close(b.tokens, a.tokens, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.lives, a.lives, rtol=0, atol=1e-5)
        every = torch.arange(n)
        shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        for counts in {padded.bucket(bb) for bb in b.budgets.tolist()} | {points[0], points[-1]}:
            # The emulated replay fills the padding rows with NaN: any leak would show in the answer.
            pb = padded.tail([Rows(b, every)], counts).get()
            assert pb.shape[0] == n and torch.isfinite(pb).all()
            torch.testing.assert_close(pb, eager.tail([Rows(a, every)], counts).get(), rtol=0, atol=1e-5)
            # rows gathered in any order, from two head batches, into one replay: each row its own answer
            half = n // 2
            mixed = padded.tail([Rows(b, shuffled[:half]), Rows(a, shuffled[half:])], counts).get()
            torch.testing.assert_close(mixed, pb[shuffled], rtol=0, atol=1e-5)
        by_bucket = padded.tail_by_bucket(b).get()
        ref = eager.model(eager.normalize(x), None, eager.bucket_grid).softmax(-1)
        torch.testing.assert_close(by_bucket, ref, rtol=0, atol=1e-5)
    assert padded.runner.eager_fallbacks == 0


def test_uncaptured_shapes_fall_back_to_eager_and_are_counted(eager: Engine, padded: Engine) -> None:
    before = padded.runner.eager_fallbacks
    x = pixels(9, seed=9)  # larger than the largest class (8)
    hb = padded.head(x, [None] * 9)
    assert padded.runner.eager_fallbacks == before + 1 and padded.padded_rows(9) == 9
    odd = tuple(p - 1 for p in padded.bucket_grid.points[-1])  # not a grid point
    probs = padded.tail([Rows(hb, torch.arange(2))], odd).get()
    assert padded.runner.eager_fallbacks == before + 2
    reference = eager.tail([Rows(eager.head(x[:2], [None, None]), torch.arange(2))], odd).get()
    torch.testing.assert_close(probs, reference, rtol=0, atol=1e-5)
    assert padded.info()["graphs"]["eager_fallbacks"] == before + 2


def test_warmup_times_both_phases_for_the_cost_model(padded: Engine) -> None:
    timings = padded.warmup(batches=1)
    phases = {(t.phase, t.rows) for t in timings}
    assert {("head", 1), ("head", 8), ("tail", 1), ("tail", 8)} <= phases
    assert all(t.seconds > 0 for t in timings) and {t.tokens_per_row for t in timings if t.phase == "tail"} \
        == {padded.tail_tokens(padded.bucket_grid.points[0]), padded.tail_tokens(padded.bucket_grid.points[-1])}


def test_calibration_statistics_stay_float32_whatever_the_model_dtype(checkpoint_dir: Path) -> None:
    # On CPU only float32 runs, so check the rule directly: the buffers the engine restores are the
    # checkpoint's float32 values, not a round trip through the model's dtype.
    engine = Engine(checkpoint_dir, device="cpu")
    life = engine.model.life
    assert life.score_quantiles.dtype == torch.float32 and life.score_samples.dtype == torch.float32
    assert life.score_samples.shape[0] > 0


class OneDevice(TorchDispatchMode):
    """Fails any op but an explicit copy that is handed tensors of two devices (0-dim CPU scalars
    aside). Some ops (``index_select`` on ``meta``) accept a CPU index silently; on a GPU that is a
    wrong-device error or a copy the host waits for."""

    COPIES = {"aten._to_copy", "aten.copy_", "aten.lift_fresh"}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if str(func.overloadpacket) not in self.COPIES:
            tensors = [t for t in pytree.tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
            devices = {t.device.type for t in tensors if t.dim() > 0 or t.device.type != "cpu"}
            assert len(devices) <= 1, f"{func} mixes devices {sorted(devices)}"
        return func(*args, **(kwargs or {}))


def test_head_and_tail_only_queue_device_work(checkpoint_dir: Path) -> None:
    """The engine on PyTorch's ``meta`` device (see tests/model/test_meta_device.py): a CPU tensor
    meeting the model's (an index, a constant) is caught, and any host read of a device value
    (``.tolist()``, ``.item()``) raises: what on a GPU would be a wrong-device error or a hidden sync."""
    engine = Engine(checkpoint_dir, device="cpu").to("meta")
    n, P, S = 5, engine.model.num_patches, len(engine.default_schedule.patch_counts)
    with torch.inference_mode(), OneDevice():
        hb = engine.head(list(pixels(n)), [None, 0.5, None, 0.9, 0.5])  # mixed rates: the indexed path
        hb2 = engine.head(pixels(3), [0.9] * 3)
    T, D = engine.model.num_prefix_tokens, engine.model.backbone.embed_dim
    assert hb.tokens.device.type == "meta" and tuple(hb.tokens.shape) == (n, T + P, D)
    assert hb.plan.tensor.device.type == "meta" and tuple(hb.plan.tensor.shape) == (n, P + 2 * S)
    counts = engine.bucket_grid.points[0]
    parts = [Rows(hb, torch.tensor([4, 0, 2])), Rows(hb2, torch.tensor([1]))]  # host indices, as the worker sends
    with OneDevice():
        probs = engine.tail(parts, counts).tensor
    assert probs.device.type == "meta" and tuple(probs.shape) == (4, len(engine.class_names))


class NeverLands:
    """An event for a copy that never completes: waiting on it is a test failure."""

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        raise AssertionError("waited for the device's copy")


def test_per_image_budgets_are_known_without_waiting_for_the_device(tmp_path: Path) -> None:
    from model import create_lifevit, save_checkpoint
    torch.manual_seed(0)
    ckpt = save_checkpoint(create_lifevit("vit_nano_patch8_32", 0.7, num_classes=5).eval(), tmp_path / "per-image")
    engine = Engine(ckpt, device="cpu")
    assert engine.model.normalization == "per_image"
    rates = [None, 0.5, None, 0.9]
    hb = engine.head(pixels(4), rates)
    plan = hb.plan.tensor
    hb.plan = HostCopy(plan, NeverLands())  # as on a GPU still computing: budgets must not need it
    expected = torch.tensor([engine.schedule_counts(r) for r in rates])
    assert torch.equal(hb.budgets, expected)
    assert [tuple(b) for b in hb.buckets.tolist()] == [engine.bucket(b) for b in expected.tolist()]
    P, S = engine.model.num_patches, expected.shape[1]
    assert torch.equal(plan[:, P:P + S].long(), expected) and torch.equal(plan[:, P + S:].long(), hb.buckets)
    with pytest.raises(AssertionError, match="waited"):
        hb.lives  # noqa: B018 - the lives do come from the device


def test_extra_rates_plan_each_images_budget_at_those_rates(eager: Engine) -> None:
    """Accuracy scaling's re-bucketing: the head also plans every image at ``extra_rates``, in the same
    copy, and those budgets and buckets are the ones a head at that rate gives."""
    px, rates = pixels(6, seed=3), [None, 0.9, None, None, 0.9, None]
    hb = eager.head(px, rates, (0.5, 0.3))
    plain = eager.head(px, rates)
    assert torch.equal(hb.budgets, plain.budgets) and torch.equal(hb.buckets, plain.buckets)
    assert torch.equal(hb.lives, plain.lives) and hb.stages == plain.stages
    for rate in (0.5, 0.3):
        budgets, buckets = hb.at_rate(rate)
        at = eager.head(px, [rate] * 6)
        assert torch.equal(budgets, at.budgets) and torch.equal(buckets, at.buckets)
    with pytest.raises(ValueError):
        hb.at_rate(0.7)


def test_extra_rates_only_queue_device_work(checkpoint_dir: Path) -> None:
    engine = Engine(checkpoint_dir, device="cpu").to("meta")
    P, S = engine.model.num_patches, len(engine.default_schedule.patch_counts)
    with torch.inference_mode(), OneDevice():
        hb = engine.head(list(pixels(3)), [None, 0.9, None], (0.5, 0.3))
    assert hb.plan.tensor.device.type == "meta" and tuple(hb.plan.tensor.shape) == (3, P + 2 * S * 3)
