"""Fixed shapes for the device: batches padded up to a batch-size class, CUDA graphs replayed per shape.

Eager PyTorch at serving batch sizes is bound by kernel launches, not FLOPs (a deit_small forward
costs ~5 ms of launches on an H200 whether it holds 1 or 64 images). So, like vLLM, the engine
captures each (phase, counts) function once per batch-size class (1, 2, 4, ... ``max_batch``) at
warm-up and afterwards only copies the inputs into the captured buffers and replays:

    runner = ShapeRunner("cuda", max_batch=32, mode="graphs")
    runner.capture(("tail", counts), fn, example_inputs)   # every class, largest first, one pool
    out = runner.run(("tail", counts), fn, inputs)          # padded to its class; eager if uncaptured
    (buf,) = runner.static_inputs(key, n)                   # or write the inputs in place yourself ...
    out = runner.replay(key, n)                             # ... and replay

Rows are independent in a ViT (no op mixes images), so the padding rows, which hold whatever the
last replay left in the buffers, never touch a real row, and only the first ``n`` output rows are
returned: views of the output buffers, valid until the next replay of that shape (work queued on
the same stream, such as a copy to the host, runs before it). Shapes outside the captured set, e.g.
batches larger than the largest class, run eagerly and are counted.

``mode="emulate"`` runs the same padding and buffer path on any device without CUDA graphs (the
function is re-run on the static buffers), so the CPU tests check what the GPU does, padding rows
filled with NaN to prove they never leak into an answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

GraphMode = Literal["graphs", "emulate", "off"]
Fn = Callable[..., tuple[torch.Tensor, ...]]


def batch_classes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself: ``1, 2, 4, ..., max_batch``."""
    out, c = [], 1
    while c < max_batch:
        out.append(c)
        c *= 2
    return (*out, max_batch)


@dataclass
class _Shape:
    inputs: tuple[torch.Tensor, ...]     # static input buffers, [class, ...] each
    outputs: tuple[torch.Tensor, ...]    # static output buffers, written by each replay
    graph: Any                           # torch.cuda.CUDAGraph, or None when emulated
    fn: Fn


class ShapeRunner:
    """Pads batches to their class and replays what was captured for that shape (see module doc)."""

    def __init__(self, device: torch.device | str, max_batch: int, mode: GraphMode) -> None:
        self.device = torch.device(device)
        if mode == "graphs" and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.mode = mode
        self.classes = batch_classes(max_batch) if mode != "off" else ()
        self.shapes: dict[tuple[Hashable, int], _Shape] = {}
        self.pool = torch.cuda.graph_pool_handle() if mode == "graphs" else None
        self.capture_seconds = 0.0
        self.capture_bytes = 0
        self.eager_fallbacks = 0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def padded_rows(self, n: int) -> int:
        """Rows a batch of ``n`` runs as: its class, or ``n`` when no class holds it."""
        return next((c for c in self.classes if c >= n), n)

    def capture(self, key: Hashable, fn: Fn, example: Sequence[torch.Tensor]) -> None:
        """Capture ``fn`` for every batch-size class; ``example``: one input row each, ``[1, ...]``."""
        if not self.enabled:
            return
        t0 = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device) if self.mode == "graphs" else 0
        for rows in sorted(self.classes, reverse=True):  # largest first: smaller ones reuse its pool
            inputs = tuple(x.expand(rows, *x.shape[1:]).clone() for x in example)
            self.shapes[(key, rows)] = self._capture_one(fn, inputs)
        if self.mode == "graphs":
            torch.cuda.synchronize(self.device)
            self.capture_bytes += torch.cuda.memory_reserved(self.device) - before
        self.capture_seconds += time.perf_counter() - t0

    def _capture_one(self, fn: Fn, inputs: tuple[torch.Tensor, ...]) -> _Shape:
        if self.mode == "emulate":
            return _Shape(inputs, tuple(fn(*inputs)), None, fn)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # lazy init (cuBLAS handles, autotuning) outside the capture
            for _ in range(2):
                fn(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = tuple(fn(*inputs))
        return _Shape(inputs, outputs, graph, fn)

    def holds(self, key: Hashable, n: int) -> bool:
        """Whether a batch of ``n`` rows at ``key`` replays a captured shape (else it runs eagerly)."""
        return (key, self.padded_rows(n)) in self.shapes

    def static_inputs(self, key: Hashable, n: int) -> tuple[torch.Tensor, ...] | None:
        """The captured input buffers (``[class, ...]`` each) a batch of ``n`` rows is replayed from, for a
        caller that writes its first ``n`` rows in place; None when no captured shape holds it."""
        shape = self.shapes.get((key, self.padded_rows(n)))
        return None if shape is None else shape.inputs

    def replay(self, key: Hashable, n: int) -> tuple[torch.Tensor, ...]:
        """Replay the shape holding ``n`` rows on what its input buffers hold; the first ``n`` output rows."""
        shape = self.shapes[(key, self.padded_rows(n))]
        if shape.graph is not None:
            shape.graph.replay()
        else:  # emulated: poison the padding rows, then recompute into the output buffers
            for static in shape.inputs:
                if static.is_floating_point():
                    static[n:].fill_(float("nan"))
            for out, new in zip(shape.outputs, shape.fn(*shape.inputs), strict=True):
                out.copy_(new)
        return tuple(out[:n] for out in shape.outputs)

    def count_eager(self) -> None:
        """A caller ran a batch eagerly because no captured shape held it."""
        if self.enabled:
            self.eager_fallbacks += 1

    def run(self, key: Hashable, fn: Fn, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``fn(*inputs)`` for a batch of ``n = inputs[0].shape[0]`` rows, through its captured shape
        (outputs are then views of its buffers: see the module docstring)."""
        n = inputs[0].shape[0]
        statics = self.static_inputs(key, n)
        if statics is None:
            self.count_eager()
            return tuple(fn(*inputs))
        for static, x in zip(statics, inputs, strict=True):
            static[:n].copy_(x, non_blocking=True)
        return self.replay(key, n)

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "mode": self.mode, "captured": len(self.shapes),
                "batch_classes": list(self.classes), "capture_seconds": round(self.capture_seconds, 3),
                "capture_bytes": int(self.capture_bytes), "eager_fallbacks": self.eager_fallbacks}
