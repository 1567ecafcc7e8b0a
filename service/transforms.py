"""timm's eval transform split where the processes split: geometry on the CPU, normalisation on the device.

Shared by the front end (which resizes and crops, to ``uint8``) and the runtime (which scales and
normalises on the model's device): a preprocessed image crosses processes as a quarter of the bytes.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.data import create_transform
from torchvision.transforms import Compose, Normalize, PILToTensor


def uint8_transform(preprocess: dict[str, Any]) -> tuple[Compose, torch.Tensor, torch.Tensor]:
    """timm's eval transform split in two: resize/crop to ``uint8 [3, H, W]`` on the CPU, and the
    (mean, std) the device applies after scaling to [0, 1] (what ToTensor + Normalize did)."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    pre: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess.items() if k in keys}
    full = create_transform(**pre)
    geometric = [t for t in full.transforms if not isinstance(t, Normalize) and "ToTensor" not in type(t).__name__]
    norm = next(t for t in full.transforms if isinstance(t, Normalize))
    return Compose([*geometric, PILToTensor()]), torch.as_tensor(norm.mean), torch.as_tensor(norm.std)
