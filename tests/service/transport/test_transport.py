"""The hand-off between an API process and the model process, in one event loop: a real
:class:`ModelHost` on a Unix socket serving a stub :class:`ModelClient` (no engine), and a real
:class:`RemoteModel` with its shared-memory slots.

The stub derives each result from the pixels it read out of the slots, so a result that crossed to
the wrong request, or pixels that were not what the sender wrote, cannot go unnoticed.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch
from transport_support import CARD, SHAPE, StubModel, assert_same, expected, image, run, until

from service.protocol import (
    BadInput,
    DeadlinePassed,
    Lifecycle,
    ModelFailed,
    QueueFull,
    WorkerError,
    WorkerStopping,
)
from service.transport import wire
from service.transport.client import LOST, RemoteModel
from service.transport.host import ModelHost
from service.transport.slots import SlotPool


def test_results_round_trip_equal_and_in_order(tmp_path: Path) -> None:
    async def scenario(stub: StubModel, host: ModelHost, remote: RemoteModel) -> None:
        batches = [[image(i), image(i + 10)] for i in range(6)]  # 12 images through 4 slots: slots are reused
        for n, pixels in enumerate(batches):
            keep = None if n % 2 else 0.5
            got = await remote.submit(pixels, keep, 123.5)
            assert_same(got, [expected(p, keep) for p in pixels])
        concurrent = await asyncio.gather(*(remote.submit(p[:1], 0.9, 9.0) for p in batches[:4]))
        for got, pixels in zip(concurrent, batches[:4], strict=True):
            assert_same(got, [expected(pixels[0], 0.9)])
        sent, keep, deadline = stub.seen[0]
        assert all(torch.equal(a, b) for a, b in zip(sent, batches[0], strict=True))  # what was written is read
        assert (keep, deadline) == (0.5, 123.5)
        assert remote.pool is not None and remote.pool.free == 4

    run(tmp_path, scenario)


@pytest.mark.parametrize("refusal", [QueueFull(2.5, "queue is full"), ModelFailed("batch failed", 7.0),
                                     DeadlinePassed("too late"), WorkerStopping("stopping"),
                                     BadInput("files[0]: not a JPEG")],
                         ids=lambda e: type(e).__name__)
def test_each_refusal_crosses_with_its_kind_message_and_retry_after(tmp_path: Path, refusal: WorkerError) -> None:
    async def scenario(stub: StubModel, host: ModelHost, remote: RemoteModel) -> None:
        stub.fail = refusal
        with pytest.raises(type(refusal)) as caught:
            await remote.submit([image(1)], None, 1.0)
        assert type(caught.value) is type(refusal) and str(caught.value) == str(refusal)
        assert getattr(caught.value, "retry_after_s", None) == getattr(refusal, "retry_after_s", None)
        assert remote.pool is not None and remote.pool.free == 4  # a refusal gives the slots back

    run(tmp_path, scenario)


def test_a_bug_in_the_model_process_is_model_failed_not_a_hang(tmp_path: Path) -> None:
    async def scenario(stub: StubModel, host: ModelHost, remote: RemoteModel) -> None:
        stub.fail = ZeroDivisionError("oops")
        with pytest.raises(ModelFailed, match="ZeroDivisionError: oops"):
            await asyncio.wait_for(remote.submit([image(1)], None, 1.0), 5)

    run(tmp_path, scenario)


def test_a_cancel_gives_the_slots_back_only_with_the_hosts_answer(tmp_path: Path) -> None:
    async def scenario(stub: StubModel, host: ModelHost, remote: RemoteModel) -> None:
        pool = remote.pool
        assert pool is not None
        stub.hold, stub.release = asyncio.Event(), asyncio.Event()
        waiting = asyncio.create_task(remote.submit([image(1), image(2), image(3)], None, 1.0))
        await until(lambda: len(stub.seen) == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await until(lambda: stub.cancelled == 1)  # the cancel reached the model's submit
        await asyncio.sleep(0.1)
        assert pool.free == 1  # the model process may still read them: not reusable yet
        with pytest.raises(QueueFull, match="pixel slots"):
            await remote.submit([image(4), image(5)], None, 1.0)
        stub.release.set()  # the host answers "cancelled"
        await until(lambda: pool.free == 4)
        stub.hold.set()
        assert_same(await remote.submit([image(6)], None, 1.0), [expected(image(6), None)])

    run(tmp_path, scenario)


def test_a_cancel_right_behind_its_submit_still_gives_the_slots_back(tmp_path: Path) -> None:
    """The host reads the submit and its cancel in one go, before the submit's task has run (a client
    that leaves at once, a busy or paused model process): it must still answer, or the slots leak."""
    async def scenario(stub: StubModel, host: ModelHost, remote: RemoteModel) -> None:
        pool = remote.pool
        assert pool is not None
        for _ in range(3):
            waiting = asyncio.create_task(remote.submit([image(1), image(2)], None, 1.0))
            await asyncio.sleep(0)  # the submit is written; the host has not read it yet
            waiting.cancel()  # the cancel is written right behind it
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await until(lambda: pool.free == 4)
        assert_same(await remote.submit([image(3)], None, 1.0), [expected(image(3), None)])

    run(tmp_path, scenario)


def test_losing_the_host_fails_pending_requests_and_says_why(tmp_path: Path) -> None:
    lost: list[bool] = []

    async def main() -> None:
        stub = StubModel()
        await stub.start()
        host = ModelHost(stub, CARD)
        await host.start(tmp_path / "model.sock")
        remote = RemoteModel(tmp_path / "model.sock", 2, on_lost=lambda: lost.append(True), deadline_margin_s=None)
        await remote.open()
        await asyncio.wait_for(remote.start(), 5)
        assert remote.status().problem is None
        stub.hold = asyncio.Event()
        pending = [asyncio.create_task(remote.submit([image(i)], None, 1.0)) for i in range(2)]
        await until(lambda: len(stub.seen) == 2)
        await host.close()  # as the model process dying closes its end of every connection
        for task in pending:
            with pytest.raises(ModelFailed, match=LOST) as caught:
                await asyncio.wait_for(task, 5)
            assert caught.value.retry_after_s > 0
        status = remote.status()
        assert status.problem == LOST and status.state == Lifecycle.STOPPED
        assert lost == [True]
        with pytest.raises(ModelFailed, match=LOST):
            await remote.submit([image(9)], None, 1.0)
        await remote.stop(grace_s=0.0)

    asyncio.run(main())


def test_status_changes_reach_the_api_process(tmp_path: Path) -> None:
    async def scenario(stub: StubModel, host: ModelHost, remote: RemoteModel) -> None:
        assert remote.status().state == Lifecycle.READY
        stub.problem = "batches keep failing"
        host.push_status()
        await until(lambda: remote.status().problem == "batches keep failing")
        stub.problem = None
        await until(lambda: remote.status().problem is None, timeout_s=wire.HEARTBEAT_S * 4)  # the heartbeat

    run(tmp_path, scenario)


def test_a_failed_start_is_raised_by_start(tmp_path: Path) -> None:
    async def main() -> None:
        stub = StubModel()
        host = ModelHost(stub, CARD)
        await host.start(tmp_path / "model.sock")
        remote = RemoteModel(tmp_path / "model.sock", 1)
        await remote.open()
        starting = asyncio.create_task(remote.start())
        await asyncio.sleep(0.05)
        assert not starting.done()  # LOADING: start waits
        stub.state, stub.error = Lifecycle.FAILED, "no memory"
        host.push_status()
        with pytest.raises(RuntimeError, match="no memory"):
            await asyncio.wait_for(starting, 5)
        await remote.stop(grace_s=0.0)
        await host.close()

    asyncio.run(main())


def test_stopping_while_the_model_loads_ends_start(tmp_path: Path) -> None:
    """SIGTERM (or the model process's death) while it warms up: the API process's drain stops the
    remote, and its lifespan then awaits ``start``: that must end, or the process never exits."""
    async def main() -> None:
        stub = StubModel()  # LOADING for ever
        host = ModelHost(stub, CARD)
        await host.start(tmp_path / "model.sock")
        remote = RemoteModel(tmp_path / "model.sock", 1)
        await remote.open()
        starting = asyncio.create_task(remote.start())
        await asyncio.sleep(0.05)
        await remote.stop(grace_s=0.0)
        with pytest.raises(RuntimeError, match="stopped"):
            await asyncio.wait_for(starting, 5)
        await host.close()

    asyncio.run(main())


def test_the_host_removes_the_segment_of_an_api_process_that_died(tmp_path: Path) -> None:
    async def scenario(stub: StubModel, host: ModelHost, remote: RemoteModel) -> None:
        assert remote.pool is not None and remote._writer is not None
        name = remote.pool.name
        assert Path("/dev/shm", name).exists()
        remote._writer.close()  # as the API process's death ends its connection; it never unlinks
        await until(lambda: not host.connections)
        assert not Path("/dev/shm", name).exists()

    run(tmp_path, scenario)


def test_wrong_pixels_are_refused_and_their_slots_given_back(tmp_path: Path) -> None:
    async def scenario(stub: StubModel, host: ModelHost, remote: RemoteModel) -> None:
        assert remote.pool is not None
        for bad in (torch.zeros(3, 8, 9, dtype=torch.uint8), torch.zeros(SHAPE, dtype=torch.float32)):
            with pytest.raises(ValueError, match="a slot holds uint8"):
                await remote.submit([image(1), bad], None, 1.0)
            assert remote.pool.free == 4
        assert not stub.seen  # nothing was sent

    run(tmp_path, scenario)


def test_a_slot_pool_refuses_wrong_shapes_dtypes_and_ids() -> None:
    owner = SlotPool(2, SHAPE)
    try:
        with pytest.raises(ValueError, match=r"uint8 \[3, 8, 8\]"):
            owner.write(0, torch.zeros(3, 8, 7, dtype=torch.uint8))
        with pytest.raises(ValueError, match="torch.float32"):
            owner.write(0, torch.zeros(SHAPE))
        assert owner.take(3) is None and owner.free == 2  # all or nothing
        ids = owner.take(2)
        assert ids is not None and owner.take(1) is None
        owner.write(ids[0], image(7))
        reader = SlotPool(2, SHAPE, name=owner.name)  # the model process's side
        try:
            assert torch.equal(reader.read([ids[0]])[0], image(7))
            with pytest.raises(ValueError, match="out of range"):
                reader.read([2])
        finally:
            reader.close()
        owner.give(ids)
        assert owner.free == 2
    finally:
        owner.close(unlink=True)
    assert not Path("/dev/shm", owner.name).exists()


def test_the_host_refuses_a_hello_for_another_shape(tmp_path: Path) -> None:
    async def main() -> None:
        stub = StubModel()
        host = ModelHost(stub, CARD)
        await host.start(tmp_path / "model.sock")
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "model.sock"))
        assert isinstance(await wire.receive(reader, wire.TO_API), wire.Welcome)
        pool = SlotPool(1, (3, 4, 4))
        try:
            wire.send(writer, wire.Hello(os.getpid(), pool.name, 1, (3, 4, 4)))
            with pytest.raises(asyncio.IncompleteReadError):  # closed: no status, no service
                await asyncio.wait_for(wire.receive(reader, wire.TO_API), 5)
            assert not host.connections
        finally:
            writer.close()
            pool.close(unlink=True)
            await host.close()

    asyncio.run(main())


# -- liveness: a model process that stops answering ----------------------------------------------------
def test_a_request_gets_its_504_at_its_deadline_when_the_model_process_never_answers(tmp_path: Path) -> None:
    """The model process holds the request (as a stopped or deadlocked one would): the API side answers
    DeadlinePassed at the deadline plus the margin, and the slots stay taken until the model process
    answers the cancel, then come back."""
    async def main() -> None:
        stub = StubModel()
        await stub.start()
        host = ModelHost(stub, CARD)
        await host.start(tmp_path / "model.sock")
        remote = RemoteModel(tmp_path / "model.sock", 2, deadline_margin_s=0.1)
        await remote.open()
        await asyncio.wait_for(remote.start(), 5)
        stub.hold, stub.release = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DeadlinePassed, match="did not answer"):
            await asyncio.wait_for(remote.submit([image(1), image(2)], None, remote.clock() + 0.3), 5)
        waited = loop.time() - t0
        assert 0.35 <= waited < 1.0, waited
        assert remote.pool is not None and remote.pool.free == 0  # the model process may still read them
        await until(lambda: stub.cancelled == 1)  # the cancel reached it
        stub.release.set()
        await until(lambda: remote.pool is not None and remote.pool.free == 2)
        await remote.stop(grace_s=0.0)
        await host.close()

    asyncio.run(main())


def test_a_silent_model_process_turns_readiness_then_liveness_off(tmp_path: Path) -> None:
    stalls: list[float] = []

    async def main() -> None:
        stub = StubModel()
        await stub.start()
        host = ModelHost(stub, CARD)
        await host.start(tmp_path / "model.sock")
        remote = RemoteModel(tmp_path / "model.sock", 1, stall_s=0.8, stall_exit_s=1.6,
                             on_stall=lambda: stalls.append(remote.silent_s() or 0.0))
        await remote.open()
        await asyncio.wait_for(remote.start(), 5)
        await asyncio.sleep(1.2)  # heartbeats every 0.5 s: never silent for 0.8 s
        assert remote.status().problem is None and remote.status().live
        assert host._beat is not None
        host._beat.cancel()  # as a stopped model process: nothing more is sent
        await until(lambda: remote.status().problem is not None, timeout_s=3)
        status = remote.status()
        assert "sent nothing" in (status.problem or "") and status.live and not stalls
        await until(lambda: bool(stalls), timeout_s=3)
        assert stalls[0] > 1.6 and not remote.status().live
        await asyncio.sleep(0.3)
        assert len(stalls) == 1  # once
        host.push_status()  # it speaks again
        await until(lambda: remote.status().problem is None)
        assert remote.status().live
        await remote.stop(grace_s=0.0)
        await host.close()

    asyncio.run(main())


# -- one pool for every API process ---------------------------------------------------------------------
def test_a_shared_pool_refuses_only_when_every_slot_is_taken(tmp_path: Path) -> None:
    """Two API processes on one shared pool of 4: one may take all 4 (with private pools of 2 each it
    was refused); a taker that dies has its slots freed by the model process."""
    async def main() -> None:
        stub = StubModel()
        await stub.start()
        pool = SlotPool(4, SHAPE, lock_path=tmp_path / "slots.lock")
        host = ModelHost(stub, CARD, pool=pool)
        await host.start(tmp_path / "model.sock")
        shared = (pool.name, tmp_path / "slots.lock")
        one, two = (RemoteModel(tmp_path / "model.sock", 4, shared_pool=shared, deadline_margin_s=None)
                    for _ in range(2))
        try:
            for remote in (one, two):
                await remote.open()
                await asyncio.wait_for(remote.start(), 5)
            assert_same(await one.submit([image(i) for i in range(4)], None, 1.0),
                        [expected(image(i), None) for i in range(4)])
            stub.hold = asyncio.Event()
            held = asyncio.create_task(one.submit([image(1), image(2), image(3)], None, 1.0))
            await until(lambda: len(stub.seen) == 2)
            assert pool.free == 1 and two.pool is not None and two.pool.free == 1
            with pytest.raises(QueueFull, match="1 of 4 pixel slots free in the service"):
                await two.submit([image(4), image(5)], None, 1.0)
            assert pool._owners is not None and set(pool._owners.tolist()) == {0, os.getpid()}
            pool.release(os.getpid())  # as the host does for a process that died (here: the same pid)
            assert pool.free == 4
            stub.hold.set()
            await asyncio.wait_for(held, 5)
        finally:
            for remote in (one, two):
                await remote.stop(grace_s=0.0)
            await host.close()
            assert Path("/dev/shm", pool.name).exists()  # the API processes do not remove the model process's pool
            pool.close(unlink=True)

    asyncio.run(main())


def test_closing_a_pool_under_a_live_view_keeps_its_pixels_readable() -> None:
    """The model process closes an API process's private pool when its connection ends, while the worker
    may still hold a queued request's slot views: reading one must not crash the process (it did: the
    segment was unmapped under them). In a child process, so that a crash fails this test alone."""
    import subprocess
    import sys

    script = """
import torch
from service.transport.slots import SlotPool
owner = SlotPool(4, (3, 8, 8))
owner.write(1, torch.full((3, 8, 8), 7, dtype=torch.uint8))
reader = SlotPool(4, (3, 8, 8), name=owner.name)
views = reader.read([1, 1])
reader.close(unlink=True)
print(int(views[0].sum()), int(views[1][0, 0, 0]))
del views
owner.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(7 * 3 * 8 * 8), "7"]
    assert "Exception ignored" not in done.stderr and "BufferError" not in done.stderr
