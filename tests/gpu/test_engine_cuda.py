"""The engine on CUDA against the same engine on the CPU in float32 (the reference), CUDA-graph
replay against eager, and the launch/wait split the worker overlaps batches with.

Written against the engine contract of issue #21: ``Engine.from_settings(Settings)``; ``preprocess``
gives uint8 ``[3, H, W]``; ``head(uint8 [B, 3, H, W], keep_rates)`` gives a ``HeadBatch`` (tokens on
the device, lives/budgets/buckets on their way to the host); ``tail([Rows(hb, index)], counts)`` and
``tail_by_bucket(hb)`` give a ``HostCopy`` of CPU float32 probabilities; ``Settings.dtype`` "auto"
and ``Settings.cuda_graphs`` "auto" | "off"; ``info()["graphs"]`` has ``enabled``, ``captured`` and
``eager_fallbacks``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from service.runtime.engine import Engine
from service.runtime.handoff import HeadBatch, Rows
from service.settings import Settings

pytestmark = pytest.mark.gpu

GRID = (8, 8)  # vit_micro_patch8_64
K, L = 4, 12
RATES: list[float | None] = [None, 0.5, 0.9, None, 0.7, None, 0.5, None, 0.9, None, None, 0.7]
# max |probability difference| to the CPU float32 engine; mean |life difference| in layers
PROB_TOL = {"float32": 2e-3, "bfloat16": 6e-2, "float16": 3e-2}
LIFE_TOL = {"float32": 0.05, "bfloat16": 0.5, "float16": 0.25}
# calibrated budgets: mean over images of |patch count difference|, per stage (tokens at a threshold may flip)
BUDGET_TOL = {"float32": 0.5, "bfloat16": 3.0, "float16": 2.0}
GRAPH_TOL = 3e-2  # graph replay vs eager, both in the "auto" dtype (bfloat16 on a recent GPU)
MAX_BATCH = 8


def make_engine(checkpoint: Path, **settings: Any) -> Engine:
    """An engine as the server has it after warm-up: with cuda_graphs=auto, every shape captured."""
    engine = Engine.from_settings(Settings(checkpoint=checkpoint, **settings))
    engine.warmup(1)
    return engine


def pixels_of(engine: Engine, photos: Sequence[Image.Image]) -> torch.Tensor:
    return torch.stack([engine.preprocess(p) for p in photos])


@dataclass
class Item:
    """One image's view of a head batch (for comparisons image by image)."""

    hb: HeadBatch
    row: int

    @property
    def budget(self) -> tuple[int, ...]:
        return tuple(self.hb.budgets[self.row].tolist())

    @property
    def lives(self) -> torch.Tensor:
        return self.hb.lives[self.row]


def head_all(engine: Engine, pixels: torch.Tensor, rates: Sequence[float | None]) -> list[Item]:
    """``engine.head`` in chunks of at most ``MAX_BATCH`` images, as the worker calls it."""
    items: list[Item] = []
    for i in range(0, len(rates), MAX_BATCH):
        hb = engine.head(pixels[i : i + MAX_BATCH], list(rates[i : i + MAX_BATCH]))
        items += [Item(hb, r) for r in range(len(hb))]
    return items


def tail(engine: Engine, items: Sequence[Item], counts: Sequence[int]) -> torch.Tensor:
    """The tail for ``items`` (rows of one or more head batches) at ``counts``, read on the host."""
    parts: dict[int, tuple[HeadBatch, list[int]]] = {}
    for it in items:
        parts.setdefault(id(it.hb), (it.hb, []))[1].append(it.row)
    return engine.tail([Rows(hb, torch.tensor(rows)) for hb, rows in parts.values()], counts).get()


def common_counts(engine: Engine, items: Sequence[Item]) -> tuple[int, ...]:
    """One static shape that holds every item: the bucket of the per-stage maximum budget."""
    return tuple(engine.bucket([max(col) for col in zip(*(it.budget for it in items))]))


