"""service/frontend/offload.py: the thread hop of the per-image work keeps what anyio's run_sync did."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from service.frontend.offload import in_thread

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def test_the_result_comes_back_from_another_thread() -> None:
    async def main() -> tuple[int, int]:
        return await in_thread(lambda a, b: (a + b, threading.get_ident()), 2, 3)

    total, ident = asyncio.run(main())
    assert total == 5 and ident != threading.get_ident()


def test_what_the_call_raises_is_raised_to_the_caller() -> None:
    def bad() -> None:
        raise ValueError("broken image")

    with pytest.raises(ValueError, match="broken image"):
        asyncio.run(in_thread(bad))


def test_the_call_sees_the_callers_context() -> None:
    async def main() -> str:
        VAR.set("request-7")
        return await in_thread(VAR.get)

    assert asyncio.run(main()) == "request-7"


def test_a_cancelled_caller_waits_for_the_thread_then_is_cancelled() -> None:
    """As run_sync by default: the decode cannot be stopped, so its caller (holding the decode budget)
    only ends once it has, however many times it is cancelled meanwhile."""
    release, finished = threading.Event(), threading.Event()

    def slow() -> None:
        release.wait(5)
        finished.set()

    async def main() -> None:
        task = asyncio.create_task(in_thread(slow))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()  # a second cancel does not end the wait either
        await asyncio.sleep(0.05)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set()

    asyncio.run(main())


def test_a_job_that_ends_as_it_is_cancelled_still_ends_the_caller() -> None:
    async def main() -> None:
        for _ in range(50):  # the job's wake and the cancel race: the caller ends either way
            task = asyncio.create_task(in_thread(lambda: None))
            await asyncio.sleep(0)
            task.cancel()
            try:
                await asyncio.wait_for(task, 5)
            except asyncio.CancelledError:
                pass

    asyncio.run(main())
