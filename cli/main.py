"""The ``patchlife`` command. Each subcommand's code is imported only when it runs, so that
``patchlife --help``, ``patchlife CMD --help`` and ``patchlife --version`` never import torch (or the
web stack), and ``patchlife bench`` never loads training code.

A command is one :class:`Command` row: the module holding ``run(args) -> int`` and where its options
are defined: a torch-free function (``cli/options.py``, ``model/options.py``) for modules that import torch at the top,
else the module's own ``add_arguments(parser)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from model import options as method_options  # train and eval: the method's own programs
from service import package_version

from . import options


@dataclass(frozen=True)
class Command:
    module: str  # provides run(args) -> int (and add_arguments(parser) when options is None)
    help: str
    options: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: dict[str, Command] = {
    "serve": Command("service.serve", "run the HTTP service", options.serve),
    "bench": Command("bench.speed", "time dense vs LifeViT vs oracle truncation vs attention top-k",
                     options.bench),
    "train": Command("model.training.train", "two-stage life-regression training", method_options.train),
    "eval": Command("model.evaluation.evaluate", "accuracy/GFLOPs/speed table against random and top-k token choice",
                    method_options.evaluate),
    "ensure-default": Command("model.training.default_model", "train the embedded default model if it is missing"),
    "loadtest": Command("bench.loadtest", "closed-loop load test: budget vs FIFO vs unbatched; --open-loop: "
                       "accuracy scaling on vs off under Poisson arrivals of labelled scenes"),
    "bench-overhead": Command("bench.overhead", "single-request overhead of the service vs batch-1 compute",
                              options.bench_overhead),
    "bench-decode": Command("bench.decode",
                            "ms per image from JPEG bytes to model input: CPU path, GPU batches", options.bench_decode),
    "bench-http": Command("bench.httpbench", "requests/s and server CPU per request under wrk, per file, settings "
                          "side by side (e.g. PATCHLIFE_API_PROCESSES=0 against auto)"),
    "bench-frontend": Command("bench.frontend", "for a GPU host: images/s, p50/p99 and server CPU per image through "
                              "HTTP against the offline served path (224/1000-px JPEGs, 1 and 16 per request)"),
    "gpu-check": Command("bench.gpu_check", "on a CUDA machine: the gpu tests, training, eval, bench, a load test "
                         "and batched JPEG decoding, in one table"),
}


class _Formatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none (None, or a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and "%(default)" not in text and "default:" not in text:
            text += " (default: %(default)s)"
        return text


def _usage() -> str:
    lines = ["usage: patchlife COMMAND [options]    (patchlife COMMAND --help: its options)", "", "commands:"]
    lines += [f"  {name:<15} {c.help}" for name, c in COMMANDS.items()]
    lines += ["", "  --version       print patchlife's version", "  -h, --help      this list"]
    return "\n".join(lines)


def parser_for(name: str) -> argparse.ArgumentParser:
    """The command's argument parser, built without importing its module when its options are
    defined torch-free (every command of this table today)."""
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"patchlife {name}", description=command.help, formatter_class=_Formatter)
    add = command.options or importlib.import_module(command.module).add_arguments
    add(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"patchlife {package_version()}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"patchlife: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    args = parser_for(name).parse_args(argv[1:])  # --help exits here, before the command's code loads
    module = importlib.import_module(COMMANDS[name].module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
