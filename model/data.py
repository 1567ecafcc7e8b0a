"""Training and evaluation data: the built-in synthetic shapes task, and ImageFolder trees.

Both give the trainer the same thing, a :class:`DataSplit`: class names, a length, and batches of
normalised images ``[B, 3, H, W]`` float32 with labels ``[B]`` int64, in an order fixed by a seed.

The synthetic task is built so that *which* patches a model keeps matters. Each image holds one
small target, a filled shape in a class colour (the class is "<colour> <shape>", e.g. "red circle"),
on a textured background with distractors: achromatic copies of the shapes, *hollow* copies in the
class colours (look-alikes of other classes: a model that loses the target's patches falls back on
them and answers wrong), and rings, bars and dots in accent colours. The target touches 4 of the 64
patches (6%) at any of the 49 corners of the patch grid; the distractors are anywhere. Aligning
the target with the grid is what lets a ViT trained from scratch learn the task in minutes on a CPU
(unaligned outlines plateaued at ~40% after 40k images). Clutter varies per image, from a plain
background to eight distractors on strong texture, so content-adaptive budgets really vary.
Images are rendered on the fly from per-item parameters, vectorised over the batch: item ``i`` of a
seed is the same image whatever the batch, the split size or the machine's thread count.
"""

from __future__ import annotations

import math
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
CLASS_COLOURS = {"red": (0.86, 0.14, 0.12), "green": (0.13, 0.66, 0.22), "blue": (0.16, 0.30, 0.92)}
# Distractor-only colours: achromatic for the decoy shapes, saturated accents for rings/bars/dots,
# all far from the class colours so "red circle" is never ambiguous.
DECOY_COLOURS = ((0.95, 0.95, 0.95), (0.08, 0.08, 0.08), (0.50, 0.50, 0.50))
ACCENT_COLOURS = ((0.95, 0.85, 0.15), (0.80, 0.25, 0.85), (0.15, 0.85, 0.90), (0.98, 0.55, 0.10))
CHUNK = 1024          # parameters are drawn per chunk of items, so a prefix never depends on the size
MAX_DISTRACTORS = 8
NOISE_BANK = 64
GRID = 8          # the backbone's patch size: targets are aligned to its grid
BAR_LENGTH = 1.8  # half-length of a bar distractor, in units of its radius


def synthetic_class_names() -> list[str]:
    return [f"{c} {s}" for c in CLASS_COLOURS for s in SHAPES]


