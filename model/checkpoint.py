"""Build a LifeViT from a config, and save/load checkpoints: ``model.safetensors`` + ``config.json``.

Everything needed to rebuild the model without network lives in the JSON: the timm architecture and
its kwargs, the keep schedule, the normalisation mode, class names and preprocessing. Calibration
quantiles are a buffer, so they travel in the safetensors file with the weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from .backbones import create_backbone, preprocess_config
from .layout import CONFIG_FILE, DEFAULT_CHECKPOINT, WEIGHTS_FILE  # noqa: F401  (re-exported)
from .life import Normalization
from .lifevit import LifeViT
from .schedule import KeepSchedule

FORMAT_VERSION = 1


@dataclass
class LifeViTConfig:
    """Serialisable description of a LifeViT (see module docstring)."""

    backbone: str
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    normalization: Normalization = "per_image"
    class_names: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def create_lifevit(backbone: str | VisionTransformer, keep_rate: float = 0.7, *,
                   stage_starts: list[int] | None = None, patch_counts: list[int] | None = None,
                   normalization: Normalization = "per_image", pretrained: bool | str | Path = False,
                   **backbone_kwargs: Any) -> LifeViT:
    """One call from a timm name (or instance) to a LifeViT.

    Args:
        backbone: timm name, a ``SMALL_CONFIGS`` key, or a built ``VisionTransformer``.
        keep_rate: EViT/paper rule for the counts; ignored when ``patch_counts`` is given.
        stage_starts: blocks where stages start (default 4/7/10 for 12 blocks).
        patch_counts: explicit patches kept per stage.
        pretrained: False, True (hub) or a local weights file.
    """
    bb = backbone if isinstance(backbone, VisionTransformer) else \
        create_backbone(backbone, pretrained=pretrained, **backbone_kwargs)
    depth, patches = len(bb.blocks), bb.patch_embed.num_patches
    if patch_counts is not None:
        from .schedule import default_stage_starts
        starts = tuple(stage_starts) if stage_starts is not None else default_stage_starts(depth)
        schedule = KeepSchedule(patches, depth, starts, tuple(patch_counts))
    else:
        schedule = KeepSchedule.from_keep_rate(keep_rate, patches, depth, stage_starts)
    return LifeViT(bb, schedule, normalization, backbone_name=backbone if isinstance(backbone, str) else None,
                   backbone_kwargs=backbone_kwargs)


def config_of(model: LifeViT, class_names: list[str] | None = None,
              metadata: dict[str, Any] | None = None) -> LifeViTConfig:
    name = model.backbone_name
    if name is None:
        raise ValueError("this LifeViT was built from an instance; build it with create_lifevit(name, ...) "
                         "so the checkpoint can record the architecture")
    kwargs = dict(model.backbone_kwargs)
    kwargs.setdefault("num_classes", model.backbone.num_classes)
    names = class_names or [str(i) for i in range(model.backbone.num_classes)]
    return LifeViTConfig(name, kwargs, model.schedule.to_dict(), model.normalization, list(names),
                         preprocess_config(model.backbone), dict(metadata or {}))


def save_checkpoint(model: LifeViT, directory: str | Path, class_names: list[str] | None = None,
                    metadata: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config_of(model, class_names, metadata)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    save_file(state, str(weights))
    # safetensors creates the file 0600; make it as readable as the JSON beside it (0644 under umask 022),
    # so a server running as another user (a container) can load it
    weights.chmod(0o666 & ~_umask())
    body = {"format_version": FORMAT_VERSION, **asdict(cfg)}
    (directory / CONFIG_FILE).write_text(json.dumps(body, indent=2) + "\n")
    return directory


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def build_from_config(cfg: LifeViTConfig) -> LifeViT:
    schedule = KeepSchedule.from_dict(cfg.schedule)
    model = create_lifevit(cfg.backbone, stage_starts=list(schedule.stage_starts),
                           patch_counts=list(schedule.patch_counts), normalization=cfg.normalization,
                           **cfg.backbone_kwargs)
    return model.at(schedule)  # the stored schedule, with its keep_rate for display


def read_config(directory: str | Path) -> LifeViTConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a patchlife checkpoint")
    body = json.loads(path.read_text())
    if body.pop("format_version", None) != FORMAT_VERSION:
        raise ValueError(f"{path} has an unsupported format_version (this patchlife reads {FORMAT_VERSION})")
    return LifeViTConfig(**body)


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[LifeViT, LifeViTConfig]:
    """Rebuild the model from ``config.json`` and load ``model.safetensors``; no network."""
    cfg = read_config(directory)
    model = build_from_config(cfg)
    state = load_file(str(Path(directory) / WEIGHTS_FILE), device="cpu")
    model.life.take_sized_buffers(state)  # sizes depend on the calibration (none, or an older checkpoint: empty)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg
