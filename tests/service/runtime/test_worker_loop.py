"""The model process's event loop never waits on the worker thread: submissions, refusals and status
return while the thread is held inside planning or a metrics hook; a batch's answers come back in
one callback; a request the queue refuses is never decoded; stop() waits on an event, never a poll;
one lifecycle rule. With the stub engine of test_worker (no HTTP)."""

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
from service.api_errors import ApiError
from service.protocol import BadInput, EncodedImage, Lifecycle, QueueFull, advance
from service.runtime.local import LocalModel
from service.runtime.worker import Worker

HOLD_S = 3.0  # how long the worker thread is held; everything on the loop must return well before


class HeldHooks(Recorder):
    """Recorder whose queue-depth hook, called on the worker thread while ``hold`` is set, blocks there
    (a slow metrics backend) until released or HOLD_S pass."""

    def __init__(self) -> None:
        super().__init__()
        self.hold, self.inside, self.release = threading.Event(), threading.Event(), threading.Event()

    def on_queue_depth(self, images: int, tokens: int) -> None:
        super().on_queue_depth(images, tokens)
        if self.hold.is_set() and threading.current_thread().name == "patchlife-worker":
            self.inside.set()
            self.release.wait(HOLD_S)


@pytest.mark.parametrize("held_in", ["plan", "metrics hook"])
def test_the_loop_submits_refuses_and_reports_while_the_thread_is_held(
        monkeypatch: pytest.MonkeyPatch, held_in: str) -> None:
    hooks, engine = HeldHooks(), StubEngine()
    real_plan = worker_mod.plan

    def plan(*args: Any, **kwargs: Any) -> Any:
        if held_in == "plan" and hooks.hold.is_set():
            hooks.inside.set()
            hooks.release.wait(HOLD_S)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(worker_mod, "plan", plan)

    async def main() -> None:
        worker = Worker(engine, settings(queue_capacity_images=2, max_delay_ms=0), hooks)
        await worker.start()
        hooks.hold.set()
        first = asyncio.create_task(worker.submit(images(1), None, later()))
        await wait_until(hooks.inside.is_set)  # the thread is inside plan() or the hook now
        t0 = time.monotonic()
        second = asyncio.create_task(worker.submit(images(2), None, later()))
        await asyncio.sleep(0)  # it runs up to its await: admitted and posted
        assert len(worker.queues.inbox) == 1  # posted; the thread takes it once it is free
        with pytest.raises(QueueFull):  # refused at once: capacity is a reservation, not the thread's queues
            await worker.submit(images(3, 4), None, later())
        assert worker.health() is None and worker.describe_scaling() is None
        waited = time.monotonic() - t0
        assert not first.done() and not second.done(), "the thread is still held"
        hooks.hold.clear()
        hooks.release.set()
        assert [int(r.probs[0]) for r in await first] == [1]
        assert [int(r.probs[0]) for r in await second] == [2]
        await worker.stop()
        assert waited < HOLD_S / 3, f"the event loop waited {waited:.2f} s on the worker thread"

    asyncio.run(main())
    assert hooks.rejects == ["overloaded"] and hooks.depths[-1] == (0, 0)
    assert 3 not in engine.headed


