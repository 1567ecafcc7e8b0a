"""The worker's queues on their own, no thread: admission against both capacities, a failed or
expired request leaving nothing queued, an image moving to the tail at its bucket, delivery once
its request's last image is done."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from service.protocol import DeadlinePassed, ImageResult, QueueFull
from service.runtime.admission import Queues, Request
from service.runtime.batching import Batch
from service.runtime.handoff import HeadBatch
from service.runtime.seams import WorkerHooks
from service.settings import Settings

Loop = asyncio.AbstractEventLoop


class Engine:
    """Tail tokens = sum of the counts; a keep rate's counts are (100 r, 50 r)."""

    def schedule_counts(self, keep_rate: float | None) -> tuple[int, ...]:
        r = 0.5 if keep_rate is None else keep_rate
        return (int(100 * r), int(50 * r))

    def tail_tokens(self, counts: tuple[int, ...]) -> int:
        return sum(counts)


class Hooks(WorkerHooks):
    def __init__(self) -> None:
        self.rejects: list[str] = []
        self.depths: list[tuple[int, int]] = []

    def on_reject(self, reason: str) -> None:
        self.rejects.append(reason)

    def on_queue_depth(self, images: int, tokens: int) -> None:
        self.depths.append((images, tokens))


def queues(**kw: int) -> tuple[Queues, Hooks]:
    hooks = Hooks()
    return Queues(Engine(), Settings(**kw), hooks), hooks  # type: ignore[arg-type]


def request(loop: Loop, n: int, deadline: float = 100.0) -> Request:
    return Request(loop.create_future(), loop, deadline, [None] * n)


@pytest.fixture
def loop() -> Iterator[Loop]:
    """An event loop for the requests' futures (answers are set on it, as from the worker thread)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def pixels(n: int) -> list[torch.Tensor]:
    return [torch.zeros(3, 2, 2, dtype=torch.uint8)] * n


def add(q: Queues, req: Request, px: list[torch.Tensor], keep_rate: float | None, estimate: int) -> None:
    """Admit (QueueFull past a capacity, nothing reserved then) and queue, as the worker does."""
    q.admit(len(px), estimate * len(px))
    q.add(req, px, keep_rate, estimate, 0.0)


def test_admission_refuses_past_either_capacity_and_queues_nothing_then(loop: Loop) -> None:
    q, hooks = queues(queue_capacity_images=3, queue_capacity_tokens=200)
    est = q.estimate(None)  # (50, 25): 75 tail tokens
    assert est == 75
    add(q, request(loop, 2), pixels(2), None, est)
    assert (len(q.head), q.tokens) == (2, 150)
    with pytest.raises(QueueFull):  # 3 images fit, 225 tokens do not
        add(q, request(loop, 1), pixels(1), None, est)
    with pytest.raises(QueueFull):  # the image cap
        add(q, request(loop, 2), pixels(2), 0.1, q.estimate(0.1))
    assert (len(q.head), q.tokens, hooks.rejects) == (2, 150, ["overloaded", "overloaded"])


def test_a_failed_request_leaves_nothing_queued_and_is_answered(loop: Loop) -> None:
    q, hooks = queues()
    keep, gone = request(loop, 1), request(loop, 2, deadline=1.0)
    add(q, keep, pixels(1), None, 75)
    add(q, gone, pixels(2), None, 75)
    assert q.expire(now=1.0) == 100.0  # the next deadline still queued
    assert [im.request for im in q.images()] == [keep] and q.tokens == 75
    q.flush()
    loop.run_until_complete(asyncio.sleep(0))  # the answer is set from the loop
    assert isinstance(gone.future.exception(), DeadlinePassed) and hooks.rejects == ["deadline"]


def test_an_image_moves_to_the_tail_at_its_bucket_and_is_delivered_with_its_request(loop: Loop) -> None:
    q, _ = queues()
    req = request(loop, 2)
    add(q, req, pixels(2), None, 75)
    taken = q.take(Batch("head", tuple(q.head), None, 0, "full", 0.0), now=0.5)
    assert not q.head and q.tokens == 0 and [im.phase_wait_s for im in taken] == [0.5, 0.5]
    hb = HeadBatch.of(torch.zeros(2, 5, 4), torch.zeros(2, 2, 2), torch.tensor([[30, 10], [50, 25]]),
                      torch.tensor([[40, 20], [50, 25]]), [0.5, 0.5])
    q.to_tail(taken, hb, [[30, 10], [50, 25]], [[40, 20], [50, 25]], 0.01, now=0.6)
    assert [im.wait.bucket for im in q.tail.values()] == [(40, 20), (50, 25)] and q.tokens == 60 + 75
    results = [ImageResult(torch.zeros(2), torch.zeros(2, 2), im.budget, im.wait.bucket, 1.0, 0.5, 0.0, 0.0)
               for im in taken]
    q.take(Batch("tail", tuple(q.tail), (50, 25), 150, "full", 0.0), now=0.7)
    q.deliver(taken[1], results[1])
    assert not req.finished  # one image to go
    q.deliver(taken[0], results[0])
    assert req.finished and not req.future.done()  # answered when the worker flushes
    q.flush()
    loop.run_until_complete(asyncio.sleep(0))
    assert req.future.result() == results and not q.images() and q.tokens == 0