class DataSplit(Protocol):
    """What the trainer and the evaluator need from a split."""

    class_names: list[str]

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images [B,3,H,W] float32, labels [B] int64)``, skipping the first ``start`` batches."""
        ...


# --- synthetic shapes: parameters ---------------------------------------------------------------
# Every image is a background plus ``MAX_DISTRACTORS + 1`` painted layers; the last is the target.
# Layer kinds (signed-distance shapes): a class shape, a ring, a bar, a dot.
SHAPE, RING, BAR, DOT = range(4)


@lru_cache(maxsize=64)
def _chunk_params(seed: int, chunk: int, size: int) -> dict[str, np.ndarray]:
    """Parameters of items ``chunk*CHUNK .. +CHUNK`` of a seed, in pixels of a ``size`` image."""
    rng = np.random.default_rng([seed, chunk, 0x5eed])
    n, d = CHUNK, MAX_DISTRACTORS
    num_classes = len(CLASS_COLOURS) * len(SHAPES)
    label = (np.arange(chunk * n, (chunk + 1) * n) % num_classes).astype(np.int64)  # balanced
    radius = size * rng.uniform(0.085, 0.10, n)
    # the target sits on a corner of the patch grid (+-0.5 px), so it spans one 2x2 block of patches
    cells = size // GRID
    center = rng.integers(1, cells, (n, 2)) * GRID + rng.uniform(-0.5, 0.5, (n, 2))
    clutter = rng.uniform(0.0, 1.0, n)
    p: dict[str, np.ndarray] = {"label": label, "clutter": clutter, "center": center, "radius": radius}
    p["bg_base"] = rng.uniform(0.25, 0.70, n)[:, None] + rng.uniform(-0.04, 0.04, (n, 3))
    p["bg_grad"] = rng.normal(0.0, 0.12, (n, 2, 3))  # linear ramp per channel along x and y
    # low-frequency texture, upsampled: mostly luminance, a little colour
    p["bg_noise"] = rng.normal(0.0, 1.0, (n, 1, 8, 8)) + rng.normal(0.0, 0.3, (n, 3, 8, 8))
    p["noise_offset"] = rng.integers(0, [NOISE_BANK, size], (n, 2))  # pixel noise: bank entry, row roll

    # distractors: class shapes in achromatic colours (25%); class shapes in class colours but hollow,
    # look-alikes of other classes (45%); rings, bars and dots in accent colours (30%)
    role = rng.choice(3, size=(n, d), p=[0.25, 0.45, 0.30])
    kind = np.where(role < 2, SHAPE, rng.integers(RING, DOT + 1, (n, d)))
    class_rgb = np.asarray(list(CLASS_COLOURS.values()))
    rgb = np.select([role[..., None] == 0, role[..., None] == 1],
                    [np.asarray(DECOY_COLOURS)[rng.integers(0, len(DECOY_COLOURS), (n, d))],
                     class_rgb[rng.integers(0, len(class_rgb), (n, d))]],
                    np.asarray(ACCENT_COLOURS)[rng.integers(0, len(ACCENT_COLOURS), (n, d))])
    hollow = role == 1
    count = np.floor(clutter * (d + 1)).clip(max=d)
    # distractors keep clear of the target: the first of 12 candidate spots that is far enough
    cand = rng.uniform(2, size - 2, (n, d, 12, 2))
    far = np.linalg.norm(cand - center[:, None, None, :], axis=-1) > (radius * 2.2 + 4)[:, None, None]
    spot = np.take_along_axis(cand, far.argmax(axis=-1)[..., None, None].repeat(2, -1), axis=2)[:, :, 0]
    present = (np.arange(d)[None, :] < count[:, None]) & far.any(axis=-1)

    target_rgb = np.asarray(list(CLASS_COLOURS.values()))[label // len(SHAPES)] + rng.uniform(-0.08, 0.08, (n, 3))
    p["l_kind"] = np.concatenate([kind, np.full((n, 1), SHAPE)], axis=1)
    p["l_shape"] = np.concatenate([rng.integers(0, len(SHAPES), (n, d)), (label % len(SHAPES))[:, None]], axis=1)
    p["l_hollow"] = np.concatenate([hollow, np.zeros((n, 1), dtype=bool)], axis=1)
    p["l_center"] = np.concatenate([spot, center[:, None]], axis=1)
    d_radius = size * np.where(hollow, rng.uniform(0.075, 0.10, (n, d)), rng.uniform(0.05, 0.09, (n, d)))
    p["l_radius"] = np.concatenate([d_radius, radius[:, None]], axis=1)
    p["l_width"] = np.concatenate([rng.uniform(0.8, 1.4, (n, d)), np.ones((n, 1))], axis=1)
    p["l_angle"] = np.concatenate([rng.uniform(0, math.pi, (n, d)), np.zeros((n, 1))], axis=1)
    p["l_rgb"] = np.concatenate([rgb, target_rgb[:, None]], axis=1)
    p["l_present"] = np.concatenate([present, np.ones((n, 1), bool)], axis=1)
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


# --- synthetic shapes: rendering --------------------------------------------------------------------
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


def _layer_sdf(kind: int, shape: int, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor,
               width: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Signed distance of layers that share ``kind`` (and ``shape``): ``[M, w, w]``."""
    if kind == SHAPE:
        return _shape_sdf(shape, dx, dy, r)
    if kind == BAR:
        cos, sin = torch.cos(angle), torch.sin(angle)
        return torch.maximum((dx * cos + dy * sin).abs() - BAR_LENGTH * r, (dy * cos - dx * sin).abs() - width)
    dist = torch.sqrt(dx * dx + dy * dy)
    return (dist - r).abs() - width if kind == RING else dist - 0.45 * r


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
    return img + texture * (0.03 + 0.10 * clutter) + noise * (0.015 + 0.035 * clutter)


