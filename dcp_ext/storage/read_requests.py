"""What a load reads, as requests: one :class:`Fetch` per contiguous byte range (or group of small
spans of one item), the :class:`ItemJob` of each requested item, the grouping of small whole
items of one file into one request on stores where a request is costly (object stores:
:func:`coalesce_small`), the copy of a box out of the scratch buffers a strided read landed in
(:func:`copy_box`), and a store seen through a byte and request counter (:class:`CountingStore`).
:class:`~dcp_ext.storage.reader.ExtStorageReader` plans these per item and runs them in threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.distributed.checkpoint.planner import ReadItem

from .base import Store
from .manifest import ItemLocation
from .ranges import BoxSpans

__all__ = ["CountingStore", "Fetch", "ItemJob", "bytes_view", "coalesce_small", "copy_box"]


def bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte memoryview of a contiguous CPU tensor."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


@dataclass
class Fetch:
    """One contiguous byte range of one file to read into ``out`` (plus, for a group of small
    spans of one item, further ``(offset, out)`` ranges read by the same task)."""

    relpath: str
    offset: int  # absolute file offset
    out: memoryview
    more: list[tuple[int, memoryview]] | None = None
    #: compressed frames in ``out`` to decode: ``(block, start in out, size, destination)``
    decode: list[tuple[int, int, int, memoryview]] | None = None

    @property
    def nbytes(self) -> int:
        return len(self.out) + (sum(len(o) for _, o in self.more) if self.more else 0)


@dataclass
class ItemJob:
    """One read item of a load: where it is stored, its fetches, what finishes it once they all
    landed (a copy out of scratch buffers, a decode), and how many are still outstanding."""

    req: ReadItem
    loc: ItemLocation
    fetches: list[Fetch] = field(default_factory=list)
    finalize: Callable[[], None] | None = None
    remaining: int = 0
    #: compressed items: verify each block after decompressing it
    verify_decoded: bool = False


#: fetches of whole items smaller than this are read together with their neighbours in the same
#: file (partial reads never: a resharded load reads what it needs) ... A request costs the
#: server too: on SeaweedFS, 80 MiB read as 2.9 MiB ranges took 0.25 CPU-s of the server and
#: 0.39 s, as 16 MiB ranges 0.165 CPU-s and 0.25 s (medians of 8, load average about 6)
SMALL_FETCH = 4 * 1024 * 1024
#: ... by stores whose ``coalesce_gap`` is at least this (a request is costly: object stores) ...
COSTLY_REQUEST_GAP = 64 * 1024
#: ... when at most this many bytes lie between them (the headers between two records' data:
#: whole small tensors share a request, a resharded load still reads only what it needs) ...
GROUP_GAP = 4096
#: ... in requests of at most this many bytes (the default multipart part size)
GROUP_SPAN = 16 * 1024 * 1024


def coalesce_small(fetches: list[tuple[ItemJob, Fetch]], gap: int) -> list[list[tuple[ItemJob, Fetch]]]:
    """The fetches as tasks: on stores where a request is costly (``gap``, the store's
    ``coalesce_gap``, is large), fetches of small whole items of one file at most ``GROUP_GAP``
    apart are grouped (one request each group); the others alone."""
    if gap < COSTLY_REQUEST_GAP:
        return [[jf] for jf in fetches]
    gap = GROUP_GAP
    tasks: list[list[tuple[ItemJob, Fetch]]] = []
    small: dict[str, list[tuple[ItemJob, Fetch]]] = {}
    for jf in fetches:
        job, f = jf
        whole = len(f.out) in (job.loc.length, job.loc.data_length)  # a whole item (never part of a reshard)
        if f.more is None and f.decode is None and whole and len(f.out) < SMALL_FETCH:
            small.setdefault(f.relpath, []).append(jf)
        else:
            tasks.append([jf])
    for group in small.values():
        group.sort(key=lambda jf: jf[1].offset)
        cur: list[tuple[ItemJob, Fetch]] = []
        start = end = 0
        for jf in group:
            f = jf[1]
            if cur and (f.offset - end > gap or f.offset + len(f.out) - start > GROUP_SPAN):
                tasks.append(cur)
                cur = []
            if not cur:
                start = f.offset
            cur.append(jf)
            end = max(end, f.offset + len(f.out)) if len(cur) > 1 else f.offset + len(f.out)
        if cur:
            tasks.append(cur)
    return tasks


def copy_box(spans: BoxSpans, ranges: list[tuple[int, int]], scratch: list[torch.Tensor], dtype: torch.dtype,
              target: torch.Tensor) -> None:
    """Copy the box ``spans`` describes into ``target`` from ``scratch`` buffers holding the
    data byte ``ranges`` (sorted, each covering whole spans)."""
    if spans.count == 1 and len(scratch) == 1:
        off = spans.starts[0] - ranges[0][0]
        src = scratch[0][off:off + spans.span_bytes].view(dtype).as_strided(spans.lengths, spans.strides)
    else:
        packed = torch.empty(spans.count * spans.span_bytes, dtype=torch.uint8)
        pv = bytes_view(packed)
        views = [bytes_view(b) for b in scratch]
        r = 0
        for k, st in enumerate(spans.starts):  # spans and ranges are both sorted
            while ranges[r][1] < st + spans.span_bytes:
                r += 1
            lo = st - ranges[r][0]
            pv[k * spans.span_bytes:(k + 1) * spans.span_bytes] = views[r][lo:lo + spans.span_bytes]
        src = packed.view(dtype).as_strided(spans.lengths, spans.strides)
    target.copy_(src)


class CountingStore:
    """A store seen through a byte and request counter (the probes of stock checkpoints count in
    :class:`LoadStats` like every other read)."""

    def __init__(self, store: Store):
        self._store = store
        self.bytes_read = 0
        self.requests = 0
        self._lock = threading.Lock()

    def read_into(self, relpath: str, offset: int, out: memoryview) -> None:
        self._store.read_into(relpath, offset, out)
        self._count(len(out))

    def read_into_views(self, relpath: str, offset: int, views: list[memoryview]) -> None:
        self._store.read_into_views(relpath, offset, views)
        self._count(sum(len(v) for v in views))

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.requests += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)
