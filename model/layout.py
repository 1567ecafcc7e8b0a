"""Where a patchlife checkpoint's files are. Torch-free, so that ``patchlife ensure-default`` can tell
whether a model exists without loading the ML stack (``model/checkpoint.py`` reads and writes them)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE = "model.safetensors", "config.json", "metrics.json"
# The embedded default model (made by `patchlife ensure-default`, shipped in the package).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "default"
