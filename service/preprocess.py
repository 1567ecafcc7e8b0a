"""Decoded image -> the model's ``uint8 [3, H, W]`` input, in as few passes over the pixels as possible.

timm's eval transform (``engine.transform``) resizes the whole upright RGB image so its shorter
side is ``floor(input / crop_pct)``, then crops the centre. For the usual configuration (``center``
crop mode, a square input, bilinear or bicubic) this module gets the same pixels with one Pillow
resize of the stored image: the centre crop becomes a ``box`` of the resize (Pillow computes only
the kept output pixels, with the same filter taps as resize-then-crop), the EXIF rotation is applied
to the 224x224 result instead of the full photo, and the conversion to RGB of a grey image too.

``view_geometry`` is the one home of that arithmetic; the GPU decoder (:mod:`service.runtime.gpu_decode`)
resizes and crops by the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import PILToTensor
from torchvision.transforms.functional import pil_to_tensor

from .api_errors import BadImage
from .decode import MAX_ASPECT, UPRIGHT, Decoded, limit_aspect, to_rgb, upright
from .transforms import uint8_transform

Box = tuple[int, int, int, int]  # left, top, right, bottom
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that exchange width and height


def resize_side(preprocess: dict[str, Any]) -> int | None:
    """The shorter side timm's eval transform resizes to (what a JPEG may be decoded down to)."""
    size, pct = preprocess.get("input_size"), preprocess.get("crop_pct") or 0.875
    return math.floor(min(size[-2:]) / pct) if size else None


def fast_config(preprocess: dict[str, Any]) -> bool:
    """Whether ``view_geometry`` reproduces this configuration's timm transform (else: use timm's)."""
    size = preprocess.get("input_size") or []
    return (len(size) >= 2 and size[-1] == size[-2] and preprocess.get("crop_mode", "center") in (None, "center")
            and preprocess.get("interpolation", "bilinear") in RESAMPLE)


def box_is_exact(preprocess: dict[str, Any], width: int, height: int) -> bool:
    """Whether ``model_input``'s one box resize gives timm's values bit for bit on an upright
    ``width x height`` image. True for a square image when the resize side is a power of two: every
    box coordinate and every filter centre is then a dyadic rational that both paths compute exactly,
    so Pillow derives the same taps and weights. Elsewhere the two can round apart (a few levels,
    more on noise: ``tests/service/frontend/test_preprocess.py``), so raw pixels, which have always
    gone through timm's transform, keep it there."""
    side = resize_side(preprocess)
    return width == height and fast_config(preprocess) and side is not None and side > 0 and side & (side - 1) == 0


@dataclass(frozen=True)
class ViewGeometry:
    """Where the model's view lies in a stored (not yet rotated) image, all in stored-image axes.

    region:  the ``MAX_ASPECT`` crop of the stored image (the whole image for ordinary photos);
    resized: the size ``region`` is resized to (shorter side ``resize_side``);
    crop:    the centre window of ``resized`` the model sees;
    orientation: EXIF orientation to apply to that window afterwards.
    """

    region: Box
    resized: tuple[int, int]
    crop: Box
    orientation: int

    def source_box(self) -> tuple[float, float, float, float]:
        """``crop`` in stored-image pixels: the ``box`` of a single Pillow resize to the crop's size."""
        left, top, right, bottom = self.region
        sx, sy = (right - left) / self.resized[0], (bottom - top) / self.resized[1]
        cl, ct, cr, cb = self.crop
        return left + cl * sx, top + ct * sy, left + cr * sx, top + cb * sy

    @property
    def output(self) -> tuple[int, int]:
        """The crop's (width, height) before rotation."""
        return self.crop[2] - self.crop[0], self.crop[3] - self.crop[1]


def view_geometry(width: int, height: int, orientation: int, preprocess: dict[str, Any]) -> ViewGeometry:
    """The geometry for a stored ``width x height`` image: computed upright (as decode_image + timm
    see it: aspect limit, shorter side to ``resize_side``, centre crop), then mapped to stored axes."""
    swap = orientation in SWAPS_AXES
    uw, uh = (height, width) if swap else (width, height)
    region = _aspect_region(uw, uh)
    rw, rh = region[2] - region[0], region[3] - region[1]
    side, out = resize_side(preprocess) or min(rw, rh), int(preprocess["input_size"][-1])
    short, long = min(rw, rh), max(rw, rh)
    new_long = int(side * long / short)  # torchvision's Resize(int) rounding
    resized = (side, new_long) if rw <= rh else (new_long, side)
    left, top = int(round((resized[0] - out) / 2.0)), int(round((resized[1] - out) / 2.0))
    crop = (left, top, left + out, top + out)
    if not swap and orientation == 1:
        return ViewGeometry(region, resized, crop, orientation)
    stored_size = (resized[1], resized[0]) if swap else resized
    return ViewGeometry(_to_stored(region, uw, uh, orientation), stored_size, _to_stored(crop, *resized, orientation),
                        orientation)


