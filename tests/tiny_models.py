"""The tests' one recipe for a tiny real checkpoint (imported by name: ``tests`` is on pytest's pythonpath)."""

from __future__ import annotations

from pathlib import Path

import torch

from model import create_lifevit, save_checkpoint


def tiny_checkpoint(path: Path, class_names: list[str], name: str, backbone: str = "vit_nano_patch8_32",
                    calibration: torch.Tensor | None = None, seed: int = 0, description: str = "") -> Path:
    """A LifeViT of ``backbone`` (default: 6 blocks, 4x4 patches of a 32x32 input) with random weights,
    calibrated on ``calibration`` images (default: 64 standard-normal ones), so budgets vary per image."""
    torch.manual_seed(seed)
    model = create_lifevit(backbone, keep_rate=0.7, num_classes=len(class_names)).eval()
    size = int(model.backbone.patch_embed.img_size[0])
    model.calibrate(torch.randn(64, 3, size, size) if calibration is None else calibration)
    meta = {"name": name, **({"description": description} if description else {})}
    return save_checkpoint(model, path, class_names=class_names, metadata=meta)
