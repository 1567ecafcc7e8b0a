"""The typed wire between a live host and its API processes: answers that are ready together leave in
one frame and still reach their own requests; a bad frame ends the connection that sent it and no
other; an API process that reads a bad frame from the model process gives up on it cleanly.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from transport_support import CARD, SHAPE, StubModel, assert_same, expected, image, run, until

from service.protocol import Lifecycle, ModelFailed, ModelStatus
from service.transport import wire
from service.transport.client import LOST, RemoteModel
from service.transport.host import ModelHost
from service.transport.slots import SlotPool


def test_a_batch_of_answers_leaves_in_one_frame_and_each_reaches_its_request(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    frames: list[wire.Answers] = []
    framed = wire.frame

    def counting(message: Any) -> bytearray:
        if isinstance(message, wire.Answers):
            frames.append(message)
        return framed(message)

    monkeypatch.setattr(wire, "frame", counting)
    n = 32

    async def scenario(stub: StubModel, host: ModelHost, remote: RemoteModel) -> None:
        stub.hold = asyncio.Event()  # every request waits, then all end in one turn of the loop (one batch)
        keeps = [round(0.3 + i / 100, 2) for i in range(n)]
        waiting = [asyncio.create_task(remote.submit([image(i)], keeps[i], 1.0)) for i in range(n)]
        await until(lambda: len(stub.seen) == n)
        stub.hold.set()
        got = await asyncio.wait_for(asyncio.gather(*waiting), 5)
        for i, result in enumerate(got):  # its own pixels and its own keep rate: no mix-up
            assert_same(result, [expected(image(i), keeps[i])])
        assert len(frames) == 1 and len(frames[0].items) == n  # one frame (and one write) for the batch
        frames.clear()
        two = await asyncio.gather(remote.submit([image(1), image(2)], None, 1.0), remote.submit([image(3)], 0.4, 1.0))
        assert_same(two[0], [expected(image(1), None), expected(image(2), None)])
        assert_same(two[1], [expected(image(3), 0.4)])
        assert sum(len(f.items) for f in frames) == 2
        assert remote.pool is not None and remote.pool.free == n

    run(tmp_path, scenario, slots=n)


BAD_FRAMES = {
    "garbage": wire.HEADER.pack(8) + b"\x00garbage",
    "wrong-direction": bytes(wire.frame(wire.Welcome(CARD, ModelStatus()))),
    "oversized": wire.HEADER.pack(wire.MAX_FRAME + 1),  # refused on its header: the 1 GiB never comes
    "second-hello": bytes(wire.frame(wire.Hello(1, "psm_other", 1, SHAPE))),
    "unknown-slot": bytes(wire.frame(wire.Submit(1, (99,), None, 1.0, "r"))),  # answered, not closed
}


@pytest.mark.parametrize("bad", list(BAD_FRAMES), ids=list(BAD_FRAMES))
def test_a_bad_frame_ends_only_the_connection_that_sent_it(tmp_path: Path, bad: str) -> None:
    async def scenario(stub: StubModel, host: ModelHost, remote: RemoteModel) -> None:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "model.sock"))
        pool = SlotPool(1, SHAPE)
        try:
            assert isinstance(await wire.receive(reader, wire.TO_API), wire.Welcome)
            wire.send(writer, wire.Hello(os.getpid(), pool.name, 1, SHAPE))
            assert isinstance(await wire.receive(reader, wire.TO_API), wire.StatusUpdate)
            await until(lambda: len(host.connections) == 2)
            assert host.connected.is_set()  # what serve's "serving" line waits on
            writer.write(BAD_FRAMES[bad])
            if bad == "unknown-slot":  # a well-formed request the host cannot serve: refused, connection kept
                answers = await asyncio.wait_for(wire.receive(reader, wire.TO_API), 5)
                while not isinstance(answers, wire.Answers):
                    answers = await asyncio.wait_for(wire.receive(reader, wire.TO_API), 5)
                failed = answers.items[0]
                assert isinstance(failed, wire.Failed) and "out of range" in failed.message
                assert len(host.connections) == 2
            else:
                with pytest.raises(asyncio.IncompleteReadError):  # closed by the host
                    while True:
                        await asyncio.wait_for(wire.receive(reader, wire.TO_API), 5)
                await until(lambda: len(host.connections) == 1)
            assert_same(await remote.submit([image(5)], None, 1.0), [expected(image(5), None)])  # unaffected
            assert remote.status().problem is None
        finally:
            writer.close()
            pool.close(unlink=True)

    run(tmp_path, scenario)


def test_an_api_process_gives_up_on_a_model_process_that_sends_a_bad_frame(tmp_path: Path) -> None:
    """A fake model process answers the hello with a message meant for the other direction: the API
    process logs why, closes, fails what waits with 503 model_unavailable, and calls ``on_lost``."""
    lost: list[bool] = []

    async def fake_model(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        wire.send(writer, wire.Welcome(CARD, ModelStatus(Lifecycle.READY)))
        await wire.receive(reader, wire.TO_MODEL)  # the hello
        submit = await wire.receive(reader, wire.TO_MODEL)
        assert isinstance(submit, wire.Submit)
        wire.send(writer, wire.Submit(submit.id, (0,), None, 1.0, "not yours"))
        await reader.read()  # until the API process closes

    async def main() -> None:
        server = await asyncio.start_unix_server(fake_model, path=str(tmp_path / "model.sock"))
        remote = RemoteModel(tmp_path / "model.sock", 2, on_lost=lambda: lost.append(True), deadline_margin_s=None)
        try:
            await remote.open()
            await asyncio.wait_for(remote.start(), 5)
            with pytest.raises(ModelFailed, match=LOST):
                await asyncio.wait_for(remote.submit([image(1)], None, 1.0), 5)
            assert lost == [True] and remote.status().problem == LOST
        finally:
            await remote.stop(grace_s=0.0)
            server.close()

    asyncio.run(main())
