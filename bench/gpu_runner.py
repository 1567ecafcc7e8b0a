"""Subprocesses of ``patchlife gpu-check``: each part runs one (or several) with a time limit of its own,
in its own process group, so that a timeout (or Ctrl-C) also stops the servers it started; what it
printed is read back as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Output:
    """What one subprocess left: ``returncode`` None when it ran past its time limit."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


Runner = Callable[[list[str], dict[str, str], float], Output]


def run_subprocess(argv: list[str], env: dict[str, str], timeout: float) -> Output:
    """Run ``argv`` in its own process group, so a timeout (or Ctrl-C here) also stops the servers it started."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return Output(proc.returncode, out, err, time.perf_counter() - t0)
    except subprocess.TimeoutExpired:
        out, err = _stop_group(proc)
        return Output(None, out, err, time.perf_counter() - t0)
    except BaseException:  # KeyboardInterrupt: the new session does not get the terminal's SIGINT
        _stop_group(proc)
        raise


def _stop_group(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM to the process group, SIGKILL 20 s later; what it printed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()


def failure(out: Output, timeout: float) -> str:
    """Why a subprocess failed, in one line: the time limit, or its exit status and last words."""
    if out.returncode is None:
        return f"timed out after {timeout:.0f} s"
    lines = [ln.strip() for ln in (out.stderr + "\n" + out.stdout).splitlines() if ln.strip()]
    last = lines[-1] if lines else "no output"
    return f"exit {out.returncode}: {last[:200]}"


def parse_json(text: str) -> dict[str, Any] | None:
    """The JSON object a command printed (the whole output, or its last line that is one)."""
    for candidate in (text, *reversed(text.splitlines())):
        try:
            body = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(body, dict):
            return body
    return None
