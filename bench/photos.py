"""Photo-like JPEGs made by code (no downloads), for decode benchmarks, load tests and equivalence tests.

A camera photo decodes at a cost set by its entropy-coded size, so noise-free gradients (a few kB
per megapixel) would flatter every decoder. These images mix smooth shading, hard-edged shapes,
fine texture and sensor-like noise, and are saved at quality 90 with 4:2:0 chroma subsampling,
like a phone: 0.27-0.36 bytes per pixel from 3000x2000 down to 224 px.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (name, width, height): the sizes ``patchlife bench-decode`` times by default
PHOTO_SIZES: tuple[tuple[str, int, int], ...] = (
    ("224px", 224, 224), ("640x480", 640, 480), ("1000px", 1000, 872), ("3000x2000", 3000, 2000))


def photo_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image ``width x height`` with photo-like statistics (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    # smooth shading: a few low-frequency waves per channel, drawn at 1/8 size and upscaled
    sw, sh = max(2, width // 8), max(2, height // 8)
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    base = np.empty((sh, sw, 3), np.float32)
    for c in range(3):
        f = rng.uniform(0.5, 3.0, size=(3, 2)) * 2 * np.pi
        ph = rng.uniform(0, 2 * np.pi, size=3)
        waves = sum(np.sin(f[k, 0] * x / sw + f[k, 1] * y / sh + ph[k]) for k in range(3))
        base[..., c] = 128 + 40 * waves
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR)
    # objects with hard edges
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 20 + 1, width // 3 + 2)), int(rng.integers(height // 20 + 1, height // 3 + 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(0.8))  # lens softness
    # texture and sensor noise: what makes a real photo's JPEG large
    arr = np.asarray(im, dtype=np.int16)
    texture = rng.normal(0.0, 6.0, (height, width, 1)).astype(np.int16)
    noise = rng.normal(0.0, 3.0, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr + texture + noise, 0, 255).astype(np.uint8))


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90, *,
               orientation: int | None = None, progressive: bool = False) -> bytes:
    """``photo_image`` as JPEG bytes; ``orientation`` adds an EXIF orientation tag (1-8)."""
    buf = io.BytesIO()
    extra: dict[str, object] = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    photo_image(width, height, seed).save(buf, "JPEG", quality=quality, subsampling="4:2:0",
                                          progressive=progressive, **extra)
    return buf.getvalue()


def photo_png(width: int, height: int, seed: int = 0) -> bytes:
    """``photo_image`` as PNG bytes (a small upload of a lossless format)."""
    buf = io.BytesIO()
    photo_image(width, height, seed).save(buf, "PNG")
    return buf.getvalue()


def default_photos(seed: int = 0) -> dict[str, bytes]:
    """One JPEG per ``PHOTO_SIZES`` entry, by name."""
    return {name: photo_jpeg(w, h, seed) for name, w, h in PHOTO_SIZES}
