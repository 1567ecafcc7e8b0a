"""A small ImageFolder tree to try ``patchlife train --data`` on, made offline in a second.

``python -m model.training.demo_tree DIR`` writes ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``:
one filled shape (circle, square or triangle: the class) of a random size, place and turn, in a
colour from its class's family of hues, on a textured background, in JPEGs of 120 to 400 px a side,
not square, as a user's photos would be. The README's from-scratch recipe and the tests train on
it; it stands in for your own data.
"""

from __future__ import annotations

import argparse
import colorsys
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
HUES = (0.02, 0.33, 0.66)  # the centre of each class's hues


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A colour ramp plus blotchy low-frequency texture and pixel noise."""
    base = rng.uniform(0.2, 0.8, 3)
    ys, xs = np.mgrid[0:h, 0:w] / max(w, h)
    ramp = rng.normal(0, 0.2, (2, 3))
    coarse = rng.normal(0, 0.08, (6, 6, 3))
    texture = np.asarray(Image.fromarray(((coarse + 0.5).clip(0, 1) * 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255 - 0.5
    img = base + xs[..., None] * ramp[0] + ys[..., None] * ramp[1] + texture + rng.normal(0, 0.03, (h, w, 3))
    return Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8))


def draw_shape(rng: np.random.Generator, shape: str, w: int, h: int) -> Image.Image:
    img = _background(rng, w, h)
    r = rng.uniform(0.18, 0.32) * min(w, h)  # the shape's "radius"
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    # each class has its own family of hues (red-orange, green, blue-violet), so a small model trained
    # from scratch on a few hundred images has a cue it can pick up in minutes, besides the shape
    hue = (HUES[CLASSES.index(shape)] + rng.uniform(-0.08, 0.08)) % 1.0
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)))
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        corners = 4 if shape == "square" else 3
        turn = rng.uniform(0, 2 * math.pi)
        draw.polygon([(cx + r * math.cos(turn + 2 * math.pi * k / corners),
                       cy + r * math.sin(turn + 2 * math.pi * k / corners)) for k in range(corners)], fill=colour)
    return img


def write_tree(root: str | Path, train_per_class: int = 60, val_per_class: int = 20, seed: int = 0) -> Path:
    """Write the tree (JPEG quality 90); the same seed writes the same images."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for shape in CLASSES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(120, 401, 2))
                draw_shape(rng, shape, w, h).save(folder / f"{shape}-{i:03d}.jpg", quality=90)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.training.demo_tree", description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="where to write train/ and val/")
    p.add_argument("--train", type=int, default=60, help="training images per class")
    p.add_argument("--val", type=int, default=20, help="held-out images per class")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_tree(args.root, args.train, args.val, args.seed)
    print(f"wrote {len(CLASSES)} classes ({', '.join(CLASSES)}), {args.train} training and {args.val} held-out "
          f"images each, under {args.root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