@pytest.fixture(scope="module")
def cpu_engines(checkpoints: dict[str, Path]) -> dict[str, Engine]:
    return {mode: make_engine(path, device="cpu", dtype="float32", max_batch_size=MAX_BATCH)
            for mode, path in checkpoints.items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["per_image", "calibrated"])
def test_head_and_tail_on_cuda_match_the_cpu(checkpoints: dict[str, Path], cpu_engines: dict[str, Engine],
                                             photos: list[Image.Image], mode: str, dtype: str) -> None:
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16 support")
    ref = cpu_engines[mode]
    gpu = make_engine(checkpoints[mode], device="cuda", dtype=dtype, cuda_graphs="off", max_batch_size=MAX_BATCH)
    info = gpu.info()
    assert info["device"].startswith("cuda") and info["dtype"] == dtype and info["normalization"] == mode

    px_ref, px = pixels_of(ref, photos), pixels_of(gpu, photos)
    assert px.dtype == torch.uint8 and px.shape == (len(photos), 3, 64, 64) and torch.equal(px, px_ref)
    items_ref, items = head_all(ref, px_ref, RATES), head_all(gpu, px, RATES)

    for it, it_ref in zip(items, items_ref, strict=True):
        assert it.hb.tokens.device.type == "cuda"
        assert it.lives.device.type == "cpu" and it.lives.dtype == torch.float32 and tuple(it.lives.shape) == GRID
        assert it.hb.keep_rates[it.row] == it_ref.hb.keep_rates[it_ref.row]
        assert tuple(it.hb.buckets[it.row].tolist()) == gpu.bucket(it.budget)  # assigned on the device
    lives, lives_ref = torch.stack([it.lives for it in items]), torch.stack([it.lives for it in items_ref])
    assert lives.min() >= K and lives.max() <= L
    assert (lives - lives_ref).abs().mean() <= LIFE_TOL[dtype]
    budgets = torch.tensor([it.budget for it in items], dtype=torch.float32)
    budgets_ref = torch.tensor([it.budget for it in items_ref], dtype=torch.float32)
    if mode == "per_image":  # every image keeps exactly its keep rate's counts, whatever the precision
        assert torch.equal(budgets, budgets_ref)
    else:
        same_rate = [i for i, r in enumerate(RATES) if r is None]
        assert budgets_ref[same_rate].std(dim=0).max() > 0, "calibrated budgets should differ between images"
        assert ((budgets - budgets_ref).abs().mean(dim=0) <= BUDGET_TOL[dtype]).all(), (budgets, budgets_ref)

    counts = common_counts(ref, items_ref)
    probs_ref, probs = tail(ref, items_ref, counts), tail(gpu, items, counts)
    assert probs.device.type == "cpu" and probs.dtype == torch.float32 and probs.shape == probs_ref.shape
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(dim=1), torch.ones(len(items)), atol=1e-3)
    assert probs_ref.std(dim=0).max() > 0.05, "the reference barely depends on the image: the check below is void"
    assert (probs - probs_ref).abs().max() <= PROB_TOL[dtype]


def test_explain_heatmap_from_cuda_lives(checkpoints: dict[str, Path], photos: list[Image.Image]) -> None:
    from service.frontend.routes.explain import heatmap_png

    gpu = make_engine(checkpoints["calibrated"], device="cuda", dtype="auto", max_batch_size=MAX_BATCH)
    lives = gpu.head(gpu.preprocess(photos[3])[None], [None]).lives[0]
    assert lives.device.type == "cpu" and tuple(lives.shape) == GRID
    png = heatmap_png(photos[3], lives, gpu)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.size[0] > im.size[1] > 64


@pytest.fixture(scope="module")
def graph_pair(checkpoints: dict[str, Path]) -> tuple[Engine, Engine]:
    """The same settings with CUDA graphs on ("auto") and off."""
    common: dict[str, Any] = dict(device="cuda", dtype="auto", max_batch_size=MAX_BATCH, bucket_step=4)
    return (make_engine(checkpoints["calibrated"], cuda_graphs="auto", **common),
            make_engine(checkpoints["calibrated"], cuda_graphs="off", **common))


