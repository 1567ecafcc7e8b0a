"""``patchlife ensure-default``: make sure the embedded default model exists, training it if not.

The default model is a 12-block micro ViT (64x64 input, 8x8 patches) trained on the built-in
synthetic shapes task by one ``patchlife train`` command, :data:`RECIPE`, sized to finish in at most
10 minutes on 2 CPU cores. The repository ships its output (``model/assets/default``); this command
rebuilds it when it is missing, with the training progress shown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .checkpoint import CONFIG_FILE, DEFAULT_CHECKPOINT, WEIGHTS_FILE

# The exact training command of the shipped checkpoint (plus --out).
RECIPE: list[str] = [
    "--synthetic", "--backbone", "vit_micro_patch8_64", "--keep-rate", "0.7", "--seed", "0",
    "--train-size", "60000", "--val-size", "2400", "--batch-size", "64",
    "--stage0-steps", "600", "--stage0-lr", "1e-3",
    "--stage1-steps", "150", "--stage1-lr", "3e-3", "--tau", "4", "--stage1-norm", "batch",
    "--stage2-steps", "300", "--stage2-lr", "5e-4", "--stage2-keep-rates", "0.5,0.7,0.9",
    "--calibrate", "2048", "--name", "patchlife-default",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT, help="where the default model lives")
    p.add_argument("--force", action="store_true", help="retrain even if the model exists")


def exists(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def train_command(out: Path) -> list[str]:
    """``RECIPE`` plus ``--out``, relative to the working directory when the model lives under it."""
    rel = os.path.relpath(out)
    return [*RECIPE, "--out", rel if not rel.startswith("..") else str(out)]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if exists(out) and not args.force:
        metrics = out / "metrics.json"
        how = ""
        if metrics.is_file():
            body = json.loads(metrics.read_text())
            how = f", trained by `{body.get('command', '?')}` in {body.get('wall_seconds', '?')} s"
        print(f"patchlife: the default model exists at {out}{how}")
        return 0
    from . import train  # training code only when needed

    argv = train_command(out)
    print(f"patchlife: training the default model into {out} (about 10 minutes on 2 CPU cores):\n"
          f"  patchlife train {' '.join(argv)}", file=sys.stderr, flush=True)
    return train.main(argv)
