"""A bound on the memory of decoding: pixels being decoded at once, over all requests.

    budget = DecodeBudget(capacity=80_000_000)
    async with budget.hold(width * height, timeout_s=10.0):   # raises DecodeBusy after timeout_s
        image = await anyio.to_thread.run_sync(decode, data)

A decoded image costs about its pixel count times a few bytes (3 for 8-bit RGB, more for the
intermediate copies of alpha compositing or high bit depths), so holding the header's width x height
for the length of a decode bounds the memory all decodes hold together. Waiters are served in arrival
order (a large image is not starved by a stream of small ones); an image larger than the whole budget
waits for all of it. Event-loop only: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class DecodeBusy(Exception):
    """No room to decode within the wait limit."""


class DecodeBudget:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.available = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> int:
        return self.capacity - self.available

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int, timeout_s: float) -> AsyncIterator[None]:
        weight = max(1, min(int(pixels), self.capacity))
        await self._acquire(weight, timeout_s)
        try:
            yield
        finally:
            self._release(weight)

    async def _acquire(self, weight: int, timeout_s: float) -> None:
        if not self._waiters and self.available >= weight:
            self.available -= weight
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (weight, granted)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), timeout_s)
        except BaseException as exc:  # timed out or cancelled: give back what may have been granted
            if granted.done() and not granted.cancelled():
                self._release(weight)
            else:
                granted.cancel()
                self._waiters.remove(entry)
                self._wake()  # the waiters behind this one may fit now
            if isinstance(exc, asyncio.TimeoutError):
                raise DecodeBusy(f"no room to decode within {timeout_s:.1f} s") from None
            raise

    def _release(self, weight: int) -> None:
        self.available += weight
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.available:
            weight, granted = self._waiters.popleft()
            self.available -= weight
            granted.set_result(None)
