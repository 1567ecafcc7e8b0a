"""What ``patchlife serve`` leaves on the machine while it runs, and removing what a killed one left.

A running service with API processes holds a work directory ``/tmp/patchlife-*`` (the model process's
socket, the pool's lock file, the metrics files; its creator's pid in ``owner.pid``) and one shared-memory
segment ``/dev/shm/patchlife_<pid>_<random>`` (the pixel slots). A clean exit removes both; so do
the API processes when they find their model process dead (:func:`remove_own`). What is left after a
``kill -9`` of everything (a container killed, a machine reset) is removed at the next start
(:func:`remove_stale`): only entries of this user whose recorded pid no longer runs, so a service
that is still running, or another user's, is never touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("patchlife.serve")

WORKDIR_PREFIX = "patchlife-"
SHM_PREFIX = "patchlife_"
OWNER_FILE = "owner.pid"
SHM_DIR = Path("/dev/shm")
_SHM_NAME = re.compile(rf"{SHM_PREFIX}(\d+)_[0-9a-f]+")


def make_workdir() -> Path:
    """A new work directory (mode 0700: the socket and the metrics are this user's alone), owned by
    this process."""
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    (workdir / OWNER_FILE).write_text(str(os.getpid()))
    return workdir


def shm_name(pid: int, token: str) -> str:
    return f"{SHM_PREFIX}{pid}_{token}"


def _running(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (killed, not yet reaped) does not, and its pid cannot be reused yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def dead(pid: int) -> bool:
    return not _running(pid)


def _dead_owner(path: Path, pid: int | None) -> bool:
    """Ours (this user's), with a recorded pid that no longer runs."""
    try:
        mine = path.lstat().st_uid == os.getuid()
    except OSError:
        return False
    return mine and pid is not None and pid > 0 and not _running(pid)


def _workdir_pid(path: Path) -> int | None:
    try:
        return int((path / OWNER_FILE).read_text().strip())
    except (OSError, ValueError):
        return None  # not ours, or still being made: left alone


def remove_stale(tmp: Path | None = None, shm: Path = SHM_DIR) -> list[Path]:
    """Remove the work directories and segments of services whose process is dead; what was removed."""
    removed: list[Path] = []
    for path in Path(tmp or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        if path.is_dir() and not path.is_symlink() and _dead_owner(path, _workdir_pid(path)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in shm.glob(f"{SHM_PREFIX}*") if shm.is_dir() else ():
        found = _SHM_NAME.fullmatch(path.name)
        if found and _dead_owner(path, int(found.group(1))):
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    if removed:
        log.info("removed what a stopped service left: %s", ", ".join(str(p) for p in removed))
    return removed


def remove_own(workdir: Path, owner_pid: int) -> None:
    """An API process whose model process ``owner_pid`` is dead: remove its work directory (its segment
    is removed by the caller, through its mapping)."""
    if _workdir_pid(workdir) == owner_pid and not _running(owner_pid):
        shutil.rmtree(workdir, ignore_errors=True)
