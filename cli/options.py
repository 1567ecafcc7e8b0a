"""Command-line options of the commands whose code imports torch or the web stack: one function per
command, torch-free, so that ``patchlife CMD --help`` answers at once. The command's module (bench,
serve, bench-overhead, bench-decode) imports the heavy code; it is loaded only to run. The options of
train and eval are the method's own (``model/options.py``).

Commands whose module is light to import (ensure-default, loadtest, gpu-check) keep their
``add_arguments`` beside their code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model.options import DTYPE_NAMES

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="deit_small_patch16_224", help="timm ViT/DeiT name or a small config")
    p.add_argument("--checkpoint", default=None, help="a patchlife checkpoint folder instead of --backbone")
    p.add_argument("--pretrained", default=None, help="local weights file (speed does not depend on it)")
    p.add_argument("--keep-rate", type=float, default=0.7, help="keep rate of the LifeViT schedule")
    p.add_argument("--batch-size", type=int, default=32, help="images per timed call")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the GPU when torch sees one, else the CPU")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--served", action="store_true",
                   help="time the service's engine as the server runs it (uint8 input, bucket grid, padding, "
                        "CUDA graphs on a GPU) beside dense run the same way (graphed)")
    p.add_argument("--calibrated", action="store_true",
                   help="--served without --checkpoint: calibrate the random model on noise images at five "
                        "contrasts and time such a batch, so budgets vary and the tail runs once per bucket")
    p.add_argument("--no-graphs", action="store_true", help="--served: run both eagerly (PATCHLIFE_CUDA_GRAPHS=off)")
    p.add_argument("--rounds", type=int, default=7, help="timed calls per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    p.add_argument("--json", action="store_true", help="print only a JSON object on stdout")


def serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="bind address (default: PATCHLIFE_HOST, see docs/api.md#settings)")
    p.add_argument("--port", type=int, help="bind port (default: PATCHLIFE_PORT)")
    p.add_argument("--checkpoint", type=Path,
                   help="checkpoint directory (default: PATCHLIFE_CHECKPOINT, else the embedded model)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn's and patchlife's log level")
    p.epilog = ("Serves, on http://HOST:PORT (127.0.0.1:8000 by default): the web page at /, the API (/classify, "
                "/explain, /v1/models, the Open Inference Protocol v2 under /v2) browsable at /docs, /healthz, "
                "/readyz and /metrics; and the v2 protocol over gRPC on PATCHLIFE_GRPC_PORT (8001; 0: off). "
                "PATCHLIFE_API_PROCESSES (auto) sets how many API processes answer clients beside the one model "
                "process (0: one process does everything). Every setting is a PATCHLIFE_* environment variable: "
                "docs/api.md#settings.")


def bench_overhead(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: a random-weight "
                                                   "LifeViT of --backbone in a temporary directory)")
    p.add_argument("--backbone", default="deit_small_patch16_224", help="timm name, without --checkpoint")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where the server runs the model")
    p.add_argument("--requests", type=int, default=60, help="timed requests (and compute runs)")
    p.add_argument("--rounds", type=int, default=6, help="alternating compute / request rounds")
    p.add_argument("--image-size", default="500x375", help="WxH of the JPEG sent")
    p.add_argument("--max-delay-ms", type=float,
                   help="PATCHLIFE_MAX_DELAY_MS of the server (default: the settings default)")
    p.add_argument("--json", action="store_true", help="print only a JSON object")


def bench_decode(p: argparse.ArgumentParser) -> None:
    from bench.photos import PHOTO_SIZES  # numpy and Pillow only

    p.add_argument("--images", type=Path, help="a folder of images to time instead of the generated photos")
    p.add_argument("--sizes", default=",".join(n for n, _, _ in PHOTO_SIZES),
                   help="generated photo sizes to time (comma-separated)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "none"), default="auto",
                   help="where the batched decoder runs: auto is cuda when there is one, else none (CPU path only)")
    p.add_argument("--batch-sizes", default="1,16,64", help="batched decoder batch sizes (comma-separated)")
    p.add_argument("--seconds", type=float, default=1.0, help="time spent on each measurement")
    p.add_argument("--checkpoint", type=Path, help="take the preprocessing (and, with --equivalence, the model) "
                                                   "from this checkpoint; default: a timm ViT at 224 px")
    p.add_argument("--equivalence", action="store_true",
                   help="also compare the batched decoder with the CPU path through a model (top-1, budgets)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
