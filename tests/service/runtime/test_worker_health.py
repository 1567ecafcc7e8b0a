"""The worker cannot fail silently: a crash outside the model calls, failed batches, a hung batch and
device out-of-memory errors, with the stub engine of test_worker (no HTTP)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from test_worker import Recorder, StubEngine, images, later, settings, wait_until

import service.runtime.worker as worker_mod
from service.protocol import ModelFailed
from service.runtime.handoff import HeadBatch
from service.runtime.worker import Worker


class FailureRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.failures: list[str] = []

    def on_model_failure(self, reason: str) -> None:
        self.failures.append(reason)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["cpu", "launch-ahead"])
def test_a_crash_in_planning_answers_every_waiting_request_and_turns_unhealthy(
        monkeypatch: pytest.MonkeyPatch, asynchronous: bool) -> None:
    """Launching ahead, the crash comes while request 0's head batch is in flight: it is answered too."""
    engine, hooks = StubEngine(asynchronous=asynchronous), FailureRecorder()
    engine.gate.clear()  # the first head batch blocks until the crash is armed
    real_plan, armed = worker_mod.plan, threading.Event()

    def plan(*args: Any, **kwargs: Any) -> Any:
        if armed.is_set():
            raise ZeroDivisionError("planning bug")
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(worker_mod, "plan", plan)

    async def main() -> None:
        worker = Worker(engine, settings(max_batch_size=1), hooks)
        await worker.start()
        assert worker.health() is None
        tasks = [asyncio.create_task(worker.submit(images(i), None, later(60))) for i in range(5)]
        await wait_until(engine.entered.is_set)  # request 0 is in its head batch, 1..4 are queued
        armed.set()
        engine.gate.set()
        t0 = time.monotonic()
        await wait_until(lambda: worker.health() is not None, timeout=1.0)
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1.0)
        assert time.monotonic() - t0 < 1.0
        assert all(isinstance(o, ModelFailed) for o in outcomes), outcomes
        assert "planning bug" in (worker.health() or "")
        with pytest.raises(ModelFailed):  # new work is refused at once, never queued forever
            await worker.submit(images(9), None, later())
        await worker.stop()

    asyncio.run(main())
    assert hooks.failures == ["worker_died"]
    assert hooks.rejects.count("model_error") == 6


def test_consecutive_failed_batches_turn_unhealthy_until_one_succeeds() -> None:
    engine, hooks = StubEngine(), FailureRecorder()
    engine.fail_on = 5

    async def main() -> None:
        worker = Worker(engine, settings(max_delay_ms=0, max_batch_size=1,
                                         unhealthy_after_failures=2), hooks)
        await worker.start()
        for _ in range(2):
            with pytest.raises(ModelFailed) as err:
                await worker.submit(images(5), None, later())
            assert err.value.retry_after_s > 0
            await wait_until(lambda: hooks.failures.count("batch_error") >= 1)
        await wait_until(lambda: worker.health() is not None)
        assert "2 model batches failed" in (worker.health() or "") and "stub engine failure" in (worker.health() or "")
        assert [int(r.probs[0]) for r in await worker.submit(images(6), None, later())] == [6]
        assert worker.health() is None
        await worker.stop()

    asyncio.run(main())
    assert hooks.failures == ["batch_error", "batch_error"]
    assert hooks.rejects == ["model_error", "model_error"]


def test_a_hung_batch_turns_unhealthy_while_it_runs() -> None:
    engine = StubEngine()
    engine.gate.clear()

    async def main() -> None:
        worker = Worker(engine, settings(watchdog_batch_s=0.05))
        await worker.start()
        task = asyncio.create_task(worker.submit(images(1), None, later()))
        await wait_until(engine.entered.is_set)
        await wait_until(lambda: worker.health() is not None)
        assert "running for" in (worker.health() or "")
        engine.gate.set()
        assert len(await task) == 1
        assert worker.health() is None
        await worker.stop()

    asyncio.run(main())


class OomEngine(StubEngine):
    """Raises the device OOM error (the CPU can raise it too) for head batches above ``fits`` images."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits
        self.head_sizes: list[int] = []

    def head(self, pixels: Sequence[torch.Tensor], keep_rates: Sequence[float | None]) -> HeadBatch:
        self.head_sizes.append(len(pixels))
        if len(pixels) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().head(pixels, keep_rates)


def test_out_of_memory_splits_the_batch_and_retries_each_half_once() -> None:
    engine, hooks = OomEngine(fits=2), FailureRecorder()

    async def main() -> None:
        worker = Worker(engine, settings(max_batch_size=8), hooks)
        await worker.start()
        results = await worker.submit(images(1, 2, 3, 4), None, later())
        assert [int(r.probs[0]) for r in results] == [1, 2, 3, 4]
        assert worker.health() is None
        await worker.stop()

    asyncio.run(main())
    assert engine.head_sizes == [4, 2, 2]
    assert hooks.failures == ["out_of_memory"]
    assert hooks.rejects == []


def test_out_of_memory_again_answers_503_and_counts_it() -> None:
    engine, hooks = OomEngine(fits=0), FailureRecorder()

    async def main() -> None:
        worker = Worker(engine, settings(max_batch_size=8), hooks)
        await worker.start()
        with pytest.raises(ModelFailed, match="OutOfMemoryError"):
            await worker.submit(images(1, 2), None, later())
        assert len(await worker.submit([], None, later())) == 0  # the thread lives on
        await worker.stop()

    asyncio.run(main())
    assert engine.head_sizes == [2, 1, 1]
    assert hooks.failures == ["out_of_memory", "batch_error", "batch_error"]
    assert hooks.rejects == ["model_error"]


def test_admission_estimates_stay_bounded_whatever_keep_rates_clients_send() -> None:
    engine = StubEngine()

    async def main() -> None:
        worker = Worker(engine, settings(queue_capacity_images=1000))
        await worker.start()
        rates = [0.5 + i * 1e-5 for i in range(300)]  # 300 distinct rates within 0.003 of each other
        await asyncio.gather(*(worker.submit(images(i), r, later()) for i, r in enumerate(rates)))
        assert len(worker.queues.estimates) <= 2
        await worker.stop()

    asyncio.run(main())
