"""The ``patchlife`` command line: help and version without torch, help text on every option, and
``ensure-default``'s quick answer when the model is there."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from ops_support import REPO

from cli import main as cli
from model.layout import DEFAULT_CHECKPOINT, METRICS_FILE

HEAVY = ("torch", "timm", "fastapi", "uvicorn")
IMPORTED_BY_HELP = """
import sys
from cli import main as cli
for name in cli.COMMANDS:
    cli.parser_for(name).format_help()
print(",".join(sorted(m for m in {heavy} if m in sys.modules)))
"""


def _patchlife(*argv: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "cli", *argv], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    return p, time.perf_counter() - t0


def test_every_commands_help_imports_no_torch_nor_the_web_stack() -> None:
    p = subprocess.run([sys.executable, "-c", IMPORTED_BY_HELP.format(heavy=HEAVY)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "", f"building the parsers imported {p.stdout.strip()}"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], *([name, "--help"] for name in cli.COMMANDS)])
def test_help_answers_and_says_how_long_it_took(argv: list[str]) -> None:
    """Timing printed for the log (run with -s), not asserted: the machine is shared."""
    p, seconds = _patchlife(*argv)
    assert p.returncode == 0, p.stderr
    print(f"patchlife {' '.join(argv)}: {seconds:.2f} s")
    if argv[0] in cli.COMMANDS:
        assert p.stdout.startswith(f"usage: patchlife {argv[0]}")
    elif argv == ["--version"]:
        assert p.stdout.strip() == f"patchlife {cli.package_version()}"
    else:
        assert all(name in p.stdout for name in cli.COMMANDS)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_has_help_text(name: str) -> None:
    parser = cli.parser_for(name)
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert missing == []
    shown = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert f"default: {action.default}" in " ".join(shown.split()) or "default:" in (action.help or ""), \
                action.option_strings


def test_dtype_choices_are_the_devices_dtypes() -> None:
    from cli.options import DTYPE_NAMES
    from model.device import DTYPES

    assert set(DTYPE_NAMES) == set(DTYPES)


def test_ensure_default_answers_from_metrics_without_torch() -> None:
    """The model is there: no torch import, and the figures are the ones metrics.json records."""
    probe = ("import sys; from cli.main import main; rc = main(['ensure-default']); "
             f"print('heavy:', sorted(m for m in {HEAVY} if m in sys.modules)); sys.exit(rc)")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    print(f"patchlife ensure-default (model present): {time.perf_counter() - t0:.2f} s")
    assert p.returncode == 0, p.stderr
    assert "heavy: []" in p.stdout
    body = json.loads((DEFAULT_CHECKPOINT / METRICS_FILE).read_text())
    if "base" in body:  # tuned from a base made by the recipe: both commands are shown
        assert body["command"] in p.stdout
        body = body["base"]
    run = body["one_command_run"]
    assert f"took {run['wall_seconds']:.0f} s wall, {run['process_cpu_seconds']:.0f} s CPU" in p.stdout
    assert run["train_command"] in p.stdout and "--init-from" not in run["train_command"]


def test_serve_help_names_what_it_serves() -> None:
    text = " ".join(cli.parser_for("serve").format_help().split())  # unwrapped
    for words in ("web page at /", "/docs", "gRPC on PATCHLIFE_GRPC_PORT (8001", "PATCHLIFE_API_PROCESSES",
                  "docs/api.md#settings"):
        assert words in text, words
