"""The CPU of a process tree: a fake ``/proc`` for each way a child can leave, then real processes
that spawn a busy child (reaped, left a zombie, orphaned)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench import proctree
from bench.proctree import Sampler, TreeCpu

TICK = os.sysconf("SC_CLK_TCK")


class FakeProc:
    """A ``/proc`` folder whose processes the test sets: pid -> (ppid, state, own ticks, reaped ticks)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def set(self, pid: int, ppid: int, own: int, reaped: int = 0, state: str = "S", start: int = 100) -> None:
        fields = [state, ppid, *[0] * 9, own, 0, reaped, 0, 20, 0, 1, 0, start, 0]
        (self.root / str(pid)).mkdir(exist_ok=True)
        (self.root / str(pid) / "stat").write_text(f"{pid} (a (b) c) " + " ".join(map(str, fields)) + "\n")

    def remove(self, pid: int) -> None:
        (self.root / str(pid) / "stat").unlink()
        (self.root / str(pid)).rmdir()


def test_parse_stat_splits_at_the_last_parenthesis() -> None:
    s = proctree.parse_stat("42 (we ird) (name) R 7 1 1 0 -1 0 0 0 0 0 11 4 6 3 20 0 3 0 9999 0 0\n")
    assert s == proctree.ProcStat(42, 7, "R", 9999, 15, 9)
    assert proctree.parse_stat("garbage") is None


def test_the_tree_is_the_root_and_everything_under_it(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    for pid, ppid in ((1, 0), (10, 1), (11, 10), (12, 11), (13, 10), (20, 1)):
        fake.set(pid, ppid, 0)
    assert sorted(s.pid for s in proctree.descendants(proctree.scan(str(tmp_path)), 10)) == [10, 11, 12, 13]
    assert proctree.descendants(proctree.scan(str(tmp_path)), 99) == []


def test_a_reaped_child_counts_once_with_its_final_time(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.set(10, 1, own=100, reaped=50)   # 50: children reaped before we looked (counted in the start figure)
    fake.set(11, 10, own=30)
    tree = TreeCpu(10, str(tmp_path))
    start = tree.sample()
    assert start == pytest.approx(180 / TICK)
    fake.set(11, 10, own=70)               # the child works on ...
    assert tree.sample() == pytest.approx(220 / TICK)
    fake.remove(11)                        # ... exits with 80 and is reaped: its time is in the parent's cutime
    fake.set(10, 1, own=110, reaped=130)
    assert tree.sample() == pytest.approx(240 / TICK)  # 110 + 130, not 110 + 130 + 70


def test_a_zombie_or_a_child_reaped_elsewhere_keeps_its_last_reading(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.set(10, 1, own=100)
    fake.set(11, 10, own=40)
    tree = TreeCpu(10, str(tmp_path))
    assert tree.sample() == pytest.approx(140 / TICK)
    fake.set(11, 10, own=0, state="Z")     # a zombie reads 0 until its parent waits
    assert tree.sample() == pytest.approx(140 / TICK)
    fake.remove(11)                        # reaped by someone else: the parent's cutime never grows
    assert tree.sample() == pytest.approx(140 / TICK)


def test_an_orphan_stays_counted_after_its_parent_dies(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.set(10, 1, own=100)
    fake.set(11, 10, own=20)
    fake.set(12, 11, own=5)
    tree = TreeCpu(10, str(tmp_path))
    assert tree.sample() == pytest.approx(125 / TICK)
    fake.remove(11)                        # 11 dies unreaped (by us); 12 is adopted by init
    fake.set(12, 1, own=45)
    fake.set(10, 1, own=100, reaped=20)    # the root reaps 11 (20 ticks)
    assert tree.sample() == pytest.approx(165 / TICK)
    fake.remove(12)                        # the orphan exits: its last reading stays
    assert tree.sample() == pytest.approx(165 / TICK)


def test_a_reused_pid_is_a_new_process(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.set(10, 1, own=100)
    fake.set(11, 10, own=40, start=200)
    tree = TreeCpu(10, str(tmp_path))
    tree.sample()
    fake.set(11, 10, own=3, start=300)     # 11 exited between samples (reaped elsewhere); a new 11 started
    assert tree.sample() == pytest.approx(143 / TICK)


def test_no_root_no_figure(tmp_path: Path) -> None:
    assert TreeCpu(10, str(tmp_path)).sample() is None


# -- real processes -------------------------------------------------------------------------------
BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < {cpu}: pass\n"


def _spawner(after_spawn: str, cpu: float = 0.6) -> str:
    """A Python program that starts a child busy for ``cpu`` CPU seconds, then runs ``after_spawn``."""
    return textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {BUSY.format(cpu=cpu)!r}])
        print(child.pid, flush=True)
    """) + textwrap.dedent(after_spawn)


def _measure(program: str, done: str = "") -> tuple[float, float]:
    """(CPU seconds of the tree over the program's life while sampled, the spawner's own CPU seconds)."""
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    tree = TreeCpu(proc.pid)
    sampler = Sampler(tree, interval_s=0.05)
    try:
        start = tree.sample()
        child = int(proc.stdout.readline())  # type: ignore[union-attr]
        while _running(child) and not done:
            time.sleep(0.05)
        if done:
            proc.stdout.readline()  # type: ignore[union-attr]
        time.sleep(0.2)
        end = tree.sample()
        own = proctree.parse_stat(Path(f"/proc/{proc.pid}/stat").read_text())
    finally:
        sampler.close()
        proc.kill()
        proc.wait()
    assert start is not None and end is not None and own is not None
    return end - start, own.own / TICK


def _running(pid: int) -> bool:
    try:
        return proctree.parse_stat(Path(f"/proc/{pid}/stat").read_text()).state not in "ZX"  # type: ignore[union-attr]
    except OSError:
        return False


def test_a_busy_child_that_is_reaped_is_counted() -> None:
    cpu, parent = _measure(_spawner("child.wait()\nprint('done', flush=True)\ntime.sleep(30)\n"), done="yes")
    assert cpu >= 0.55  # the child's 0.6 s (clock ticks: 10 ms steps)
    assert cpu < 0.6 + parent + 1.0


def test_a_busy_child_left_a_zombie_is_counted() -> None:
    cpu, parent = _measure(_spawner("time.sleep(30)\n"))  # never waits: the child stays a zombie
    assert 0.55 - 0.05 <= cpu < 0.6 + parent + 1.0  # up to one sampling interval of its time may be missed


def test_a_busy_grandchild_adopted_by_init_is_counted() -> None:
    # the middle process starts the busy one and exits 0.3 s later (the sampler has seen both by then):
    # init adopts the grandchild, which works on outside the tree
    program = textwrap.dedent(f"""
        import subprocess, sys, time
        middle = subprocess.Popen([sys.executable, "-c", {_spawner("time.sleep(0.3)")!r}], stdout=subprocess.PIPE,
                                  text=True)
        print(middle.stdout.readline().strip(), flush=True)
        middle.wait()
        time.sleep(30)
    """)
    cpu, parent = _measure(program)
    assert 0.55 - 0.05 <= cpu < 0.6 + parent + 2.0
