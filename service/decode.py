"""Image bytes -> an RGB PIL image the engine can preprocess, or a typed error.

Rules (documented in docs/api.md):
  * A declared content type (of the body, of a multipart part, or of a base64 data URL) must be
    ``image/*`` or ``application/octet-stream`` or absent; anything else is 415. Which image format
    it is comes from the bytes, never from the declaration.
  * Bytes that are not a decodable JPEG/PNG/GIF/BMP/TIFF/WebP (unknown format, truncated, corrupt)
    are 400. Only these Pillow plugins are tried, to keep the attack surface small.
  * The pixel count is checked from the header, before any pixel is decoded: over the limit is 413.
  * Baseline and progressive JPEGs in YCbCr or grey go through libjpeg-turbo (simplejpeg), decoded at
    the smallest DCT scale (M/8, used only at 1/2 or below) that covers the side the preprocessing
    resizes to; CMYK JPEGs, every other format, and any JPEG simplejpeg refuses go through Pillow
    (JPEGs with ``draft``).
  * EXIF orientation is applied; the first frame of animations and multi-page files is used (a
    multi-page TIFF whose first page cannot be read is refused as such, not as "not an image"); CMYK,
    palette, 1-bit, 16/32-bit integer and float images become 8-bit RGB (high bit depths scaled,
    not clipped); transparency is composited over white.
  * Extreme aspect ratios are centre-cropped to at most ``MAX_ASPECT``:1 before preprocessing. The
    backbone's centre-crop preprocessing only looks at the central square anyway, so this changes
    nothing the model sees and keeps a 1 x 40M-pixel strip from being resized to gigapixels.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import simplejpeg
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from .api_errors import BadImage, TooManyPixels, UnsupportedMediaType

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")  # JPEG includes multi-picture (MPO) files
ACCEPTED_NON_IMAGE_TYPES = ("application/octet-stream",)
MAX_ASPECT = 4.0
# Our own pixel limit (settings.max_image_pixels) is checked right after the header is read; Pillow's
# global warning at 89M pixels would only add noise to the log.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
Image.init()  # register every plugin now: ``Image.open(formats=...)`` looks them up by name
# EXIF orientation (tag 0x0112) -> the transpose that makes the stored image upright (as ImageOps.exif_transpose)
UPRIGHT: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90}


def check_media_type(declared: str | None, source: str) -> None:
    """415 unless ``declared`` (a Content-Type value or None) could be an image."""
    if declared is None or not declared.strip():
        return
    main = declared.split(";", 1)[0].strip().lower()
    if main.startswith("image/") or main in ACCEPTED_NON_IMAGE_TYPES:
        return
    raise UnsupportedMediaType(f"{source}: content type {main!r} is not an image; send image/* "
                               "(JPEG, PNG, GIF, BMP, TIFF or WebP) or application/octet-stream")


def image_pixels(data: bytes, max_pixels: int, *, source: str = "image") -> int:
    """Width x height from the header alone (no pixel decoded); the same 400/413 as ``decode_image``."""
    return header_info(data, max_pixels, source=source).pixels


@dataclass(frozen=True)
class HeaderInfo:
    """What the header says, before any pixel is decoded: enough to price the decode."""

    pixels: int
    mode: str
    format: str | None
    transparent: bool  # a palette image with a transparent colour (decoded through RGBA)


def header_info(data: bytes, max_pixels: int, *, source: str = "image") -> HeaderInfo:
    """The header's size, mode and format; the same 400/413 as ``decode_image``."""
    im = open_header(data, max_pixels, source)
    width, height = im.size
    return HeaderInfo(int(width) * int(height), im.mode, im.format, im.mode == "P" and "transparency" in im.info)


