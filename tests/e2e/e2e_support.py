"""Helpers of the browser tests (imported by name: tests/e2e is on pytest's pythonpath)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ops_support import REPO, free_port, stop_process
from PIL import Image

CLASSES = ["cat", "dog", "ship", "tree", "cup"]
EXAMPLES = [
    {"file": "simple.png", "label": "cat", "note": "one object, plain background"},
    {"file": "busy.png", "label": "ship", "note": "texture everywhere"},
]
MAX_UPLOAD_BYTES = 300_000     # small, so that the page can be shown the "too large" answers:
MAX_REQUEST_BYTES = 1_000_000  # this one is refused from Content-Length, before the body is read


def example_image(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """A landscape picture with a bright blob on a textured background (the crop matters)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin((x + 9 * seed) / 6.0)], -1) * 200
    blob = np.exp(-((x - w * (0.35 + 0.3 * seed)) ** 2 + (y - h / 2) ** 2) / (2 * (h / 6) ** 2))[..., None]
    pixels = base * (1 - blob) + np.array([250, 240, 60], np.float32) * blob + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


@contextlib.contextmanager
def run_service(checkpoint: Path, log: Path, env: Mapping[str, str] = {}) -> Iterator[Service]:
    """``patchlife serve`` of ``checkpoint`` on a free loopback port (not yet waited for), with the
    browser tests' limits plus ``env``; its output in ``log``; stopped at the end."""
    port = free_port()
    full = {**os.environ, "PATCHLIFE_HOST": "127.0.0.1", "PATCHLIFE_PORT": str(port),
            "PATCHLIFE_CHECKPOINT": str(checkpoint), "PATCHLIFE_DEVICE": "cpu",
            "PATCHLIFE_DTYPE": "float32", "PATCHLIFE_WARMUP_BATCHES": "1", "OMP_NUM_THREADS": "1",
            "PATCHLIFE_GRPC_PORT": "0", "PATCHLIFE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
            "PATCHLIFE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES), **env}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "serve"], cwd=REPO, env=full,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Service(proc, f"http://127.0.0.1:{port}", log)
    finally:
        stop_process(proc)
