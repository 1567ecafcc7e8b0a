"""``patchlife bench-decode``: milliseconds per image from encoded bytes to the model's input.

Paths, each where this machine has it:
  * ``cpu path``: what a request costs today, one image at a time on one thread: header check, decode
    (libjpeg-turbo with DCT scaling, or Pillow) and the one-resize preprocessing, to ``uint8 [3, H, W]``;
    timed in the thread's CPU time, which other busy processes on the machine hardly change;
  * ``gpu bN``: :class:`service.runtime.gpu_decode.BatchDecoder` on CUDA, batches of N, end to end to a
    normalised ``float32 [N, 3, H, W]`` on the device (synchronised), in wall time. ``--device cpu`` times the same
    batched code with torchvision's CPU decoder instead (how CI runs it).

Images: generated photos (:mod:`bench.photos`) of 224 px, 640x480, 1000 px and 3000x2000, or every
file of ``--images DIR``. ``--equivalence`` adds the CPU-vs-batched comparison of :func:`equivalence`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from service.decode import decode_stored, open_header
from service.preprocess import model_input, resize_side
from service.runtime.gpu_decode import BatchDecoder

from .photos import PHOTO_SIZES, photo_jpeg

# a timm ViT's preprocessing at 224 px (vit_*_patch16_224): what the bench assumes without --checkpoint
VIT_224 = {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
MAX_PIXELS = 40_000_000


def cpu_pixels(data: bytes, preprocess: dict[str, Any]) -> torch.Tensor:
    """The served CPU path for one image (header check, decode, preprocessing) -> ``uint8 [3, H, W]``."""
    open_header(data, MAX_PIXELS, "image")
    decoded = decode_stored(data, MAX_PIXELS, min_side=resize_side(preprocess))
    return model_input(decoded, preprocess, _timm_only)


def _timm_only(_image: Any) -> torch.Tensor:
    raise ValueError("bench-decode times the one-resize preprocessing only (centre crop of a square input)")


def time_per_item(run: Callable[[], object], items: int, seconds: float,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """Median milliseconds per item of ``run`` (which handles ``items`` items) on ``clock``, repeated
    for about ``seconds`` of wall time."""
    run()  # warm-up: first CUDA call, allocations
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = clock()
        run()
        times.append(clock() - t0)
    return statistics.median(times) * 1000.0 / items


def image_sets(images_dir: Path | None, sizes: Sequence[str]) -> dict[str, list[bytes]]:
    """Named lists of encoded images: one per generated size (4 seeds each), or every file of the folder."""
    if images_dir is not None:
        files = sorted(p for p in images_dir.iterdir() if p.is_file())
        return {f"{images_dir.name} ({len(files)} files)": [p.read_bytes() for p in files]}
    chosen = [(n, w, h) for n, w, h in PHOTO_SIZES if n in sizes]
    return {n: [photo_jpeg(w, h, seed) for seed in range(4)] for n, w, h in chosen}


def time_paths(sets: dict[str, list[bytes]], preprocess: dict[str, Any], device: str | None,
          batch_sizes: Sequence[int], seconds: float) -> list[dict[str, Any]]:
    """One row per image set: ``cpu path`` ms/image, and ``<device type> bN`` ms/image per batch size."""
    decoder = BatchDecoder(preprocess, device, MAX_PIXELS) if device else None
    rows = []
    for name, images in sets.items():
        def served(imgs: list[bytes] = images) -> None:
            for d in imgs:
                cpu_pixels(d, preprocess)
        cpu_ms = time_per_item(served, len(images), seconds, time.thread_time)
        row: dict[str, Any] = {"images": name, "cpu path": cpu_ms}
        if decoder is not None:
            for n in batch_sizes:
                row[f"{decoder.device.type} b{n}"] = time_per_item(
                    _batched(decoder, [images[i % len(images)] for i in range(n)]), n, seconds)
            row["fallbacks"] = dict(decoder.fallbacks)
        rows.append(row)
    return rows


def _batched(decoder: BatchDecoder, batch: list[bytes]) -> Callable[[], None]:
    def run() -> None:
        decoder(batch)
        if decoder.device.type == "cuda":
            torch.cuda.synchronize(decoder.device)
    return run


def equivalence(images: Sequence[bytes], device: str, checkpoint: Path | None = None) -> dict[str, Any]:
    """The batched decoder against the CPU path on ``images``, through one calibrated model on
    ``device``: pixel differences, top-1 agreement and the largest per-stage budget difference (patches).
    Without ``checkpoint``: a near-null 224-px LifeViT (vit_tiny, 4 blocks of width 24) with random
    weights, calibrated on noise, whose budgets still react to every pixel."""
    from service.runtime.engine import Engine  # the model: only here (the timing above never loads it)

    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(checkpoint or _near_null(Path(tmp)), device=device, dtype="float32", cuda_graphs="off")
    pre = engine.config.preprocess
    cpu = torch.stack([model_input(decode_stored(d, MAX_PIXELS, min_side=resize_side(pre)), pre, engine.preprocess)
                       for d in images])
    batched = BatchDecoder(pre, device, MAX_PIXELS).pixels(images).cpu()
    diff = (cpu.int() - batched.int()).abs()
    a, b = _predict(engine, cpu), _predict(engine, batched)
    budget_gap = max(max(abs(x - y) for x, y in zip(p[1], q[1], strict=True)) for p, q in zip(a, b, strict=True))
    return {"images": len(images), "max_pixel_diff": int(diff.max()), "mean_pixel_diff": float(diff.float().mean()),
            "top1_agreement": sum(p[0] == q[0] for p, q in zip(a, b, strict=True)) / len(images),
            "classes_seen": len({p[0] for p in a}),  # agreement means little if every image got one class
            "max_budget_diff": int(budget_gap), "patches": int(engine.model.num_patches)}


def _near_null(directory: Path) -> Path:
    from model import create_lifevit, save_checkpoint

    torch.manual_seed(0)
    model = create_lifevit("vit_tiny_patch16_224", keep_rate=0.7, stage_starts=[1, 2, 3], depth=4, embed_dim=24,
                           num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        model.backbone.get_classifier().weight.mul_(15.0)  # logits spread out: top-1 depends on the image, not on ties
    model.calibrate(torch.randn(64, 3, 224, 224))
    return save_checkpoint(model, directory / "near-null", class_names=[str(i) for i in range(10)])


def _predict(engine: Any, pixels: torch.Tensor) -> list[tuple[int, tuple[int, ...]]]:
    """(top-1 class, budget) per image, each tail run at the image's own budget as the served path does."""
    from service.runtime.handoff import Rows

    hb = engine.head(pixels, [None] * len(pixels))
    budgets = [tuple(int(c) for c in b) for b in hb.budgets.tolist()]
    return [(int(engine.tail([Rows(hb, torch.tensor([i]))], b).get()[0].argmax()), b) for i, b in enumerate(budgets)]


