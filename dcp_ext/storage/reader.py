"""``ExtStorageReader``: DCP's ``StorageReader`` over any :class:`~dcp_ext.storage.base.Store`.

What it does better than stock ``FileSystemReader`` (and why):

* **Refuses what is not whole.** A location without ``.metadata`` is reported as an
  incomplete checkpoint (or as missing), never loaded; a manifest that does not match its
  ``.metadata`` is refused.
* **Nothing executed on load.** Metadata comes from the JSON manifest when present (stock
  checkpoints without one: a restricted unpickler that admits DCP's metadata classes only);
  non-tensor values are loaded with weights-only semantics before the planner sees them
  (:mod:`dcp_ext.storage.safe_pickle`), unless ``allow_pickle=True``.
* **Reads only what a rank needs.** Stock ``torch.load``\\ s each whole item and then
  narrows it; we know where each item's raw tensor bytes sit inside its ``torch.save``
  record, so we fetch only the byte spans of the requested box (coalescing close spans),
  in parallel, straight into the destination tensor when its memory layout allows.
* **Verifies what it reads.** Block checksums are checked for every block a read
  touches; a mismatch or a truncated file raises
  :class:`~dcp_ext.errors.CorruptCheckpointError` naming the file and the FQN.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.futures import Future
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader

from ..config import Config
from ..errors import (
    CorruptCheckpointError,
    DcpExtError,
)
from ..integrity import ChecksumMismatch, checksum, verify_range, verify_rest
from ..progress import Progress
from .base import Store
from .commit import METADATA_NAME, data_file_rank, manifest_name, metadata_name, require_committed
from .manifest import ItemLocation, decode_manifest
from .ranges import box_spans, merge_ranges
from .safe_pickle import checked_bytes_item, load_metadata
from .threads import run_all

__all__ = ["ExtStorageReader", "LoadStats"]

logger = logging.getLogger(__name__)

#: quantized dtypes (their records carry scale and zero point: read whole, like stock)
_QUANTIZED = frozenset(d for d in (getattr(torch, n, None) for n in dir(torch))
                       if isinstance(d, torch.dtype) and str(d).startswith(("torch.qint", "torch.quint")))
#: large contiguous reads are split into parts of this size so threads share them
PART_BYTES = 32 * 1024 * 1024


@dataclass
class LoadStats:
    """What the last ``read_data`` on this rank did: bytes fetched vs bytes needed."""

    bytes_read: int = 0
    bytes_needed: int = 0
    requests: int = 0
    items: int = 0
    seconds: float = 0.0
    blocks_verified: int = 0


def _as_bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte memoryview of a contiguous CPU tensor."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


#: small spans of one item are read in groups of about this many bytes per thread task
GROUP_BYTES = 4 * 1024 * 1024
#: ... and at most this many spans per group
GROUP_SPANS = 2048


@dataclass
class _Fetch:
    """One contiguous byte range of one file to read into ``out`` (plus, for a group of small
    spans of one item, further ``(offset, out)`` ranges read by the same task)."""

    relpath: str
    offset: int  # absolute file offset
    out: memoryview
    more: list[tuple[int, memoryview]] | None = None

    @property
    def nbytes(self) -> int:
        return len(self.out) + (sum(len(o) for _, o in self.more) if self.more else 0)


@dataclass
class _ItemJob:
    req: ReadItem
    loc: ItemLocation
    fetches: list[_Fetch] = field(default_factory=list)
    finalize: Callable[[], None] | None = None
    remaining: int = 0


def _location_of(info: Any) -> ItemLocation:
    """An :class:`ItemLocation` from a ``.metadata`` entry (stock ``_StorageInfo`` or ours)."""
    if isinstance(info, ItemLocation):
        return info
    transforms = getattr(info, "transform_descriptors", None)
    return ItemLocation(info.relative_path, info.offset, info.length,
                        transform_descriptors=tuple(transforms) if transforms else None)


class ExtStorageReader(StorageReader):
    """Reads standard DCP checkpoints (ours and stock ones) through a Store.

    Build it with :func:`dcp_ext.storage_reader` rather than directly.
    """

    def __init__(self, store: Store, config: Config):
        super().__init__()
        self.store = store
        self.config = config
        self.load_id = uuid.uuid4().hex
        self.locations: dict[MetadataIndex, ItemLocation] = {}
        self._chunks: dict[MetadataIndex, tuple[torch.Size, torch.dtype]] = {}
        self.manifest_extra: dict = {}
        self.stats = LoadStats()
        self.rank = 0

    # -- metadata ----------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.locations = {}
        self._chunks = {}
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.store.url:
            self.store = type(self.store)(os.fspath(checkpoint_id), self.config)
        self.load_id = uuid.uuid4().hex

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's ``Metadata``, as stock readers return it (``storage_data`` values are
        stock ``_StorageInfo``; ``storage_meta.checkpoint_id`` is the location it was saved to);
        our richer item locations (data offsets, checksums) are kept in :attr:`locations`.

        ``rank=r`` (DCP asks for it when the location has no global ``.metadata``): rank r's
        part of a rank-local checkpoint (``dcp.save(..., use_collectives=False)``).
        """
        rank = kwargs.get("rank")
        md_name, man_name = metadata_name(rank), manifest_name(rank)
        require_committed(self.store, rank)
        raw_md = self.store.read_bytes(md_name)
        self.manifest_extra = {}
        if self.store.exists(man_name):
            where = f"{self.store.url}/{man_name}"
            m = decode_manifest(self.store.read_bytes(man_name), where)
            if m.extra.get("layout") is not None:  # e.g. "zarr3": arrays, not DCP data files
                raise DcpExtError(f"{self.store.url} is a {m.extra['layout']} checkpoint written by "
                                  f"{m.extra.get('writer')}; load it with backend='tensorstore' (or a zarr3+ URL)")
            if checksum(raw_md) != m.metadata_crc:
                raise CorruptCheckpointError(
                    f"{self.store.url}: {md_name} does not match {man_name} (they belong to "
                    f"different saves, or one is corrupt); refusing to load")
            metadata = m.metadata
            if not m.planner_data_complete:  # planner data JSON could not hold: take it from the pickle
                metadata.planner_data = self._unpickle(raw_md, md_name).planner_data
            self.locations = m.locations
            self.manifest_extra = m.extra
            if not m.views_resolved:
                # written before the writer resolved conj/neg views: a record's pickle may carry the
                # bit, which only torch.load of the whole record honours (no ranged reads then)
                logger.info("%s was saved by an older dcp-ext: reading whole records", self.store.url)
                for loc in self.locations.values():
                    loc.data_offset = None
            metadata.storage_data = {idx: loc.storage_info() for idx, loc in m.locations.items()}
        else:
            metadata = self._unpickle(raw_md, md_name)
            self.locations = {idx: _location_of(si) for idx, si in (metadata.storage_data or {}).items()}
        self._check_world_size()
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _check_world_size(self) -> None:
        """``expect_world_size``: refuse a checkpoint saved by another number of ranks."""
        want = self.config.expect_world_size
        if want is None:
            return
        ws = self.manifest_extra.get("world_size")
        if ws is not None:
            if ws != want:
                raise DcpExtError(f"{self.store.url} was saved by {ws} ranks but this load expects {want} "
                                  f"(expect_world_size); its per-rank state would not line up")
            return
        # no manifest (a stock checkpoint): data file names __{rank}_{n}.distcp give a lower bound
        ranks = {r for loc in self.locations.values() if (r := data_file_rank(loc.relative_path)) is not None}
        if ranks and max(ranks) + 1 > want:
            raise DcpExtError(f"{self.store.url} was saved by at least {max(ranks) + 1} ranks (it has data files "
                              f"of rank {max(ranks)}) but this load expects {want} (expect_world_size); its "
                              f"per-rank state would not line up")
        logger.warning("%s has no dcp-ext manifest, so the number of ranks that saved it is unknown; "
                       "expect_world_size=%d could not be checked", self.store.url, want)

    def _unpickle(self, raw: bytes, name: str = METADATA_NAME) -> Metadata:
        """Stock ``.metadata``: DCP metadata classes only, unless ``allow_pickle``."""
        return load_metadata(raw, f"{self.store.url}/{name}", self.config.allow_pickle)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs.get("rank") or 0
        if not self.locations:
            self.locations = {idx: _location_of(loc) for idx, loc in (metadata.storage_data or {}).items()}
        self._chunks = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                for c in md.chunks:
                    self._chunks[MetadataIndex(fqn, c.offsets)] = (c.sizes, md.properties.dtype)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @property
    def checkpoint_id(self) -> str:
        return self.store.url

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    # -- data --------------------------------------------------------------------------
    def _verify(self, job: _ItemJob, data_start: int, buf: memoryview | None, rest: tuple | None = None) -> int:
        """Check data bytes ``buf`` (from ``data_start``, block aligned) and, with ``rest``
        (``(head, tail)``), the record's bytes outside its data, through the one block check of
        :mod:`dcp_ext.integrity`; the error names the file, the byte range and the tensor."""
        c = job.loc.checksums
        assert c is not None
        try:
            n = verify_range(c, data_start, buf) if buf is not None and len(buf) else 0
            if rest is not None:
                verify_rest(c, *rest)
            return n
        except ChecksumMismatch as e:
            s, loc = job.req.storage_index, job.loc
            if e.block is None:
                where = f"record header at byte {loc.offset}"
            else:
                base = loc.offset + c.data_offset
                where = f"bytes {base + e.start}-{base + e.end}"
            raise CorruptCheckpointError(
                f"checksum mismatch in {self.store.url}/{loc.relative_path} ({where}) for {s.fqn} chunk "
                f"{list(s.offset or [])}: the file is corrupt or was modified") from e

    def _plan_item(self, req: ReadItem, planner: LoadPlanner, stats: LoadStats) -> _ItemJob:
        loc = self.locations.get(req.storage_index)
        if loc is None:
            raise CorruptCheckpointError(f"{self.store.url}: metadata has no location for {req.storage_index.fqn} "
                                         f"chunk {list(req.storage_index.offset or [])}")
        if loc.transform_descriptors:
            raise DcpExtError(f"{self.store.url}: item {req.storage_index.fqn} uses stream transforms "
                              f"{list(loc.transform_descriptors)}, which dcp-ext cannot read; use stock "
                              f"FileSystemReader")
        job = _ItemJob(req, loc)
        verify = self.config.verify and loc.checksums is not None
        if req.type == LoadItemType.BYTE_IO:
            return self._plan_whole(job, planner, stats, verify, as_bytes=True)
        meta = self._chunks.get(req.storage_index)
        if loc.data_offset is None or meta is None or meta[1] in _QUANTIZED:
            # quantized: the scale and zero point live in the record's pickle, as stock reads them
            return self._plan_whole(job, planner, stats, verify, as_bytes=False)
        shape, dtype = meta
        esize = dtype.itemsize
        spans = box_spans(list(shape), list(req.storage_offsets), list(req.lengths), esize,
                          gap=self.store.coalesce_gap)
        stats.bytes_needed += spans.needed_bytes
        target = planner.resolve_tensor(req).detach()
        if tuple(target.shape) != tuple(req.lengths):
            raise DcpExtError(f"{req.storage_index.fqn}: planner target has shape {list(target.shape)} but the "
                              f"read is {list(req.lengths)}")
        data_base = loc.offset + loc.data_offset
        c = loc.checksums
        if spans.needed_bytes == 0:
            job.finalize = lambda: planner.commit_tensor(req, target)
            return job
        if verify:
            ranges = merge_ranges([c.block_range(s, s + spans.span_bytes) for s in spans.starts])
        else:
            ranges = [(s, s + spans.span_bytes) for s in spans.starts]
        direct = (len(ranges) == 1 and spans.count == 1 and spans.exact
                  and ranges[0] == (spans.starts[0], spans.starts[0] + spans.needed_bytes)
                  and target.is_contiguous() and target.dtype == dtype and target.device.type == "cpu"
                  and not target.is_conj() and not target.is_neg())  # bytes of a conj view are not its values
        if direct:
            out = _as_bytes_view(target)
            self._add_fetches(job, data_base, ranges[0][0], out, verify)
            job.finalize = lambda: planner.commit_tensor(req, target)
            return job
        if not verify and spans.count > 1:
            # read every span straight into its place in one packed buffer (small spans grouped
            # into one task each), then one strided copy into the target
            sb = spans.span_bytes
            packed = torch.empty(spans.count * sb, dtype=torch.uint8)
            pv = _as_bytes_view(packed)
            group: _Fetch | None = None
            for k, st in enumerate(spans.starts):
                view = pv[k * sb:(k + 1) * sb]
                if sb >= GROUP_BYTES:
                    self._add_fetches(job, data_base, st, view, False)
                elif group is not None and group.nbytes + sb <= GROUP_BYTES and len(group.more) < GROUP_SPANS:
                    group.more.append((data_base + st, view))
                else:
                    group = _Fetch(loc.relative_path, data_base + st, view, [])
                    job.fetches.append(group)

            def finalize_packed() -> None:
                target.copy_(packed.view(dtype).as_strided(spans.lengths, spans.strides))
                planner.commit_tensor(req, target)

            job.finalize = finalize_packed
            return job
        # read the ranges into scratch, then copy the box out of them
        scratch = [torch.empty(e - s, dtype=torch.uint8) for s, e in ranges]
        for (s, _e), buf in zip(ranges, scratch):
            self._add_fetches(job, data_base, s, _as_bytes_view(buf), verify)

        def finalize() -> None:
            if spans.count == 1 and len(scratch) == 1:
                off = spans.starts[0] - ranges[0][0]
                src = scratch[0][off:off + spans.span_bytes].view(dtype).as_strided(spans.lengths, spans.strides)
            else:
                packed = torch.empty(spans.count * spans.span_bytes, dtype=torch.uint8)
                pv = _as_bytes_view(packed)
                views = [_as_bytes_view(b) for b in scratch]
                r = 0
                for k, st in enumerate(spans.starts):  # spans and ranges are both sorted
                    while ranges[r][1] < st + spans.span_bytes:
                        r += 1
                    lo = st - ranges[r][0]
                    pv[k * spans.span_bytes:(k + 1) * spans.span_bytes] = views[r][lo:lo + spans.span_bytes]
                src = packed.view(dtype).as_strided(spans.lengths, spans.strides)
            target.copy_(src)
            planner.commit_tensor(req, target)

        job.finalize = finalize
        return job

    def _plan_whole(self, job: _ItemJob, planner: LoadPlanner, stats: LoadStats, verify: bool,
                    as_bytes: bool) -> _ItemJob:
        """Read the whole record (bytes items, and stock checkpoints without data offsets)."""
        loc, req = job.loc, job.req
        buf = bytearray(loc.length)
        mv = memoryview(buf)
        stats.bytes_needed += loc.length
        job.fetches.append(_Fetch(loc.relative_path, loc.offset, mv))
        c = loc.checksums

        def finalize() -> None:
            if verify and c is not None:
                d0, d1 = c.data_offset, c.data_offset + c.data_length
                self._verify(job, 0, mv[d0:d1], rest=(mv[:d0], mv[d1:]))
            if as_bytes:
                # stock planners torch.load these bytes with weights_only=False: check them first
                raw = bytes(buf) if self.config.allow_pickle else checked_bytes_item(
                    buf, req.storage_index.fqn, self.store.url)
                planner.load_bytes(req, io.BytesIO(raw))
                return
            try:
                tensor = torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise CorruptCheckpointError(
                    f"{self.store.url}/{loc.relative_path}: record of {req.storage_index.fqn} at byte "
                    f"{loc.offset} is unreadable: {e}") from e
            for dim, (o, n) in enumerate(zip(req.storage_offsets, req.lengths)):
                tensor = tensor.narrow(dim, o, n)
            target = planner.resolve_tensor(req).detach()
            if target.size() != tensor.size():
                raise DcpExtError(f"{req.storage_index.fqn}: size mismatch {list(target.size())} vs "
                                  f"{list(tensor.size())}")
            target.copy_(tensor)
            planner.commit_tensor(req, target)

        job.finalize = finalize
        return job

    def _add_fetches(self, job: _ItemJob, data_base: int, data_start: int, out: memoryview, verify: bool) -> None:
        """Split a contiguous read into block-aligned parts; each part verifies its own blocks."""
        n = len(out)
        part = PART_BYTES
        if job.loc.checksums is not None:
            bs = job.loc.checksums.block_size
            part = max(bs, (PART_BYTES // bs) * bs)
        pos = 0
        while pos < n:
            take = min(part, n - pos)
            f = _Fetch(job.loc.relative_path, data_base + data_start + pos, out[pos:pos + take])
            if verify:
                f.verify_at = data_start + pos  # type: ignore[attr-defined]
            job.fetches.append(f)
            pos += take

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        stats = LoadStats(items=len(plan.items))
        jobs = [self._plan_item(req, planner, stats) for req in plan.items]
        total = sum(f.nbytes for j in jobs for f in j.fetches)
        progress = Progress(f"rank {self.rank}: loading from {self.store.url}", total,
                            self.config.progress if self.rank == 0 else False, logger)
        lock = threading.Lock()
        done_jobs: list[_ItemJob] = []

        def run_fetch(job: _ItemJob, f: _Fetch) -> None:
            try:
                self.store.read_into(f.relpath, f.offset, f.out)
                for off, out in f.more or ():
                    self.store.read_into(f.relpath, off, out)
            except CorruptCheckpointError as e:
                raise CorruptCheckpointError(f"{e} (while reading {job.req.storage_index.fqn})") from e
            vat = getattr(f, "verify_at", None)
            nblocks = self._verify(job, vat, f.out) if vat is not None else 0
            n = f.nbytes
            progress.advance(n)
            with lock:
                stats.bytes_read += n
                stats.requests += 1 + len(f.more or ())
                stats.blocks_verified += nblocks
                job.remaining -= 1
                last = job.remaining == 0
            if last:
                done_jobs.append(job)

        for j in jobs:
            j.remaining = len(j.fetches)
        fetches = [(j, f) for j in jobs for f in j.fetches]
        # big parts first keeps all threads busy to the end
        fetches.sort(key=lambda jf: -jf[1].nbytes)
        try:
            run_all("read", self.config.io_threads, run_fetch, fetches)
            for j in jobs:
                if j.finalize is not None:
                    j.finalize()
        finally:
            self.store.close_readers() if hasattr(self.store, "close_readers") else None
        stats.seconds = progress.close()
        self.stats = stats
        logger.debug("rank %d read %d of %d needed bytes in %d requests", self.rank, stats.bytes_read,
                     stats.bytes_needed, stats.requests)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

