"""Training and evaluation data: the built-in synthetic counting task, and ImageFolder trees.

Both give the trainer the same thing, a :class:`DataSplit`: class names, a length, and batches of
normalised images ``[B, 3, H, W]`` float32 with labels ``[B]`` int64, in an order fixed by a seed.

The synthetic task (version 2) is built so that *how many* patches a model needs grows with the
image's content. Each 64x64 scene holds 0 to 5 **filled red circles** (the targets) and 0 to 6
distractors, on a textured background; the class is the number of targets ("0 red circles" ..
"5 red circles"). Distractors are look-alikes: red squares, triangles and crosses (right colour,
wrong shape), circles in other colours (right shape, wrong colour), hollow red rings and achromatic
circles. Every object sits in its own cell of a 4x4 grid of 16-px cells: a large one (radius
5.5-7 px) centred on the cell, on a corner of the 8-px patch grid, so it spans 2x2 patches; a small
one (radius 2.6-3.4 px) inside one patch of the cell. So a scene with five large targets spreads its
answer over 20 of the 64 patches, an empty one over none: a model that drops a target's patches
miscounts, and content-adaptive budgets have something to follow. Clutter (texture and pixel noise)
varies per image too. Images are rendered on the fly from per-item parameters, vectorised over the
batch: item ``i`` of a seed is the same image whatever the batch, the split size or the machine's
thread count. :func:`scene_content` gives the counts drawn, for tests and for the evaluator.
"""

from __future__ import annotations

import math
import random
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SHAPES = ("circle", "square", "triangle", "cross")
TARGET_RGB = (0.86, 0.14, 0.12)  # the targets: filled red circles
# right shape, wrong colour (green, blue, yellow, orange) / achromatic
OTHER_COLOURS = ((0.13, 0.66, 0.22), (0.16, 0.30, 0.92), (0.95, 0.85, 0.15), (0.98, 0.55, 0.10))
GREY_COLOURS = ((0.95, 0.95, 0.95), (0.08, 0.08, 0.08), (0.50, 0.50, 0.50))
MAX_COUNT = 5        # classes: 0..MAX_COUNT targets
MAX_DISTRACTORS = 6
CELLS = 4            # objects sit in distinct cells of a CELLS x CELLS grid (16 px at 64 px)
CHUNK = 1024         # parameters are drawn per chunk of items, so a prefix never depends on the size
NOISE_BANK = 64
# distractor kinds: red other shape, circle in another colour, hollow red ring, achromatic circle
RED_SHAPE, OTHER_COLOUR, RING, GREY = range(4)
DISTRACTOR_P = (0.35, 0.35, 0.15, 0.15)
TASK_DESCRIPTION = (
    "Counts the filled red circles (0-5) in a 64x64 synthetic scene, among up to 6 look-alike "
    "distractors (red squares/triangles/crosses, circles of other colours, hollow red rings) of two "
    "sizes on a textured background. It recognises nothing else: a photo gets one of these 6 answers.")


def synthetic_class_names() -> list[str]:
    return [f"{n} red circle{'' if n == 1 else 's'}" for n in range(MAX_COUNT + 1)]


