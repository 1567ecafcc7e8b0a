"""A bound on the memory of decoding: bytes being decoded at once, over all requests.

    gate = DecodeGate(capacity=decode_capacity(80_000_000))     # PATCHLIFE_MAX_DECODE_PIXELS
    cost = decode_cost(width * height, mode, format)              # from the header, nothing decoded
    async with gate.hold(cost, timeout_s=10.0):                   # raises DecodeBusy after timeout_s
        image = await anyio.to_thread.run_sync(decode, data)

A decode's peak memory is its pixel count times a number of bytes that depends on the image's mode
and format (``BYTES_PER_PIXEL``): 4 for 8-bit RGB (Pillow stores RGB as 4 bytes), 20 for images with
an alpha channel (compositing over white makes three RGBA copies), 7 for 16-bit grey, 12 for 32-bit
integer or float grey, 16 for any WebP. Holding that for the length of the decode bounds the memory
all decodes hold together. Waiters are served in arrival order (a large image is not starved by a
stream of small ones); an image larger than the whole capacity waits for all of it. Event-loop only:
no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

# Peak bytes per pixel of ``decode.decode_image`` by Pillow mode, measured as the rise of VmHWM while one
# 10-megapixel image decodes (scripts/decode_memory.py --modes), rounded up.
BYTES_PER_PIXEL: dict[str, int] = {
    "RGB": 4, "RGBX": 4, "YCbCr": 4, "LAB": 4, "HSV": 4, "L": 5, "P": 5, "1": 5, "CMYK": 8,
    "RGBA": 20, "RGBa": 20, "LA": 20, "La": 20, "PA": 20,
    "I;16": 8, "I;16B": 8, "I;16L": 8, "I;16N": 8, "I": 12, "F": 12,
}
WEBP_BYTES_PER_PIXEL = 16   # libwebp decodes to RGBA and Pillow copies it
OTHER_BYTES_PER_PIXEL = 20  # a mode not measured: charged like the dearest common one
RGB_BYTES_PER_PIXEL = BYTES_PER_PIXEL["RGB"]


def decode_capacity(max_decode_pixels: int) -> int:
    """The capacity in bytes: PATCHLIFE_MAX_DECODE_PIXELS counts pixels of 8-bit RGB."""
    return max_decode_pixels * RGB_BYTES_PER_PIXEL


def decode_cost(pixels: int, mode: str, image_format: str | None, transparent: bool = False) -> int:
    """Bytes a decode of ``pixels`` pixels of this mode/format peaks at (``transparent``: a palette image
    with a transparent colour, composited like RGBA)."""
    if image_format == "WEBP":
        per_pixel = WEBP_BYTES_PER_PIXEL
    elif transparent:
        per_pixel = BYTES_PER_PIXEL["RGBA"]
    else:
        per_pixel = BYTES_PER_PIXEL.get(mode, OTHER_BYTES_PER_PIXEL)
    return pixels * per_pixel


class DecodeBusy(Exception):
    """No room to decode within the wait limit."""


class DecodeGate:
    """Bytes being decoded at once, over all requests (a semaphore weighted by each decode's cost)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.available = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> int:
        return self.capacity - self.available

    @contextlib.asynccontextmanager
    async def hold(self, cost: int, timeout_s: float) -> AsyncIterator[None]:
        weight = max(1, min(int(cost), self.capacity))
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
