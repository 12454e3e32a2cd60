"""Pooled host staging for ``dcp.async_save``: copy into reused buffers, never overwrite a
buffer an upload may still read.

Stock ``dcp.async_save`` stages every checkpoint into *fresh* host memory. Fresh memory is
page-faulted in on first touch, which makes the "copy" several times slower than a ``memcpy``
into memory that is already mapped (about 0.65 GB/s vs 19 GB/s measured on the dev machines).
:class:`PooledStager` allocates one flat host buffer (a *pool*) sized from the state dict on
first use and copies every later checkpoint of the same structure into it.

Ownership: a pool is *leased* to one checkpoint from :meth:`PooledStager.stage` until the
upload that reads it has finished. The stager learns that in one of two ways:

* explicitly: :func:`async_save` (or :meth:`PooledStager.track` on the future that stock
  ``dcp.async_save`` returns) registers a done-callback on the upload future;
* implicitly, for a plain ``dcp.async_save(..., async_stager=stager)`` that nobody tracked:
  the lease ends when no tensor viewing the pool is alive outside the stager any more (the
  storage reference count drops back to the stager's own). Any code that can still read the
  staged tensors holds such a reference, so this can only release *late*, never early.

A new save that finds every pool leased either allocates another pool (if ``max_pools`` and
``memory_budget`` allow) or waits, logging a warning every ``warn_every_s`` seconds, up to
``wait_timeout`` (then :class:`~dcp_ext.errors.StagingPoolBusyError`).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from .errors import StagingBudgetError, StagingError, StagingPoolBusyError
from .torch_compat import ASYNC_SAVE_TAKES_STAGER, async_save_kwargs

__all__ = ["PooledStager", "async_save"]

logger = logging.getLogger(__name__)

_ALIGN = 64  # byte alignment of every tensor inside a pool (cache line; any dtype's itemsize)
_ATOMIC = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_POLL_S = 0.02

#: the reference count of a storage (counts every tensor and storage object viewing it): how a
#: pool tells that nobody holds its staged tensors any more (implicit release)
_use_count: Callable[[Any], int] = torch._C._storage_Use_Count  # type: ignore[attr-defined]


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _pin(ptr: int, nbytes: int) -> None:
    """Page-lock an existing host range (cudaHostRegister); no power-of-2 rounding."""
    rc = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1))  # 1 = cudaHostRegisterPortable
    if rc != 0:
        raise StagingError(f"cudaHostRegister of {_fmt_bytes(nbytes)} staging pool failed (cudaError {rc})")


def _unpin_all(ptrs: list[int]) -> None:
    for ptr in ptrs:
        _unpin(ptr)


def _unpin(ptr: int) -> None:
    try:
        rc = int(torch.cuda.cudart().cudaHostUnregister(ptr))
        if rc != 0:
            logger.warning("cudaHostUnregister(0x%x) failed with cudaError %d", ptr, rc)
    except Exception:  # noqa: BLE001 - interpreter shutdown, CUDA context gone
        pass


@dataclass
class _Leaf:
    """One unique source tensor of a state dict and where it lives in a pool."""

    path: str
    tensor: torch.Tensor  # the plain local tensor to copy (DTensor's local shard)
    offset: int = 0
    nbytes: int = 0
    #: the local shard of a DTensor (in shared memory it gets a segment of its own, see _Pool)
    dtensor: bool = False


class _Pool:
    """One flat host allocation holding a copy of every tensor of one state-dict structure.

    Private memory (the default): one allocation, but every tensor gets its *own* storage
    over its slice (``torch.frombuffer``), exactly ``nbytes`` long. A plain view of one big
    storage would make stock ``FileSystemWriter`` clone every item into fresh memory during
    the upload (it clones tensors whose storage is larger than the tensor, because
    ``torch.save`` of a view writes the whole storage), which costs page faults and a
    transient second copy of each item.

    Shared memory (``share_memory=True``): one shared segment and plain views of it, so the
    process executor passes one handle (one file descriptor) per save instead of one per
    tensor; the clone then happens in the checkpoint process, off the training process. The
    local shards of DTensors are the exception: each gets a shared segment of its own, because
    pickling a DTensor whose local tensor starts at a non-zero offset of a shared storage
    crashes the process (segmentation fault in torch 2.13's ``_share_fd_cpu_``).
    """

    def __init__(self, signature: tuple, leaves: list[_Leaf], *, pin: bool, share: bool, index: int):
        self.signature = signature
        self.index = index
        total = 0
        own_bytes = 0
        slots: list[tuple[int, torch.dtype, torch.Size, bool]] = []
        for leaf in leaves:
            t = leaf.tensor
            nbytes = t.numel() * t.element_size()
            own = share and leaf.dtensor  # a shared segment of its own (see the class docstring)
            slots.append((-1 if own else total, t.dtype, t.shape, own))
            if own:
                own_bytes += _align(nbytes)
            else:
                total += _align(nbytes)
        self.nbytes = total + own_bytes
        if share:
            storage = torch.UntypedStorage._new_shared(max(total, 1))
            base = torch.empty(0, dtype=torch.uint8).set_(storage)
        else:
            base = torch.empty(max(total, 1), dtype=torch.uint8)
        self.base = base
        self.shared = share
        self.pinned = False
        flat = None if share else base.numpy()
        self.views: list[torch.Tensor] = []
        regions = [(base.data_ptr(), base.numel())] if total > 0 else []  # host ranges to pin
        for off, dtype, shape, own in slots:
            nbytes = dtype.itemsize * int(torch.Size(shape).numel())
            if own:
                seg = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(nbytes, 1)))
                v = seg[:nbytes]
                if nbytes:
                    regions.append((seg.data_ptr(), nbytes))
            elif share:
                v = base[off:off + nbytes]
            elif nbytes == 0:
                v = torch.empty(0, dtype=torch.uint8)
            else:
                v = torch.frombuffer(flat, dtype=torch.uint8, count=nbytes, offset=off)
            self.views.append(v.view(dtype).view(shape))
        if pin and regions:
            done: list[int] = []
            try:
                for ptr, n in regions:
                    _pin(ptr, n)
                    done.append(ptr)
            except BaseException:
                _unpin_all(done)
                raise
            self.pinned = True
            self._finalizer = weakref.finalize(self, _unpin_all, [ptr for ptr, _ in regions])
            self._finalizer.atexit = False
        # Distinct storages and the references the pool itself holds on each (its own
        # tensors and these storage objects); anything above that is someone else's.
        seen: dict[int, Any] = {}
        for t in [base, *self.views]:
            st = t.untyped_storage()
            seen.setdefault(st._cdata, st)
        self.storages = list(seen.values())
        self.ptrs = [v.data_ptr() for v in self.views]
        self.lease: _Lease | None = None
        self.baseline: list[int] = []

    def measure_baseline(self) -> None:
        """Record the pool's own reference counts; call once the constructor's locals are gone."""
        self.baseline = [_use_count(st._cdata) for st in self.storages]

    def external_refs(self) -> int:
        """Tensors (or storages) viewing this pool that the pool did not create itself."""
        return sum(_use_count(st._cdata) - b for st, b in zip(self.storages, self.baseline))

    def moved(self) -> bool:
        """Whether torch.multiprocessing moved the pool's storages into shared memory in place."""
        return any(v.data_ptr() != p for v, p in zip(self.views, self.ptrs))

    def free(self) -> None:
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()  # unpin now, while the memory is certainly still mapped
        self.views = []
        self.storages = []
        self.base = None  # type: ignore[assignment]


@dataclass
class _Lease:
    """A pool handed to one checkpoint, from ``stage()`` until its upload finished."""

    pool: _Pool
    seq: int
    started: float = field(default_factory=time.monotonic)
    tracked: bool = False
    released: bool = False
    staging: bool = False  # inside stage(): not yet handed out, never reaped


class PooledStager(AsyncStager):
    """An ``AsyncStager`` for ``dcp.async_save`` that copies into a reused host buffer pool.

    Use it through :func:`dcp_ext.async_save` (which tracks the upload for you)::

        stager = dcp_ext.PooledStager()
        for step in ...:
            fut = dcp_ext.async_save(state, storage_writer=..., async_stager=stager)
            ...  # training may mutate `state` at once
        fut.result(); stager.close()

    Plain ``dcp.async_save(state, async_stager=stager, ...)`` is safe too (see the module
    docstring: the pool is only reused once no staged tensor is referenced any more); call
    :meth:`track` on its result to release the pool exactly when the upload finishes.

    Args:
        pin_memory: page-lock the pool (``cudaHostRegister``) for fast non-blocking D2H
            copies. ``None`` (default): when CUDA is available.
        share_memory: allocate the pool in shared memory, so the process-based executor
            (``AsyncCheckpointerType.PROCESS``) passes a handle instead of copying it into
            shared memory on the first save. Required with ``pin_memory`` and PROCESS.
        max_pools: how many pools may exist at once (a second one lets a save proceed while
            the previous upload still reads the first). Default 1: a new save waits.
        memory_budget: upper bound in bytes on the host memory of all pools together. A
            state dict whose pool alone exceeds it raises :class:`StagingBudgetError`; a
            further pool is only allocated if it fits.
        wait_timeout: seconds a save may wait for a busy pool before
            :class:`StagingPoolBusyError`; ``None`` waits for ever (with warnings).
        warn_every_s: interval of the "still waiting" warning.
    """

    _synchronize_after_execute: bool = False  # stage() is complete when it returns

    def __init__(
        self,
        *,
        pin_memory: bool | None = None,
        share_memory: bool = False,
        max_pools: int = 1,
        memory_budget: int | None = None,
        wait_timeout: float | None = None,
        warn_every_s: float = 60.0,
    ) -> None:
        if not isinstance(max_pools, int) or isinstance(max_pools, bool) or max_pools < 1:
            raise ValueError(f"PooledStager: max_pools must be an int >= 1, got {max_pools!r}")
        if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget <= 0):
            raise ValueError(f"PooledStager: memory_budget must be a positive int (bytes) or None, "
                             f"got {memory_budget!r}")
        if wait_timeout is not None and wait_timeout < 0:
            raise ValueError(f"PooledStager: wait_timeout must be >= 0 seconds or None, got {wait_timeout!r}")
        if not warn_every_s > 0:
            raise ValueError(f"PooledStager: warn_every_s must be > 0 seconds, got {warn_every_s!r}")
        if max_pools > 1 and not ASYNC_SAVE_TAKES_STAGER:  # torch 2.7
            raise ValueError(f"PooledStager: max_pools={max_pools} needs torch >= 2.9 (dcp.async_save must accept "
                             f"a staging Future to keep uploads in order); this is torch {torch.__version__}")
        cuda = torch.cuda.is_available()
        if pin_memory and not cuda:
            raise ValueError("PooledStager: pin_memory=True needs CUDA, which is not available; "
                             "leave pin_memory=None to pin only when CUDA is available")
        self.pin_memory = cuda if pin_memory is None else bool(pin_memory)
        self.share_memory = bool(share_memory)
        self.max_pools = max_pools
        self.memory_budget = memory_budget
        self.wait_timeout = wait_timeout
        self.warn_every_s = warn_every_s
        self._cond = threading.Condition()
        self._pools: list[_Pool] = []
        self._pool_counter = 0
        self._seq = 0
        self._untracked: _Lease | None = None  # the latest lease, until track() claims it
        self._streams: dict[torch.device, Any] = {}
        self._closed = False
        self._gate: ThreadPoolExecutor | None = None
        #: counters for tests and logs: pools allocated, saves staged, saves that had to wait
        self.stats = {"pools_allocated": 0, "stages": 0, "waits": 0, "rebuilds": 0}

    # ------------------------------------------------------------------ public API
    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any] | Future:  # type: ignore[override]
        """Copy ``state_dict`` into a pool and return the staged copy (same structure).

        With ``max_pools > 1`` the staged copy is returned inside a ``Future`` that resolves
        when every earlier upload has ended (so uploads never overlap); ``dcp.async_save``
        then returns an ``AsyncSaveResponse``. The copy itself is complete in either case.

        Tensors become views into the pool (DTensors keep their wrapper around a staged
        local tensor); plain containers are rebuilt; other values are deep-copied. Blocks
        until the copy is complete, so the caller may mutate the source as soon as this
        returns.
        """
        if self._closed:
            raise StagingError("PooledStager.stage() called after close()")
        if not isinstance(state_dict, dict):
            raise StagingError(f"PooledStager.stage() expects a dict state_dict, got {type(state_dict).__name__}")
        leaves: list[_Leaf] = []
        by_id: dict[int, _Ref] = {}
        template = self._collect(state_dict, "", leaves, by_id)
        signature = tuple((leaf.tensor.dtype, tuple(leaf.tensor.shape), leaf.dtensor) for leaf in leaves)
        lease = self._acquire(signature, leaves)  # leased with staging=True: never reaped mid-copy
        try:
            views = lease.pool.views
            self._copy_in(leaves, views)
            staged = self._build(template, views)
        except BaseException:
            self._release(lease, why="staging failed")
            raise
        with self._cond:
            if self._untracked is not None and not self._untracked.tracked:
                logger.debug("PooledStager: lease #%d was not tracked; it ends when its staged tensors are "
                             "no longer referenced", self._untracked.seq)
            self._untracked = lease
            lease.staging = False
        self.stats["stages"] += 1
        if self.max_pools == 1:
            # With one pool, acquiring it already waited for the previous upload to finish.
            return staged
        # With several pools the previous upload may still run. Two uploads at once would issue
        # collectives on one process group from two threads (mismatched across ranks), so the
        # upload of this save starts only once every earlier lease has ended. The copy is done:
        # the caller may mutate the source now.
        if self._gate is None:
            self._gate = ThreadPoolExecutor(max_workers=1, thread_name_prefix="PooledStagerGate")
        return self._gate.submit(self._after_earlier, lease, staged)  # type: ignore[return-value]

    def _after_earlier(self, lease: _Lease, staged: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        with self._cond:
            while True:
                self._reap_untracked()
                earlier = [p.lease for p in self._pools if p.lease is not None and p.lease.seq < lease.seq]
                if not earlier:
                    break
                self._cond.wait(_POLL_S)
        if time.monotonic() - t0 > 0.01:
            logger.info("PooledStager: upload of save #%d started after the previous upload ended (%.3fs)",
                        lease.seq, time.monotonic() - t0)
        return staged

    def track(self, result: Future | Any) -> None:
        """Release the pool of the latest ``stage()`` when ``result``'s upload finishes.

        ``result`` is what ``dcp.async_save`` returned: a ``Future`` or an
        ``AsyncSaveResponse`` (its ``upload_completion`` is used). Call it right after
        ``dcp.async_save``; :func:`dcp_ext.async_save` does it for you.
        """
        fut = getattr(result, "upload_completion", result)
        if not isinstance(fut, Future):
            raise TypeError(f"PooledStager.track() expects the Future or AsyncSaveResponse returned by "
                            f"dcp.async_save, got {type(result).__name__}")
        with self._cond:
            lease = self._untracked
            if lease is None:
                raise StagingError("PooledStager.track(): no staged checkpoint is waiting to be tracked "
                                   "(call it once, right after the dcp.async_save that used this stager)")
            self._untracked = None
            lease.tracked = True
        fut.add_done_callback(lambda f, lease=lease: self._release(lease, why=_outcome(f)))

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until no pool is leased (every tracked upload finished)."""
        t0 = last_warn = time.monotonic()
        with self._cond:
            while True:
                self._reap_untracked()
                busy = [p for p in self._pools if p.lease is not None]
                if not busy:
                    return
                now = time.monotonic()
                if timeout is not None and now - t0 > timeout:
                    raise StagingPoolBusyError(self._busy_message(busy, timeout))
                if now - last_warn > self.warn_every_s:
                    last_warn = now
                    logger.warning("%s", self._busy_message(busy, round(now - t0, 1), still=True))
                self._cond.wait(_POLL_S)

    def close(self) -> None:
        """Wait for outstanding uploads (``wait_timeout``), then free (and unpin) all pools.

        If an upload still holds a pool after ``wait_timeout``, raises
        :class:`StagingPoolBusyError` and stays open (call ``close()`` again later).
        """
        if self._closed:
            return
        self.wait_idle(self.wait_timeout)
        with self._cond:
            for p in self._pools:
                p.free()
            self._pools = []
            self._closed = True
            if self._gate is not None:
                self._gate.shutdown(wait=False)

    def synchronize_staging(self) -> None:
        """No-op: ``stage()`` returns only after every copy (including D2H) has completed."""

    @property
    def pool_bytes(self) -> int:
        """Host bytes held by all pools of this stager right now."""
        with self._cond:
            return sum(p.nbytes for p in self._pools)

    # ------------------------------------------------------------------ traversal
    def _collect(self, x: Any, path: str, leaves: list[_Leaf], by_id: dict[int, _Ref]) -> Any:
        """Return a template of ``x``: tensors replaced by ``_Ref`` markers into ``leaves``."""
        if isinstance(x, torch.Tensor):
            if id(x) in by_id:  # the same tensor object under two keys (tied weights)
                return by_id[id(x)]
            if isinstance(x, DTensor):
                local = x._local_tensor
                ref = _Ref(self._add_leaf(local, path, leaves), dtensor=x)
                leaves[ref.index].dtensor = True
            elif type(x) is torch.Tensor or type(x) is torch.nn.Parameter:
                ref = _Ref(self._add_leaf(x, path, leaves))
            else:
                raise StagingError(
                    f"PooledStager cannot stage {type(x).__name__} at {path!r}: only torch.Tensor, "
                    f"nn.Parameter and DTensor values are supported (convert ShardedTensor to DTensor)")
            by_id[id(x)] = ref
            return ref
        if isinstance(x, dict):
            return _Container(type(x), [(k, self._collect(v, f"{path}.{k}" if path else str(k), leaves, by_id))
                                        for k, v in x.items()])
        if isinstance(x, (list, tuple)):
            items = [self._collect(v, f"{path}.{i}" if path else str(i), leaves, by_id) for i, v in enumerate(x)]
            return _Container(type(x), items)
        if isinstance(x, _ATOMIC):
            return x
        return _Copy(copy.deepcopy(x))

    def _add_leaf(self, t: torch.Tensor, path: str, leaves: list[_Leaf]) -> int:
        if t.is_sparse or t.layout != torch.strided:
            raise StagingError(f"PooledStager cannot stage a {t.layout} tensor at {path!r}: only strided tensors")
        if t.is_quantized:
            raise StagingError(f"PooledStager cannot stage a quantized tensor at {path!r}")
        if t.device.type == "meta":
            raise StagingError(f"PooledStager cannot stage a meta tensor at {path!r}: it has no data")
        leaves.append(_Leaf(path, t))
        return len(leaves) - 1

    def _build(self, node: Any, views: list[torch.Tensor]) -> Any:
        if isinstance(node, _Ref):
            # A fresh alias per save: it raises the pool storage's reference count, which is how
            # an untracked lease knows that someone may still read it.
            v = views[node.index].detach()
            if node.dtensor is not None:
                return _rewrap_dtensor(node.dtensor, v)
            return v
        if isinstance(node, _Container):
            if issubclass(node.kind, dict):
                d = {k: self._build(v, views) for k, v in node.items}
                return d if node.kind is dict else _make(node.kind, d)
            items = [self._build(v, views) for v in node.items]
            if node.kind is list:
                return items
            if node.kind is tuple:
                return tuple(items)
            if hasattr(node.kind, "_fields"):  # namedtuple
                return node.kind(*items)
            return _make(node.kind, items)
        if isinstance(node, _Copy):
            return node.value
        return node

    # ------------------------------------------------------------------ copies
    def _copy_in(self, leaves: list[_Leaf], views: list[torch.Tensor]) -> None:
        events = []
        with torch.no_grad():
            for leaf, dst in zip(leaves, views):
                src = leaf.tensor.detach()
                if src.device.type == "cuda":
                    stream = self._side_stream(src.device)
                    with torch.cuda.stream(stream):
                        # non_blocking D2H is only truly async into pinned memory; the event below
                        # makes the copy complete before the staged dict leaves stage().
                        dst.copy_(src, non_blocking=True)
                else:
                    dst.copy_(src)
            for dev, stream in self._streams.items():
                if any(leaf.tensor.device == dev for leaf in leaves):
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    events.append(ev)
        for ev in events:
            ev.synchronize()

    def _side_stream(self, device: torch.device) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = torch.cuda.Stream(device=device)
            self._streams[device] = stream
        # The side stream must see every kernel already queued that writes the source tensors.
        stream.wait_stream(torch.cuda.current_stream(device))
        return stream

    # ------------------------------------------------------------------ ownership
    def _acquire(self, signature: tuple, leaves: list[_Leaf]) -> _Lease:
        need = sum(_align(leaf.tensor.numel() * leaf.tensor.element_size()) for leaf in leaves)
        if self.memory_budget is not None and need > self.memory_budget:
            biggest = sorted(leaves, key=lambda lf: lf.tensor.numel() * lf.tensor.element_size(), reverse=True)[:3]
            big = ", ".join(f"{lf.path!r} {_fmt_bytes(lf.tensor.numel() * lf.tensor.element_size())}"
                            for lf in biggest)
            raise StagingBudgetError(
                f"PooledStager: staging this state dict needs {_fmt_bytes(need)} ({need} bytes, "
                f"{len(leaves)} tensors; largest: {big}) but memory_budget is "
                f"{_fmt_bytes(self.memory_budget)} ({self.memory_budget} bytes); raise memory_budget "
                f"to at least {need} or stage less state per save")
        waited_since = None
        last_warn = time.monotonic()
        with self._cond:
            while True:
                self._reap_untracked()
                # 1. an idle pool of this structure
                for p in self._pools:
                    if p.lease is None and p.signature == signature:
                        return self._lease(p, waited_since)
                # 2. drop idle pools of another structure, then allocate if allowed
                stale = [p for p in self._pools if p.lease is None and p.signature != signature]
                for p in stale:
                    logger.info("PooledStager: state dict structure changed; freeing pool %d (%s) to rebuild",
                                p.index, _fmt_bytes(p.nbytes))
                    self.stats["rebuilds"] += 1
                    p.free()
                    self._pools.remove(p)
                held = sum(p.nbytes for p in self._pools)
                fits = self.memory_budget is None or held + need <= self.memory_budget
                if len(self._pools) < self.max_pools and fits:
                    pool = self._allocate(signature, leaves)
                    return self._lease(pool, waited_since)
                # 3. wait for an upload to finish
                now = time.monotonic()
                if waited_since is None:
                    waited_since = now
                    self.stats["waits"] += 1
                    logger.info("PooledStager: all %d pool(s) are held by unfinished uploads; waiting",
                                len(self._pools))
                busy = [p for p in self._pools if p.lease is not None]
                if self.wait_timeout is not None and now - waited_since > self.wait_timeout:
                    raise StagingPoolBusyError(self._busy_message(busy, self.wait_timeout))
                if now - last_warn > self.warn_every_s:
                    last_warn = now
                    logger.warning("%s", self._busy_message(busy, now - waited_since, still=True))
                self._cond.wait(_POLL_S)

    def _allocate(self, signature: tuple, leaves: list[_Leaf]) -> _Pool:
        t0 = time.perf_counter()
        self._pool_counter += 1
        pool = _Pool(signature, leaves, pin=self.pin_memory, share=self.share_memory, index=self._pool_counter)
        pool.measure_baseline()
        self._pools.append(pool)
        self.stats["pools_allocated"] += 1
        logger.info("PooledStager: allocated pool %d: %s for %d tensors (pinned=%s, shared=%s) in %.3fs",
                    pool.index, _fmt_bytes(pool.nbytes), len(leaves), pool.pinned, pool.shared,
                    time.perf_counter() - t0)
        return pool

    def _lease(self, pool: _Pool, waited_since: float | None) -> _Lease:
        if waited_since is not None:
            logger.info("PooledStager: pool %d free after waiting %.3fs", pool.index, time.monotonic() - waited_since)
        if pool.moved():
            # torch.multiprocessing moved a non-shared pool into shared memory in place when the
            # process executor pickled it; that is a one-time copy, but it drops pinning.
            if pool.pinned:
                raise StagingError("PooledStager: the pinned pool was moved into shared memory by the process "
                                   "executor (AsyncCheckpointerType.PROCESS); create the stager with "
                                   "share_memory=True to use pinned memory with the process executor")
            logger.info("PooledStager: pool %d was moved to shared memory by the process executor; "
                        "pass share_memory=True to avoid that copy", pool.index)
            pool.ptrs = [v.data_ptr() for v in pool.views]
            pool.shared = True
        self._seq += 1
        lease = _Lease(pool, self._seq, staging=True)
        pool.lease = lease
        return lease

    def _release(self, lease: _Lease, why: str) -> None:
        with self._cond:
            if lease.released:
                return
            lease.released = True
            if lease.pool.lease is lease:
                lease.pool.lease = None
            if self._untracked is lease:
                self._untracked = None
            logger.debug("PooledStager: lease #%d of pool %d released (%s) after %.3fs", lease.seq,
                         lease.pool.index, why, time.monotonic() - lease.started)
            self._cond.notify_all()

    def _reap_untracked(self) -> None:
        """Release untracked leases whose staged tensors nobody references any more."""
        for p in self._pools:
            lease = p.lease
            if lease is None or lease.tracked or lease.staging:
                continue
            if p.external_refs() <= 0:
                lease.released = True
                p.lease = None
                if self._untracked is lease:
                    self._untracked = None
                logger.debug("PooledStager: lease #%d of pool %d ended (no staged tensor referenced)",
                             lease.seq, p.index)

    def _busy_message(self, busy: Iterable[_Pool], waited: float | None, still: bool = False) -> str:
        parts = []
        for p in busy:
            lease = p.lease
            if lease is None:
                continue
            how = ("tracked upload future not done" if lease.tracked
                   else f"untracked; {p.external_refs()} staged tensor reference(s) still alive")
            parts.append(f"pool {p.index} ({_fmt_bytes(p.nbytes)}) leased to save #{lease.seq} "
                         f"{time.monotonic() - lease.started:.1f}s ago ({how})")
        head = "still waiting" if still else "timed out"
        return (f"PooledStager: {head} after {waited}s for a staging pool: " + "; ".join(parts) +
                ". The previous upload has not finished, or its staged state dict is still referenced "
                "(e.g. by a reused planner, or an exception traceback). Use dcp_ext.async_save(...) or "
                "stager.track(future) so the pool is released when the upload future completes, allow "
                "another pool (max_pools=2 and a memory_budget that fits two), or wait for the "
                "previous future before saving again.")


@dataclass
class _Ref:
    index: int
    dtensor: Any = None


@dataclass
class _Container:
    kind: type
    items: list


@dataclass
class _Copy:
    value: Any


def _make(kind: type, value: Any) -> Any:
    try:
        return kind(value)
    except Exception:  # noqa: BLE001 - exotic container: fall back to the plain type
        return dict(value) if isinstance(value, dict) else list(value)


def _rewrap_dtensor(src: Any, local: torch.Tensor) -> Any:
    """A DTensor with ``src``'s mesh, placements and global shape around a staged local tensor.

    ``DTensor.from_local`` would move a CPU local tensor back to a CUDA mesh's device, so the
    constructor is used directly (its signature is stable since torch 2.1).
    """
    return DTensor(local, src._spec, requires_grad=False)


def _outcome(f: Future) -> str:
    if f.cancelled():
        return "upload cancelled"
    return "upload failed" if f.exception() is not None else "upload finished"


def async_save(state_dict: dict[str, Any], *, async_stager: PooledStager | None = None,
               **kwargs: Any) -> Any:
    """``dcp.async_save`` that hands ``async_stager``'s pool back exactly when the upload ends.

    Same arguments and return value as ``torch.distributed.checkpoint.async_save`` of torch
    2.13, on older torch too (:func:`~dcp_ext.torch_compat.async_save_kwargs`). With a
    :class:`PooledStager` it registers a done-callback on the upload future
    (:meth:`PooledStager.track`); any other stager is passed through untouched.
    """
    import torch.distributed.checkpoint as dcp

    result = dcp.async_save(state_dict, **async_save_kwargs(kwargs, async_stager))
    if not isinstance(async_stager, PooledStager):
        return result
    # If async_save raised after staging, the lease stays untracked: it ends once the staged
    # tensors are unreferenced, i.e. never while an upload could still read them.
    async_stager.track(result)
    return result
