"""The model host's path without a task per request (:class:`~service.transport.host.PostingModel`, what
``LocalModel`` offers): answers, refusals, bugs, cancels and a lost connection go as on the task path."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transport_support import CARD, StubModel, assert_same, expected, image, until

from service.protocol import EncodedImage, ImageResult, ModelFailed, QueueFull, WorkerError
from service.transport.client import RemoteModel
from service.transport.host import ModelHost, PostingModel


@dataclass(eq=False)
class Posted:
    future: asyncio.Future[list[ImageResult]]
    pixels: list[torch.Tensor]
    keep_rate: float | None
    withdrawn: bool = False
    extra: dict[str, object] = field(default_factory=dict)


class PostingStub(StubModel):
    """The stub model with ``post``: answers at once unless ``held`` (then the test answers); ``refuse``
    is raised by ``post`` itself, ``broken`` is set on the future instead of an answer."""

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[Posted] = []
        self.held = False
        self.refuse: Exception | None = None
        self.broken: Exception | None = None
        self.submits = 0

    def post(self, pixels: Sequence[torch.Tensor | EncodedImage], keep_rate: float | None, deadline: float,
             min_keep_rate: float | None = None) -> Posted | None:
        if not pixels or any(isinstance(p, EncodedImage) for p in pixels):
            return None  # as LocalModel: submit's to do
        if self.refuse is not None:
            raise self.refuse
        tensors = [p for p in pixels if isinstance(p, torch.Tensor)]
        posted = Posted(asyncio.get_running_loop().create_future(), [p.clone() for p in tensors], keep_rate)
        self.posts.append(posted)
        if self.broken is not None:
            posted.future.set_exception(self.broken)
        elif not self.held:
            self.answer(posted)
        return posted

    def answer(self, posted: Posted) -> None:
        posted.future.set_result([expected(p, posted.keep_rate) for p in posted.pixels])

    def withdraw(self, request: Posted) -> None:  # type: ignore[override]
        request.withdrawn = True

    async def submit(self, *args: object, **kwargs: object) -> list[ImageResult]:  # type: ignore[override]
        self.submits += 1
        return await super().submit(*args, **kwargs)  # type: ignore[arg-type]


def run(tmp_path: Path, scenario: object) -> None:
    async def main() -> None:
        stub = PostingStub()
        host = ModelHost(stub, CARD)
        assert isinstance(stub, PostingModel) and host.poster is stub
        path = tmp_path / "model.sock"
        await host.start(path)
        remote = RemoteModel(path, 4, connect_timeout_s=5.0, deadline_margin_s=None)
        try:
            await remote.open()
            await stub.start()
            host.push_status()
            await asyncio.wait_for(remote.start(), 5)
            await scenario(stub, host, remote)  # type: ignore[operator]
        finally:
            await remote.stop(grace_s=0.0)
            await host.close()

    asyncio.run(main())


def test_answers_come_back_in_order_without_a_task_or_submit(tmp_path: Path) -> None:
    async def scenario(stub: PostingStub, host: ModelHost, remote: RemoteModel) -> None:
        tasks_before = len(asyncio.all_tasks())
        for n in range(5):  # 10 images through 4 slots: the slots come back with each answer
            pixels = [image(n), image(n + 20)]
            assert_same(await remote.submit(pixels, 0.5, 9.0), [expected(p, 0.5) for p in pixels])
        many = await asyncio.gather(*(remote.submit([image(40 + i)], None, 9.0) for i in range(4)))
        for i, got in enumerate(many):
            assert_same(got, [expected(image(40 + i), None)])
        assert stub.submits == 0 and len(stub.posts) == 9 and len(asyncio.all_tasks()) == tasks_before
        assert all(torch.equal(a, image(0)) for a in stub.posts[0].pixels[:1])  # it read what was written
        assert remote.pool is not None and remote.pool.free == 4

    run(tmp_path, scenario)


def test_a_refusal_raised_by_post_crosses_with_its_kind(tmp_path: Path) -> None:
    async def scenario(stub: PostingStub, host: ModelHost, remote: RemoteModel) -> None:
        stub.refuse = QueueFull(2.5, "queue full (3 images)")
        with pytest.raises(QueueFull, match=r"queue full \(3 images\)") as caught:
            await remote.submit([image(1)], None, 9.0)
        assert caught.value.retry_after_s == 2.5
        assert remote.pool is not None and remote.pool.free == 4

    run(tmp_path, scenario)


@pytest.mark.parametrize("where", ["post", "future"])
def test_a_bug_is_model_failed_and_logged_with_the_request_id(tmp_path: Path, where: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(stub: PostingStub, host: ModelHost, remote: RemoteModel) -> None:
        if where == "post":
            stub.refuse = ZeroDivisionError("oops")
        else:
            stub.broken = ZeroDivisionError("oops")
        with pytest.raises(ModelFailed, match="ZeroDivisionError: oops"):
            await asyncio.wait_for(remote.submit([image(1)], None, 9.0), 5)
        stub.refuse = stub.broken = None
        assert_same(await remote.submit([image(2)], None, 9.0), [expected(image(2), None)])  # it serves on

    run(tmp_path, scenario)
    assert any("request failed in the model process" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_cancel_withdraws_the_request_answers_it_and_ignores_a_late_answer(tmp_path: Path) -> None:
    async def scenario(stub: PostingStub, host: ModelHost, remote: RemoteModel) -> None:
        pool = remote.pool
        assert pool is not None
        stub.held = True
        waiting = asyncio.create_task(remote.submit([image(1), image(2)], None, 9.0))
        await until(lambda: len(stub.posts) == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await until(lambda: pool.free == 4)  # the host answered "cancelled": the slots are back
        assert stub.posts[0].withdrawn
        stub.answer(stub.posts[0])  # the worker had already settled it: nobody is answered twice
        stub.held = False
        assert_same(await remote.submit([image(3)], None, 9.0), [expected(image(3), None)])
        assert not host.connections or all(not c.posted for c in host.connections)

    run(tmp_path, scenario)


def test_a_connection_that_ends_withdraws_what_it_had_posted(tmp_path: Path) -> None:
    async def scenario(stub: PostingStub, host: ModelHost, remote: RemoteModel) -> None:
        stub.held = True
        waiting = asyncio.create_task(remote.submit([image(1)], None, 9.0))
        await until(lambda: len(stub.posts) == 1)
        assert remote._writer is not None
        remote._writer.close()  # the API process goes away with a request queued
        await until(lambda: stub.posts[0].withdrawn)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)

    run(tmp_path, scenario)


def test_what_post_leaves_to_submit_still_gets_a_task(tmp_path: Path) -> None:
    async def scenario(stub: PostingStub, host: ModelHost, remote: RemoteModel) -> None:
        assert await remote.submit([], None, 9.0) == []  # no pixels: post leaves it to submit
        assert stub.submits == 1 and stub.posts == []

    run(tmp_path, scenario)


def test_a_model_without_post_is_served_through_submit() -> None:
    assert ModelHost(StubModel(), CARD).poster is None
    assert not isinstance(StubModel(), PostingModel)
    assert issubclass(WorkerError, Exception)
