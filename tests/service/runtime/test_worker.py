"""The worker with a stub engine: routing under concurrency, deadline, overload, cancellation, drain.

The stub encodes each image's identity in its pixels, carries it through head and tail, and
returns it in the probabilities, so a result routed to the wrong request cannot go unnoticed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from service.protocol import DeadlinePassed, ImageResult, ModelFailed, QueueFull, WorkerStopping
from service.runtime.handoff import HeadBatch, HostCopy, Rows
from service.runtime.worker import Worker, WorkerHooks
from service.settings import Settings

STEP = 4


class LoggedCopy(HostCopy):
    """A host copy that records when the worker reads it (the moment a GPU worker would wait)."""

    def __init__(self, tensor: torch.Tensor, log: list[tuple[str, str, tuple[int, ...]]], what: str,
                 idents: tuple[int, ...]) -> None:
        super().__init__(tensor)
        self.log, self.what, self.idents = log, what, idents

    def get(self) -> torch.Tensor:
        self.log.append(("read", self.what, self.idents))
        return super().get()


class StubEngine:
    """Budget = f(identity, keep rate); tail returns [identity, keep rate, *counts] as 'probs'.

    ``asynchronous``: whether the worker may launch a batch before reading the previous one's copy;
    ``log`` records launches and reads in order.
    """

    def __init__(self, head_s: float = 0.0, tail_s: float = 0.0, asynchronous: bool = False) -> None:
        self.head_s, self.tail_s = head_s, tail_s
        self.asynchronous = asynchronous
        self.log: list[tuple[str, str, tuple[int, ...]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()    # set when a head batch starts (gate tests)
        self.headed: list[int] = []         # identities seen by head, in order
        self.tails: list[tuple[tuple[int, ...], list[int]]] = []
        self.fail_on: int | None = None
        self.threads: list[int] = []        # torch.get_num_threads() in the thread that runs head

    head_tokens = 0

    def schedule_counts(self, keep_rate: float | None) -> tuple[int, ...]:
        r = 0.5 if keep_rate is None else keep_rate
        return (int(32 * r), int(16 * r))

    def bucket(self, budget: Sequence[int]) -> tuple[int, ...]:
        return tuple(-(-int(v) // STEP) * STEP for v in budget)

    def tail_tokens(self, counts: tuple[int, ...]) -> int:
        return sum(counts) + len(counts)

    def padded_rows(self, n: int) -> int:
        return n

    def gflops(self, counts: tuple[int, ...]) -> float:
        return float(sum(counts))

    @staticmethod
    def budget_of(ident: int, keep_rate: float | None) -> tuple[int, int]:
        r = 0.5 if keep_rate is None else keep_rate
        return (int(32 * r) - ident % 7, int(16 * r) - ident % 3)

    def head(self, pixels: Sequence[torch.Tensor], keep_rates: Sequence[float | None]) -> HeadBatch:
        self.entered.set()
        self.threads.append(torch.get_num_threads())
        assert self.gate.wait(10), "test gate never opened"
        time.sleep(self.head_s)
        tokens, budgets = [], []
        for x, r in zip(pixels, keep_rates, strict=True):
            ident = int(x[0, 0, 0])
            if ident == self.fail_on:
                raise RuntimeError("stub engine failure")
            self.headed.append(ident)
            tokens.append([float(ident), r or 0.0])
            budgets.append(self.budget_of(ident, r))
        idents = torch.tensor(tokens)[:, 0]
        hb = HeadBatch.of(torch.tensor(tokens), idents.view(-1, 1, 1).expand(-1, 2, 2),
                          torch.tensor(budgets), torch.tensor([self.bucket(b) for b in budgets]),
                          [r or 0.5 for r in keep_rates])
        who = tuple(int(i) for i in idents)
        self.log.append(("launch", "head", who))
        hb.plan = LoggedCopy(hb.plan.tensor, self.log, "head", who)
        return hb

    def tail(self, parts: Sequence[Rows], counts: Sequence[int]) -> HostCopy:
        time.sleep(self.tail_s)
        for part in parts:  # the counts run must cover every image's budget
            for budget in part.batch.budgets[part.index].tolist():
                assert all(c >= b for c, b in zip(counts, budget, strict=True))
        tokens = torch.cat([p.batch.tokens[p.index] for p in parts])
        who = tuple(int(t[0]) for t in tokens)
        self.tails.append((tuple(counts), list(who)))
        self.log.append(("launch", "tail", who))
        probs = torch.cat([tokens, torch.tensor([[float(c) for c in counts]] * len(tokens))], dim=1)
        return LoggedCopy(probs, self.log, "tail", who)


class Recorder(WorkerHooks):
    def __init__(self) -> None:
        self.batches: list[tuple[str, int, int, str | None]] = []
        self.waste: list[tuple[int, int]] = []
        self.rejects: list[str] = []
        self.done = 0
        self.depths: list[tuple[int, int]] = []

    def on_queue_depth(self, images: int, tokens: int) -> None:
        self.depths.append((images, tokens))

    def on_batch(self, phase: str, size: int, tokens: int, bucket: str | None,
                 queue_waits_s: list[float], compute_s: float) -> None:
        assert len(queue_waits_s) == size and all(w >= 0 for w in queue_waits_s)
        self.batches.append((phase, size, tokens, bucket))

    def on_waste(self, needed_tokens: int, computed_tokens: int) -> None:
        self.waste.append((needed_tokens, computed_tokens))

    def on_reject(self, reason: str) -> None:
        self.rejects.append(reason)

    def on_image_done(self, result: ImageResult) -> None:
        self.done += 1


def images(*idents: int) -> list[torch.Tensor]:
    return [torch.full((3, 2, 2), float(i)) for i in idents]


def settings(**kw: Any) -> Settings:
    base: dict[str, Any] = dict(max_batch_size=8, max_delay_ms=5.0, shutdown_grace_s=5.0)
    return Settings(**(base | kw))


def later(s: float = 10.0) -> float:
    return time.monotonic() + s


async def wait_until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition never became true"
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["cpu", "launch-ahead"])
@pytest.mark.parametrize("mode,waste", [("budget", 0.0), ("budget", 0.25), ("fifo", 0.0), ("unbatched", 0.0)])
def test_concurrent_requests_get_their_own_results_in_order(mode: str, waste: float, asynchronous: bool) -> None:
    engine, hooks = StubEngine(head_s=0.002, tail_s=0.002, asynchronous=asynchronous), Recorder()

    async def main() -> None:
        worker = Worker(engine, settings(batching=mode, max_batch_waste=waste), hooks)
        await worker.start()

        async def one(req: int) -> None:
            n, rate = 1 + req % 4, (0.5, 0.75, 1.0, None)[req % 4]
            idents = [req * 10 + j for j in range(n)]
            results = await worker.submit(images(*idents), rate, later())
            assert [int(r.probs[0]) for r in results] == idents
            for ident, r in zip(idents, results, strict=True):
                assert r.budget == engine.budget_of(ident, rate)
                assert float(r.probs[1]) == (rate or 0.0) and torch.equal(r.lives, torch.full((2, 2), ident))
                assert tuple(int(c) for c in r.probs[2:]) == r.counts  # the counts its batch ran at
                assert all(c >= b for c, b in zip(r.counts, engine.bucket(r.budget), strict=True))
                if mode != "fifo" and waste == 0:
                    assert r.counts == engine.bucket(r.budget)
                assert r.queue_ms >= 0 and r.compute_ms > 0 and r.gflops == sum(r.counts)

        await asyncio.gather(*(one(i) for i in range(60)))
        await worker.stop()

    asyncio.run(main())
    sizes = [size for phase, size, _, _ in hooks.batches if phase == "tail"]
    assert sum(sizes) == sum(1 + i % 4 for i in range(60)) == hooks.done
    if mode == "unbatched":
        assert max(sizes) == 1
    else:
        assert max(sizes) > 1, "concurrent load must actually form batches"
    buckets = [{engine.bucket(engine.budget_of(i, (0.5, 0.75, 1.0, None)[(i // 10) % 4])) for i in idents}
               for _, idents in engine.tails]
    if mode == "budget" and waste == 0:  # one bucket per batch, run at that bucket
        assert all(b == {counts} for b, (counts, _) in zip(buckets, engine.tails, strict=True))
    if mode == "budget" and waste > 0:  # buckets mix only within the waste cap
        assert any(len(b) > 1 for b in buckets), "this load has room to merge covered buckets"
        for b, (needed, computed) in zip(buckets, hooks.waste, strict=True):
            if len(b) > 1:
                assert computed - needed <= waste * needed
    assert all(needed <= computed for needed, computed in hooks.waste)
    assert hooks.depths[-1] == (0, 0) and hooks.rejects == []


def test_one_request_on_an_idle_worker_does_not_wait_for_the_batching_delay() -> None:
    engine, hooks = StubEngine(), Recorder()

    async def main() -> None:
        worker = Worker(engine, settings(max_delay_ms=60_000), hooks)
        await worker.start()
        for ident in (1, 2):  # twice: the idle worker goes back to flushing at once
            t0 = time.monotonic()
            [result] = await worker.submit(images(ident), None, later(120))
            assert time.monotonic() - t0 < 30, "the request waited for the batching delay"
            assert int(result.probs[0]) == ident and result.queue_ms < 30_000
        await worker.stop()

    asyncio.run(main())
    assert [(phase, size) for phase, size, _, _ in hooks.batches] == [("head", 1), ("tail", 1)] * 2


def test_deadline_passed_while_queued_answers_deadline_and_never_runs() -> None:
    engine, hooks = StubEngine(), Recorder()

    async def main() -> None:
        worker = Worker(engine, settings(max_delay_ms=0), hooks)
        await worker.start()
        engine.gate.clear()
        engine.entered.clear()
        blocker = asyncio.create_task(worker.submit(images(1), None, later()))
        await wait_until(engine.entered.is_set)  # image 1 is in the head; the model is busy
        late = asyncio.create_task(worker.submit(images(2, 3), None, later(0.05)))
        await asyncio.sleep(0.15)
        engine.gate.set()
        with pytest.raises(DeadlinePassed):
            await late
        assert [int(r.probs[0]) for r in await blocker] == [1]
        with pytest.raises(DeadlinePassed):  # already past: refused before queueing
            await worker.submit(images(4), None, time.monotonic() - 1)
        await worker.stop()

    asyncio.run(main())
    assert engine.headed == [1], "expired images are dropped before their phase starts"
    assert hooks.rejects == ["deadline", "deadline"]


def test_overload_rejects_at_once_with_retry_after() -> None:
    engine, hooks = StubEngine(), Recorder()

    async def main() -> None:
        worker = Worker(engine, settings(queue_capacity_images=4, max_delay_ms=0), hooks)
        await worker.start()
        engine.gate.clear()
        first = asyncio.create_task(worker.submit(images(1), None, later()))
        await wait_until(engine.entered.is_set)  # running, so no longer queued
        queued = asyncio.create_task(worker.submit(images(2, 3, 4, 5), None, later()))
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(QueueFull) as err:
            await worker.submit(images(6), None, later())
        assert time.monotonic() - t0 < 0.5 and err.value.retry_after_s > 0
        engine.gate.set()
        assert len(await first) == 1 and len(await queued) == 4
        assert len(await worker.submit(images(7), None, later())) == 1  # room again
        await worker.stop()

    asyncio.run(main())
    assert hooks.rejects == ["overloaded"]
    assert 6 not in engine.headed


def test_overload_counts_tokens_at_the_keep_rates_schedule() -> None:
    engine = StubEngine()
    one_image = engine.tail_tokens((32, 16))  # keep rate 1.0
    hooks = Recorder()

    async def main() -> None:
        worker = Worker(engine, settings(queue_capacity_tokens=2 * one_image, max_delay_ms=50),
                        hooks)
        await worker.start()
        engine.gate.clear()
        running = asyncio.create_task(worker.submit(images(9), 1.0, later()))
        await wait_until(engine.entered.is_set)  # the model is busy: what comes next stays queued
        task = asyncio.create_task(worker.submit(images(1, 2), 1.0, later()))
        await asyncio.sleep(0.005)
        with pytest.raises(QueueFull):
            await worker.submit(images(3), 1.0, later())
        engine.gate.set()
        assert len(await task) == 2 and len(await running) == 1
        await worker.stop()

    asyncio.run(main())
    assert hooks.rejects == ["overloaded"]


def test_cancelled_request_has_its_queued_work_dropped() -> None:
    engine, hooks = StubEngine(), Recorder()

    async def main() -> None:
        worker = Worker(engine, settings(max_delay_ms=0), hooks)
        await worker.start()
        engine.gate.clear()
        first = asyncio.create_task(worker.submit(images(1), None, later()))
        await wait_until(engine.entered.is_set)
        gone = asyncio.create_task(worker.submit(images(2, 3), None, later()))
        kept = asyncio.create_task(worker.submit(images(4), None, later()))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        engine.gate.set()  # the thread, free again, takes the cancellation before it plans
        assert [int(r.probs[0]) for r in await first] == [1]
        assert [int(r.probs[0]) for r in await kept] == [4]
        assert hooks.depths[-1] == (0, 0)
        with pytest.raises(asyncio.CancelledError):
            await gone
        await worker.stop()

    asyncio.run(main())
    assert sorted(engine.headed) == [1, 4]
    assert hooks.rejects == ["disconnected"]


def test_stop_drains_queued_work_and_refuses_new_work() -> None:
    engine, hooks = StubEngine(tail_s=0.01), Recorder()

    async def main() -> None:
        # A long delay: draining must send the partial batches without waiting for it.
        # Request 0 holds the model while the others queue; once it leaves the head both queues hold
        # work, so without draining nothing would be due for a minute.
        worker = Worker(engine, settings(max_delay_ms=60_000), hooks)
        await worker.start()
        engine.gate.clear()
        tasks = [asyncio.create_task(worker.submit(images(0, 1), 0.75, later(60)))]
        await wait_until(engine.entered.is_set)
        tasks += [asyncio.create_task(worker.submit(images(10 * i, 10 * i + 1), 0.75, later(60)))
                  for i in range(1, 5)]
        await asyncio.sleep(0.01)
        stopping = asyncio.create_task(worker.stop())
        await asyncio.sleep(0)
        with pytest.raises(WorkerStopping):
            await worker.submit(images(99), None, later())
        engine.gate.set()
        t0 = time.monotonic()
        results = await asyncio.gather(*tasks)
        await stopping
        assert time.monotonic() - t0 < 2.0
        assert [[int(r.probs[0]) for r in rs] for rs in results] == [[10 * i, 10 * i + 1] for i in range(5)]

    asyncio.run(main())
    assert hooks.rejects == ["shutdown"]


def test_stop_fails_what_the_grace_period_cannot_finish() -> None:
    engine, hooks = StubEngine(head_s=0.2), Recorder()

    async def main() -> None:
        worker = Worker(engine, settings(max_batch_size=1, max_delay_ms=0, shutdown_grace_s=0.05),
                        hooks)
        await worker.start()
        tasks = [asyncio.create_task(worker.submit(images(i), None, later())) for i in range(4)]
        await wait_until(lambda: engine.headed == [0] or engine.entered.is_set())
        t0 = time.monotonic()
        await worker.stop()
        assert time.monotonic() - t0 < 1.0, "stop waits for the running batch only, not the queue"
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        # Image 0 was in the head when the grace ran out; nothing else started; nobody gets an answer.
        assert all(isinstance(o, WorkerStopping) for o in outcomes)

    asyncio.run(main())
    assert engine.headed == [0]
    assert hooks.rejects == ["shutdown"] * 4


def test_engine_error_fails_its_batch_only_and_the_worker_goes_on() -> None:
    engine = StubEngine()
    engine.fail_on = 5

    async def main() -> None:
        worker = Worker(engine, settings(max_delay_ms=0, max_batch_size=1))
        await worker.start()
        with pytest.raises(ModelFailed, match="RuntimeError"):  # 503 + Retry-After, not a 500
            await worker.submit(images(5), None, later())
        assert [int(r.probs[0]) for r in await worker.submit(images(6), None, later())] == [6]
        await worker.stop()

    asyncio.run(main())


def test_submit_before_start_and_empty_requests() -> None:
    async def main() -> None:
        worker = Worker(StubEngine(), settings())
        with pytest.raises(WorkerStopping):
            await worker.submit(images(1), None, later())
        await worker.start()
        assert await worker.submit([], None, later()) == []
        await worker.stop()

    asyncio.run(main())


def test_worker_thread_runs_the_model_with_the_configured_torch_threads() -> None:
    async def one_image(worker: Worker) -> None:
        await worker.start()
        await worker.submit(images(1), None, later())
        await worker.stop()

    before = torch.get_num_threads()
    wanted = before + 1  # differs from the default whatever the machine
    engine = StubEngine()
    try:
        asyncio.run(one_image(Worker(engine, settings(torch_threads=wanted))))
    finally:
        torch.set_num_threads(before)  # the count new threads start from is process-wide
    assert engine.threads == [wanted]
    engine = StubEngine()  # 0 leaves torch's default alone
    asyncio.run(one_image(Worker(engine, settings(torch_threads=0))))
    assert engine.threads == [before]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["cpu", "launch-ahead"])
def test_an_asynchronous_engine_gets_the_next_batch_before_the_worker_waits(asynchronous: bool) -> None:
    """With head batches of two queued back to back, a GPU worker launches the second head before it
    reads the first one's copy; on the CPU it reads first (every batch finished before the next)."""
    engine, hooks = StubEngine(asynchronous=asynchronous), Recorder()

    async def main() -> list[list[ImageResult]]:
        worker = Worker(engine, settings(max_batch_size=2, max_delay_ms=200), hooks)
        await worker.start()
        engine.gate.clear()
        first = asyncio.create_task(worker.submit(images(1, 2), None, later()))
        await wait_until(engine.entered.is_set)  # head (1, 2) is launching
        second = asyncio.create_task(worker.submit(images(3, 4), 0.75, later()))
        await wait_until(lambda: worker.queues.tokens > 0 and worker.queues.capacity.images == 2)  # admitted
        engine.gate.set()
        out = [await first, await second]
        await worker.stop()
        return out

    results = asyncio.run(main())
    assert [[int(r.probs[0]) for r in rs] for rs in results] == [[1, 2], [3, 4]]
    assert [r.budget for r in results[1]] == [engine.budget_of(i, 0.75) for i in (3, 4)]
    log = engine.log
    launch_second, read_first = log.index(("launch", "head", (3, 4))), log.index(("read", "head", (1, 2)))
    assert (launch_second < read_first) == asynchronous, log
    assert all(log.count(("read", what, who)) == 1 for kind, what, who in log if kind == "launch"), log
    assert hooks.done == 4

