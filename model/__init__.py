"""patchlife's model: life-regression patch slimming on timm ViT/DeiT backbones."""

from .backbones import SMALL_CONFIGS, PretrainedUnavailable, create_backbone
from .checkpoint import LifeViTConfig, create_lifevit, load_checkpoint, save_checkpoint
from .flops import dense_gflops, slimmed_gflops
from .lifevit import HeadState, LifeViT
from .schedule import KeepSchedule, budgets_from_lives, round_up_budget

__all__ = [
    "SMALL_CONFIGS", "HeadState", "KeepSchedule", "LifeViT", "LifeViTConfig", "PretrainedUnavailable",
    "budgets_from_lives", "create_backbone", "create_lifevit", "dense_gflops", "load_checkpoint",
    "round_up_budget", "save_checkpoint", "slimmed_gflops",
]
