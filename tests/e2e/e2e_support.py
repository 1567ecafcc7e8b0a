"""Helpers of the browser tests (imported by name: tests/e2e is on pytest's pythonpath)."""

from __future__ import annotations

import numpy as np
from PIL import Image

CLASSES = ["cat", "dog", "ship", "tree", "cup"]
EXAMPLES = [
    {"file": "simple.png", "label": "cat", "note": "one object, plain background"},
    {"file": "busy.png", "label": "ship", "note": "texture everywhere"},
]
MAX_UPLOAD_BYTES = 300_000     # small, so that the page can be shown the "too large" answers:
MAX_REQUEST_BYTES = 1_000_000  # this one is refused from Content-Length, before the body is read


def example_image(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """A landscape picture with a bright blob on a textured background (the crop matters)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin((x + 9 * seed) / 6.0)], -1) * 200
    blob = np.exp(-((x - w * (0.35 + 0.3 * seed)) ** 2 + (y - h / 2) ** 2) / (2 * (h / 6) ** 2))[..., None]
    pixels = base * (1 - blob) + np.array([250, 240, 60], np.float32) * blob + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
