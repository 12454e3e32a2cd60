"""Run a function on N gloo ranks in subprocesses: for tests, demos and benchmarks.

Two ways to use it:

* :func:`run_on_ranks` starts ``world_size`` fresh processes, runs ``fn(*args)`` on each
  and returns the per-rank results (a list indexed by rank).
* :class:`RankPool` keeps ``world_size`` processes with an initialised gloo group alive
  and runs many functions on them, which is much faster for a test suite (importing
  torch and forming a group costs seconds per process).

Both rendezvous through a ``FileStore`` in a private temporary directory (nothing listens
on the network), propagate the first failing rank's exception together with its
traceback, and time out instead of hanging: a rank stuck in a collective because a peer
failed is killed, and the error says which ranks finished and which did not. Ranks (and the
fork server) end when the process that owns the pool dies, even by ``kill -9``.

``fn`` must be importable by the child processes (a module-level function): children never
share the parent's memory. They are started with the ``forkserver`` method where the platform
has it: one server process imports torch once and every rank is forked from it, so starting a
pool costs a fraction of a second instead of one ``import torch`` per rank (seconds each on a
small machine). Each child gets the parent's environment (as of the pool's creation), working
directory and ``sys.path``, like ``spawn``. ``preload=["my_module"]`` imports
more modules once in the server (the demo preloads dcp_ext). Pass ``start_method="spawn"`` for
environment variables that torch reads at import time (the most isolated start).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["RankFailedError", "RankTimeoutError", "RankPool", "run_on_ranks"]

logger = logging.getLogger(__name__)

_POLL_S = 0.05


class RankFailedError(RuntimeError):
    """A function raised on one or more ranks; carries the remote traceback(s)."""

    def __init__(self, failures: dict[int, str], exc_types: dict[int, str]):
        self.failures = failures
        self.exc_types = exc_types
        first = min(failures)
        others = sorted(set(failures) - {first})
        msg = f"rank {first} failed with {exc_types[first]}:\n{failures[first]}"
        if others:
            msg += f"\n(ranks {others} failed too)"
        super().__init__(msg)


class RankTimeoutError(TimeoutError):
    """Ranks did not finish within the timeout (e.g. a peer died inside a collective)."""


@dataclass
class _Task:
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict


def _init_group(rank: int, world_size: int, store_path: str, backend: str, timeout_s: float) -> None:
    import datetime

    import torch.distributed as dist

    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


#: _forkserver_guard.ENV_VAR (not imported here: importing the guard is what arms it)
_GUARD_ENV = "_DCP_EXT_PDEATHSIG_PARENT"
#: modules the forkserver imports once, so that forked ranks start without importing torch
_PRELOAD = ["dcp_ext._forkserver_guard", "torch", "torch.distributed", "torch.distributed.checkpoint"]


def _mp_context(start_method: str | None, preload: Sequence[str] = ()) -> Any:
    """The multiprocessing context for rank processes (``forkserver`` preloading torch by default)."""
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method must be 'forkserver', 'spawn' or None, got {start_method!r}")
    if preload and start_method != "forkserver":
        raise ValueError("preload= needs start_method='forkserver' (or None)")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload([*_PRELOAD, *(m for m in preload if m not in _PRELOAD)])
    return ctx


def _watch_owner(owner: int) -> None:
    """End this rank as soon as the process that owns its pool is gone (even after ``kill -9``:
    no orphaned rank outlives a test run). A daemon thread polls, because a rank forked by the
    fork server is not the owner's child; the fork server itself dies with the owner
    (:mod:`dcp_ext._forkserver_guard`)."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # pragma: no cover - the pid was reused by another user
                os._exit(1)

    threading.Thread(target=watch, name="dcp_ext-owner-watch", daemon=True).start()


def _worker_main(rank: int, world_size: int, store_path: str, backend: str, pg_timeout_s: float,
                 env: dict[str, str], inbox: Any, outbox: Any, owner: int | None = None) -> None:
    if owner is not None:
        _watch_owner(owner)
    # forkserver children inherit the *server's* environment: replace it with the parent's
    os.environ.clear()
    os.environ.update(env)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    # Keep the 2-core CI machine responsive: one intra-op thread per rank by default.
    import torch

    torch.set_num_threads(int(os.environ.get("DCP_EXT_TEST_THREADS", "1")))
    try:
        _init_group(rank, world_size, store_path, backend, pg_timeout_s)
    except BaseException as e:  # noqa: BLE001 - report anything to the parent
        outbox.put((rank, "init_error", type(e).__name__, traceback.format_exc()))
        return
    outbox.put((rank, "ready", None, None))
    import torch.distributed as dist

    try:
        while True:
            task = inbox.get()
            if task is None:
                break
            try:
                result = task.fn(*task.args, **task.kwargs)
                outbox.put((rank, "ok", None, result))
            except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
                outbox.put((rank, "error", type(e).__name__, traceback.format_exc()))
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