def open_header(data: bytes, max_pixels: int, source: str) -> Image.Image:
    """``Image.open`` (header only) with the format allow-list and the pixel limit checked."""
    if not data:
        raise BadImage(f"{source}: empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(too_many_pixels(source, max_pixels, bomb=exc)) from None
    except UnidentifiedImageError:
        _refuse_multipage_tiff(data, source, "Pillow does not recognise it")
        raise BadImage(f"{source}: not a supported image (JPEG, PNG, GIF, BMP, TIFF or WebP)") from None
    except Exception as exc:  # Pillow raises many types on crafted headers
        _refuse_multipage_tiff(data, source, f"{type(exc).__name__}: {exc}")
        raise BadImage(f"{source}: unreadable image header ({type(exc).__name__}: {exc})") from None
    width, height = im.size
    if width * height > max_pixels:
        raise TooManyPixels(too_many_pixels(source, max_pixels, (width, height)))
    if width < 1 or height < 1:
        raise BadImage(f"{source}: image has no pixels ({width}x{height})")
    return im


def too_many_pixels(source: str, max_pixels: int, size: tuple[int, int] | None = None,
                    bomb: Exception | None = None) -> str:
    """The 413 message: the size (from the header, or from Pillow's own guard) and the limit in words."""
    counted = re.search(r"\((\d+) pixels\)", str(bomb)) if bomb is not None else None
    what = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, " if size else (
        f"{int(counted.group(1)):,} pixels, " if counted else "")
    return (f"{source}: {what}larger than the {max_pixels:,}-pixel limit of this server "
            "(PATCHLIFE_MAX_IMAGE_PIXELS); send a smaller image")


def tiff_pages(data: bytes, most: int = 2) -> int:
    """How many pages (IFDs) a TIFF or BigTIFF has, counted up to ``most`` from the offsets alone;
    0 when ``data`` is not a TIFF."""
    endian: Literal["little", "big"]
    if data[:2] == b"II":
        endian = "little"
    elif data[:2] == b"MM":
        endian = "big"
    else:
        return 0
    magic = int.from_bytes(data[2:4], endian)
    big = magic == 43
    if magic not in (42, 43) or len(data) < 8:
        return 0
    off_size, count_size, entry_size = (8, 8, 20) if big else (4, 2, 12)
    start = 8 if big else 4
    offset, pages = int.from_bytes(data[start:start + off_size], endian), 0
    while offset and pages < most and offset + count_size <= len(data):
        pages += 1
        entries = int.from_bytes(data[offset:offset + count_size], endian)
        at = offset + count_size + entries * entry_size
        offset = int.from_bytes(data[at:at + off_size], endian) if at + off_size <= len(data) else 0
    return pages


def _refuse_multipage_tiff(data: bytes, source: str, why: str) -> None:
    """A multi-page TIFF that failed to open or decode: say so, rather than "not an image"."""
    if tiff_pages(data) > 1:
        raise BadImage(f"{source}: multi-page TIFF is not supported: its first page could not be read ({why}); "
                       "save the page you mean as a single-page image (PNG or JPEG)")


@dataclass
class Decoded:
    """Pixels as stored in the file: EXIF orientation not applied yet, mode as decoded (RGB or L from
    libjpeg-turbo; any Pillow mode otherwise), so that a caller can rotate and convert after shrinking."""

    image: Image.Image
    orientation: int  # EXIF orientation 1-8; 1 is upright


def decode_stored(data: bytes, max_pixels: int, *, min_side: int | None = None,
                  source: str = "image") -> Decoded:
    """Decode ``data`` as stored; see ``decode_image`` for the arguments and errors."""
    im = open_header(data, max_pixels, source)
    try:
        fast = _turbo(data, im, min_side)
        if fast is not None:
            return Decoded(fast, exif_orientation(im))
        if min_side and isinstance(im, JpegImagePlugin.JpegImageFile):
            im.draft(im.mode, (min_side, min_side))
        im.load()
        return Decoded(im, exif_orientation(im))  # after load: a PNG's eXIf chunk may follow its pixels
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(too_many_pixels(source, max_pixels, bomb=exc)) from None
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, ValueError, ...
        _refuse_multipage_tiff(data, source, f"{type(exc).__name__}: {exc}")
        raise BadImage(f"{source}: could not decode the image ({type(exc).__name__}: {exc})") from None


def device_decodable(image_format: str | None, mode: str) -> bool:
    """A YCbCr or grey JPEG (by its header): what the model process decodes in batches on its device
    when PATCHLIFE_DECODE says so, and what libjpeg-turbo decodes here; CMYK JPEGs and every other
    format are Pillow's."""
    return image_format in ("JPEG", "MPO") and mode in ("RGB", "L")