class DataSplit(Protocol):
    """What the trainer and the evaluator need from a split."""

    class_names: list[str]

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images [B,3,H,W] float32, labels [B] int64)``, skipping the first ``start`` batches."""
        ...


# --- synthetic scenes: parameters ---------------------------------------------------------------
# Every image is a background plus MAX_COUNT + MAX_DISTRACTORS object slots (``l_*`` arrays, [n, slots]):
# the first MAX_COUNT are targets, present while slot < label; the rest distractors.
@lru_cache(maxsize=64)
def _chunk_params(seed: int, chunk: int, size: int) -> dict[str, np.ndarray]:
    """Parameters of items ``chunk*CHUNK .. +CHUNK`` of a seed, in pixels of a ``size`` image."""
    rng = np.random.default_rng([seed, chunk, 0x5eed2])
    n, t, d = CHUNK, MAX_COUNT, MAX_DISTRACTORS
    slots = t + d
    label = (np.arange(chunk * n, (chunk + 1) * n) % (t + 1)).astype(np.int64)  # balanced
    clutter = rng.uniform(0.0, 1.0, n)
    p: dict[str, np.ndarray] = {"label": label, "clutter": clutter}
    p["bg_base"] = rng.uniform(0.30, 0.70, n)[:, None] + rng.uniform(-0.04, 0.04, (n, 3))
    p["bg_grad"] = rng.normal(0.0, 0.12, (n, 2, 3))  # linear ramp per channel along x and y
    p["bg_noise"] = rng.normal(0.0, 1.0, (n, 1, 8, 8)) + rng.normal(0.0, 0.3, (n, 3, 8, 8))
    p["noise_offset"] = rng.integers(0, [NOISE_BANK, size], (n, 2))  # pixel noise: bank entry, row roll

    # placement: a distinct cell per slot; large objects centred on the cell (a patch-grid corner),
    # small ones centred in one of the cell's four patches
    cell = size / CELLS
    where = np.argsort(rng.random((n, CELLS * CELLS)), axis=1)[:, :slots]
    cx, cy = where % CELLS, where // CELLS
    large = rng.random((n, slots)) < 0.5
    quarter = rng.integers(0, 2, (n, slots, 2))
    offset = np.where(large[..., None], cell / 2, cell / 4 + quarter * cell / 2)
    jitter = rng.uniform(-0.5, 0.5, (n, slots, 2)) * size / 64
    p["l_center"] = np.stack([cx, cy], axis=-1) * cell + offset + jitter
    p["l_radius"] = size / 64 * np.where(large, rng.uniform(5.5, 7.0, (n, slots)), rng.uniform(2.6, 3.4, (n, slots)))
    p["l_large"] = large

    n_distr = rng.integers(0, d + 1, n)
    role = rng.choice(4, size=(n, d), p=DISTRACTOR_P)
    shape = np.where(role == RED_SHAPE, rng.integers(1, len(SHAPES), (n, d)), 0)
    rgb = np.select([role[..., None] == RED_SHAPE, role[..., None] == OTHER_COLOUR, role[..., None] == RING],
                    [np.broadcast_to(TARGET_RGB, (n, d, 3)),
                     np.asarray(OTHER_COLOURS)[rng.integers(0, len(OTHER_COLOURS), (n, d))],
                     np.broadcast_to(TARGET_RGB, (n, d, 3))],
                    np.asarray(GREY_COLOURS)[rng.integers(0, len(GREY_COLOURS), (n, d))])
    rgb = rgb + rng.uniform(-0.06, 0.06, (n, d, 3))
    target_rgb = np.asarray(TARGET_RGB) + rng.uniform(-0.06, 0.06, (n, t, 3))
    p["l_shape"] = np.concatenate([np.zeros((n, t), np.int64), shape], axis=1)
    p["l_hollow"] = np.concatenate([np.zeros((n, t), bool), role == RING], axis=1)
    p["l_width"] = size / 64 * rng.uniform(1.0, 1.6, (n, slots))  # rim of a hollow ring
    p["l_rgb"] = np.concatenate([target_rgb, rgb], axis=1)
    p["l_present"] = np.concatenate([np.arange(t)[None, :] < label[:, None],
                                     np.arange(d)[None, :] < n_distr[:, None]], axis=1)
    p["l_target"] = np.broadcast_to(np.arange(slots) < t, (n, slots))
    return p


def _gather_params(seed: int, indices: np.ndarray, size: int) -> dict[str, np.ndarray]:
    chunks = indices // CHUNK
    out: dict[str, list[np.ndarray]] = {}
    order = []
    for c in np.unique(chunks):
        sel = np.nonzero(chunks == c)[0]
        order.append(sel)
        params = _chunk_params(seed, int(c), size)
        for k, v in params.items():
            out.setdefault(k, []).append(v[indices[sel] % CHUNK])
    inverse = np.argsort(np.concatenate(order), kind="stable")
    return {k: np.concatenate(v)[inverse] for k, v in out.items()}


def scene_content(seed: int, indices: Sequence[int] | np.ndarray, size: int = 64) -> dict[str, np.ndarray]:
    """What each item shows, ``[B]`` int arrays: ``count`` (targets, = the label), ``objects``
    (targets + distractors), ``target_patches`` (patches of the 8x8 grid the targets span)."""
    p = _gather_params(seed, np.asarray(indices, dtype=np.int64), size)
    present = p["l_present"]
    targets = present & p["l_target"]
    return {"count": targets.sum(axis=1), "objects": present.sum(axis=1),
            "target_patches": (targets * np.where(p["l_large"], 4, 1)).sum(axis=1)}


# --- synthetic scenes: rendering ------------------------------------------------------------------
@lru_cache(maxsize=4)
def _noise_bank(size: int) -> torch.Tensor:
    """Fixed pixel noise ``[NOISE_BANK, 3, 2*size, size]`` (rows doubled, so a rolled view is a slice)."""
    bank = torch.randn(NOISE_BANK, 3, size, size, generator=torch.Generator().manual_seed(0x7e47))
    return torch.cat([bank, bank], dim=2)


def _shape_sdf(shape: int, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (pixels, < 0 inside) of one of the equal-area ``SHAPES`` of size ``r``."""
    if shape == 0:  # circle
        return torch.sqrt(dx * dx + dy * dy) - r
    ax, ay = dx.abs(), dy.abs()
    if shape == 1:  # square
        return torch.maximum(ax, ay) - 0.886 * r
    if shape == 2:  # triangle, apex up (y grows downward), its box centred; ri = inradius
        ri = 0.7 * r
        dy = dy - 0.5 * ri
        return torch.maximum(dy - ri, torch.maximum(0.866 * dx - 0.5 * dy - ri, -0.866 * dx - 0.5 * dy - ri))
    arm, half = 1.15 * r, 0.42 * r  # cross
    return torch.minimum(torch.maximum(ax - arm, ay - half), torch.maximum(ax - half, ay - arm))