class RankPool:
    """``world_size`` long-lived processes sharing one gloo process group.

    Use as a context manager::

        with RankPool(4) as pool:
            results = pool.run(my_module.my_fn, arg1, timeout=60)

    After a failure or a timeout the pool stays usable when every rank returned; if a
    rank is stuck (e.g. waiting in a collective for a failed peer) the pool is torn down
    and :attr:`broken` is set; create a new one.

    ``env`` is added to the parent's environment in every rank. ``start_method``: ``None``
    (``forkserver`` with torch preloaded where available, else ``spawn``), ``"forkserver"`` or
    ``"spawn"`` (slower to start; use it when torch must see ``env`` at import time).
    ``preload``: more modules for the fork server to import once (forkserver only).
    """

    def __init__(self, world_size: int, *, backend: str = "gloo", start_timeout: float = 120.0,
                 pg_timeout: float = 120.0, env: dict[str, str] | None = None,
                 failure_grace: float = 10.0, start_method: str | None = None, preload: Sequence[str] = ()):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        ctx = _mp_context(start_method, preload)
        self.world_size = world_size
        self.broken = False
        #: seconds to wait for the other ranks once one rank failed
        self.failure_grace = failure_grace
        self._dir = tempfile.mkdtemp(prefix="dcp_ext_ranks_")
        child_env = {**os.environ, **(env or {})}
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(world_size)]
        store_path = os.path.join(self._dir, "store")
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(r, world_size, store_path, backend, pg_timeout, child_env,
                      self._inboxes[r], self._outbox, os.getpid()),
                daemon=True,
                name=f"dcp_ext-rank{r}",
            )
            for r in range(world_size)
        ]
        # the fork server starts with the first process; the guard it preloads arms itself only
        # in a child of the process this variable names (see _forkserver_guard), and the variable
        # is set just for that moment, so nothing else this process starts inherits it
        prev = os.environ.get(_GUARD_ENV)
        os.environ[_GUARD_ENV] = str(os.getpid())
        try:
            for p in self._procs:
                p.start()
        finally:
            if prev is None:
                os.environ.pop(_GUARD_ENV, None)
            else:
                os.environ[_GUARD_ENV] = prev
        try:
            self._collect("ready", start_timeout)
        except BaseException:
            self.close(force=True)
            raise

    def _collect(self, what: str, timeout: float | None) -> list[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        types: dict[int, str] = {}
        first_failure_at: float | None = None
        while len(results) + len(failures) < self.world_size:
            now = time.monotonic()
            # Once one rank failed, give the others a short grace period, not the full timeout.
            if first_failure_at is not None and now - first_failure_at > self.failure_grace:
                break
            if deadline is not None and now > deadline:
                break
            try:
                rank, status, exc_type, payload = self._outbox.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs)
                        if not p.is_alive() and r not in results and r not in failures]
                for r in dead:
                    failures[r] = f"process exited with code {self._procs[r].exitcode}"
                    types[r] = "ProcessDied"
                    first_failure_at = first_failure_at or time.monotonic()
                continue
            if status in ("ok", "ready"):
                results[rank] = payload
            else:
                failures[rank] = payload
                types[rank] = exc_type
                first_failure_at = first_failure_at or time.monotonic()
        missing = sorted(set(range(self.world_size)) - set(results) - set(failures))
        if missing:
            self.close(force=True)
            if failures:
                raise RankFailedError(failures, types)
            raise RankTimeoutError(
                f"{what}: ranks {missing} did not finish within {timeout}s "
                f"(finished: {sorted(results)}); the pool was torn down"
            )
        if failures:
            raise RankFailedError(failures, types)
        return [results[r] for r in range(self.world_size)]

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = 300.0,
            **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results indexed by rank."""
        if self.broken:
            raise RuntimeError("this RankPool is broken (a previous call timed out); create a new one")
        task = _Task(fn, args, kwargs)
        for q in self._inboxes:
            q.put(task)
        return self._collect(getattr(fn, "__name__", "task"), timeout)

    def close(self, force: bool = False) -> None:
        """Stop the worker processes (politely unless ``force``) and remove the rendezvous dir."""
        if not force and not self.broken:
            for q in self._inboxes:
                try:
                    q.put(None)
                except Exception:  # noqa: BLE001
                    pass
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if force:
            self.broken = True
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0,
                 backend: str = "gloo", env: dict[str, str] | None = None, start_method: str | None = None,
                 preload: Sequence[str] = (), **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` fresh gloo ranks; return per-rank results.

    Raises :class:`RankFailedError` (with the failing rank's traceback) if any rank raised,
    and :class:`RankTimeoutError` if ranks did not finish within ``timeout`` seconds.
    ``start_method``/``preload``: see :class:`RankPool`.
    """
    with RankPool(world_size, backend=backend, env=env, start_method=start_method, preload=preload) as pool:
        return pool.run(fn, *args, timeout=timeout, **kwargs)


def free_rank_pools(pools: Sequence[RankPool]) -> None:
    """Close several pools (helper for test fixtures)."""
    for p in pools:
        p.close()