def test_graph_replay_equals_eager_for_every_captured_shape(graph_pair: tuple[Engine, Engine],
                                                            photos: list[Image.Image]) -> None:
    """Every batch size up to ``max_batch_size`` (graphs pad up to their batch class) at every bucket these
    images need, plus the schedule's own bucket."""
    graphed, eager = graph_pair
    assert graphed.info()["graphs"]["enabled"] is True and eager.info()["graphs"]["enabled"] is False
    rates = [None] * len(photos)
    items_g = head_all(graphed, pixels_of(graphed, photos), rates)
    items_e = head_all(eager, pixels_of(eager, photos), rates)
    buckets = {eager.bucket(it.budget) for it in items_e} | {eager.bucket(eager.info()["schedule"]["patch_counts"])}
    assert len(buckets) >= 2
    for counts in sorted(buckets):
        for b in range(1, MAX_BATCH + 1):
            tail(graphed, items_g[:b], counts)  # the first call at a shape may capture; the second replays
            p_graph, p_eager = tail(graphed, items_g[:b], counts), tail(eager, items_e[:b], counts)
            assert p_graph.shape == p_eager.shape and p_graph.shape[0] == b
            diff = float((p_graph - p_eager).abs().max())
            assert diff <= GRAPH_TOL, f"graph replay differs from eager by {diff:.4f} at batch {b}, counts {counts}"
    graphs = graphed.info()["graphs"]
    assert graphs["captured"] >= 1, graphs


def test_an_uncaptured_batch_shape_falls_back_to_eager(graph_pair: tuple[Engine, Engine],
                                                       photos: list[Image.Image]) -> None:
    graphed, eager = graph_pair
    rates = [None] * len(photos)
    items_g = head_all(graphed, pixels_of(graphed, photos), rates)
    items_e = head_all(eager, pixels_of(eager, photos), rates)
    counts = eager.bucket(eager.info()["schedule"]["patch_counts"])

    tail(graphed, items_g[:4], counts)  # captured (or replayed) ...
    before = graphed.info()["graphs"]["eager_fallbacks"]
    tail(graphed, items_g[:4], counts)  # ... so the same shape again replays: no fallback
    assert graphed.info()["graphs"]["eager_fallbacks"] == before

    big = MAX_BATCH + 1  # past the largest batch class: no graph holds it
    p_graph = tail(graphed, items_g[:big], counts)
    assert graphed.info()["graphs"]["eager_fallbacks"] > before
    p_eager = tail(eager, items_e[:big], counts)
    assert p_graph.shape == p_eager.shape and p_graph.shape[0] == big
    assert float((p_graph - p_eager).abs().max()) <= GRAPH_TOL


def test_extra_rates_from_a_graph_replay_equal_eager(graph_pair: tuple[Engine, Engine],
                                                     photos: list[Image.Image]) -> None:
    """Accuracy scaling's extra plans are computed after the head's replay, from its static output
    buffer, before the next replay reuses it: the same budgets and buckets as eager, at every rate."""
    graphed, eager = graph_pair
    rates: list[float | None] = [None, 0.7, None, 0.9][: len(photos[:4])]
    first = graphed.head(pixels_of(graphed, photos[:4]), rates, (0.5, 0.3))
    graphed.head(pixels_of(graphed, photos[4:8]), [None] * 4, (0.5, 0.3))  # a second replay meanwhile
    reference = eager.head(pixels_of(eager, photos[:4]), rates, (0.5, 0.3))
    for rate in (0.5, 0.3):
        for got, want in zip(first.at_rate(rate), reference.at_rate(rate), strict=True):
            assert torch.equal(got, want), f"extra plan at keep rate {rate} differs under graph replay"
