"""Reusable byte buffers shared by the writers of a process.

Both the object-store part uploads and the local data files' write buffers take their buffers
from here and give them back when a file is done, so a rank's buffer memory is what its open
files use at once (bounded by its budget), allocated once, not once per file and save: fresh
allocations of several MiB also grow glibc's per-thread arenas, which keep freed memory.
"""

from __future__ import annotations

import collections
import threading

__all__ = ["BUFFERS", "BufferPool", "release_buffers"]


class BufferPool:
    """A process-wide free list of ``bytearray`` buffers (object-store parts, local files' write
    buffers), one list per size.

    Fresh memory costs a page fault per 4 KiB (about 0.65 GB/s here, versus ~10 GB/s for a
    copy into memory already mapped), so buffers are kept between files and checkpoints, up to
    ``max_idle`` per size. :func:`release_buffers` frees them.
    """

    def __init__(self) -> None:
        self._free: dict[int, collections.deque] = {}
        self._lock = threading.Lock()
        self.max_idle = 32

    def get(self, size: int) -> bytearray:
        with self._lock:
            q = self._free.get(size)
            if q:
                return q.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        with self._lock:
            q = self._free.setdefault(len(buf), collections.deque())
            if len(q) < self.max_idle:
                q.append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


BUFFERS = BufferPool()


def release_buffers() -> None:
    """Free the idle buffers kept for the next upload or data file (they are reused otherwise)."""
    BUFFERS.clear()
