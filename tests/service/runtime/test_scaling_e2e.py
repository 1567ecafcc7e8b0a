"""Accuracy scaling with a real (tiny, calibrated) LifeViT: a scaled answer is the model's answer at
the rate it reports, and with the objective off (or never missed) the answers are bit for bit the
same as without scaling.

One image per request, one at a time: every batch holds a single image, so answers of different
runs are computed by the same kernels on the same shapes and can be compared exactly.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from tiny_models import tiny_checkpoint

from service.protocol import ImageResult
from service.runtime.engine import Engine
from service.runtime.scaling import Scaling
from service.runtime.worker import Worker
from service.settings import Settings

FLOOR = 0.3


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), [f"c{i}" for i in range(5)], "scaling-test",
                           backbone="vit_micro_patch8_64")  # calibrated: budgets vary by image and rate
    return Engine(path, device="cpu")


@pytest.fixture(scope="module")
def pixels() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn(3, 64, 64, generator=g) * (0.2 + 0.1 * (i % 5)) for i in range(6)]
    return [(128 + 64 * x).clamp(0, 255).to(torch.uint8) for x in noise]


def answers(engine: Engine, pixels: list[torch.Tensor], scaling: Scaling | None,
            min_keep_rate: float | None = None) -> list[ImageResult]:
    async def main() -> list[ImageResult]:
        worker = Worker(engine, Settings(max_batch_size=8, max_batch_waste=0), timings=engine.warmup(0),
                        scaling=scaling)
        await worker.start()
        try:
            deadline = time.monotonic() + 120
            return [(await worker.submit([p], None, deadline, min_keep_rate))[0] for p in pixels]
        finally:
            await worker.stop()

    return asyncio.run(main())


def test_objective_off_or_never_missed_gives_the_same_answers_bit_for_bit(engine: Engine,
                                                                          pixels: list[torch.Tensor]) -> None:
    default = float(engine.default_schedule.keep_rate or 0.0)
    off = answers(engine, pixels, None)
    relaxed = answers(engine, pixels, Scaling(3600.0, default, FLOOR))
    for a, b in zip(off, relaxed, strict=True):
        assert torch.equal(a.probs, b.probs) and torch.equal(a.lives, b.lives)
        assert (a.budget, a.counts, a.keep_rate, a.gflops) == (b.budget, b.counts, b.keep_rate, b.gflops)
        assert not a.scaled and not b.scaled and a.requested_keep_rate == b.requested_keep_rate == default
    for p, a in zip(pixels, off, strict=True):  # and they are the engine's own answers (a batch of one)
        hb, probs = engine.run_batch(p[None])
        assert torch.equal(a.probs, probs[0]) and a.budget == tuple(hb.budgets[0].tolist())


def test_a_scaled_answer_is_the_models_answer_at_the_rate_it_reports(engine: Engine,
                                                                     pixels: list[torch.Tensor]) -> None:
    default = float(engine.default_schedule.keep_rate or 0.0)
    # an objective no queue can meet: every image runs at its floor
    scaled = answers(engine, pixels, Scaling(1e-9, default, FLOOR))
    own_floor = answers(engine, pixels, Scaling(1e-9, default, None), min_keep_rate=0.5)
    for p, a, b in zip(pixels, scaled, own_floor, strict=True):
        assert a.scaled and a.keep_rate == FLOOR and a.requested_keep_rate == default
        assert b.scaled and b.keep_rate == 0.5
        for r in (a, b):
            hb, probs = engine.run_batch(p[None], [r.keep_rate])
            assert r.budget == tuple(hb.budgets[0].tolist())        # the budget at that rate
            assert r.counts == engine.bucket(r.budget)
            assert r.gflops == engine.gflops(r.counts)
            torch.testing.assert_close(r.probs, probs[0], rtol=0, atol=1e-6)
    assert sum(engine.tail_tokens(r.counts) for r in scaled) < sum(engine.tail_tokens(r.counts) for r in own_floor)
