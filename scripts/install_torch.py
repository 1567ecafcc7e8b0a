"""Install torch and torchvision into the running interpreter's environment before patchlife itself.

``make install`` (and every target that creates ``.venv``) runs ``python scripts/install_torch.py $(TORCH)``
with the new venv's python, then ``pip install -e '.[dev]'``, which keeps the torch installed here.

Why: on Linux x86_64, PyPI's torch is the CUDA build and pulls in about 3 GB of NVIDIA libraries
(a 6.5 GB .venv). PyTorch's CPU wheel index serves the same releases built for the CPU only.

``TORCH`` is one of:

* ``cpu``: torch and torchvision from the CPU index, when it answers within ``--timeout`` seconds;
  otherwise this says so and installs nothing, and pip takes the default build from the registry.
* ``cuda``: nothing here; pip takes the registry's default build (CUDA on Linux x86_64).
* ``auto`` (the Makefile's default): ``cpu`` on Linux where no NVIDIA driver is loaded, else ``cuda``.
  Elsewhere (macOS, Windows) the registry's default build is already CPU-only.

The version ranges are read from pyproject.toml, so they are written once. Standard library only:
this runs before anything is installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
PACKAGES = ("torch", "torchvision")


@dataclass(frozen=True)
class Plan:
    """What to install: ``command`` (None: leave torch to pip's default resolution) and why."""

    command: list[str] | None
    reason: str


def requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """The torch and torchvision requirement strings of ``[project] dependencies``, as written there."""
    found: dict[str, str] = {}
    for match in re.finditer(r'^\s*"((torch|torchvision)\s*[<>=!~][^"]*)"', pyproject.read_text(), re.M):
        found[match.group(2)] = match.group(1).replace(" ", "")
    missing = [p for p in PACKAGES if p not in found]
    if missing:
        raise ValueError(f"{pyproject}: no requirement for {', '.join(missing)} in its dependencies")
    return [found[p] for p in PACKAGES]


def nvidia_driver() -> bool:
    """Whether an NVIDIA driver is loaded (its /proc entry) or its tool is installed."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def reachable(url: str, timeout: float) -> bool:
    """Whether ``url`` answers 2xx/3xx within ``timeout`` seconds, name lookup included.

    The request runs in a daemon thread that is abandoned at the deadline: a socket timeout does not
    bound a hanging DNS lookup, and CI (no route to the index) must not wait on one."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                answer.append(200 <= r.status < 400)
        except Exception:  # any failure means: not usable from here
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def plan(choice: str, index: str, timeout: float, *, linux: bool | None = None,
         driver: Callable[[], bool] = nvidia_driver,
         probe: Callable[[str, float], bool] = reachable) -> Plan:
    linux = platform.system() == "Linux" if linux is None else linux
    if choice == "auto":
        if not linux:
            return Plan(None, "not Linux: the registry's torch is the CPU build already")
        if driver():
            return Plan(None, "an NVIDIA driver is present: the registry's default (CUDA) torch")
        choice = "cpu"
    if choice == "cuda":
        return Plan(None, "TORCH=cuda: the registry's default torch (CUDA libraries included on Linux x86_64)")
    if not probe(f"{index.rstrip('/')}/torch/", timeout):
        return Plan(None, f"PyTorch's CPU index ({index}) is not reachable (probed for at most {timeout:g} s): "
                          "falling back "
                          "to the registry's default torch (on Linux x86_64 the CUDA build, about 6.5 GB of .venv)")
    command = [sys.executable, "-m", "pip", "install", "-q", "--index-url", index, *requirements()]
    return Plan(command, f"no NVIDIA GPU wanted: torch's CPU-only build from {index}")


def main(argv: Sequence[str] | None = None,
         run: Callable[[list[str]], int] = lambda cmd: subprocess.call(cmd)) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("torch", nargs="?", default=os.environ.get("TORCH") or "auto", choices=("auto", "cpu", "cuda"),
                   help="which torch build (default: $TORCH, else auto)")
    p.add_argument("--index", default=os.environ.get("TORCH_CPU_INDEX", CPU_INDEX),
                   help="the CPU wheel index (default: $TORCH_CPU_INDEX, else %(default)s)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the index to answer")
    p.add_argument("--dry-run", action="store_true", help="print the plan and install nothing")
    args = p.parse_args(argv)
    chosen = plan(args.torch, args.index, args.timeout)
    print(f"install_torch: {chosen.reason}", file=sys.stderr)
    if chosen.command is None or args.dry_run:
        if chosen.command is not None:
            print(" ".join(chosen.command))
        return 0
    if run(chosen.command) != 0:  # e.g. the index lacks a release in range: pip's default still works
        print("install_torch: the CPU index install failed: falling back to the registry's default torch",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
