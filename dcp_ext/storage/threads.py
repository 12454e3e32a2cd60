"""Long-lived I/O thread pools shared by every save and load of a process.

Stock DCP and our first versions started a fresh ``ThreadPoolExecutor`` per ``write_data`` /
``read_data``. Starting a thread waits for it to take the GIL, which the threads started just
before are busy using (serialising, hashing): on 2 busy cores that cost ~40 ms per save, 20% of a
256 MiB save. The pools here are created once per (purpose, size) and reused; each purpose has its
own pool, so a job never waits on a job queued behind it in the same pool (no nested deadlock),
and a child process created by ``fork`` starts with no pools (threads do not survive ``fork``).

Jobs run in a copy of the caller's :mod:`contextvars` context (as ``asyncio.to_thread`` does).
torch keeps settings such as ``torch.serialization.set_crc32_options`` per context: without the
copy, a pool thread would not see that the caller switched torch's zip CRC32 off, and every
multi-file save computed it anyway (about a third more CPU per byte on these machines).
"""

from __future__ import annotations

import contextvars
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

__all__ = ["io_pool", "run_all"]

_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def io_pool(purpose: str, workers: int) -> ThreadPoolExecutor:
    """The process-wide pool of ``workers`` threads for ``purpose`` (``"write"``, ``"read"``...)."""
    key = (purpose, max(1, int(workers)))
    with _LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(key[1], thread_name_prefix=f"dcp_ext-{purpose}")
        return pool


def run_all(purpose: str, workers: int, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
    """``[fn(*args) for args in calls]`` on the shared pool; returns the results in order.

    If a call raises, the calls not started yet are cancelled, the running ones are waited for
    (so no thread still touches the caller's buffers when this returns), and the first error is
    raised. With one call (or one worker) everything runs on the calling thread. Each call runs
    in its own copy of the caller's context, so context-local settings carry over.
    """
    if len(calls) <= 1 or workers <= 1:
        return [fn(*args) for args in calls]
    pool = io_pool(purpose, min(workers, len(calls)))
    futs: list[Future] = [pool.submit(contextvars.copy_context().run, fn, *args) for args in calls]
    first: BaseException | None = None
    for f in futs:
        try:
            f.result()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after every job stopped
            if first is None:
                first = e
                for g in futs:
                    g.cancel()
    if first is not None:
        raise first
    return [f.result() for f in futs]


def _forget_pools_in_child() -> None:
    global _LOCK
    _POOLS.clear()
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)
