"""The lifespan heatmap: the photo the model saw, coloured by how many layers each patch lived.

    png = render_heatmap(view, lives, first_block=K, depth=L)

Each patch is painted with one colour (nearest-neighbour, so patch borders stay visible) blended
over the photo; a colour bar on the right carries the layer numbers ``K..L``. A patch coloured at
``K`` was pruned right after the life module; one at ``L`` survived to the end.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# A perceptually ordered dark-to-bright ramp (anchor colours of the viridis map, linearly interpolated).
_ANCHORS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float32)
OVERLAY_ALPHA = 0.55
TARGET_SIDE = 448  # photo side in the PNG, about; rounded to whole pixels per patch
BAR_PANEL = 96
MARGIN = 16


def colormap(t: np.ndarray) -> np.ndarray:
    """Values in ``[0, 1]`` (any shape) -> uint8 RGB ``[..., 3]``."""
    t = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(t).astype(np.int64).clip(max=len(_ANCHORS) - 2)
    frac = (t - lo)[..., None]
    return np.round(_ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac).astype(np.uint8)


def model_view(image: Image.Image, input_size: Sequence[int], crop_pct: float | None) -> Image.Image:
    """The region of ``image`` the eval preprocessing keeps (timm's centre crop): what lives refer to.

    Args:
        input_size: ``(3, H, W)`` or ``(H, W)`` of the model.
        crop_pct: timm's crop fraction (None: 0.875, timm's default).
    """
    h_in, w_in = (int(v) for v in input_size[-2:])
    pct = crop_pct or 0.875
    scale_h, scale_w = math.floor(h_in / pct), math.floor(w_in / pct)
    w, h = image.size
    if scale_h == scale_w:  # shorter side resized to scale, then a centred (h_in, w_in) crop
        factor = scale_h / min(w, h)
        crop_w, crop_h = min(w, w_in / factor), min(h, h_in / factor)
    else:  # both sides resized to (scale_h, scale_w)
        crop_w, crop_h = w * w_in / scale_w, h * h_in / scale_h
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return image.crop((round(left), round(top), round(left + crop_w), round(top + crop_h)))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tick_layers(first_block: int, depth: int) -> list[int]:
    step = max(1, math.ceil((depth - first_block) / 12))
    ticks = list(range(first_block, depth + 1, step))
    return ticks if ticks[-1] == depth else [*ticks, depth]


def render_heatmap(image: Image.Image, lives: torch.Tensor | np.ndarray, first_block: int, depth: int) -> bytes:
    """PNG bytes of ``image`` (RGB, the model's view) with ``lives [rows, cols]`` (layer units) overlaid.

    Args:
        first_block: ``K``, the smallest possible life (the bottom of the colour bar).
        depth: ``L``, the number of blocks (the top of the colour bar).
    """
    grid = np.asarray(lives.detach().cpu() if isinstance(lives, torch.Tensor) else lives, np.float32)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"lives must be a [rows, cols] grid, got shape {grid.shape}")
    if depth <= first_block:
        raise ValueError(f"depth ({depth}) must exceed the first pruning block ({first_block})")
    rows, cols = grid.shape
    cell = max(1, round(TARGET_SIDE / max(rows, cols)))
    width, height = cols * cell, rows * cell

    photo = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    colours = Image.fromarray(colormap((grid - first_block) / (depth - first_block)), "RGB")
    overlay = Image.blend(photo, colours.resize((width, height), Image.Resampling.NEAREST), OVERLAY_ALPHA)

    canvas = Image.new("RGB", (width + BAR_PANEL + MARGIN, height + 2 * MARGIN), (255, 255, 255))
    canvas.paste(overlay, (MARGIN, MARGIN))
    _draw_colour_bar(canvas, MARGIN + width + 14, MARGIN, height, first_block, depth)
    buf = io.BytesIO()
    canvas.save(buf, "PNG", compress_level=3)
    return buf.getvalue()


def _draw_colour_bar(canvas: Image.Image, x: int, top: int, height: int, first_block: int, depth: int) -> None:
    """Vertical bar, ``depth`` at the top and ``first_block`` at the bottom, ticks at layer numbers."""
    bar_w = 20
    ramp = colormap(np.linspace(1.0, 0.0, height, dtype=np.float32))  # [height, 3], top = long life
    bar = Image.fromarray(np.repeat(ramp[:, None, :], bar_w, axis=1), "RGB")
    canvas.paste(bar, (x, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x - 1, top - 1, x + bar_w, top + height), outline=(60, 60, 60))
    font = _font(13)
    for layer in _tick_layers(first_block, depth):
        y = top + round((depth - layer) / (depth - first_block) * (height - 1))
        draw.line((x + bar_w, y, x + bar_w + 5, y), fill=(40, 40, 40))
        _text(draw, (x + bar_w + 8, y), str(layer), font, centre_x=False)
    _text(draw, (x + bar_w // 2, top + height + 9), "life", font, centre_x=True)


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: ImageFont.FreeTypeFont |
          ImageFont.ImageFont, centre_x: bool) -> None:
    """Text vertically centred on ``xy`` (and horizontally if asked); works with bitmap fonts too."""
    left, upper, right, lower = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - (right - left) // 2 - left if centre_x else xy[0] - left
    draw.text((x, xy[1] - (lower + upper) // 2), text, fill=(20, 20, 20), font=font)
