"""Where the processes of one service meet for metrics: prometheus_client's multiprocess directory.

Each process writes its series into memory-mapped files named after its pid in one directory; a
scrape merges them (``service.metrics.Metrics.exposition``). The parent of ``serve`` owns the
directory: it calls :func:`enable_multiprocess` with ``fresh=True`` before it starts children,
:func:`mark_process_dead` when one exits, and :func:`cleanup_multiprocess` at the end.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prometheus_client import multiprocess, values

# The environment variable prometheus_client reads (at import, and whenever a process opens its files).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(directory: Path, fresh: bool = False) -> None:
    """Switch this process to multiprocess metrics in ``directory`` (before its :class:`Metrics`).

    The parent calls it before starting children (they inherit the environment variable, so their
    prometheus_client starts in this mode); a child calls it again, which changes nothing. The value
    class is chosen when prometheus_client is imported, so it is switched here explicitly too.
    ``fresh`` (the parent's first call, before any child starts) deletes the files an earlier run
    left in ``directory``. Metrics made before this call stay in-process and are not aggregated.
    """
    directory = Path(directory).resolve()
    current = multiprocess_dir()
    if current is not None and current != directory:
        raise RuntimeError(f"metrics already shared through {current}; cannot move them to {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    if fresh:  # an earlier run's files (a reused directory); this process's own open files stay
        own = f"_{os.getpid()}.db" if current is not None else None
        for stale in directory.glob("*.db"):
            if own is None or not stale.name.endswith(own):
                stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


def multiprocess_dir() -> Path | None:
    """The shared directory while this process writes its metrics there, else None."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path or not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return Path(path).resolve()


def mark_process_dead(pid: int, directory: Path | None = None) -> None:
    """A child exited: drop its live gauges (in flight, queue depth, health...); its counts stay."""
    where = directory or multiprocess_dir()
    if where is not None:
        multiprocess.mark_process_dead(pid, str(where))


def cleanup_multiprocess(directory: Path) -> None:
    """At the end of ``serve``: delete the directory; this process is back to in-process metrics.

    Metrics this process made while multiprocess mode was on must not be used afterwards.
    """
    directory = Path(directory).resolve()
    if multiprocess_dir() == directory:  # open files stay mapped (unlinked): a late write harms nothing
        values.ValueClass = values.MutexValue
        del os.environ[MULTIPROC_ENV]
    shutil.rmtree(directory, ignore_errors=True)
