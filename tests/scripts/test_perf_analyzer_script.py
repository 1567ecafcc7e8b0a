"""scripts/perf-analyzer --cached: whether running perf_analyzer would fetch first (the perf_analyzer test
asks it, and never downloads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "perf-analyzer"


def _cached(cache: Path) -> int:
    env = {**os.environ, "PERF_ANALYZER_CACHE": str(cache), "PERF_ANALYZER_VERSION": "9.9.9"}
    return subprocess.run([sys.executable, str(SCRIPT), "--cached"], env=env, timeout=60).returncode


def _glibc() -> tuple[int, ...]:
    name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else (0,)


def test_cached_only_when_everything_is_there(tmp_path: Path) -> None:
    assert _cached(tmp_path) == 1  # empty cache: a run would fetch the wheel
    exe = tmp_path / "wheel-9.9.9" / "perf_analyzer" / "bin" / "perf_analyzer"
    exe.parent.mkdir(parents=True)
    exe.write_text("")
    if _glibc() < (2, 38):  # this machine also needs Debian 13's runtime beside it
        assert _cached(tmp_path) == 1
        loader = tmp_path / "trixie-runtime" / "usr" / "lib" / "x86_64-linux-gnu" / "ld-linux-x86-64.so.2"
        loader.parent.mkdir(parents=True)
        loader.write_text("")
    assert _cached(tmp_path) == 0
