"""``patchlife serve``: the HTTP service under uvicorn.

Settings come from ``PATCHLIFE_*`` environment variables; ``--host``, ``--port`` and
``--checkpoint`` override them. The engine is loaded before the socket opens, so a missing or bad
checkpoint ends the command at once with the engine's message (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from pydantic import ValidationError

from .app import create_app
from .frontend.access import warn_if_open
from .frontend.http_server import make_server
from .logs import configure_logging
from .runtime.engine import Engine
from .settings import Settings


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k in ("host", "port", "checkpoint") if (v := getattr(args, k, None)) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"patchlife serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, settings.log_format)
    warn_if_open(settings)  # here, once: not in each API process
    cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    cores = len(os.sched_getaffinity(0))
    processes = settings.api_process_count(cuda, cores)
    if processes > 0:
        from .processes import run as run_processes

        return run_processes(args, settings.model_threads_beside(processes, cuda, cores), processes)
    try:
        engine = Engine.from_settings(settings)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"patchlife serve: {exc}", file=sys.stderr)
        return 1
    server = make_server(create_app(settings, engine), settings, args.log_level)
    server.run()
    return 0 if server.started else 1