def _coverage(sdf: torch.Tensor, hollow: np.ndarray, width: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage ``[M, w, w]`` of each layer: the whole shape, or a rim ``width`` wide."""
    fill = 0.5 - sdf
    rim = 0.5 - (sdf + width / 2).abs() + width / 2
    return torch.where(torch.from_numpy(hollow)[:, None, None], rim, fill).clamp(0.0, 1.0)


def _t(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _background(p: dict[str, np.ndarray], size: int) -> torch.Tensor:
    """Base colour + linear ramp + low-frequency texture + pixel noise, stronger with clutter."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    clutter = _t(p["clutter"])[:, None, None, None]
    grad = _t(p["bg_grad"])  # [n, 2, 3]
    img = _t(p["bg_base"])[:, :, None, None] + grad[:, 0, :, None, None] * (xs / size - 0.5) \
        + grad[:, 1, :, None, None] * (ys / size - 0.5)
    texture = F.interpolate(_t(p["bg_noise"]), size=(size, size), mode="bilinear", align_corners=False)
    bank = _noise_bank(size)
    noise = torch.stack([bank[e, :, r:r + size] for e, r in p["noise_offset"].tolist()]) if len(img) else img
    return img + texture * (0.03 + 0.10 * clutter) + noise * (0.015 + 0.045 * clutter)


def _paint_layers(p: dict[str, np.ndarray], img: torch.Tensor) -> torch.Tensor:
    """Paint the present objects over ``img [n, 3, S, S]``.

    Objects never overlap (one per cell), so the order does not matter. Each is rendered only in a
    ``2m x 2m`` window around its centre, each group of one shape with only its own distance function.
    """
    n, size = img.shape[0], img.shape[-1]
    m = math.ceil(7.0 / 64 * size * 1.15 + 2)  # half window: the largest cross plus anti-aliasing
    side = size + 2 * m
    item, slot = np.nonzero(p["l_present"])  # [M] present objects
    shape = p["l_shape"][item, slot]
    c = _t(p["l_center"][item, slot])  # [M, 2] as (x, y)
    corner = c.floor()
    k = torch.arange(2 * m, dtype=torch.float32) + 0.5 - m
    dx = (corner[:, 0] - c[:, 0])[:, None, None] + k[None, None, :]  # [M, 1, 2m]
    dy = (corner[:, 1] - c[:, 1])[:, None, None] + k[None, :, None]  # [M, 2m, 1]
    r, width = (_t(p[key][item, slot])[:, None, None] for key in ("l_radius", "l_width"))
    sdf = torch.empty(len(item), 2 * m, 2 * m)
    for s in np.unique(shape):
        sel = torch.from_numpy(np.nonzero(shape == s)[0])
        sdf[sel] = _shape_sdf(int(s), dx[sel], dy[sel], r[sel])
    alpha = _coverage(sdf, p["l_hollow"][item, slot], width).flatten(1)  # [M, 4m^2]
    rgb = _t(p["l_rgb"][item, slot])  # [M, 3]
    # flat index of every window pixel, per channel, in the canvas padded by m (window at `corner`)
    pos = torch.arange(2 * m)
    cl = corner.long()
    within = ((cl[:, 1, None, None] + pos[:, None]) * side + cl[:, 0, None, None] + pos).flatten(1)
    chan = (torch.from_numpy(item)[:, None] * 3 + torch.arange(3)) * side * side  # [M, 3]
    flat = chan[:, :, None] + within[:, None, :]  # [M, 3, 4m^2]
    canvas = F.pad(img, (m, m, m, m)).reshape(-1)
    for j in np.unique(slot):  # within one slot every object is in another image: no index repeats
        sel = torch.from_numpy(np.nonzero(slot == j)[0])
        idx, a = flat[sel], alpha[sel, None, :]
        canvas[idx] = canvas[idx] * (1 - a) + rgb[sel, :, None] * a
    return canvas.view(n, 3, side, side)[:, :, m:m + size, m:m + size]


def render_synthetic(seed: int, indices: Sequence[int] | np.ndarray,
                     size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Render items of the synthetic task: ``(uint8 images [B, 3, size, size], labels [B])``."""
    p = _gather_params(seed, np.asarray(indices, dtype=np.int64), size)
    img = _paint_layers(p, _background(p, size))
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), torch.from_numpy(p["label"])


@dataclass
class SyntheticShapes:
    """The built-in counting task: ``size`` items of a seed. Rendered on the fly, deterministic by seed.

    Args:
        size: number of items.
        seed: which images (different seeds give disjoint streams: use one for train, one for val).
        image_size: side in pixels (the backbone's input size).
        mean, std: per-channel normalisation of the backbone (timm's data config).
    """

    size: int
    seed: int = 0
    image_size: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        self.class_names = synthetic_class_names()

    def __len__(self) -> int:
        return self.size

    def render(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 [B, 3, H, W], labels [B])`` for item indices."""
        return render_synthetic(self.seed, indices, self.image_size)

    def content(self, indices: Sequence[int] | np.ndarray | None = None) -> dict[str, np.ndarray]:
        """:func:`scene_content` of items (default: all of them, in order)."""
        idx = np.arange(self.size) if indices is None else indices
        return scene_content(self.seed, idx, self.image_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def image(self, index: int) -> tuple[Image.Image, str]:
        """One item as an RGB PIL image and its class name (for demos and load tests)."""
        img, label = self.render([index])
        return Image.fromarray(img[0].permute(1, 2, 0).numpy()), self.class_names[int(label[0])]

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Items are independent draws, so shuffling chunks and items within a chunk is as good as a
        # full permutation, and a batch then touches one or two chunks of parameters.
        order = np.arange(self.size)
        if shuffle:
            rng = np.random.default_rng([seed, 0xda7a])
            chunks = [order[i:i + CHUNK] for i in range(0, self.size, CHUNK)]
            order = np.concatenate([rng.permutation(chunks[c]) for c in rng.permutation(len(chunks))])
        for b in range(start, math.ceil(self.size / batch_size)):
            img, label = self.render(order[b * batch_size:(b + 1) * batch_size])
            yield self.normalize(img), label


def epoch_order(n: int, shuffle: bool, seed: int) -> np.ndarray:
    """Item order for one pass: a permutation fixed by ``seed``, or ``0..n-1``."""
    return np.random.default_rng([seed, 0xda7a]).permutation(n) if shuffle else np.arange(n)


def synthetic_splits(train_size: int, val_size: int, seed: int = 0, image_size: int = 64,
                     mean: Sequence[float] = (0.5, 0.5, 0.5),
                     std: Sequence[float] = (0.5, 0.5, 0.5)) -> tuple[SyntheticShapes, SyntheticShapes]:
    """Train and held-out splits: disjoint item streams of the same seed."""
    m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    train = SyntheticShapes(train_size, 2 * seed, image_size, m, s)  # type: ignore[arg-type]
    val = SyntheticShapes(val_size, 2 * seed + 1, image_size, m, s)  # type: ignore[arg-type]
    return train, val


# --- ImageFolder trees ------------------------------------------------------------------------
class DataConfigError(ValueError):
    """The data on disk does not fit the run; the message says what to change."""


class FolderSplit:
    """One split of an ImageFolder tree through timm's transforms for the backbone.

    The training augmentation of an image is drawn from a generator seeded by the epoch's seed and the
    image's position in the epoch, not from a worker's running stream: the same batch gets the same
    crops and flips whatever the worker count and wherever a run resumes (``resume.py``).

    Args:
        root: the split's folder (one sub-folder per class).
        data_config: timm data config (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``).
        training: timm's training augmentation (random resized crop, flip) instead of resize + crop.
        workers: DataLoader worker processes.
        crop_scale: training: the random crop's smallest area, a fraction of the image.
    """

    def __init__(self, root: Path, data_config: dict[str, Any], training: bool, workers: int = 2,
                 crop_scale: float = 0.08) -> None:
        from timm.data import create_transform
        from torchvision.datasets import ImageFolder

        cfg: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()
                               if k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
        if training:
            cfg["scale"] = (crop_scale, 1.0)
        self.dataset = ImageFolder(str(root), transform=create_transform(**cfg, is_training=training))
        self.class_names = list(self.dataset.classes)
        self.workers = workers

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.dataset), shuffle, seed)
        keys = [(int(item), seed * 1_000_003 + pos) for pos, item in enumerate(order)][start * batch_size:]
        loader = torch.utils.data.DataLoader(_SeededItems(self.dataset), batch_size=batch_size, sampler=keys,
                                             num_workers=self.workers, worker_init_fn=_ignore_sigint)
        yield from loader


class _SeededItems(torch.utils.data.Dataset[Any]):
    """``dataset[item]`` with Python's, NumPy's and torch's generators seeded by a key, then put back."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        item, seed = key
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed CUDA too
        try:
            return self.dataset[item]
        finally:  # in the main process (--workers 0) the training loop's generators must not move
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def _ignore_sigint(worker: int) -> None:
    """DataLoader workers leave Ctrl-C (and SIGTERM) to the main process, which finishes its step and
    saves (``resume.py``); a worker would otherwise die first and take the step down with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def folder_splits(root: str | Path, data_config: dict[str, Any], workers: int = 2,
                  crop_scale: float = 0.08) -> tuple[FolderSplit, FolderSplit]:
    """``root/train`` and ``root/val`` with the same classes, or a :class:`DataConfigError`."""
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataConfigError(f"{root / split} is not a folder: --data needs an ImageFolder root with "
                                  "train/ and val/ (one sub-folder of images per class in each)")
    try:
        train = FolderSplit(root / "train", data_config, training=True, workers=workers, crop_scale=crop_scale)
        val = FolderSplit(root / "val", data_config, training=False, workers=workers)
    except (FileNotFoundError, RuntimeError) as exc:  # torchvision: no class folders / no images
        raise DataConfigError(f"cannot read images under {root}: {exc}") from exc
    if train.class_names != val.class_names:
        only_train = sorted(set(train.class_names) - set(val.class_names))
        only_val = sorted(set(val.class_names) - set(train.class_names))
        raise DataConfigError(f"train/ and val/ under {root} have different classes: only in train/: "
                              f"{only_train or '-'}; only in val/: {only_val or '-'}. Give both splits "
                              "the same class folders")
    return train, val
