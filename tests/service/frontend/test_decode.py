"""service/decode.py: every image kind decodes to upright 8-bit RGB; bad bytes get typed errors."""

from __future__ import annotations

import pytest
from PIL import Image
from service_support import (
    BLUE,
    GREEN,
    RED,
    WHITE,
    all_kinds,
    encode,
    gif_two_frames,
    gray16,
    jpeg_with_orientation,
    palette_with_transparency,
    photo,
    png_bomb,
    png_rgb16,
    rgba_half_transparent,
)

from service.decode import MAX_ASPECT, check_media_type, decode_image, limit_aspect
from service.frontend.errors import BadImage, TooManyPixels, UnsupportedMediaType

LIMIT = 40_000_000


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", sorted(all_kinds()))
def test_every_kind_decodes_to_rgb(name: str) -> None:
    im = decode_image(all_kinds()[name], LIMIT)
    assert im.mode == "RGB"
    w, h = im.size
    assert w >= 1 and h >= 1 and max(w, h) <= MAX_ASPECT * min(w, h) + 1
    im.load()


def test_exif_orientation_is_applied() -> None:
    # stored 40x20 with red left / blue right; orientation 6 = displayed rotated 90 degrees clockwise
    im = decode_image(jpeg_with_orientation(6), LIMIT)
    assert im.size == (20, 40)
    assert close(im.getpixel((10, 5)), RED) and close(im.getpixel((10, 35)), BLUE)
    im = decode_image(jpeg_with_orientation(3), LIMIT)  # upside down: red ends on the right
    assert im.size == (40, 20) and close(im.getpixel((35, 10)), RED)


def test_cmyk_jpeg_colours() -> None:
    im = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95), LIMIT)
    r, g, b = im.getpixel((8, 8))
    assert r > 200 and g < 40 and b < 40


def test_transparency_composited_over_white() -> None:
    im = decode_image(rgba_half_transparent(), LIMIT)
    assert im.getpixel((4, 8)) == WHITE and im.getpixel((24, 8)) == GREEN
    im = decode_image(palette_with_transparency(), LIMIT)
    assert im.getpixel((2, 8)) == WHITE and im.getpixel((12, 8)) == GREEN


def test_high_bit_depth_is_scaled_not_clipped() -> None:
    assert close(decode_image(gray16(30_000), LIMIT).getpixel((5, 5)), (117, 117, 117), 1)
    assert close(decode_image(png_rgb16(4, 4, (40_000, 20_000, 10_000)), LIMIT).getpixel((1, 1)),
                 (156, 78, 39), 2)
    floats = encode(Image.new("F", (4, 4), 0.5), "TIFF")
    assert close(decode_image(floats, LIMIT).getpixel((1, 1)), (127, 127, 127), 1)


def test_gif_uses_first_frame() -> None:
    assert close(decode_image(gif_two_frames(), LIMIT).getpixel((5, 5)), RED, 30)


def test_extreme_aspect_is_centre_cropped() -> None:
    im = decode_image(encode(Image.new("RGB", (3000, 2), BLUE), "PNG"), LIMIT)
    assert im.size == (8, 2)
    strip = Image.new("RGB", (10, 1000))
    strip.paste(RED, (0, 480, 10, 520))
    assert limit_aspect(strip).size == (10, 40)
    assert limit_aspect(strip).getpixel((5, 20)) == RED  # the centre survives
    assert limit_aspect(Image.new("RGB", (30, 10))).size == (30, 10)


def test_jpeg_draft_decodes_small_but_covers_min_side() -> None:
    big = encode(photo((1600, 1200)), "JPEG", quality=85)
    im = decode_image(big, LIMIT, min_side=100)
    assert 100 <= min(im.size) < 1200 and im.size[0] * 3 == im.size[1] * 4


def test_pixel_limit_from_header_only() -> None:
    with pytest.raises(TooManyPixels, match=f"2,500,000,000 pixels, larger than the {LIMIT:,}-pixel limit"):
        decode_image(png_bomb(), LIMIT)
    with pytest.raises(TooManyPixels):
        decode_image(encode(photo((20, 20)), "PNG"), 399)
    decode_image(encode(photo((20, 20)), "PNG"), 400)
    # beyond Pillow's own guard (2 x 89M pixels) with a lenient limit of ours: still a 413 error
    with pytest.raises(TooManyPixels):
        decode_image(png_bomb(20_000, 20_000), 10**12)


@pytest.mark.parametrize("data", [
    b"", b"hello, world", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
    encode(photo(), "JPEG")[:300], encode(photo(), "PNG")[:-40], encode(photo(), "PPM"),
    encode(photo((16, 16)), "ICO"), b"GIF89a" + b"\xff" * 20,
], ids=["empty", "text", "png-magic-only", "jpeg-truncated", "png-truncated", "ppm", "ico", "gif-garbage"])
def test_undecodable_bytes_are_bad_image(data: bytes) -> None:
    with pytest.raises(BadImage):
        decode_image(data, LIMIT, source="files[0]")


def test_error_messages_name_the_source() -> None:
    with pytest.raises(BadImage, match=r"^images\[2\]: "):
        decode_image(b"junk", LIMIT, source="images[2]")


@pytest.mark.parametrize("declared", [None, "", "image/png", "image/jpeg; q=1", "IMAGE/WEBP",
                                      "application/octet-stream"])
def test_accepted_media_types(declared: str | None) -> None:
    check_media_type(declared, "file")


@pytest.mark.parametrize("declared", ["text/plain", "application/pdf", "video/mp4", "application/json"])
def test_non_image_media_types_are_415(declared: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        check_media_type(declared, "files[0]")
    assert info.value.status == 415
