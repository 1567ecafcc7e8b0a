"""Predicted budgets (model/budget.py): the Lagrangian allocation, and a LifeViT serving them."""

from __future__ import annotations

import torch

from model import budget as predicted
from model import create_lifevit, load_checkpoint, save_checkpoint
from model.life import thresholds_at_counts
from model.schedule import KeepSchedule, budgets_from_lives
from model.training.budget_fit import fit_predictor


def test_solve_lambda_holds_the_target_mean_and_spends_where_need_is():
    costs = torch.tensor([1.0, 2.0, 4.0, 8.0])
    # half the images need rate 0 for sure, half need rate 2: a fixed rate would pay 4 for everyone
    cdf = torch.tensor([[1.0, 1.0, 1.0, 1.0]] * 50 + [[0.0, 0.1, 1.0, 1.0]] * 50)
    lam = predicted.solve_lambda(cdf, costs, target=2.5)
    idx = predicted.allocate(cdf, costs, lam)
    assert float(costs[idx].mean()) <= 2.5
    assert (idx[:50] == 0).all() and (idx[50:] == 2).all()  # every image at exactly its need


def test_no_price_when_the_target_is_the_top():
    costs = torch.tensor([1.0, 2.0])
    cdf = torch.tensor([[0.5, 0.5]])
    lam = predicted.solve_lambda(cdf, costs, target=2.0)
    assert lam == 0.0 and predicted.allocate(cdf, costs, lam).tolist() == [1]


def test_ladder_counts_are_the_keep_rate_schedules():
    sched = KeepSchedule.from_keep_rate(0.5, 64, 12, (1, 4, 7))
    counts = predicted.ladder_counts(sched)
    assert len(counts) == len(predicted.LADDER) and counts[-1] == (64, 64, 64)
    assert counts[predicted.LADDER.index(0.5)] == sched.patch_counts
    costs = [predicted.tail_cost(sched, c) for c in counts]
    assert costs == sorted(costs)


def test_thresholds_at_counts_keep_exactly_those_counts():
    scores = torch.randn(5, 16)
    counts = torch.tensor([[10, 5, 2], [16, 16, 16], [1, 1, 1], [8, 8, 3], [12, 6, 6]])
    t = thresholds_at_counts(scores, counts)
    assert torch.equal((scores[:, :, None] > t[:, None, :]).sum(dim=1), counts)


def _fitted_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_lifevit("vit_nano_patch8_32", keep_rate=0.5, num_classes=3).eval()
    model.calibrate(torch.randn(64, 3, 32, 32))
    scores = model.head(torch.randn(200, 3, 32, 32)).scores
    # a need that grows with the image's top score: the predictor must learn to follow it
    top = scores.max(dim=1).values
    need = torch.bucketize(top, top.quantile(torch.linspace(0, 1, 6)[1:-1])) * 3
    model.life.set_budget_params(fit_predictor(scores, need, epochs=200))
    return model


def test_predicted_budgets_follow_need_at_the_schedules_mean_cost():
    model = _fitted_model()
    assert model.life.has_budget_predictor
    x = torch.randn(128, 3, 32, 32)
    scores = model.head(x).scores
    for rate in (0.3, 0.5, 0.7):
        sched = model.schedule_for(rate)
        lives = model.lives(scores, sched)
        budgets = model.budgets(scores, sched, lives)
        assert torch.equal(budgets_from_lives(lives, sched), budgets)  # lives and budgets agree
        assert len({tuple(b) for b in budgets.tolist()}) > 1  # per image, not one count
        fixed = predicted.tail_cost(sched, sched.patch_counts)
        mean = sum(predicted.tail_cost(sched, b) for b in budgets.tolist()) / len(budgets)
        assert 0.6 * fixed <= mean <= 1.4 * fixed, (rate, mean, fixed)  # the sample's mean, held roughly
    # the calibration sample's budgets (what a server fits its grid to) come from the predictor too
    sample = model.budget_sample(model.schedule_for(0.5))
    assert sample.shape[1] == 3 and len({tuple(b) for b in sample.tolist()}) > 1
    # more need (a larger top score) never gets a smaller budget on average
    top = scores.max(dim=1).values
    b = model.budgets(scores, model.schedule_for(0.5)).float().sum(dim=1)
    hi, lo = top > top.median(), top <= top.median()
    assert b[hi].mean() > b[lo].mean()


def test_the_predictor_travels_in_the_checkpoint(tmp_path):
    model = _fitted_model()
    save_checkpoint(model, tmp_path / "m", class_names=["a", "b", "c"])
    loaded, _ = load_checkpoint(tmp_path / "m")
    x = torch.randn(16, 3, 32, 32)
    assert loaded.life.has_budget_predictor
    assert torch.equal(loaded.budgets(loaded.head(x).scores), model.budgets(model.head(x).scores))


def test_checkpoints_without_a_predictor_keep_calibrated_thresholds(tmp_path):
    torch.manual_seed(0)
    model = create_lifevit("vit_nano_patch8_32", keep_rate=0.5, num_classes=3).eval()
    model.calibrate(torch.randn(32, 3, 32, 32))
    save_checkpoint(model, tmp_path / "m", class_names=["a", "b", "c"])
    loaded, _ = load_checkpoint(tmp_path / "m")
    assert not loaded.life.has_budget_predictor and loaded.normalization == "calibrated"
    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(loaded.budgets(loaded.head(x).scores), model.budgets(model.head(x).scores))
