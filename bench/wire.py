"""CPU cost of the wire between an API process and the model process: the typed msgspec frames of
``service/transport/wire.py`` against the pickle framing they replaced (a copy of it is kept here, for
this comparison only), side by side in one run.

    python -m bench.wire [--classes 1000] [--grid 14] [--rounds 2000]

Per case, microseconds (best of 5 runs) to build the frame(s) on the sending side (results packed from the batch's
tensors, encoded, header in place) and to read them on the other (decoded, results rebuilt as
``ImageResult`` tensors), and the bytes and frames sent. "16 answers" is a batch of 16 one-image
requests: one frame per request before, one ``Answers`` frame for the batch now.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from service.protocol import ImageResult
from service.transport import wire


# -- the pickle framing as it was (bench only) -----------------------------------------------------------
@dataclass(frozen=True)
class OldSubmit:
    id: int
    slots: tuple[Any, ...]
    keep_rate: float | None
    deadline: float
    request_id: str
    min_keep_rate: float | None = None


@dataclass(frozen=True)
class OldDone:
    id: int
    probs: Any
    lives: Any
    rest: tuple[tuple[Any, ...], ...]


OLD_HEADER = struct.Struct("<I")


def old_frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=5)
    return OLD_HEADER.pack(len(body)) + body


def old_read(frame: bytes | bytearray) -> Any:
    return pickle.loads(frame[OLD_HEADER.size:])


def old_pack(rid: int, results: list[ImageResult]) -> OldDone:
    probs = torch.stack([r.probs for r in results]).numpy()
    lives = torch.stack([r.lives for r in results]).numpy()
    rest = tuple((r.budget, r.counts, r.gflops, r.keep_rate, r.queue_ms, r.compute_ms, r.scaled,
                  r.requested_keep_rate) for r in results)
    return OldDone(rid, probs, lives, rest)


def old_unpack(done: OldDone) -> list[ImageResult]:
    probs, lives = torch.from_numpy(done.probs), torch.from_numpy(done.lives)
    return [ImageResult(probs[i], lives[i], *rest) for i, rest in enumerate(done.rest)]


# -- the cases -----------------------------------------------------------------------------------------
def batch_results(n: int, classes: int, grid: int) -> list[ImageResult]:
    """``n`` results as the worker hands them over: views into one batch's output tensors."""
    probs, lives = torch.rand(n, classes), torch.rand(n, grid, grid) * 12
    return [ImageResult(probs[i], lives[i], (196, 120, 80), (196, 128, 80), 2.4, 0.5, 1.25, 3.5)
            for i in range(n)]


def timed(fn: Callable[[], Any], rounds: int, repeats: int = 5) -> tuple[float, Any]:
    """Microseconds per call: the best of ``repeats`` runs of ``rounds // repeats`` calls (a busy machine
    only ever adds time)."""
    out = fn()
    n = max(1, rounds // repeats)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6, out


Case = tuple[Callable[[], list[bytes | bytearray]], Callable[[list[bytes | bytearray]], Any]]


def cases(classes: int, grid: int) -> dict[str, tuple[Case, Case]]:
    """name -> (old: (send, read), new: (send, read))."""
    one = batch_results(16, classes, grid)

    def submit(n: int) -> tuple[Case, Case]:
        slots = tuple(range(n))
        old: Case = (lambda: [old_frame(OldSubmit(7, slots, 0.5, 1234.5, "req-1"))],
                     lambda frames: [old_read(f) for f in frames])
        new: Case = (lambda: [wire.frame(wire.Submit(7, slots, 0.5, 1234.5, "req-1"))],
                     lambda frames: [wire.decode(memoryview(f)[wire.HEADER.size:], wire.TO_MODEL) for f in frames])
        return old, new

    answers_old: Case = (lambda: [old_frame(old_pack(i, [r])) for i, r in enumerate(one)],
                         lambda frames: [old_unpack(old_read(f)) for f in frames])
    answers_new: Case = (lambda: [wire.frame(wire.Answers([wire.pack_results(i, [r]) for i, r in enumerate(one)]))],
                         lambda frames: [[wire.unpack_results(a) for a in read_answers(f)] for f in frames])
    request_old: Case = (lambda: [old_frame(old_pack(1, one))],
                         lambda frames: [old_unpack(old_read(f)) for f in frames])
    request_new: Case = (lambda: [wire.frame(wire.Answers([wire.pack_results(1, one)]))],
                         lambda frames: [[wire.unpack_results(a) for a in read_answers(f)] for f in frames])
    return {"Submit, 1 image": submit(1), "Submit, 16 images": submit(16),
            "16 answers of 1 image": (answers_old, answers_new), "1 answer of 16 images": (request_old, request_new)}


def read_answers(frame: bytes | bytearray) -> list[wire.Done]:
    message = wire.decode(memoryview(frame)[wire.HEADER.size:], wire.TO_API)
    assert isinstance(message, wire.Answers)
    return [a for a in message.items if isinstance(a, wire.Done)]


def check_same(old: Any, new: Any) -> None:
    """The two framings carry the same results (the comparison is of equal work)."""
    flat_old = [r for rs in old for r in rs]
    flat_new = [r for f in new for rs in f for r in rs]
    assert len(flat_old) == len(flat_new)
    for a, b in zip(flat_old, flat_new, strict=True):
        assert torch.equal(a.probs, b.probs) and torch.equal(a.lives, b.lives) and a.budget == b.budget


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=1000, help="probabilities per image")
    p.add_argument("--grid", type=int, default=14, help="patch rows (= cols) of the lives map")
    p.add_argument("--rounds", type=int, default=2000)
    args = p.parse_args(argv)
    print(f"{args.classes} classes, {args.grid}x{args.grid} lives; microseconds per case "
          f"(send: pack + encode + header; read: decode + ImageResults)")
    print(f"{'case':24s} {'':7s} {'send us':>9s} {'read us':>9s} {'total us':>9s} {'bytes':>8s} {'frames':>6s}")
    for name, sides in cases(args.classes, args.grid).items():
        totals, outputs = [], []
        for label, (send, read) in zip(("pickle", "msgspec"), sides, strict=True):
            send_us, frames = timed(send, args.rounds)
            read_us, out = timed(functools.partial(read, frames), args.rounds)
            totals.append(send_us + read_us)
            outputs.append(out)
            print(f"{name:24s} {label:7s} {send_us:9.1f} {read_us:9.1f} {send_us + read_us:9.1f} "
                  f"{sum(len(f) for f in frames):8d} {len(frames):6d}")
        if "answer" in name:
            check_same(outputs[0], outputs[1])
        print(f"{'':24s} {'':7s} {'':9s} {'':9s} {totals[0] / totals[1]:8.1f}x faster")


if __name__ == "__main__":
    main()