def _paint_layers(p: dict[str, np.ndarray], img: torch.Tensor) -> torch.Tensor:
    """Paint the present layers over ``img [n, 3, S, S]`` in slot order (the target, last, on top).

    Each layer is rendered only in a ``2m x 2m`` window around its centre, and each group of layers
    of one kind/shape with only its own distance function: most of the cost of a naive full-image
    render is skipped.
    """
    n, size = img.shape[0], img.shape[-1]
    m = math.ceil(BAR_LENGTH * 0.095 * size + 2)  # half window: the longest bar plus anti-aliasing
    side = size + 2 * m
    item, slot = np.nonzero(p["l_present"])  # [M] present layers
    kind, shape = p["l_kind"][item, slot], p["l_shape"][item, slot]
    c = _t(p["l_center"][item, slot])  # [M, 2] as (x, y)
    corner = c.floor()
    k = torch.arange(2 * m, dtype=torch.float32) + 0.5 - m
    dx = (corner[:, 0] - c[:, 0])[:, None, None] + k[None, None, :]  # [M, 1, 2m]
    dy = (corner[:, 1] - c[:, 1])[:, None, None] + k[None, :, None]  # [M, 2m, 1]
    r, width, angle = (_t(p[key][item, slot])[:, None, None] for key in ("l_radius", "l_width", "l_angle"))
    sdf = torch.empty(len(item), 2 * m, 2 * m)
    group = kind * len(SHAPES) + np.where(kind == SHAPE, shape, 0)
    for g in np.unique(group):
        sel = torch.from_numpy(np.nonzero(group == g)[0])
        sdf[sel] = _layer_sdf(int(g) // len(SHAPES), int(g) % len(SHAPES), dx[sel], dy[sel], r[sel],
                              width[sel], angle[sel])
    alpha = _coverage(sdf, p["l_hollow"][item, slot], width).flatten(1)  # [M, 4m^2]
    rgb = _t(p["l_rgb"][item, slot])  # [M, 3]
    # flat index of every window pixel, per channel, in the canvas padded by m (window at `corner`)
    pos = torch.arange(2 * m)
    cl = corner.long()
    within = ((cl[:, 1, None, None] + pos[:, None]) * side + cl[:, 0, None, None] + pos).flatten(1)
    chan = (torch.from_numpy(item)[:, None] * 3 + torch.arange(3)) * side * side  # [M, 3]
    flat = chan[:, :, None] + within[:, None, :]  # [M, 3, 4m^2]
    canvas = F.pad(img, (m, m, m, m)).reshape(-1)
    for j in np.unique(slot):  # painter's order; within one slot every layer is in another image
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
    """The built-in task: ``size`` items of a seed. Rendered on the fly, deterministic by seed.

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

    Args:
        root: the split's folder (one sub-folder per class).
        data_config: timm data config (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``).
        training: timm's training augmentation (random resized crop, flip) instead of resize + crop.
        workers: DataLoader worker processes.
    """

    def __init__(self, root: Path, data_config: dict[str, Any], training: bool, workers: int = 2) -> None:
        from timm.data import create_transform
        from torchvision.datasets import ImageFolder

        cfg: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()
                               if k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
        self.dataset = ImageFolder(str(root), transform=create_transform(**cfg, is_training=training))
        self.class_names = list(self.dataset.classes)
        self.workers = workers

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.dataset), shuffle, seed)[start * batch_size:].tolist()
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, sampler=order,
                                             num_workers=self.workers,
                                             generator=torch.Generator().manual_seed(seed))
        yield from loader


def folder_splits(root: str | Path, data_config: dict[str, Any], workers: int = 2) -> tuple[FolderSplit, FolderSplit]:
    """``root/train`` and ``root/val`` with the same classes, or a :class:`DataConfigError`."""
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataConfigError(f"{root / split} is not a folder: --data needs an ImageFolder root with "
                                  "train/ and val/ (one sub-folder of images per class in each)")
    try:
        train = FolderSplit(root / "train", data_config, training=True, workers=workers)
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


def patch_coverage(seed: int, indices: Sequence[int], size: int = 64, patch: int = 8) -> torch.Tensor:
    """Fraction of patches each item's target touches (a pixel at least a quarter covered): ``[B]``."""
    p = _gather_params(seed, np.asarray(indices, dtype=np.int64), size)
    only_target = {**p, "l_present": np.zeros_like(p["l_present"])}
    only_target["l_present"][:, -1] = True
    img = _paint_layers({**only_target, "l_rgb": np.ones_like(p["l_rgb"])},
                        torch.zeros(len(indices), 3, size, size))[:, 0]
    covered = F.max_pool2d(img[:, None], patch)[:, 0] > 0.25
    return covered.flatten(1).float().mean(dim=1)
