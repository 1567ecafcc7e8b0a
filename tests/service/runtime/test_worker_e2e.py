"""The worker with a real (tiny, calibrated) LifeViT: concurrency changes nothing in the answers.

Budget batching without bucket merging (``max_batch_waste=0``) runs every image at its own bucket,
whatever else is queued, so budgets and counts must match exactly. Probabilities and lives are compared with a tight
tolerance, not ``torch.equal``: CPU matmul kernels block differently for different batch sizes, so
the same image in a batch of 1 and in a batch of 7 differs in the last bits (about 1e-8 here).
Such a difference could flip a budget only for a life within ~1e-6 of a stage boundary; the test
checks that its images have no such life (lives clamped to exactly K are stable), so an exact
budget mismatch means a real bug.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from tiny_models import tiny_checkpoint

from service.protocol import ImageResult
from service.runtime.engine import Engine
from service.runtime.handoff import Rows
from service.runtime.worker import Worker, WorkerHooks
from service.settings import Settings

RATES = (None, 0.5, 0.9, None, 0.7)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), [f"c{i}" for i in range(7)], "micro-test",
                           backbone="vit_micro_patch8_64")  # calibrated: budgets vary by image
    return Engine(path, device="cpu")


@pytest.fixture(scope="module")
def pixels() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(3, 64, 64, generator=g) * (0.2 + 0.1 * (i % 8)) for i in range(24)]
    return [(128 + 64 * x).clamp(0, 255).to(torch.uint8) for x in noise]  # what Engine.preprocess gives


def requests_of(pixels: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], float | None]]:
    """Eight requests of 1-5 images with different keep rates (input order kept)."""
    out, i, n = [], 0, 0
    while i < len(pixels):
        size = 1 + n % 5
        out.append((pixels[i:i + size], RATES[n % len(RATES)]))
        i, n = i + size, n + 1
    return out


class Batches(WorkerHooks):
    def __init__(self) -> None:
        self.tail_sizes: list[int] = []

    def on_batch(self, phase: str, size: int, tokens: int, bucket: str | None,
                 queue_waits_s: list[float], compute_s: float) -> None:
        if phase == "tail":
            self.tail_sizes.append(size)


def run(engine: Engine, mode: str, reqs: list[tuple[list[torch.Tensor], float | None]],
        concurrent: bool, hooks: WorkerHooks | None = None, waste: float = 0.0) -> list[list[ImageResult]]:
    async def main() -> list[list[ImageResult]]:
        worker = Worker(engine, Settings(batching=mode, max_batch_size=8, max_delay_ms=30,
                                         max_batch_waste=waste), hooks)
        await worker.start()
        deadline = time.monotonic() + 120
        try:
            if concurrent:
                return list(await asyncio.gather(*(worker.submit(px, r, deadline) for px, r in reqs)))
            # one image at a time: every batch holds a single image
            return [[(await worker.submit([p], r, deadline))[0] for p in px] for px, r in reqs]
        finally:
            await worker.stop()

    return asyncio.run(main())


def test_concurrent_budget_batching_gives_the_single_request_answers(engine: Engine,
                                                                      pixels: list[torch.Tensor]) -> None:
    reqs = requests_of(pixels)
    single = run(engine, "budget", reqs, concurrent=False)
    hooks = Batches()
    together = run(engine, "budget", reqs, concurrent=True, hooks=hooks)
    assert max(hooks.tail_sizes) > 1, "the concurrent run must batch images together"

    budgets = {r.budget for rs in single for r in rs}
    assert len(budgets) > 3, "calibrated budgets must vary for the test to mean anything"
    starts = torch.tensor(engine.model.schedule.stage_starts, dtype=torch.float32)
    lives = torch.stack([r.lives for rs in single for r in rs])
    gap = (lives[..., None] - starts).abs()
    # Lives clamped to exactly K are stable (clamp gives K whatever the noise); others must keep away.
    assert gap[gap > 0].min() > 1e-4, "no life sits within 1e-4 of a stage boundary"

    for (px, _), a_list, b_list in zip(reqs, single, together, strict=True):
        assert len(a_list) == len(b_list) == len(px)
        for a, b in zip(a_list, b_list, strict=True):
            assert b.budget == a.budget and b.counts == a.counts == engine.bucket(a.budget)
            assert b.keep_rate == a.keep_rate and b.gflops == a.gflops
            torch.testing.assert_close(b.probs, a.probs, rtol=0, atol=1e-6)
            torch.testing.assert_close(b.lives, a.lives, rtol=0, atol=1e-5)

    # And the single answers are the model's own forward pass at the same bucket grid.
    for (px, rate), a_list in zip(reqs, single, strict=True):
        sched = engine.schedule(rate)
        with torch.inference_mode():
            ref = engine.model(engine.normalize(torch.stack(px)), sched, engine.bucket_grid).softmax(-1)
        torch.testing.assert_close(torch.stack([a.probs for a in a_list]), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,waste", [("fifo", 0.0), ("budget", 1.0)])
def test_mixed_batches_route_each_answer_to_its_image(engine: Engine, pixels: list[torch.Tensor],
                                                      mode: str, waste: float) -> None:
    """FIFO, and budget batching that merges covered buckets, run some images above their own bucket:
    each answer is still its own image's, at the counts reported."""
    reqs = requests_of(pixels)
    together = run(engine, mode, reqs, concurrent=True, waste=waste)
    widened = 0
    for (px, rate), results in zip(reqs, together, strict=True):
        hb = engine.head(torch.stack(px), [rate] * len(px))
        for row, (budget, r) in enumerate(zip(hb.budgets.tolist(), results, strict=True)):
            assert r.budget == tuple(budget)
            assert all(c >= b for c, b in zip(r.counts, engine.bucket(r.budget), strict=True))
            widened += r.counts != engine.bucket(r.budget)
            alone = engine.tail([Rows(hb, torch.tensor([row]))], r.counts).get()[0]
            torch.testing.assert_close(r.probs, alone, rtol=0, atol=1e-6)
    assert widened > 0, "these batches mix budgets, so some images run above their own bucket"
