"""patchlife's model: life-regression patch slimming on timm ViT/DeiT backbones.

The names below load on first use (PEP 562), so that ``import cli.main`` and the commands'
``--help`` never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backbones import SMALL_CONFIGS, PretrainedUnavailable, create_backbone
    from .checkpoint import LifeViTConfig, create_lifevit, load_checkpoint, save_checkpoint
    from .flops import dense_gflops, slimmed_gflops
    from .lifevit import HeadState, LifeViT
    from .schedule import KeepSchedule, budgets_from_lives, round_up_budget

_HOMES = {
    "backbones": ("SMALL_CONFIGS", "PretrainedUnavailable", "create_backbone"),
    "checkpoint": ("LifeViTConfig", "create_lifevit", "load_checkpoint", "save_checkpoint"),
    "flops": ("dense_gflops", "slimmed_gflops"),
    "lifevit": ("HeadState", "LifeViT"),
    "schedule": ("KeepSchedule", "budgets_from_lives", "round_up_budget"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = [
    "SMALL_CONFIGS", "HeadState", "KeepSchedule", "LifeViT", "LifeViTConfig", "PretrainedUnavailable",
    "budgets_from_lives", "create_backbone", "create_lifevit", "dense_gflops", "load_checkpoint",
    "round_up_budget", "save_checkpoint", "slimmed_gflops",
]


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value
