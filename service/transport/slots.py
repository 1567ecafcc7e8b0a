"""Shared-memory pixel slots: a preprocessed image goes from an API process to the model process
without being pickled or copied through a pipe.

Each API process owns one pool (a POSIX shared-memory segment of ``slots`` fixed-size slots, one
``uint8 [3, H, W]`` image each) and is its only writer: a slot is taken, written once by the decoder,
named in a submit message, read by the model process (into the pinned staging buffer of the head
batch), and given back only when the model process has answered for it (a result, a refusal, or the
acknowledgement of a cancel), so a slot is never rewritten while it may still be read. No lock is
needed: allocation happens on the API process's event loop. The processes of one ``serve`` share
multiprocessing's resource tracker (the API processes are spawned by the model process), so a
segment whose owner died is still removed at the end. A full pool is the API process's
overload signal (503 + Retry-After), like a full queue.

Pages are touched only when written, so a large pool costs memory only under load; where /dev/shm is
small (Docker's default is 64 MiB) mount a bigger one (docs/ops.md).
"""

from __future__ import annotations

import math
import os
from multiprocessing import shared_memory

import numpy as np
import torch


class SlotPool:
    """``slots`` images of ``shape`` in one shared segment. ``create=True`` in the API process (the
    owner); the model process attaches by ``name``."""

    def __init__(self, slots: int, shape: tuple[int, ...], name: str | None = None) -> None:
        self.slots, self.shape = slots, tuple(shape)
        size = max(1, slots * math.prod(self.shape))
        self.owner = name is None
        self.shm = shared_memory.SharedMemory(name=name, create=self.owner, size=size if self.owner else 0)
        self._array: np.ndarray | None = np.ndarray((slots, *self.shape), np.uint8, buffer=self.shm.buf)
        self.tensor: torch.Tensor | None = torch.from_numpy(self._array)
        self._free = list(range(slots - 1, -1, -1))

    @property
    def name(self) -> str:
        return self.shm.name

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int] | None:
        """``n`` free slots, or None when fewer are free (nothing is taken then)."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def give(self, ids: list[int]) -> None:
        self._free.extend(ids)

    def write(self, slot: int, pixels: torch.Tensor) -> None:
        if tuple(pixels.shape) != self.shape or pixels.dtype != torch.uint8:
            raise ValueError(f"a slot holds uint8 {list(self.shape)}, got {pixels.dtype} {list(pixels.shape)}")
        assert self._array is not None
        np.copyto(self._array[slot], pixels.numpy())  # numpy: a plain memcpy, no intra-op thread team

    def read(self, ids: list[int]) -> list[torch.Tensor]:
        """Views of the slots (no copy): valid until the answer for them is sent."""
        assert self.tensor is not None
        if any(not 0 <= i < self.slots for i in ids):
            raise ValueError(f"slot id out of range 0..{self.slots - 1}: {ids}")
        return [self.tensor[i] for i in ids]

    def close(self, unlink: bool = False) -> None:
        """Unmap (the views must be gone: a live view keeps the mapping) and, ``unlink``, remove the segment."""
        self.tensor = self._array = None
        try:
            self.shm.close()
        except BufferError:  # a view is still referenced somewhere: the mapping goes when it does
            pass
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