def test_the_requests_a_batch_finishes_are_answered_in_one_callback() -> None:
    engine, hooks = StubEngine(), Recorder()
    calls = 0

    async def main() -> None:
        nonlocal calls
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(callback: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            if threading.current_thread().name == "patchlife-worker":
                calls += 1
            return real(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        worker = Worker(engine, settings(batching="fifo", max_batch_size=8, max_delay_ms=0), hooks)
        await worker.start()
        engine.gate.clear()
        first = asyncio.create_task(worker.submit(images(0), None, later()))
        await wait_until(engine.entered.is_set)  # the model is busy: the next ones queue together
        rest = [asyncio.create_task(worker.submit(images(i), None, later())) for i in range(1, 7)]
        await wait_until(lambda: worker.queues.capacity.images == 6)
        engine.gate.set()
        answers = await asyncio.gather(first, *rest)
        assert [int(rs[0].probs[0]) for rs in answers] == list(range(7))
        await worker.stop()

    asyncio.run(main())
    tails = [size for phase, size, _, _ in hooks.batches if phase == "tail"]
    assert sum(tails) == 7 and max(tails) > 1, tails
    assert calls == len(tails), f"{calls} callbacks for {len(tails)} tail batches of one-image requests"


class FakeDecoder:
    """DecodeQueue's interface: counts the images it is given; returns the stub's pixels or an error."""

    def __init__(self) -> None:
        self.decoded: list[str] = []

    async def decode(self, items: Sequence[EncodedImage]) -> list[torch.Tensor | ApiError]:
        self.decoded += [im.source for im in items]
        return [ApiError("corrupt") if im.data == b"bad" else images(int(im.data))[0]
                for im in items]

    def close(self) -> None: ...


def test_a_request_the_queue_refuses_is_never_decoded_on_the_device() -> None:
    engine, hooks = StubEngine(), Recorder()

    async def main() -> None:
        model = LocalModel(settings(queue_capacity_images=3, max_delay_ms=0), None)  # type: ignore[arg-type]
        decoder = FakeDecoder()
        model.decoder = decoder  # type: ignore[assignment]
        model.worker = worker = Worker(engine, model.settings, hooks)
        await worker.start()
        engine.gate.clear()
        busy = asyncio.create_task(model.submit(images(0), None, later()))
        await wait_until(engine.entered.is_set)
        queued = asyncio.create_task(model.submit([EncodedImage(b"1", "a"), EncodedImage(b"2", "b")], None, later()))
        await wait_until(lambda: worker.queues.capacity.images == 2)
        assert hooks.depths[-1][0] == 2  # reported while they decode (the worker, held, reports nothing)
        with pytest.raises(QueueFull):  # 2 queued + 2 > 3: refused before the decoder sees them
            await model.submit([EncodedImage(b"3", "c"), EncodedImage(b"4", "d")], None, later())
        assert decoder.decoded == ["a", "b"]
        with pytest.raises(BadInput):  # a file that does not decode gives its room back
            await model.submit([EncodedImage(b"bad", "e")], None, later())
        assert worker.queues.capacity.images == 2
        engine.gate.set()
        assert [int(r.probs[0]) for r in await queued] == [1, 2] and len(await busy) == 1
        await worker.stop()

    asyncio.run(main())
    assert hooks.rejects == ["overloaded"] and hooks.depths[-1] == (0, 0)
    assert sorted(engine.headed) == [0, 1, 2]


def test_stop_waits_on_an_event_and_returns_once_the_last_batch_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, hooks = StubEngine(tail_s=0.05), Recorder()

    async def no_polling(delay: float, result: Any = None) -> Any:
        raise AssertionError("stop() polled with asyncio.sleep")

    async def main() -> None:
        worker = Worker(engine, settings(max_delay_ms=0, shutdown_grace_s=30), hooks)
        await worker.start()
        engine.gate.clear()
        task = asyncio.create_task(worker.submit(images(1, 2), None, later()))
        await wait_until(engine.entered.is_set)
        monkeypatch.setattr(asyncio, "sleep", no_polling)
        stopping = asyncio.create_task(worker.stop())
        await asyncio.wait([stopping], timeout=0.05)
        assert not stopping.done(), "stop() must wait for the queued work (30 s of grace)"
        engine.gate.set()
        t0 = time.monotonic()
        await stopping
        assert time.monotonic() - t0 < 5.0, "stop() returns once the work is done, not at the grace's end"
        assert [int(r.probs[0]) for r in await task] == [1, 2]

    asyncio.run(main())
    assert hooks.rejects == []


def test_lifecycle_moves_forward_only_and_failed_is_final() -> None:
    assert advance(Lifecycle.LOADING, Lifecycle.READY) is Lifecycle.READY
    assert advance(Lifecycle.DRAINING, Lifecycle.STOPPING) is Lifecycle.DRAINING  # a late event
    assert advance(Lifecycle.FAILED, Lifecycle.STOPPED) is Lifecycle.FAILED
    assert all(advance(s, Lifecycle.FAILED) is Lifecycle.FAILED for s in Lifecycle)


def test_post_queues_without_a_task_and_withdraw_gives_the_room_back() -> None:
    """``LocalModel.post`` (the model host's path): the same answers as ``submit``, refusals raised at
    once, JPEGs and empty requests left to ``submit``; a withdrawn request is dropped from the queue."""
    engine, hooks = StubEngine(), Recorder()

    async def main() -> None:
        model = LocalModel(settings(queue_capacity_images=3, max_delay_ms=0), None)  # type: ignore[arg-type]
        model.worker = worker = Worker(engine, model.settings, hooks)
        await worker.start()
        assert model.post([], None, later()) is None
        assert model.post([EncodedImage(b"1", "a")], None, later()) is None
        engine.gate.clear()
        busy = model.post(images(0), None, later())
        assert busy is not None
        await wait_until(engine.entered.is_set)  # the model is busy: the next ones wait in the queue
        kept, dropped = model.post(images(1), None, later()), model.post(images(2) + images(3), None, later())
        assert kept is not None and dropped is not None
        with pytest.raises(QueueFull):  # 3 queued: full
            model.post(images(4), None, later())
        model.withdraw(dropped)  # taken from the inbox before the next plan: its images never run
        engine.gate.set()
        assert [int(r.probs[0]) for r in await busy.future] == [0]
        assert [int(r.probs[0]) for r in await kept.future] == [1]
        assert dropped.future.cancelled()
        await wait_until(lambda: worker.queues.capacity.images == 0)  # the withdrawn room is back too
        await worker.stop()

    asyncio.run(main())
    assert sorted(engine.headed) == [0, 1] and "disconnected" in hooks.rejects
