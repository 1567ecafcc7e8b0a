"""Fixtures of the gpu tier: two tiny checkpoints (per-image and calibrated) and test photos.

Every test here is marked ``gpu`` and skipped where torch sees no CUDA device (``tests/conftest.py``);
fixtures run only when a test does, so a CPU machine pays nothing for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import create_lifevit, save_checkpoint
from model.training.data import synthetic_class_names

CLASSES = synthetic_class_names()  # so `patchlife eval --synthetic` accepts the checkpoints
BACKBONE = "vit_micro_patch8_64"  # 8x8 patches, 12 blocks (stages at 4/7/10), 64x64 input


def photo(seed: int, size: tuple[int, int] = (80, 64)) -> Image.Image:
    """A textured RGB image; seeds differ in content and in how busy the image is."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin((x + 7 * seed) / (2 + seed % 5))], -1) * 255
    noise = rng.normal(0, 5 + 15 * (seed % 4), base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"per_image": dir, "calibrated": dir}``: one random micro model, saved before and after calibration.

    The classifier weights are scaled up so probabilities differ clearly between images (a
    near-uniform output would make every "equal within tolerance" check pass trivially).
    """
    torch.manual_seed(0)
    model = create_lifevit(BACKBONE, 0.7, num_classes=len(CLASSES)).eval()
    with torch.no_grad():
        model.backbone.head.weight.mul_(15.0)
    root = tmp_path_factory.mktemp("gpu-checkpoints")
    out = {"per_image": save_checkpoint(model, root / "per_image", class_names=CLASSES,
                                        metadata={"name": "micro-per-image"})}
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(64, 3, 64, 64, generator=g) * torch.linspace(0.05, 3, 64)[:, None, None, None]
    model.calibrate(calib)
    out["calibrated"] = save_checkpoint(model, root / "calibrated", class_names=CLASSES,
                                        metadata={"name": "micro-calibrated"})
    return out


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    return [photo(seed) for seed in range(12)]
