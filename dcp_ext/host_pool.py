"""Host staging pools: one flat host allocation holding a copy of every tensor of one state dict.

A :class:`HostPool` is memory only: its layout (one aligned slot per tensor), optional
page-locking (``cudaHostRegister``, undone when the pool is freed or collected) or shared
memory, and the storage reference counts that tell whether anyone outside still views it.
Who may use a pool when (leases, waiting, budgets) is :class:`dcp_ext.staging.PooledStager`'s
concern; this module decides nothing about ownership.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import StagingError

__all__ = ["ALIGN", "HostPool", "Leaf", "align", "fmt_bytes", "use_count"]

logger = logging.getLogger(__name__)

ALIGN = 64  # byte alignment of every tensor inside a pool (cache line; any dtype's itemsize)

#: the reference count of a storage (counts every tensor and storage object viewing it): how a
#: pool tells that nobody holds its staged tensors any more (implicit release)
use_count: Callable[[Any], int] = torch._C._storage_Use_Count  # type: ignore[attr-defined]


def fmt_bytes(n: int) -> str:
    """``n`` bytes for a log line or an error message (``1.50 MiB``)."""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def align(n: int) -> int:
    """``n`` rounded up to :data:`ALIGN` (the size of a tensor's slot in a pool)."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _pin(ptr: int, nbytes: int) -> None:
    """Page-lock an existing host range (cudaHostRegister); no power-of-2 rounding."""
    rc = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1))  # 1 = cudaHostRegisterPortable
    if rc != 0:
        raise StagingError(f"cudaHostRegister of {fmt_bytes(nbytes)} staging pool failed (cudaError {rc})")


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
class Leaf:
    """One unique source tensor of a state dict and where it lives in a pool."""

    path: str
    tensor: torch.Tensor  # the plain local tensor to copy (DTensor's local shard)
    offset: int = 0
    nbytes: int = 0
    #: the local shard of a DTensor (in shared memory it gets a segment of its own, see HostPool)
    dtensor: bool = False


class HostPool:
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

    def __init__(self, signature: tuple, leaves: list[Leaf], *, pin: bool, share: bool, index: int):
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
                own_bytes += align(nbytes)
            else:
                total += align(nbytes)
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
        self.lease: Any = None  # the lease (dcp_ext.staging) holding it, None when idle
        self.baseline: list[int] = []

    def measure_baseline(self) -> None:
        """Record the pool's own reference counts; call once the constructor's locals are gone."""
        self.baseline = [use_count(st._cdata) for st in self.storages]

    def external_refs(self) -> int:
        """Tensors (or storages) viewing this pool that the pool did not create itself."""
        return sum(use_count(st._cdata) - b for st, b in zip(self.storages, self.baseline))

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