def _turbo(data: bytes, header: Image.Image, min_side: int | None) -> Image.Image | None:
    """A YCbCr or grey JPEG decoded by libjpeg-turbo at the smallest M/8 scale covering ``min_side``;
    None for anything else, or when libjpeg-turbo refuses the file (Pillow then decodes it, or says why not)."""
    if not device_decodable(header.format, header.mode):
        return None
    # scale only by 2 or more: a 7/8 IDCT costs nearly a full decode and blurs more than the resize would
    side = min_side if min_side and min(header.size) >= 2 * min_side else 0
    try:
        arr = simplejpeg.decode_jpeg(data, "RGB" if header.mode == "RGB" else "GRAY", min_height=side,
                                     min_width=side)
    except ValueError:
        return None
    return Image.fromarray(arr if arr.shape[2] == 3 else arr[:, :, 0])


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag, 1 when absent or out of range."""
    value = im.getexif().get(0x0112, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def decode_image(data: bytes, max_pixels: int, *, min_side: int | None = None,
                 source: str = "image") -> Image.Image:
    """Decode ``data`` into an 8-bit RGB image, upright, aspect ratio at most ``MAX_ASPECT``.

    Args:
        max_pixels: width x height limit checked from the header (decompression bombs).
        min_side: the shorter side the caller will resize to; JPEGs are then decoded at the
            smallest DCT scale that still covers it, which is much faster for photos and changes
            nothing visible after the resize.
        source: how the caller names this image in error messages (``files[1]``).
    Raises:
        BadImage (400), TooManyPixels (413).
    """
    return upright_rgb(decode_stored(data, max_pixels, min_side=min_side, source=source), source)


def upright_rgb(decoded: Decoded, source: str = "image") -> Image.Image:
    """``decode_image``'s result from a ``decode_stored`` one: upright, RGB, aspect limited."""
    try:
        rgb = to_rgb(upright(decoded))
    except Exception as exc:  # a mode Pillow cannot convert
        raise BadImage(f"{source}: could not decode the image ({type(exc).__name__}: {exc})") from None
    return limit_aspect(rgb)


def upright(decoded: Decoded) -> Image.Image:
    """The decoded image turned as its EXIF orientation says."""
    method = UPRIGHT.get(decoded.orientation)
    return decoded.image if method is None else decoded.image.transpose(method)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; see the module docstring for the rules."""
    if im.mode in ("RGB",):
        return im
    if im.mode.startswith(("I", "F")):
        return Image.fromarray(_to_uint8(np.asarray(im)), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK (Adobe-inverted handled by Pillow), YCbCr, LAB, HSV, RGBX


_BLOCK_PIXELS = 1 << 20  # rows converted at a time by _to_uint8: the int64/float temporaries stay ~8 MB


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """High-bit-depth grey ``[H, W]`` -> uint8, scaling by the type's range instead of clipping.

    Row blocks at a time, so that the wide temporaries (int64, float32) cost a few MB instead of
    8 bytes per pixel of a 40-megapixel image (the decode budget charges what is left, see
    ``service/frontend/decode_gate.py``)."""
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, _BLOCK_PIXELS // max(1, arr.shape[-1]))
    blocks = [slice(r, r + rows) for r in range(0, arr.shape[0], rows)]
    if arr.dtype.kind == "f":
        def finite(block: np.ndarray) -> np.ndarray:
            return np.nan_to_num(block.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)

        top = max((float(finite(arr[b]).max(initial=0.0)) for b in blocks), default=0.0)
        scale = 255.0 if top <= 1.0 else 1.0  # [0, 1] floats or [0, 255] floats
        for b in blocks:
            out[b] = np.clip(finite(arr[b]) * scale, 0, 255).astype(np.uint8)
        return out
    wide = arr.dtype.itemsize >= 2 and int(arr.max(initial=0)) > 255  # 16-bit data (also in 32-bit "I")
    for b in blocks:
        a = arr[b].astype(np.int64)
        out[b] = (np.clip(a, 0, 65535) // 256 if wide else np.clip(a, 0, 255)).astype(np.uint8)
    return out


def limit_aspect(im: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Centre-crop the long side so that long / short <= ``max_aspect``."""
    w, h = im.size
    if w > h * max_aspect:
        keep = max(1, round(h * max_aspect))
        left = (w - keep) // 2
        return im.crop((left, 0, left + keep, h))
    if h > w * max_aspect:
        keep = max(1, round(w * max_aspect))
        top = (h - keep) // 2
        return im.crop((0, top, w, top + keep))
    return im
