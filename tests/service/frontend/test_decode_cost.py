"""The decode budget charges what a decode costs, by mode and format, from the header alone; the
high-bit-depth conversion works in row blocks and gives the same pixels as converting at once."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from service_support import encode, photo

from service import decode
from service.frontend.decode_gate import (
    BYTES_PER_PIXEL,
    RGB_BYTES_PER_PIXEL,
    WEBP_BYTES_PER_PIXEL,
    decode_capacity,
    decode_cost,
)


def cost_of(data: bytes) -> int:
    h = decode.header_info(data, 10_000_000)
    return decode_cost(h.pixels, h.mode, h.format, h.transparent)


def test_cost_follows_mode_and_format() -> None:
    size = (40, 30)
    rgb = cost_of(encode(photo(size), "PNG"))
    assert rgb == 1200 * RGB_BYTES_PER_PIXEL
    grey16 = cost_of(encode(Image.fromarray(np.full((30, 40), 40_000, np.uint16)), "PNG"))
    floats = cost_of(encode(Image.fromarray(np.full((30, 40), 0.5, np.float32)), "TIFF"))
    rgba = cost_of(encode(photo(size).convert("RGBA"), "PNG"))
    webp = cost_of(encode(photo(size), "WEBP"))
    palette = Image.new("P", size, 0)
    transparent = cost_of(encode(palette, "PNG", transparency=0))
    assert rgb < grey16 < floats < rgba
    assert grey16 == 1200 * BYTES_PER_PIXEL["I;16"] and floats == 1200 * BYTES_PER_PIXEL["F"]
    assert webp == 1200 * WEBP_BYTES_PER_PIXEL and transparent == rgba
    assert decode_capacity(80_000_000) == 80_000_000 * RGB_BYTES_PER_PIXEL


def test_two_40_megapixel_16_bit_images_never_decode_together_by_default() -> None:
    one = decode_cost(40_000_000, "I;16", "TIFF")
    assert 2 * one > decode_capacity(80_000_000) >= decode_cost(40_000_000, "RGB", "JPEG") * 2


def _reference(arr: np.ndarray) -> np.ndarray:
    """The conversion written plainly (whole array at once)."""
    if arr.dtype.kind == "f":
        a = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if float(a.max(initial=0.0)) <= 1.0 else 1.0
        return np.clip(a * scale, 0, 255).astype(np.uint8)
    a = arr.astype(np.int64)
    if arr.dtype.itemsize >= 2 and int(a.max(initial=0)) > 255:
        return (np.clip(a, 0, 65535) // 256).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["uint16", "uint16-low", "int32", "int32-negative", "float01", "float255",
                                  "float-nan-inf"])
def test_blockwise_conversion_equals_the_plain_one(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "_BLOCK_PIXELS", 50)  # many blocks, one of them partial
    rng = np.random.default_rng(0)
    shape = (37, 23)
    arr = {"uint16": rng.integers(0, 65536, shape).astype(np.uint16),
           "uint16-low": rng.integers(0, 200, shape).astype(np.uint16),
           "int32": rng.integers(0, 70_000, shape).astype(np.int32),
           "int32-negative": rng.integers(-500, 200, shape).astype(np.int32),
           "float01": rng.random(shape).astype(np.float32),
           "float255": (rng.random(shape) * 300).astype(np.float32)}.get(kind)
    if arr is None:
        arr = rng.random(shape).astype(np.float32)
        arr[0, 0], arr[5, 5], arr[-1, -1] = np.nan, np.inf, -np.inf
    assert np.array_equal(decode._to_uint8(arr), _reference(arr))


def test_a_16_bit_tiff_decodes_like_before() -> None:
    arr = (np.arange(64 * 48) * 21 % 65536).astype(np.uint16).reshape(48, 64)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "TIFF")
    out = np.asarray(decode.decode_image(buf.getvalue(), 1_000_000))
    assert np.array_equal(out[..., 0], _reference(arr)) and np.array_equal(out[..., 0], out[..., 2])
