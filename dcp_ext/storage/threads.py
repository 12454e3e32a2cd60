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

import collections
import contextvars
import os
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["io_pool", "submit_in_turn", "run_all", "HostInfo", "ranks_on_hosts", "ranks_on_host_from_env",
           "cpu_workers"]

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


@dataclass
class HostInfo:
    """What a rank's local plan tells the coordinator (``storage_data``): the rank's host."""

    host: str = field(default_factory=socket.gethostname)


def ranks_on_host_from_env() -> int:
    """``LOCAL_WORLD_SIZE`` (torchrun sets it), else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def ranks_on_hosts(storage_data: Sequence[Any], collective: bool = True) -> list[int]:
    """For each plan of a save or load (given its ``storage_data``), how many of the plans come
    from the same host, counted from their :class:`HostInfo`. A plan without one, or a rank-local
    (not ``collective``) save or load, falls back to ``LOCAL_WORLD_SIZE``."""
    hosts = [d.host if isinstance(d, HostInfo) else None for d in storage_data]
    per_host = collections.Counter(hosts)
    return [per_host[h] if h is not None and collective else ranks_on_host_from_env() for h in hosts]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_workers(io_threads: int, cpu_bound: bool, ranks_on_host: int) -> int:
    """Threads a rank moves bytes with: ``io_threads``, but where the transfer is CPU work (a
    local file system: a copy to or from the page cache), no more than this rank's share of the
    host's cores. More runnable threads than cores made 2 ranks on 2 cores slower, not faster
    (tmpfs, 1 GiB: 0.50 s per save with 1 thread per rank, 0.74 s with 2, 0.67 s with 8; stock,
    1 thread per rank: 0.56 s): a thread preempted while holding its process's GIL stalls the
    others of that process, and threads sharing a core evict each other's block from the cache
    between its hashing and its write. Object stores wait on the network: ``io_threads``."""
    if not cpu_bound:
        return io_threads
    return max(1, min(io_threads, _usable_cpus() // max(1, ranks_on_host)))


#: per key, the calls of :func:`submit_in_turn` waiting for the one running
_TURNS: dict[Any, collections.deque] = {}
_TURNS_LOCK = threading.Lock()


def submit_in_turn(pool: ThreadPoolExecutor, key: Any, fn: Callable[[], Any]) -> Future:
    """``pool.submit(fn)``, except that calls with the same ``key`` run one at a time, in the
    order submitted: the next is queued on ``pool`` when the one before finishes, so the pool's
    threads run calls of other keys meanwhile. For writes to one file: the kernel takes the
    file's lock for each write (tmpfs, ext4, xfs buffered), so two threads writing one file run
    one at a time, the waiting one spinning on the lock (a 768 MiB fp32 zarr3 save in 64 MiB
    shard files on 2 cores: 401 ms with jobs in pool order, 291 ms in turn; bf16 384 MiB: 200
    and 150 ms; medians of 7, load average ~0.5-0.8)."""
    fut: Future = Future()
    with _TURNS_LOCK:
        waiting = _TURNS.get(key)
        if waiting is not None:
            waiting.append((fn, fut))
            return fut
        _TURNS[key] = collections.deque()
    _start_turn(pool, key, fn, fut)
    return fut


def _start_turn(pool: ThreadPoolExecutor, key: Any, fn: Callable[[], Any], fut: Future) -> None:
    def run() -> None:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(e)
        else:
            fut.set_result(result)
        finally:
            with _TURNS_LOCK:
                waiting = _TURNS[key]
                nxt = waiting.popleft() if waiting else None
                if nxt is None:
                    del _TURNS[key]
            if nxt is not None:
                _start_turn(pool, key, *nxt)

    try:
        pool.submit(run)
    except RuntimeError as e:  # the pool was shut down (interpreter exit): fail this call and the rest
        fut.set_exception(e)
        with _TURNS_LOCK:
            rest = _TURNS.pop(key, collections.deque())
        for _fn, f in rest:
            f.set_exception(e)


def _forget_pools_in_child() -> None:
    global _LOCK, _TURNS_LOCK
    _POOLS.clear()
    _LOCK = threading.Lock()
    _TURNS.clear()
    _TURNS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)
