"""One call in a worker thread for the API process's per-image work (decode, resize): ``await in_thread(fn, *args)``.

An empty round trip through ``anyio.to_thread.run_sync`` costs the process about 65 us of CPU, through
this (a plain ``concurrent.futures`` pool with a done-callback) about 41 us (``python -m bench.loop_costs``):
anyio enters and leaves a capacity limiter and a cancel scope, looks up run variables and adds a
checkpoint, and its worker threads run a loop of their own. The 224-px JPEG and v2 pixel requests pay
it once per image. What it does is kept:

* the call runs in a copy of the caller's context (the request id of its log lines);
* as many calls at once as anyio's default limiter allowed (40); the decode budget
  (``service/frontend/decode_gate.py``) is what bounds them in practice;
* a cancelled caller still waits for the thread to finish, then re-raises the cancellation, as
  ``run_sync`` does by default: a decode cannot be stopped, and its cost stays held in the decode budget
  until it really ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
WORKERS = 40  # anyio's default thread limiter, which these calls shared before
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool() -> ThreadPoolExecutor:
    """This process's pool, made at the first call (an API process makes it after it has started)."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="patchlife-work")
    return _pool


def _wake(waiter: list[asyncio.Future[None]]) -> None:
    """On the loop: the job is done; wake whichever future its caller awaits now."""
    if not waiter[0].done():
        waiter[0].set_result(None)


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread; its result, or what it raised."""
    loop = asyncio.get_running_loop()
    waiter = [loop.create_future()]  # a list: after a cancel, the callback wakes the future awaited then

    def done(_: Future[T]) -> None:  # in the worker thread
        try:
            loop.call_soon_threadsafe(_wake, waiter)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    job = pool().submit(contextvars.copy_context().run, fn, *args)
    job.add_done_callback(done)
    try:
        await waiter[0]
    except asyncio.CancelledError:
        while not job.done():  # the thread cannot be stopped: wait for it, however often cancelled
            waiter[0] = loop.create_future()
            try:
                await waiter[0]
            except asyncio.CancelledError:
                continue
        raise
    return job.result()
