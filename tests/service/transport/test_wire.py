"""The typed wire on its own: every message survives a frame and comes back equal; a frame that is
malformed, too large or meant for the other side is a :class:`~service.transport.wire.WireError` that
says so; a refusal comes back as the same :class:`WorkerError` of the same :class:`ErrorKind`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import torch
from transport_support import CARD

from service.protocol import (
    BadInput,
    Cancelled,
    DeadlinePassed,
    EncodedImage,
    ErrorKind,
    ImageResult,
    Lifecycle,
    ModelCard,
    ModelFailed,
    ModelStatus,
    QueueFull,
    WorkerError,
    WorkerStopping,
)
from service.transport import wire


def through(message: Any, decoder: msgspec.msgpack.Decoder[Any]) -> Any:
    """``message`` framed, then read back as the other side reads it."""
    frame = wire.frame(message)
    (n,) = wire.HEADER.unpack_from(frame)
    assert n == len(frame) - wire.HEADER.size
    return wire.decode(bytes(frame[wire.HEADER.size:]), decoder)


def results(n: int, scaled: bool = False) -> list[ImageResult]:
    g = torch.Generator().manual_seed(n)
    probs, lives = torch.rand(n, 5, generator=g), torch.rand(n, 3, 4, generator=g) * 12
    return [ImageResult(probs[i], lives[i], (12, 8 + i), (12, 9 + i), 1.5 + i, 0.5, 0.25 * i, 3.0 + i,
                        scaled=scaled, requested_keep_rate=0.75 if scaled else None) for i in range(n)]


def assert_same(got: list[ImageResult], want: list[ImageResult]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.probs.dtype == torch.float32 and torch.equal(g.probs, w.probs)
        assert g.lives.shape == w.lives.shape and torch.equal(g.lives, w.lives)
        assert (g.budget, g.counts, g.gflops, g.keep_rate, g.queue_ms, g.compute_ms, g.scaled, g.requested_keep_rate) \
            == (w.budget, w.counts, w.gflops, w.keep_rate, w.queue_ms, w.compute_ms, w.scaled, w.requested_keep_rate)


# -- round trips ---------------------------------------------------------------------------------------
def test_the_card_and_every_status_cross_unchanged() -> None:
    card = ModelCard(name="m", info={"schedule": {"patch_counts": (196, 98)}, "classes": ["a", "b"], "x": None},
                     class_names=("a", "b"), preprocess={"input_size": (3, 224, 224), "mean": (0.5, 0.5, 0.5),
                                                         "crop_pct": 0.875, "interpolation": "bicubic"},
                     grid=(14, 14), dense_gflops=4.6, first_block=3, depth=12, checkpoint="/ckpt",
                     batch_classes=(1, 2, 4, 8), decodes_jpeg=True)
    assert card.preprocess["input_size"] == [3, 224, 224]  # JSON form from the start, so equal after the wire
    for state in Lifecycle:
        status = ModelStatus(state, "err" if state == Lifecycle.FAILED else None, "slow", 2.5,
                             {"graphs": {"captured": 3, "batch_classes": [1, 2]}, "accuracy_scaling": None},
                             live=state != Lifecycle.STOPPED)
        got = through(wire.Welcome(card, status), wire.TO_API)
        assert got == wire.Welcome(card, status) and got.card.input_shape == (3, 224, 224)
        assert type(got.status.state) is Lifecycle
        assert through(wire.StatusUpdate(status), wire.TO_API) == wire.StatusUpdate(status)
    assert through(wire.Welcome(CARD, ModelStatus()), wire.TO_API).card == CARD


def test_hello_submit_and_cancel_cross_unchanged() -> None:
    for message in (wire.Hello(123, "psm_x", 64, (3, 224, 224)),
                    wire.Submit(7, (3, EncodedImage(b"\xff\xd8jpeg", "files[1]"), 0), 0.5, 1234.5, "req-1", 0.3),
                    wire.Submit(8, (), None, 0.0, ""),
                    wire.Cancel(7)):
        assert through(message, wire.TO_MODEL) == message


@pytest.mark.parametrize("n", [0, 1, 3])
def test_results_cross_with_every_field(n: int) -> None:
    want = results(n, scaled=n == 3)
    answers = through(wire.Answers([wire.pack_results(11, want), wire.Failed(12, ErrorKind.QUEUE_FULL, "full", 2.0)]),
                      wire.TO_API)
    done, refused = answers.items
    assert isinstance(done, wire.Done) and done.id == 11
    assert_same(wire.unpack_results(done), want)
    assert refused == wire.Failed(12, ErrorKind.QUEUE_FULL, "full", 2.0)


def test_results_are_writable_tensors_of_their_own() -> None:
    got = wire.unpack_results(through(wire.Answers([wire.pack_results(1, results(2))]), wire.TO_API).items[0])
    got[0].probs.add_(1.0)  # no warning about a read-only buffer, and the other image is untouched
    assert torch.equal(got[1].probs, results(2)[1].probs)


def test_results_of_any_layout_or_dtype_arrive_as_float32() -> None:
    base = results(1)[0]
    odd = ImageResult(base.probs.half(), torch.rand(4, 3).t(), (1,), (1,), 0.0, 1.0, 0.0, 0.0)  # fp16, transposed
    got = wire.unpack_results(through(wire.Answers([wire.pack_results(1, [odd])]), wire.TO_API).items[0])[0]
    assert got.probs.dtype == torch.float32 and torch.equal(got.probs, odd.probs.float())
    assert torch.equal(got.lives, odd.lives)


# -- frames this side does not accept -------------------------------------------------------------------
def test_a_message_for_the_other_side_is_refused_by_name() -> None:
    with pytest.raises(wire.WireError, match="'Submit'"):
        through(wire.Submit(1, (0,), None, 1.0, "r"), wire.TO_API)
    with pytest.raises(wire.WireError, match="'Welcome'"):
        through(wire.Welcome(CARD, ModelStatus()), wire.TO_MODEL)
    with pytest.raises(wire.WireError, match="'Answers'"):
        through(wire.Answers([]), wire.TO_MODEL)


@pytest.mark.parametrize("body", [b"", b"\x00garbage", b"\xc1", msgspec.msgpack.encode(["Submit", "one", [0]]),
                                  msgspec.msgpack.encode(["Failed", 1, 99, "unknown kind", None]),
                                  msgspec.msgpack.encode({"id": 1}), msgspec.msgpack.encode(["Cancel", 1, 2, 3])],
                         ids=["empty", "garbage", "reserved-byte", "wrong-type", "unknown-kind", "map", "extra-field"])
def test_a_malformed_frame_is_a_wire_error(body: bytes) -> None:
    decoder = wire.TO_API if b"Failed" in body else wire.TO_MODEL
    with pytest.raises(wire.WireError, match="malformed or unexpected message"):
        wire.decode(body, decoder)


def test_an_answer_whose_arrays_do_not_fit_is_a_wire_error() -> None:
    good = wire.pack_results(1, results(2))
    for bad in (wire.Done(1, bytearray(12), good.lives, good.grid, good.images),   # 3 floats for 2 images
                wire.Done(1, good.probs, good.lives, (3, 3), good.images),         # lives of another grid
                wire.Done(1, bytearray(), bytearray(), (3, 4), good.images)):
        with pytest.raises(wire.WireError, match="bytes for float32"):
            wire.unpack_results(through(wire.Answers([bad]), wire.TO_API).items[0])


def test_an_oversized_frame_is_refused_before_its_body_is_read() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(wire.HEADER.pack(wire.MAX_FRAME + 1))  # no body follows: it must not be awaited
        with pytest.raises(wire.WireError, match=f"frame of {wire.MAX_FRAME + 1} bytes: over"):
            await asyncio.wait_for(wire.receive(reader, wire.TO_MODEL), 1)
        reader = asyncio.StreamReader()
        reader.feed_data(wire.frame(wire.Cancel(5)))
        assert await wire.receive(reader, wire.TO_MODEL) == wire.Cancel(5)

    asyncio.run(main())


def test_an_oversized_message_is_refused_by_its_sender(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_FRAME", 100)
    with pytest.raises(wire.WireError, match="a Submit of .* bytes: over the 100-byte frame limit"):
        wire.frame(wire.Submit(1, (EncodedImage(b"x" * 200, "files[0]"),), None, 1.0, "r"))


# -- refusals --------------------------------------------------------------------------------------------
REFUSALS: list[WorkerError] = [BadInput("files[0]: corrupt"), QueueFull(2.5, "queue is full"), DeadlinePassed("late"),
                               WorkerStopping("stopping"), ModelFailed("batch failed", 7.0), Cancelled("cancelled")]


def test_every_kind_names_one_refusal() -> None:
    assert sorted(e.kind for e in REFUSALS) == sorted(ErrorKind)
    assert len({type(e) for e in REFUSALS}) == len(ErrorKind)


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda e: e.kind.name)
def test_a_refusal_crosses_as_its_kind_and_comes_back_the_same(refusal: WorkerError) -> None:
    failed = through(wire.Answers([wire.failed(3, refusal)]), wire.TO_API).items[0]
    assert isinstance(failed, wire.Failed) and failed.kind is refusal.kind
    back = wire.worker_error(failed)
    assert type(back) is type(refusal) and str(back) == str(refusal)
    assert back.retry_after_s == refusal.retry_after_s


def test_a_second_class_for_one_kind_is_refused() -> None:
    with pytest.raises(TypeError, match="already names QueueFull"):
        type("Another", (WorkerError,), {"kind": ErrorKind.QUEUE_FULL})


def test_numpy_numbers_in_a_result_cross_as_numbers() -> None:
    import numpy as np

    base = results(1)[0]
    odd = ImageResult(base.probs, base.lives, tuple(np.array([12, 8])), (np.int32(12), 9), np.float64(1.5),
                      np.float32(0.5), 0.0, 1.0, np.bool_(True), np.float64(0.75))
    got = wire.unpack_results(through(wire.Answers([wire.pack_results(1, [odd])]), wire.TO_API).items[0])[0]
    assert (got.budget, got.counts, got.gflops, got.keep_rate, got.scaled, got.requested_keep_rate) == \
        ((12, 8), (12, 9), 1.5, 0.5, True, 0.75)
    assert type(got.budget[0]) is int and type(got.scaled) is bool
