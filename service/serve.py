"""``patchlife serve``: the HTTP service under uvicorn.

Settings come from ``PATCHLIFE_*`` environment variables; ``--host``, ``--port`` and
``--checkpoint`` override them. The engine is loaded before the socket opens, so a missing or bad
checkpoint ends the command at once with the engine's message (exit status 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import ValidationError

from .app import create_app, load_engine
from .routes.common import Runtime
from .settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="bind address (PATCHLIFE_HOST)")
    parser.add_argument("--port", type=int, help="bind port (PATCHLIFE_PORT)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint directory (PATCHLIFE_CHECKPOINT); "
                                                        "default: the embedded model")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


class _Server(uvicorn.Server):
    """uvicorn, plus: the first SIGTERM/SIGINT turns /readyz to 503 and refuses new work at once,
    while uvicorn lets the requests in flight finish. After that clean drain the command exits 0
    (uvicorn alone would re-raise the signal and end with 143); a second SIGINT forces the exit."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.runtime.ready, self.runtime.draining = False, True
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k in ("host", "port", "checkpoint") if (v := getattr(args, k, None)) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"patchlife serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = load_engine(settings)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"patchlife serve: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, engine)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)))
    server = _Server(config, app.state.runtime)
    server.run()
    return 0 if server.started else 1
