"""The ``patchlife`` command. Each subcommand lives in its own module, imported only when used,
so ``patchlife bench`` never loads the web stack and ``patchlife serve`` never loads training code.

A subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.serve", "run the HTTP service"),
    "bench": ("model.bench", "time dense vs LifeViT vs oracle truncation vs attention top-k"),
    "train": ("model.train", "two-stage life-regression training"),
    "eval": ("model.evaluate", "accuracy/GFLOPs/speed table against random and top-k token choice"),
    "ensure-default": ("model.default_model", "train the embedded default model if it is missing"),
    "loadtest": ("service.loadtest", "closed-loop load test: budget vs FIFO vs unbatched"),
    "bench-overhead": ("service.overhead", "single-request overhead of the service vs batch-1 compute"),
    "bench-decode": ("service.benchdecode", "ms per image from JPEG bytes to model input: CPU path, GPU batches"),
    "gpu-check": ("model.gpu_check", "on a CUDA machine: the gpu tests, bench and a load test, in one table"),
}


def _usage() -> str:
    lines = ["usage: patchlife COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"patchlife: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"patchlife {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