def table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in rows[0] if c not in ("images", "fallbacks")]
    lines = ["| images | " + " | ".join(f"{c} ms/img" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['images']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    try:
        batch_sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    except ValueError:
        batch_sizes = []
    known = {n for n, _, _ in PHOTO_SIZES}
    if (args.images is None and (not sizes or set(sizes) - known)) or not batch_sizes or min(batch_sizes) < 1 \
            or args.seconds <= 0 or (args.images is not None and not args.images.is_dir()):
        print(f"patchlife bench-decode: --sizes from {','.join(sorted(known))}, --images an existing folder, "
              "--batch-sizes positive integers, --seconds > 0", file=sys.stderr)
        return 2
    device = {"auto": "cuda" if torch.cuda.is_available() else None, "none": None}.get(args.device, args.device)
    if device == "cuda" and not torch.cuda.is_available():
        print("patchlife bench-decode: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.checkpoint is not None:
        from model.checkpoint import read_config

        preprocess = read_config(args.checkpoint).preprocess
    else:
        preprocess = VIT_224
    sets = image_sets(args.images, sizes)
    rows = time_paths(sets, preprocess, device, batch_sizes, args.seconds)
    result: dict[str, Any] = {"device": device, "rows": rows}
    if args.equivalence:
        images = [d for imgs in sets.values() for d in imgs]
        result["equivalence"] = equivalence(images, device or "cpu", args.checkpoint)
    if args.json:
        print(json.dumps(result))
        return 0
    print(table(rows))
    if "equivalence" in result:
        e = result["equivalence"]
        print(f"\nbatched ({device or 'cpu'}) vs CPU path, {e['images']} images: top-1 agreement "
              f"{e['top1_agreement']:.1%}, largest budget difference {e['max_budget_diff']} of {e['patches']} patches, "
              f"pixels max |diff| {e['max_pixel_diff']}, mean {e['mean_pixel_diff']:.2f}")
    return 0