def _aspect_region(w: int, h: int) -> Box:
    """``decode.limit_aspect``'s crop as a box (the same arithmetic, one test keeps them equal)."""
    if w > h * MAX_ASPECT:
        keep = max(1, round(h * MAX_ASPECT))
        return (w - keep) // 2, 0, (w - keep) // 2 + keep, h
    if h > w * MAX_ASPECT:
        keep = max(1, round(w * MAX_ASPECT))
        return 0, (h - keep) // 2, w, (h - keep) // 2 + keep
    return 0, 0, w, h


def _to_stored(box: Box, uw: int, uh: int, orientation: int) -> Box:
    """A box in the upright image (``uw x uh``) -> the same pixels in the stored image's axes."""
    def point(x: int, y: int) -> tuple[int, int]:
        return {2: (uw - x, y), 3: (uw - x, uh - y), 4: (x, uh - y), 5: (y, x),
                6: (y, uw - x), 7: (uh - y, uw - x), 8: (uh - y, x)}[orientation]
    (x0, y0), (x1, y1) = point(box[0], box[1]), point(box[2], box[3])
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def model_input(decoded: Decoded, preprocess: dict[str, Any], fallback: Callable[[Image.Image], torch.Tensor],
                source: str = "image") -> torch.Tensor:
    """``uint8 [3, H, W]`` as ``fallback`` (timm's transform on the upright RGB image) computes it,
    in one resize of the stored pixels when ``fast_config`` allows. BadImage (400) for a mode Pillow
    cannot convert."""
    im = decoded.image
    if not fast_config(preprocess):
        return fallback(limit_aspect(_rgb(upright(decoded), source)))
    if im.mode not in ("RGB", "L"):  # palette, alpha, CMYK, high bit depth: converted at full size first
        im = _rgb(im, source)
    geo = view_geometry(im.width, im.height, decoded.orientation, preprocess)
    out = im.resize(geo.output, RESAMPLE[preprocess.get("interpolation", "bilinear")], box=geo.source_box())
    if (method := UPRIGHT.get(decoded.orientation)) is not None:
        out = out.transpose(method)
    return planar(out if out.mode == "RGB" else out.convert("RGB"))


def planar(im: Image.Image) -> torch.Tensor:
    """An RGB image -> ``uint8 [3, H, W]``, contiguous: ``pil_to_tensor``'s values, in a quarter of its time.

    ``pil_to_tensor`` copies the pixels out interleaved and returns a strided view, which the API
    process then transposes byte by byte into its shared-memory slot (together about 140 us for
    224 x 224); Pillow's raw packer writes one band at a time (about 8 us each), so the slot's copy is a
    plain ``memcpy``."""
    if im.mode != "RGB":
        return pil_to_tensor(im)
    width, height = im.size
    data = bytearray(b"".join([im.tobytes("raw", band) for band in "RGB"]))  # bytearray: a writable tensor
    return torch.frombuffer(data, dtype=torch.uint8).view(3, height, width)


def _rgb(im: Image.Image, source: str) -> Image.Image:
    try:
        return to_rgb(im)
    except Exception as exc:  # a mode Pillow cannot convert: the file's fault
        raise BadImage(f"{source}: could not decode the image ({type(exc).__name__}: {exc})") from None


class Preprocessor:
    """The served model's preprocessing (from its card's timm config): decoded image -> ``uint8 [3, H, W]``.

    timm's transform is built once, for the configurations ``fast_config`` does not cover and for raw
    pixel arrays (/v2); normalisation is the model process's (``service/transforms.py``).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.transform = uint8_transform(config)[0]

    def model_input(self, decoded: Decoded, source: str = "image") -> torch.Tensor:
        return model_input(decoded, self.config, self.pil, source)

    def upright(self, image: Image.Image) -> torch.Tensor:
        """An upright image (raw pixels: no EXIF, no aspect crop pending) -> timm's values: by one box
        resize where that is the same (``box_is_exact``: a square image and, say, crop_pct 0.875 at
        224 px, a 256-px resize side; a quarter fewer output pixels, no crop copy), else by :meth:`pil`."""
        if image.mode == "RGB" and box_is_exact(self.config, image.width, image.height):
            return model_input(Decoded(image, 1), self.config, self.pil)
        return self.pil(image)

    def pil(self, image: Image.Image) -> torch.Tensor:
        """An upright PIL image -> the model's input, through timm's transform (an RGB image as it is:
        ``convert`` would only copy it)."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        *geometry, last = self.transform.transforms
        if not isinstance(last, PILToTensor):
            return self.transform(rgb)  # type: ignore[no-any-return]
        for step in geometry:  # timm's resize and crop, then ``planar`` for its PILToTensor (same values)
            rgb = step(rgb)
        return planar(rgb)
