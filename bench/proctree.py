"""CPU time of a server and every process under it, read from ``/proc``, exits included.

A server of several processes (one model process, API processes that may die and be replaced)
spends CPU in all of them, so the CPU of its first process alone says little. Linux keeps two
figures per process in ``/proc/<pid>/stat``: ``utime + stime`` (its own threads) and
``cutime + cstime`` (children it has waited for, with their own waited-for children). The sum of
both over the live processes of a tree is conserved when a child exits and its parent reaps it:
the child's time moves into the parent's ``cutime``. It is not conserved when

  * a child is a zombie (exited, not yet reaped): its stat then reads 0 until the parent waits;
  * a child is reaped outside the tree (its parent died first and init adopted it), or by a
    parent that ignores ``SIGCHLD`` (the kernel reaps it and accounts it to nobody).

:class:`TreeCpu` therefore samples the tree (:class:`Sampler`: a thread, every ``interval_s``) and
keeps the last reading of every process it has seen. A process that leaves is credited to its
parent with that reading, and its parent counts ``max(its cutime growth, the credits of its
departed children)``: a reaped child counts once, with its final time; a child reaped elsewhere
counts what it had at the last sample. Processes that are born and die between two samples are
counted only through a tree parent's ``cutime`` (they are when the parent waits for them).
Processes are told apart by (pid, start time), so a reused pid is a new process.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """What this module reads from one ``/proc/<pid>/stat`` (times in clock ticks)."""

    pid: int
    ppid: int
    state: str
    start: int   # start time since boot: a reused pid is a different process
    own: int     # utime + stime: this process's threads
    reaped: int  # cutime + cstime: children it waited for (and theirs)

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.start


def parse_stat(text: str) -> ProcStat | None:
    """A ``/proc/<pid>/stat`` line; the command name may hold spaces and parentheses, so split at the last ')'."""
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    try:
        pid = int(head.split("(", 1)[0])
        return ProcStat(pid, int(fields[1]), fields[0], int(fields[19]),
                        int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    except (ValueError, IndexError):
        return None


def scan(proc: str = "/proc") -> dict[int, ProcStat]:
    """Every process of the machine now, by pid (those that vanish while being read are left out)."""
    out: dict[int, ProcStat] = {}
    with os.scandir(proc) as entries:
        for entry in entries:
            if entry.name.isdigit():
                try:
                    stat = parse_stat(Path(entry.path, "stat").read_text())
                except OSError:
                    continue
                if stat is not None:
                    out[stat.pid] = stat
    return out


def own_seconds(pid: int, proc: str = "/proc") -> float | None:
    """CPU seconds of process ``pid``'s own threads (its children not counted); None when it is gone."""
    try:
        stat = parse_stat(Path(proc, str(pid), "stat").read_text())
    except OSError:
        return None
    return None if stat is None else stat.own / _TICK


def descendants(stats: dict[int, ProcStat], root: int) -> list[ProcStat]:
    """``root`` and every process below it in ``stats`` (empty when ``root`` is not there)."""
    children: dict[int, list[ProcStat]] = {}
    for s in stats.values():
        children.setdefault(s.ppid, []).append(s)
    out, todo = [], [stats[root]] if root in stats else []
    while todo:
        s = todo.pop()
        out.append(s)
        todo += [c for c in children.get(s.pid, []) if c.pid != s.pid]
    return out


@dataclass
class _Tracked:
    stat: ProcStat
    parent: tuple[int, int] | None  # the key of its parent when first seen in the tree (None: the root)
    first_reaped: int               # its cutime + cstime when first seen
    departed: int = 0               # last readings of its children that have left

    def ticks(self) -> int:
        """Its own time and its children's: the ``cutime`` growth, or the departed children's last
        readings where those are more (children reaped elsewhere, or zombies not yet waited for)."""
        return self.stat.own + max(self.stat.reaped, self.first_reaped + self.departed)


class TreeCpu:
    """CPU seconds of process ``root`` and its descendants, summed over the readings so far.

    ``sample()`` reads ``/proc`` and returns the total; take differences of two samples for a window.
    Thread-safe (a :class:`Sampler` thread and a caller may sample at once).
    """

    def __init__(self, root: int, proc: str = "/proc") -> None:
        self.root, self.proc = root, proc
        self._tracked: dict[tuple[int, int], _Tracked] = {}
        self._lost = 0  # last readings of processes whose parent had left too (or the root itself)
        self._lock = threading.Lock()

    def sample(self) -> float | None:
        """Total CPU seconds now; None until the root has been seen once."""
        stats = scan(self.proc)
        with self._lock:
            self._update(stats)
            if not self._tracked and not self._lost:
                return None
            return (sum(t.ticks() for t in self._tracked.values()) + self._lost) / _TICK

    def _update(self, stats: dict[int, ProcStat]) -> None:
        alive = {s.key: s for s in stats.values() if s.state not in "ZX"}
        in_tree = {s.key: s for s in descendants(stats, self.root) if s.key in alive}
        by_pid = {k[0]: k for k in (*self._tracked, *in_tree)}
        for key, s in in_tree.items():
            if key not in self._tracked:
                parent = by_pid.get(s.ppid) if s.pid != self.root else None
                self._tracked[key] = _Tracked(s, parent, s.reaped)
        for key, t in self._tracked.items():
            if key in alive:  # adopted elsewhere (its parent died) still counts: it stays tracked
                t.stat = alive[key]
        for key in [k for k in self._tracked if k not in alive]:  # exited (or a zombie): leaves with its last reading
            self._depart(key)

    def _depart(self, key: tuple[int, int]) -> None:
        gone = self._tracked.pop(key)
        orphans = [k for k, t in self._tracked.items() if t.parent == key]
        for k in orphans:  # children still alive: their time can no longer reach this process's cutime
            self._tracked[k].parent = None
        parent = self._tracked.get(gone.parent) if gone.parent is not None else None
        if parent is not None:
            parent.departed += gone.ticks()
        else:
            self._lost += gone.ticks()


class Sampler:
    """A daemon thread that samples a :class:`TreeCpu` every ``interval_s`` until closed, so that a
    process that exits between the caller's own samples is read shortly before it goes."""

    def __init__(self, tree: TreeCpu, interval_s: float = 0.25) -> None:
        self.tree, self.interval_s = tree, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="proctree-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tree.sample()

    def seconds(self) -> float | None:
        """The tree's CPU seconds now (a fresh sample)."""
        return self.tree.sample()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def rss_bytes(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since start) of a process, in bytes, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out
