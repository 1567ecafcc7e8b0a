"""The served batch path costs the host a fixed number of ATen ops per batch, whatever its size.

Counted on the CPU with a ``TorchDispatchMode`` around ``Engine.run_batch`` (head, one tail call per
bucket, one copy of the answers): a batch of 64 may dispatch more ops than a batch of 8 only by what
its extra buckets cost, never by anything per image. A Python loop over images (a ``tokens[i]``, a
``torch.stack`` of slices, a copy per image) shows up here as ops that grow with the batch. On a GPU
each op is a kernel launch or a host-side tensor operation, which is what this bounds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from service.runtime.engine import Engine
from service.runtime.handoff import Rows


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def served_ops(engine: Engine, pixels: torch.Tensor) -> tuple[Counter[str], int]:
    """(ops dispatched by one served batch, buckets it ran)."""
    with OpCounter() as counter:
        hb, _ = engine.run_batch(pixels)
    return counter.ops, len({tuple(b) for b in hb.buckets.tolist()})


def varied(n: int, seed: int) -> torch.Tensor:
    """``uint8`` noise images at several contrasts: calibrated budgets fall in several buckets."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([6.0, 20.0, 45.0, 90.0])[torch.arange(n) % 4].view(n, 1, 1, 1)
    return (128 + scale * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module", params=["off", "emulate"])
def engine(request: pytest.FixtureRequest, checkpoint_dir: Path) -> Engine:
    """Eager (the CPU's path) and emulated graphs (the GPU's path: static buffers, padding)."""
    engine = Engine(checkpoint_dir, device="cpu", cuda_graphs=request.param, max_batch_size=64)
    engine.capture()
    return engine


def test_ops_per_batch_do_not_grow_with_the_batch(engine: Engine) -> None:
    small = varied(8, seed=0)
    same_buckets = small.repeat(8, 1, 1, 1)  # 64 images, the 8 buckets' set exactly
    ops8, buckets8 = served_ops(engine, small)
    ops64, buckets64 = served_ops(engine, same_buckets)
    assert buckets8 == buckets64 >= 2, "the images should fall in several buckets"
    grown = {op: (ops8[op], n) for op, n in ops64.items() if n != ops8[op]}
    assert sum(ops64.values()) == sum(ops8.values()) and not grown, f"ops that grew with the batch: {grown}"


def test_ops_per_batch_differ_only_by_the_buckets(engine: Engine) -> None:
    one_bucket = varied(1, seed=1).repeat(8, 1, 1, 1)
    small, large = varied(8, seed=2), varied(64, seed=3)
    base, b1 = served_ops(engine, one_bucket)
    ops8, b8 = served_ops(engine, small)
    ops64, b64 = served_ops(engine, large)
    assert b1 == 1 and b8 > 1 and b64 > b8, (b1, b8, b64)
    per_bucket, rest = divmod(sum(ops8.values()) - sum(base.values()), b8 - 1)
    assert rest == 0 and per_bucket > 0
    assert sum(ops64.values()) - sum(ops8.values()) == (b64 - b8) * per_bucket, \
        f"8 images: {sum(ops8.values())} ops in {b8} buckets; 64: {sum(ops64.values())} in {b64}"


def test_the_workers_calls_dispatch_the_same_ops_at_8_and_64(engine: Engine) -> None:
    """As the worker calls the engine: one ``[3, H, W]`` tensor per image into the head, then a tail
    batch gathered from two head batches (one ``index_select`` each) at one bucket's counts."""
    counts = engine.bucket_grid.points[-1]
    totals = []
    for n in (8, 64):
        images = list(varied(n, seed=4))
        with OpCounter() as head_ops:
            first, second = engine.head(images, [None] * n), engine.head(images, [0.5] * n)
        with OpCounter() as tail_ops:
            engine.tail([Rows(first, torch.arange(0, n, 2)), Rows(second, torch.arange(1, n, 2))], counts).get()
        totals.append((head_ops.ops, tail_ops.ops))
    (head8, tail8), (head64, tail64) = totals
    # the counter saw the calls (an empty count would be equal at both sizes whatever they dispatch):
    # the head runs the model's blocks, the tail gathers rows with one index_select per head batch
    assert sum(head8.values()) > 0 and tail8["aten.index_select"] == 2, (head8, tail8)
    assert head8 == head64 and tail8 == tail64, (sum(head8.values()), sum(head64.values()),
                                                 sum(tail8.values()), sum(tail64.values()))
