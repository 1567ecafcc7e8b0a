"""Launch and wait apart on a GPU: the engine's head and tail only queue work (no host sync), and
the worker launches the next batch while the device still runs the one before.

``torch.cuda._sleep`` holds the stream busy for a known time, so "the call returned before the
device finished" is checked without timing the model.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from service.runtime.engine import Engine
from service.runtime.handoff import HeadBatch, HostCopy, Rows
from service.runtime.worker import Worker
from service.settings import Settings

pytestmark = pytest.mark.gpu

MAX_BATCH = 8


def busy(ms: float) -> None:
    """Queue about ``ms`` milliseconds of spinning on the current stream."""
    hz = torch.cuda.get_device_properties(0).clock_rate * 1000  # kHz -> cycles per second
    torch.cuda._sleep(int(hz * ms / 1000))


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([5.0, 20.0, 60.0, 110.0])[torch.arange(n) % 4].view(n, 1, 1, 1)
    return (128 + scale * torch.randn(n, 3, 64, 64, generator=g)).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def engine(checkpoints: dict[str, Path]) -> Engine:
    engine = Engine.from_settings(Settings(checkpoint=checkpoints["calibrated"], device="cuda", dtype="auto",
                                           max_batch_size=MAX_BATCH))
    engine.warmup(1)
    return engine


def test_head_and_tail_return_while_the_device_is_busy(engine: Engine) -> None:
    px = pixels(MAX_BATCH)
    reference = engine.head(px, [None] * MAX_BATCH)
    expected = engine.tail_by_bucket(reference).get()
    torch.cuda.synchronize()

    busy(200)
    t0 = time.perf_counter()
    hb = engine.head(px, [None] * MAX_BATCH)
    launched = time.perf_counter() - t0
    assert not hb.plan.ready() and launched < 0.1, f"head took {launched:.3f} s: it waited for the device"
    assert torch.equal(hb.budgets, reference.budgets) and torch.equal(hb.buckets, reference.buckets)

    busy(200)
    t0 = time.perf_counter()
    copy = engine.tail_by_bucket(hb)  # its buckets are on the host already: launching waits for nothing
    assert not copy.ready() and time.perf_counter() - t0 < 0.1
    torch.testing.assert_close(copy.get(), expected, rtol=0, atol=1e-6)


def test_launches_make_no_host_sync(engine: Engine) -> None:
    px = list(pixels(6, seed=1))
    hb = engine.head(px, [None, 0.5, None, 0.9, None, 0.5])
    hb.plan.get()
    torch.cuda.synchronize()  # the pinned blocks these sizes need are cached now
    torch.cuda.set_sync_debug_mode("error")
    try:
        hb2 = engine.head(px, [None, 0.5, None, 0.9, None, 0.5])  # mixed rates: the indexed path too
        copy = engine.tail([Rows(hb, torch.tensor([5, 0, 2])), Rows(hb2, torch.tensor([1]))],
                           engine.bucket_grid.points[-1])
        by_bucket = engine.tail_by_bucket(hb)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert copy.get().shape == (4, len(engine.class_names)) and by_bucket.get().shape == (6, len(engine.class_names))
    assert torch.equal(hb2.budgets, hb.budgets)


class Watched:
    """The engine, with each tail holding the device ~20 ms longer, noting for each head launch whether
    an earlier batch's copy was still on its way (i.e. the launch overlapped device work)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.copies, self.overlapped = engine, [], []  # type: ignore[var-annotated]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def head(self, pixels: Any, keep_rates: Any) -> HeadBatch:
        self.overlapped.append(any(not c.ready() for c in self.copies))
        hb = self.engine.head(pixels, keep_rates)
        self.copies.append(hb.plan)
        return hb

    def tail(self, parts: Any, counts: Any) -> HostCopy:
        busy(20)
        copy = self.engine.tail(parts, counts)
        self.copies.append(copy)
        return copy


def test_the_worker_launches_ahead_and_answers_as_alone(engine: Engine) -> None:
    watched = Watched(engine)
    data = [pixels(3, seed=s) for s in range(12)]

    async def main(eng: Any) -> list[list[Any]]:
        worker = Worker(eng, Settings(device="cuda", max_batch_size=MAX_BATCH, max_delay_ms=5.0,
                                      max_batch_waste=0.0))
        await worker.start()
        try:
            return list(await asyncio.gather(*(worker.submit(list(px), None, time.monotonic() + 60) for px in data)))
        finally:
            await worker.stop()

    results = asyncio.run(main(watched))
    assert any(watched.overlapped), "no head was launched while an earlier batch still ran on the device"
    same = 0  # bf16 products differ with the batch's size, so a budget at a threshold may flip
    for px, answers in zip(data, results, strict=True):
        hb = engine.head(px, [None] * len(px))
        alone = engine.tail_by_bucket(hb).get()
        for a, bucket, p in zip(answers, hb.buckets.tolist(), alone, strict=True):
            if a.counts == tuple(bucket):
                same += 1
                torch.testing.assert_close(a.probs, p, rtol=0, atol=3e-2)
    assert same >= 0.8 * sum(len(px) for px in data)
