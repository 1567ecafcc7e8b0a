"""The transport tests' stand-ins: a stub :class:`~service.protocol.ModelClient` whose every result
depends on the pixels it read (a result that crossed to the wrong request cannot go unnoticed), and a
real host and remote connected over a Unix socket in one event loop (:func:`run`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import torch

from service.protocol import ImageResult, Lifecycle, ModelCard, ModelStatus
from service.transport.client import RemoteModel
from service.transport.host import ModelHost

SHAPE = (3, 8, 8)
CARD = ModelCard(name="stub", info={"device": "cpu", "dtype": "float32"}, class_names=("a", "b", "c"),
                 preprocess={"input_size": SHAPE}, grid=(2, 2), dense_gflops=1.0, first_block=1, depth=4,
                 checkpoint="/nowhere", batch_classes=(1, 2))


def image(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, SHAPE, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def expected(pixels: torch.Tensor, keep_rate: float | None) -> ImageResult:
    """What the stub answers for ``pixels``: every field depends on them (or on the keep rate)."""
    x = pixels.float()
    total = int(pixels.long().sum())
    return ImageResult(probs=x.mean(dim=(1, 2)) / 255.0, lives=x[0, :2, :2] / 64.0, budget=(total % 97, 4),
                       counts=(total % 89, 4), gflops=total / 1e6, keep_rate=keep_rate or 0.7,
                       queue_ms=float(total % 7), compute_ms=float(total % 11))


class StubModel:
    """A :class:`ModelClient` without an engine. ``fail``: a refusal to raise instead of answering;
    ``hold``: submits wait for it; while cancelled they keep the answer back until ``release`` is set."""

    def __init__(self) -> None:
        self.state = Lifecycle.LOADING
        self.error: str | None = None
        self.problem: str | None = None
        self.fail: Exception | None = None
        self.hold: asyncio.Event | None = None
        self.release = asyncio.Event()
        self.release.set()
        self.cancelled = 0
        self.seen: list[tuple[list[torch.Tensor], float | None, float]] = []

    async def open(self) -> ModelCard:
        return CARD

    async def start(self) -> None:
        self.state = Lifecycle.READY

    def status(self) -> ModelStatus:
        return ModelStatus(self.state, self.error, self.problem)

    def clock(self) -> float:
        return 0.0

    async def submit(self, pixels: Sequence[torch.Tensor], keep_rate: float | None,
                     deadline: float, min_keep_rate: float | None = None) -> list[ImageResult]:
        self.seen.append(([p.clone() for p in pixels], keep_rate, deadline))
        if self.hold is not None:
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                await self.release.wait()  # the host's answer to the cancel waits for this
                raise
        if self.fail is not None:
            raise self.fail
        return [expected(p, keep_rate) for p in pixels]

    def begin_drain(self) -> None:
        self.state = Lifecycle.STOPPING

    async def stop(self, grace_s: float | None = None) -> None:
        self.state = Lifecycle.STOPPED


Scenario = Callable[[StubModel, ModelHost, RemoteModel], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, slots: int = 4) -> None:
    """``scenario(stub, host, remote)`` with the host listening and the remote connected (ready)."""

    async def main() -> None:
        stub = StubModel()
        host = ModelHost(stub, CARD)
        path = tmp_path / "model.sock"
        await host.start(path)
        remote = RemoteModel(path, slots, connect_timeout_s=5.0, deadline_margin_s=None)  # the stub's deadlines
        try:
            assert await remote.open() == CARD
            await stub.start()
            host.push_status()
            await asyncio.wait_for(remote.start(), 5)
            await scenario(stub, host, remote)
        finally:
            await remote.stop(grace_s=0.0)
            await host.close()

    asyncio.run(main())


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not check():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


def assert_same(got: list[ImageResult], want: list[ImageResult]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.probs, w.probs) and torch.equal(g.lives, w.lives)
        assert (g.budget, g.counts, g.gflops, g.keep_rate, g.queue_ms, g.compute_ms) == \
               (w.budget, w.counts, w.gflops, w.keep_rate, w.queue_ms, w.compute_ms)
