"""Checkpoints that the HTTP benches make on the spot (random weights: speed does not depend on them).

  * ``near-null``: a 224-px LifeViT so small (``vit_tiny_patch16_224`` cut to 4 blocks of width 24,
    2 heads, stages from blocks 1, 2, 3) that the model costs next to nothing: what a request costs
    the server is then HTTP, parsing, decoding and preprocessing (the setup of the issue "A front end
    that can feed a GPU");
  * ``deit-small``: ``deit_small_patch16_224`` as served on a GPU host.

Both are calibrated on photo-like images (:mod:`bench.photos`), so budgets vary from photo to photo
and the tail runs once per bucket, as it does for real uploads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODELS: dict[str, dict[str, Any]] = {
    "near-null": {"backbone": "vit_tiny_patch16_224", "stage_starts": [1, 2, 3], "depth": 4, "embed_dim": 24,
                  "num_heads": 2, "num_classes": 5},
    "deit-small": {"backbone": "deit_small_patch16_224"},
}
CALIBRATION_PHOTOS = 32


def make_checkpoint(kind: str, directory: Path, keep_rate: float = 0.7, seed: int = 0) -> Path:
    """A calibrated checkpoint of ``MODELS[kind]`` in ``directory`` (created); returns its path."""
    import torch

    from model import create_lifevit, save_checkpoint

    spec = dict(MODELS[kind])
    torch.manual_seed(seed)
    model = create_lifevit(spec.pop("backbone"), keep_rate, stage_starts=spec.pop("stage_starts", None),
                           **spec).eval()
    model.calibrate(list(calibration_images(model.backbone).split(8)))
    return save_checkpoint(model, directory, metadata={"name": kind, "description": "bench model, random weights"})


def calibration_images(backbone: Any, n: int = CALIBRATION_PHOTOS) -> Any:
    """``float [n, 3, H, W]``: photo-like images at the backbone's input size, normalised as it expects."""
    import numpy as np
    import torch

    from .photos import photo_image

    h, w = (int(v) for v in backbone.patch_embed.img_size)
    cfg: dict[str, Any] = dict(getattr(backbone, "pretrained_cfg", None) or {})
    mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
    pixels = np.stack([np.asarray(photo_image(w, h, seed=1000 + i)) for i in range(n)])  # uint8 [n, H, W, 3]
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std
