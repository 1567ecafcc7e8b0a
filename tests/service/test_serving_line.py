"""The model process's log lines about the API processes (service/processes.py): the count in words, and the
"serving" line only once the model is ready and an API process has connected."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import pytest

from service import processes
from service.settings import Settings


def test_api_process_count_in_words() -> None:
    assert processes._api_processes(1) == "1 API process"
    assert processes._api_processes(3) == "3 API processes"
    line = processes._serving_line(Settings(host="127.0.0.1", port=8123, grpc_port=8124), 1)
    assert line == "serving http://127.0.0.1:8123 (1 API process, gRPC on port 8124)"
    assert "gRPC" not in processes._serving_line(Settings(grpc_port=0), 2)


async def _announce(started: bool, connect_after_s: float | None, caplog: pytest.LogCaptureFixture) -> list[float]:
    host = SimpleNamespace(connected=asyncio.Event())  # ModelHost's: set at the first connection
    loop = asyncio.get_running_loop()

    async def start() -> bool:
        await asyncio.sleep(0.05)
        return started

    if connect_after_s is not None:
        loop.call_later(connect_after_s, host.connected.set)
    t0 = time.time()  # the log records' clock
    task = asyncio.create_task(processes._announce(asyncio.create_task(start()), host, "serving X"))
    try:
        await asyncio.wait_for(asyncio.shield(task), 1.0)
    except asyncio.TimeoutError:
        task.cancel()
    return [r.created - t0 for r in caplog.records if r.getMessage() == "serving X"] if task.done() else []


def test_serving_is_logged_after_an_api_process_connects(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "patchlife.serve")
    (after_s,) = asyncio.run(_announce(True, 0.3, caplog))
    assert after_s >= 0.29  # not when the model was ready (0.05 s), but once the API process connected


def test_no_serving_line_before_a_connection_or_after_a_failed_start(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "patchlife.serve")
    asyncio.run(_announce(True, None, caplog))   # model ready, no API process: nothing yet
    asyncio.run(_announce(False, 0.1, caplog))   # warm-up failed: never "serving"
    assert not [r for r in caplog.records if r.getMessage() == "serving X"]
