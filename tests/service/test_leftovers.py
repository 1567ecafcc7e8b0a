"""A start removes what a killed ``patchlife serve`` left in /tmp and /dev/shm, and only that: entries of
this user whose recorded process is dead, never a running service's, nor anything it cannot attribute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.leftovers import OWNER_FILE, remove_stale, shm_name


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its pid names no process
    return proc.pid


def workdir(tmp: Path, name: str, pid: int | None) -> Path:
    path = tmp / name
    (path / "metrics").mkdir(parents=True)
    (path / "model.sock").write_bytes(b"")
    if pid is not None:
        (path / OWNER_FILE).write_text(str(pid))
    return path


def test_only_the_dead_services_entries_are_removed(tmp_path: Path) -> None:
    tmp, shm = tmp_path / "tmp", tmp_path / "shm"
    tmp.mkdir()
    shm.mkdir()
    gone = dead_pid()
    killed = workdir(tmp, "patchlife-killed", gone)
    running = workdir(tmp, "patchlife-running", os.getpid())
    unknown = workdir(tmp, "patchlife-unknown", None)  # no owner recorded (an older version, or being made)
    other = workdir(tmp, "someone-else", gone)
    segments = {name: shm / name for name in (shm_name(gone, "ab12"), shm_name(os.getpid(), "cd34"),
                                                "psm_0123", f"patchlife_{gone}_notours!")}
    for path in segments.values():
        path.write_bytes(b"\0" * 16)
    removed = remove_stale(tmp, shm)
    assert sorted(removed) == sorted([killed, segments[shm_name(gone, "ab12")]])
    assert not killed.exists() and running.exists() and unknown.exists() and other.exists()
    assert [p.name for p in sorted(shm.iterdir())] == sorted(n for n in segments if n != shm_name(gone, "ab12"))


def test_init_pid_and_garbage_are_never_dead_owners(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    for name, text in (("patchlife-init", "1"), ("patchlife-zero", "0"), ("patchlife-text", "x")):
        workdir(tmp, name, None)
        (tmp / name / OWNER_FILE).write_text(text)
    assert remove_stale(tmp, tmp_path / "no-shm") == []
    assert len(list(tmp.iterdir())) == 3
