"""What the event loop and the worker thread share, and nothing else: the loop never waits on the worker.

The worker thread owns the queues (:mod:`service.runtime.admission`) outright: it alone reads and
changes them, so planning, expiry and the metrics hooks run with no lock held at all. The event loop
reaches the worker through three things, none of which the worker holds while it plans or runs a batch:

* :class:`Capacity`: images and tail tokens admitted and not yet in a batch. Admission reserves
  against it at once (:class:`~service.protocol.QueueFull` when a capacity would be passed), the
  worker gives back what it takes into a batch, fails or drops. Each side holds its lock for a few
  additions only. A reservation rather than a count of the queues, because the queues belong to the
  worker thread: the loop could count them only by waiting for it.
* :class:`Inbox`: submissions and cancellations, appended by the loop to a ``deque`` (thread-safe for
  append and popleft), and an :class:`threading.Event` that wakes the worker. The worker drains it
  before each plan, so an image is in the queues before any batch could take it.
* :func:`settle`: answers go back by one ``call_soon_threadsafe`` per event loop for everything a batch
  (or an expiry, or a shutdown) settled, not one per request.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.protocol import ImageResult

Outcome = Any  # list[ImageResult] | Exception: what a request's future is set to


class Capacity:
    """Admitted images and tail tokens not yet taken into a batch (the queue depth), and their caps.

    ``_lock`` guards the two numbers for the length of an addition: neither thread ever waits on the
    other's planning or batches. ``on_depth(images, tokens)`` (the queue-depth gauge) is called outside
    it, by whichever thread calls ``publish``; when both do at once, the one reporting goes on until
    the newest numbers are reported and the other does not wait (so the gauge ends at the last value).
    A reservation is not reported by the event loop: the worker reports it when it takes the request
    from the inbox (a moment later: the post wakes it), once per round rather than once per request.
    """

    def __init__(self, images_cap: int, tokens_cap: int, on_depth: Callable[[int, int], None]) -> None:
        self.images_cap, self.tokens_cap, self.on_depth = images_cap, tokens_cap, on_depth
        self.images = 0
        self.tokens = 0
        self._lock = threading.Lock()
        self._version = 0         # bumped on every change
        self._reported = 0        # the version the gauge shows
        self._reporting = threading.Lock()  # taken without blocking: one reporter at a time, nobody waits

    def reserve(self, images: int, tokens: int) -> tuple[int, int] | None:
        """Add ``images`` and ``tokens`` when both stay within their caps (None); otherwise add nothing
        and return the (images, tokens) already held, for the refusal."""
        with self._lock:
            if self.images + images > self.images_cap or self.tokens + tokens > self.tokens_cap:
                return self.images, self.tokens
            self.images += images
            self.tokens += tokens
            self._version += 1
        return None

    def add(self, images: int, tokens: int) -> None:
        """Change the numbers without a check (negative: given back); ``publish`` reports them."""
        with self._lock:
            self.images += images
            self.tokens += tokens
            self._version += 1

    def publish(self) -> None:
        while self._version != self._reported:
            if not self._reporting.acquire(blocking=False):
                return  # the thread reporting now sees this version on its next round
            try:
                with self._lock:
                    version, images, tokens = self._version, self.images, self.tokens
                self.on_depth(images, tokens)
                self._reported = version
            finally:
                self._reporting.release()


@dataclass(frozen=True)
class Posted:
    """Queue a request's images for the head (their capacity is already reserved)."""

    request: Any                 # admission.Request
    pixels: list[Any]            # torch.Tensor each
    keep_rate: float | None
    estimate: int
    now: float
    rates: tuple[float, ...]


@dataclass(frozen=True)
class Withdrawn:
    """The request's caller went away: drop what is still queued of it."""

    request: Any


class Inbox:
    """Messages from the event loop to the worker thread, in order, and the event that wakes it."""

    def __init__(self) -> None:
        self._messages: deque[Posted | Withdrawn] = deque()
        self.wake = threading.Event()

    def post(self, message: Posted | Withdrawn) -> None:
        self._messages.append(message)
        # Event.set takes the event's lock and notifies: skip it while the event is still set. Safe: the
        # worker clears it before it takes the inbox, so a message appended while it reads as set is
        # appended before that clear, and taken after it.
        if not self.wake.is_set():
            self.wake.set()

    def take(self) -> list[Posted | Withdrawn]:
        """Everything posted so far, oldest first (any thread; each message is taken once)."""
        out = []
        while True:
            try:
                out.append(self._messages.popleft())
            except IndexError:
                return out

    def __len__(self) -> int:
        return len(self._messages)


def settle(settled: Iterable[tuple[Any, Outcome]]) -> None:
    """Answer requests, ``(request, outcome)`` each: one ``call_soon_threadsafe`` per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[list[ImageResult]], Outcome]]] = {}
    for request, outcome in settled:
        by_loop.setdefault(request.loop, []).append((request.future, outcome))
    for loop, answers in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, answers)
        except RuntimeError:  # the loop has closed (shutdown): nobody waits
            pass


def _set_all(answers: list[tuple[asyncio.Future[list[ImageResult]], Outcome]]) -> None:
    for future, outcome in answers:
        if future.done():  # cancelled meanwhile
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
