"""The cost model learns a device's fixed and per-unit costs from batches (synthetic timings)."""

from __future__ import annotations

import random

import pytest

from service.runtime.costmodel import CostModel, LinearFit


def test_fit_converges_on_a_noisy_linear_source() -> None:
    rng = random.Random(0)
    fit = LinearFit(decay=0.99)
    for _ in range(400):
        units = rng.choice([1, 2, 4, 8, 16, 32])
        fit.observe(units, 0.004 + 0.0005 * units + rng.gauss(0, 0.0002))
    assert fit.fixed == pytest.approx(0.004, rel=0.1)
    assert fit.slope == pytest.approx(0.0005, rel=0.05)


def test_fit_follows_a_device_that_gets_slower() -> None:
    fit = LinearFit(decay=0.9)
    for i in range(200):
        units = 1 + i % 8
        fit.observe(units, 0.001 + 0.001 * units)
    for i in range(200):  # the machine gets busy: every call now costs twice as much
        units = 1 + i % 8
        fit.observe(units, 0.002 + 0.002 * units)
    assert fit.predict(4) == pytest.approx(0.010, rel=0.02)


def test_one_unit_count_only_fits_the_level_and_never_goes_negative() -> None:
    fit = LinearFit(fixed=0.0, slope=0.001)
    for _ in range(10):
        fit.observe(5, 0.02)
    assert fit.slope == 0.001 and fit.predict(5) == pytest.approx(0.02)
    fit.observe(1, 0.5)  # noise that suggests a negative slope: clamped, level still fitted
    assert fit.slope >= 0 and fit.fixed >= 0
    fit.observe(float("nan"), 1.0)  # ignored
    assert fit.n == 11


def test_cost_model_prices_tail_batches_by_tokens_and_head_batches_by_images() -> None:
    cost = CostModel()
    assert not cost.ready
    for rows in (1, 8):
        cost.observe("head", rows, 0, 0.002 + 0.001 * rows)
        for per_row in (100, 400):
            cost.observe("tail", rows, per_row, 0.003 + 1e-5 * rows * per_row)
    assert cost.ready
    assert cost.seconds("head", 4) == pytest.approx(0.006)
    assert cost.seconds("tail", 2, 250) == pytest.approx(0.003 + 1e-5 * 500)
    described = cost.describe()
    assert described["tail"]["fixed_ms"] == pytest.approx(3.0) and described["head"]["observations"] == 2


def test_typical_images_is_a_faded_mean_of_real_images_per_batch() -> None:
    model = CostModel(decay=0.5)
    assert model.typical_images("tail") is None
    model.observe("tail", 8, 10, 0.01, images=5)               # padded to 8 rows, 5 of them images
    assert model.typical_images("tail") == 5
    model.observe("tail", 8, 10, 0.01)                         # no count given: every row is an image
    assert model.typical_images("tail") == pytest.approx((0.5 * 5 + 8) / 1.5)
    assert model.typical_images("head") is None                # per phase
