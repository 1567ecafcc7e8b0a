"""Batched JPEG decoding on the model's device: list of encoded images -> ``[B, 3, H, W]`` model input.

On CUDA, ``torchvision.io.decode_jpeg(list, device="cuda")`` decodes a whole batch with nvJPEG; the
resize, centre crop, EXIF rotation and mean/std normalisation then run on the device, by the numbers
of :func:`service.frontend.preprocess.view_geometry` (the CPU path's geometry). Images of the same stored
size and orientation are resized in one call. The same code runs with ``device="cpu"`` (torchvision's
libjpeg-turbo), which is how CI tests it.

Per image, the CPU path (:mod:`service.frontend.decode` + :mod:`service.frontend.preprocess`) takes over for what
nvJPEG should not or cannot decode, counted in ``BatchDecoder.fallbacks`` by reason:

  * ``format``: not a JPEG, or a CMYK/YCCK JPEG (Pillow handles Adobe's inverted CMYK);
  * ``refused``: torchvision raised on it (a batch that fails is retried image by image first).

Headers are read by Pillow first, so the pixel limit (413) and unreadable files (400) are the same
errors as on the CPU path. The pixels differ slightly from the CPU path's (a full-size decode resized
in float on the device, against a DCT-scaled decode resized by Pillow in 8-bit): docs/api.md gives
the measured agreement.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import InterpolationMode

from .decode import decode_stored, exif_orientation, open_header
from .preprocess import ViewGeometry, fast_config, model_input, resize_side, view_geometry

DecodeMode = Literal["auto", "cpu", "gpu"]
_TORCH_ORIENT = {  # EXIF orientation -> [.., H, W] tensor op equal to decode.UPRIGHT's Pillow transpose
    2: lambda x: x.flip(-1), 3: lambda x: x.flip(-2, -1), 4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-1, -2), 6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: torch.rot90(x, 2, (-2, -1)).transpose(-1, -2), 8: lambda x: torch.rot90(x, 1, (-2, -1))}


def decode_on(mode: str, device: torch.device) -> Literal["cpu", "gpu"]:
    """Where images are decoded for a model on ``device`` (PATCHLIFE_DECODE): auto is the GPU when the
    model runs on CUDA; gpu without CUDA is an error."""
    if mode == "gpu" and device.type != "cuda":
        raise ValueError(f"PATCHLIFE_DECODE=gpu needs the model on a CUDA device (it is on {device.type})")
    return "gpu" if mode == "gpu" or (mode == "auto" and device.type == "cuda") else "cpu"


class BatchDecoder:
    """Encoded images -> the model's input on ``device``, in batches.

    Args:
        preprocess: the checkpoint's preprocessing config (``engine.config.preprocess``).
        device: where to decode and preprocess; ``cuda`` uses nvJPEG.
        max_pixels: the per-image pixel limit (PATCHLIFE_MAX_IMAGE_PIXELS).
    """

    def __init__(self, preprocess: dict[str, Any], device: torch.device | str, max_pixels: int = 40_000_000) -> None:
        if not fast_config(preprocess):
            raise ValueError(f"no device preprocessing for {preprocess}: only centre crops of a square input, "
                             "bilinear or bicubic")
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self.side = int(preprocess["input_size"][-1])
        self.mode = InterpolationMode(preprocess.get("interpolation", "bilinear")).value
        mean = torch.tensor(preprocess.get("mean", IMAGENET_DEFAULT_MEAN), dtype=torch.float32)
        std = torch.tensor(preprocess.get("std", IMAGENET_DEFAULT_STD), dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, -1, 1, 1).to(self.device)
        self.fallbacks: Counter[str] = Counter()  # images decoded on the CPU, by reason
        self.decoded = 0                           # images decoded by torchvision on ``device``

    def __call__(self, images: Sequence[bytes], sources: Sequence[str] | None = None) -> torch.Tensor:
        """``float32 [B, 3, H, W]`` on the device, mean/std-normalised."""
        return self.normalize(self.pixels(images, sources))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, 3, H, W]`` -> (x / 255 - mean) / std as one multiply-add."""
        return pixels.float() * self._scale + self._shift

    def pixels(self, images: Sequence[bytes], sources: Sequence[str] | None = None) -> torch.Tensor:
        """``uint8 [B, 3, H, W]`` on the device: what the CPU path's ``model_input`` gives, stacked.
        Raises the CPU path's BadImage (400) / TooManyPixels (413) for a bad image."""
        names = list(sources) if sources is not None else [f"images[{i}]" for i in range(len(images))]
        out = torch.empty((len(images), 3, self.side, self.side), dtype=torch.uint8, device=self.device)
        orientation: dict[int, int] = {}
        for i, data in enumerate(images):
            header = open_header(data, self.max_pixels, names[i])
            if header.format in ("JPEG", "MPO") and header.mode in ("RGB", "L"):
                orientation[i] = exif_orientation(header)
            else:
                self._on_cpu(out, i, data, names[i], "format")
        decoded = self._decode([images[i] for i in orientation])
        groups: dict[tuple[int, int, int], list[tuple[int, torch.Tensor]]] = {}
        for i, tensor in zip(orientation, decoded, strict=True):
            if tensor is None:
                self._on_cpu(out, i, images[i], names[i], "refused")
                continue
            groups.setdefault((tensor.shape[-1], tensor.shape[-2], orientation[i]), []).append((i, tensor))
        for (w, h, o), members in groups.items():
            geo = view_geometry(w, h, o, self.preprocess)
            out[[i for i, _ in members]] = self._view(torch.stack([t for _, t in members]), geo)
        self.decoded += sum(len(m) for m in groups.values())
        return out

    def _decode(self, images: list[bytes]) -> list[torch.Tensor | None]:
        """torchvision's decode of the whole list; when the batch fails, each image alone (None: refused)."""
        if not images:
            return []
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in images]
        with warnings.catch_warnings():  # torchvision 0.29 announces TorchCodec on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                pass
            out: list[torch.Tensor | None] = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def _view(self, batch: torch.Tensor, geo: ViewGeometry) -> torch.Tensor:
        """``uint8 [N, 3, h, w]`` stored images of one size -> ``uint8 [N, 3, side, side]``: aspect crop,
        resize (antialiased, Pillow's filters), centre crop, EXIF rotation."""
        left, top, right, bottom = geo.region
        x = batch[..., top:bottom, left:right].float()
        rw, rh = geo.resized
        if (rw, rh) != (right - left, bottom - top):
            x = F.interpolate(x, size=(rh, rw), mode=self.mode, antialias=True, align_corners=False)
        cl, ct, cr, cb = geo.crop
        x = x[..., ct:cb, cl:cr]
        if (turn := _TORCH_ORIENT.get(geo.orientation)) is not None:
            x = turn(x)
        return x.round_().clamp_(0, 255).to(torch.uint8)

    def _on_cpu(self, out: torch.Tensor, i: int, data: bytes, source: str, reason: str) -> None:
        decoded = decode_stored(data, self.max_pixels, min_side=resize_side(self.preprocess), source=source)
        out[i] = model_input(decoded, self.preprocess, _no_fallback, source).to(self.device)
        self.fallbacks[reason] += 1


def _no_fallback(_image: Any) -> torch.Tensor:
    raise AssertionError("fast_config was checked in BatchDecoder.__init__")
