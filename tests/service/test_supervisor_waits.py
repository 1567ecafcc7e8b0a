"""service/processes.py's supervisor waits on events: a process's end wakes it (its sentinel), with no
poll of ``is_alive`` (the "serving" line's wait on ModelHost.connected: tests/service/test_serving_line.py)."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

from service import processes


def test_the_end_of_a_process_wakes_the_wait_at_once() -> None:
    ctx = multiprocessing.get_context("fork")
    quick, slow = ctx.Process(target=time.sleep, args=(0.3,)), ctx.Process(target=time.sleep, args=(30,))
    quick.start()
    slow.start()
    try:
        t0 = time.monotonic()
        asyncio.run(processes._until_one_exits([quick, slow], 20.0))
        waited = time.monotonic() - t0
        quick.join(5)
        assert not quick.is_alive() and slow.is_alive() and waited < 10.0
    finally:
        slow.kill()
        slow.join(5)


def test_the_wait_ends_at_its_timeout_while_every_process_lives() -> None:
    proc = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    proc.start()
    try:
        t0 = time.monotonic()
        asyncio.run(processes._until_one_exits([proc], 0.3))
        assert 0.25 <= time.monotonic() - t0 < 10.0 and proc.is_alive()
    finally:
        proc.kill()
        proc.join(5)

