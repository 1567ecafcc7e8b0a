"""Shared-memory pixel slots: a preprocessed image goes from an API process to the model process
without being pickled or copied through a pipe.

A pool is one POSIX shared-memory segment of ``slots`` fixed-size slots, one ``uint8 [3, H, W]``
image each, after a table of owners (one int32 per slot). A slot is taken, written once by the
decoder, named in a submit message, read by the model process (into the pinned staging buffer of the
head batch), and given back only when the model process has answered for it (a result, a refusal, or
the acknowledgement of a cancel), so a slot is never rewritten while it may still be read. A full
pool is the overload signal (503 + Retry-After), like a full queue.

Two ways to allocate:

* **private** (``lock_path=None``): the pool belongs to one process, whose event loop allocates from a
  free list (no lock);
* **shared** (``lock_path`` given; ``patchlife serve``): the model process creates one pool for all
  API processes, so a request is refused for slots only when the service as a whole is full. A taker
  writes its pid into the owner table under an ``flock`` on ``lock_path`` (tens of microseconds; the kernel
  drops the lock of a process that dies holding it), and the model process frees the slots of an API
  process whose connection ended (:meth:`release`). Free slots are taken lowest first, so the pages
  touched (the memory /dev/shm really holds) follow the most slots ever in use at once.

The processes of one ``serve`` share multiprocessing's resource tracker (the API processes are
spawned by the model process), so a segment whose creator died is still removed at the end.

Pages are touched only when written, so a large pool costs memory only under load; where /dev/shm is
small (Docker's default is 64 MiB) mount a bigger one (docs/ops.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import torch


def _table_bytes(slots: int) -> int:
    return -(-slots * 4 // 64) * 64  # the owner table, padded to a cache line


class SlotPool:
    """``slots`` images of ``shape`` in one shared segment: created (``name=None``; ``new_name`` names it)
    or attached by ``name``. ``lock_path``: allocation shared between processes (see the module)."""

    def __init__(self, slots: int, shape: tuple[int, ...], name: str | None = None,
                 lock_path: Path | None = None, new_name: str | None = None) -> None:
        self.slots, self.shape = slots, tuple(shape)
        table = _table_bytes(slots)
        size = table + max(1, slots * math.prod(self.shape))
        self.owner = name is None
        self.shm = shared_memory.SharedMemory(name=name or new_name, create=self.owner, size=size if self.owner else 0)
        # np.frombuffer, not np.ndarray(buffer=): only an array made this way holds the segment's buffer
        # (numpy 2.4), so that close() cannot unmap it while a view of a slot lives (a read of it would
        # crash the process; measured: a model process whose private pool was closed under a queued batch)
        buf = self.shm.buf
        assert buf is not None  # just mapped
        self._owners: np.ndarray | None = np.frombuffer(buf, np.int32, slots)
        self._array: np.ndarray | None = np.frombuffer(buf, np.uint8, slots * math.prod(self.shape),
                                                       table).reshape((slots, *self.shape))
        self.tensor: torch.Tensor | None = torch.from_numpy(self._array)
        self._views: list[torch.Tensor] | None = None  # one per slot, made at the first read (see read)
        self._free = list(range(slots - 1, -1, -1))
        self._pid = os.getpid()
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600) if lock_path is not None else None

    @property
    def shared(self) -> bool:
        return self._lock_fd is not None

    @property
    def name(self) -> str:
        return self.shm.name

    @property
    def free(self) -> int:
        if self._owners is not None and self.shared:
            return int(np.count_nonzero(self._owners == 0))
        return len(self._free)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[np.ndarray]:
        assert self._lock_fd is not None and self._owners is not None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield self._owners
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def take(self, n: int) -> list[int] | None:
        """``n`` free slots, or None when fewer are free (nothing is taken then)."""
        if not self.shared:
            if n > len(self._free):
                return None
            return [self._free.pop() for _ in range(n)]
        if n == 0:
            return []
        with self._locked() as owners:
            free = np.flatnonzero(owners == 0)[:n]
            if len(free) < n:
                return None
            owners[free] = self._pid
        return [int(i) for i in free]

    def give(self, ids: list[int]) -> None:
        if not self.shared:
            self._free.extend(ids)
            return
        with self._locked() as owners:
            owners[ids] = 0

    def release(self, pid: int) -> int:
        """Free every slot ``pid`` holds (its process has gone); the number freed."""
        if not self.shared:
            return 0
        with self._locked() as owners:
            held = owners == pid
            owners[held] = 0
            return int(np.count_nonzero(held))

    def write(self, slot: int, pixels: torch.Tensor) -> None:
        if tuple(pixels.shape) != self.shape or pixels.dtype != torch.uint8:
            raise ValueError(f"a slot holds uint8 {list(self.shape)}, got {pixels.dtype} {list(pixels.shape)}")
        assert self._array is not None
        np.copyto(self._array[slot], pixels.numpy())  # numpy: a plain memcpy, no intra-op thread team

    def read(self, ids: list[int]) -> list[torch.Tensor]:
        """Views of the slots (no copy): valid until the answer for them is sent."""
        assert self.tensor is not None
        if ids and (min(ids) < 0 or max(ids) >= self.slots):
            raise ValueError(f"slot id out of range 0..{self.slots - 1}: {ids}")
        if self._views is None:  # indexing a tensor makes a new view each time (microseconds); these are made once
            self._views = list(self.tensor.unbind(0))
        views = self._views
        return [views[i] for i in ids]

    def __del__(self) -> None:
        # what SharedMemory.__del__ would do, but after dropping our arrays (they hold its buffer)
        if getattr(self, "tensor", None) is not None:
            with contextlib.suppress(Exception):
                self.close()

    def close(self, unlink: bool = False) -> None:
        """Unmap and, ``unlink``, remove the segment. A view of a slot still alive (a request its sender
        gave up on, still queued in the model process) keeps the mapping until it goes."""
        self.tensor = self._array = self._owners = self._views = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        try:
            self.shm.close()
        except BufferError:  # a view lives: the arrays' buffer holds the mmap, which unmaps when they go
            self.shm._mmap = None  # type: ignore[attr-defined]  # neither this nor SharedMemory.__del__ retries
            self.shm.close()       # the rest: the descriptor
        if unlink:  # the owner at its exit; the model process too when the owner died without doing it
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def shm_free_bytes() -> int | None:
    """Free bytes of /dev/shm (None where there is none)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
