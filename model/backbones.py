"""timm backbones: by name or instance, pretrained from the hub or a local file, plus small CPU configs."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import timm
from timm.models.vision_transformer import VisionTransformer

# Small ViTs for CPU training (12 blocks so lifespans have room). Passed to timm's own
# VisionTransformer through create_model's kwargs, so every timm feature stays available.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_micro_patch8_64": dict(base="vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=128,
                                depth=12, num_heads=4, mlp_ratio=3.0),
    # the heavier sibling of the default model (same input and depth, 2x wider, 4x the compute)
    "vit_wide_patch8_64": dict(base="vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=256,
                               depth=12, num_heads=8, mlp_ratio=4.0),
    "vit_nano_patch8_32": dict(base="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                               depth=6, num_heads=2, mlp_ratio=2.0),
}


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights could be found neither on the hub nor in a local file."""


def backbone_spec(name: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """Resolve a patchlife small-config name to (timm name, kwargs); timm names pass through."""
    if name in SMALL_CONFIGS:
        cfg = dict(SMALL_CONFIGS[name])
        base = cfg.pop("base")
        return base, {**cfg, **kwargs}
    return name, dict(kwargs)


def create_backbone(name: str, pretrained: bool | str | Path = False, **kwargs: Any) -> VisionTransformer:
    """Build a timm ViT/DeiT.

    Args:
        name: a timm model name (``deit_small_patch16_224``) or a key of ``SMALL_CONFIGS``.
        pretrained: False, True (Hugging Face hub), or a path to a local weights file
            (``.safetensors``/``.pth``/``.bin`` as timm saves them).
        kwargs: passed to ``timm.create_model`` (``num_classes``, ``img_size``, ...).
    """
    timm_name, kw = backbone_spec(name, **kwargs)
    if timm_name not in timm.list_models():
        raise ValueError(f"unknown backbone {name!r}: use a timm ViT/DeiT name "
                         f"(e.g. deit_small_patch16_224) or one of {sorted(SMALL_CONFIGS)}")
    if isinstance(pretrained, (str, Path)):
        path = Path(pretrained)
        if not path.is_file():
            raise PretrainedUnavailable(f"pretrained weights file {path} does not exist")
        model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kw)
    elif pretrained:
        unreachable = hub_unreachable()
        try:
            with _offline(unreachable is not None):  # cached weights still load; nothing else is tried
                model = timm.create_model(timm_name, pretrained=True, **kw)
        except Exception as exc:  # hub unreachable, offline mode, missing weights
            why = f"the hub is unreachable: {unreachable}; and they are not in the local cache" if unreachable \
                else str(exc)
            raise PretrainedUnavailable(
                f"could not load pretrained weights for {timm_name} from the Hugging Face hub ({why}). "
                "Either make the hub reachable (and HF_HUB_OFFLINE unset), or download the weights "
                "elsewhere and pass the local file: --pretrained /path/to/model.safetensors") from exc
    else:
        model = timm.create_model(timm_name, pretrained=False, **kw)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{name} is a {type(model).__name__}; patchlife needs a timm VisionTransformer")
    return model


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (None: it can, or a proxy decides).

    One TCP connection attempt, so that without network ``--pretrained hub`` fails in seconds instead
    of after the hub client's retries (about 50 s).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy may reach what this machine cannot
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {url.hostname} ({exc})"
    return None


@contextmanager
def _offline(on: bool) -> Iterator[None]:
    """The hub client's offline mode for one call (it reads the flag on every request)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or on
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def preprocess_config(backbone: VisionTransformer) -> dict[str, Any]:
    """timm's data config for the backbone: input size, mean/std, interpolation, crop_pct."""
    cfg = timm.data.resolve_data_config({}, model=backbone)
    # the small configs change img_size; timm's pretrained_cfg still says 224
    size = backbone.patch_embed.img_size
    cfg["input_size"] = (3, int(size[0]), int(size[1]))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
