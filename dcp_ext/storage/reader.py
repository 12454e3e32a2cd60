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
* **Compressed, still ranged.** Items we compressed per block (``compression="zstd"``) are read
  frame by frame: only the blocks a rank touches are fetched and decompressed (straight into
  the destination where the box allows), then verified like uncompressed blocks.
* **Every stock 2.13 format.** ``torch.save`` records, stream-transformed ones (``_extensions``,
  e.g. stock's ``ZStandard``: whole items, through stock's ``ExtensionRegistry``), the
  ``SAFETENSORS`` serialization format and ``HuggingFaceStorageWriter`` checkpoints (raw bytes
  located from the safetensors headers: ranged reads), on every byte backend.

Metadata is read by :mod:`dcp_ext.storage.checkpoint_metadata`, the requests' records and
grouping live in :mod:`dcp_ext.storage.read_requests`. Why the rest is one module (about 650
lines): it is one concern, the data path of a load - turning each read item into fetches (plain,
strided box, compressed frames, whole or stream-transformed records, probed stock records),
verifying and decoding them as they land, and running them - and every step works on the same
reader state (item locations, chunk table, probed stock files, :class:`LoadStats`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.futures import Future
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader

from ..config import Config
from ..errors import (
    CorruptCheckpointError,
    DcpExtError,
    MissingDependencyError,
    UnsupportedFormatError,
)
from ..integrity import ChecksumMismatch, verify_range, verify_rest
from ..progress import Progress
from ..torch_compat import reports_metadata_errors
from .base import Store
from .checkpoint_metadata import location_of, read_checkpoint_metadata
from .compression import decode_frame_into, frame_error, unshuffle_into, zstandard_module
from .manifest import ItemLocation
from .ranges import BoxSpans, box_spans, merge_ranges
from .read_requests import CountingStore, Fetch, ItemJob, bytes_view, coalesce_small, copy_box
from .safe_pickle import checked_bytes_item
from .threads import HostInfo, cpu_workers, ranks_on_hosts, run_all

__all__ = ["ExtStorageReader", "LoadStats"]

logger = logging.getLogger(__name__)

#: quantized dtypes (their records carry scale and zero point: read whole, like stock)
_QUANTIZED = frozenset(d for d in (getattr(torch, n, None) for n in dir(torch))
                       if isinstance(d, torch.dtype) and str(d).startswith(("torch.qint", "torch.quint")))
#: large contiguous reads are split into parts of this size so threads share them
PART_BYTES = 32 * 1024 * 1024


@dataclass
class _ReadStorage:
    """A rank's load plan data from the coordinator: how many ranks of the load share its host."""

    ranks_on_host: int = 1


@dataclass
class LoadStats:
    """What the last ``read_data`` on this rank did: bytes fetched vs bytes needed."""

    bytes_read: int = 0
    bytes_needed: int = 0
    requests: int = 0
    items: int = 0
    seconds: float = 0.0
    blocks_verified: int = 0
    #: the stored bytes the needed data takes (for a compressed item: its share of the item's
    #: stored data frames, ``bytes_needed / data bytes * stored data bytes``); ``bytes_read`` over
    #: this is the read amplification
    stored_bytes_needed: float = 0.0
    #: compressed items: blocks decompressed, and how many of them straight into the destination
    blocks_decompressed: int = 0
    blocks_direct: int = 0


#: a verified part is read and checked in pieces of about this size (whole checksum blocks), so
#: each piece is verified while it is still in the CPU's cache (L2 here: 1 MiB per core)
VERIFY_PIECE = 1024 * 1024
#: small spans of one item are read in groups of about this many bytes per thread task
GROUP_BYTES = 4 * 1024 * 1024
#: ... and at most this many spans per group
GROUP_SPANS = 2048


def _format_hint(buf: bytearray) -> str:
    """What an unreadable record looks like, for the error message."""
    head = bytes(buf[:4])
    if head == b"PK\x03\x04":
        return ""
    if head == b"\x28\xb5\x2f\xfd":
        return " (it is zstd-compressed, but the checkpoint's metadata records no stream transform for it)"
    return (f" (it starts with {head!r}: not a torch.save record, so not a format dcp-ext reads: DCP "
            f"torch.save records, stream-transformed ones, and safetensors)")


class ExtStorageReader(StorageReader):
    """Reads standard DCP checkpoints (ours and stock ones) through a Store.

    Build it with :func:`dcp_ext.storage_reader` rather than directly. ``extension_registry``:
    how stream-transformed items are decoded (stock's ``ExtensionRegistry``, which knows
    ``ZStandard``, when None), as ``FileSystemReader(_extension_registry=...)``.
    """

    def __init__(self, store: Store, config: Config, extension_registry: Any = None):
        super().__init__()
        self.store = store
        self.config = config
        self.extension_registry = extension_registry
        self.load_id = uuid.uuid4().hex
        self.locations: dict[MetadataIndex, ItemLocation] = {}
        self._chunks: dict[MetadataIndex, tuple[torch.Size, torch.dtype]] = {}
        self.manifest_extra: dict = {}
        self.stats = LoadStats()
        self.rank = 0
        #: None, or the format of a checkpoint without our manifest: "dcp" (stock ``.metadata``:
        #: its data files may be in the SAFETENSORS format) or "hf" (``HuggingFaceStorageWriter``)
        self.stock_format: str | None = None
        #: data files (and items) of a stock checkpoint already looked into for raw data offsets
        self._probed: set[Any] = set()

    # -- metadata ----------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.locations = {}
        self._chunks = {}
        self._probed = set()
        self.stock_format = None
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.store.url:
            self.store = type(self.store)(os.fspath(checkpoint_id), self.config)
        self.load_id = uuid.uuid4().hex

    @reports_metadata_errors  # torch 2.9 would hide them
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's ``Metadata``, as stock readers return it (``storage_data`` values are
        stock ``_StorageInfo``; ``storage_meta.checkpoint_id`` is the location it was saved to);
        our richer item locations (data offsets, checksums) are kept in :attr:`locations`.

        ``rank=r`` (DCP asks for it when the location has no global ``.metadata``): rank r's
        part of a rank-local checkpoint (``dcp.save(..., use_collectives=False)``).
        """
        self._probed = set()
        self.stock_format = None
        self.manifest_extra = {}
        got = read_checkpoint_metadata(self.store, self.config, kwargs.get("rank"))
        self.locations, self.manifest_extra, self.stock_format = got.locations, got.extra, got.stock_format
        got.metadata.storage_meta.load_id = self.load_id
        return got.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs.get("rank") or 0
        if not self.locations:
            self.locations = {idx: location_of(loc) for idx, loc in (metadata.storage_data or {}).items()}
        self._chunks = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                for c in md.chunks:
                    self._chunks[MetadataIndex(fqn, c.offsets)] = (c.sizes, md.properties.dtype)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return dataclasses.replace(plan, storage_data=HostInfo())

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        # a plan per rank of a collective load (a rank-local one: this rank's plan alone)
        collective = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == len(plans)
        counts = ranks_on_hosts([p.storage_data for p in plans], collective)
        return [dataclasses.replace(p, storage_data=_ReadStorage(n)) for p, n in zip(plans, counts)]

    @property
    def checkpoint_id(self) -> str:
        return self.store.url

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    # -- data --------------------------------------------------------------------------
    def _verify(self, job: ItemJob, data_start: int, buf: memoryview | None, rest: tuple | None = None) -> int:
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
            elif loc.compression is not None:
                start, size = loc.compression.block_frame(e.block)
                where = (f"compressed block {e.block}, bytes {loc.offset + start}-{loc.offset + start + size}, "
                         f"decompressed")
            else:
                base = loc.offset + c.data_offset
                where = f"bytes {base + e.start}-{base + e.end}"
            raise CorruptCheckpointError(
                f"checksum mismatch in {self.store.url}/{loc.relative_path} ({where}) for {s.fqn} chunk "
                f"{list(s.offset or [])}: the file is corrupt or was modified") from e

    @staticmethod
    def _verify_piece(job: ItemJob) -> int:
        """How much of a part to read before verifying it: whole blocks, about ``VERIFY_PIECE``."""
        bs = job.loc.checksums.block_size  # type: ignore[union-attr]
        return bs * max(1, VERIFY_PIECE // bs)

    def _extensions_for(self, job: ItemJob) -> list[Any]:
        """The stream transforms that decode ``job``'s stored bytes (stock's ``ExtensionRegistry``
        turns the recorded descriptors into them); an error naming the transform if unknown."""
        from torch.distributed.checkpoint._extension import ExtensionRegistry

        descs = list(job.loc.transform_descriptors or ())
        fqn = job.req.storage_index.fqn
        registry = self.extension_registry if self.extension_registry is not None else ExtensionRegistry()
        try:
            return list(registry.from_descriptor_list(descs))
        except ValueError as e:
            if "no module named" in str(e):
                raise MissingDependencyError(
                    f"{self.store.url}: item {fqn} is compressed with stock's ZStandard ({descs}); reading it needs the "
                    f"Python package 'zstandard' (or 'pyzstd'): pip install 'dcp-ext[zstd]'") from e
            raise UnsupportedFormatError(
                f"{self.store.url}: item {fqn} uses the stream transform(s) {descs}, which this reader does not know "
                f"({e}); pass _extension_registry= (a torch.distributed.checkpoint._extension.ExtensionRegistry that "
                f"has it registered) to dcp_ext.storage_reader, as to stock FileSystemReader") from e

    def _plan_item(self, req: ReadItem, planner: LoadPlanner, stats: LoadStats) -> ItemJob:
        loc = self.locations.get(req.storage_index)
        if loc is None:
            raise CorruptCheckpointError(f"{self.store.url}: metadata has no location for {req.storage_index.fqn} "
                                         f"chunk {list(req.storage_index.offset or [])}")
        job = ItemJob(req, loc)
        verify = self.config.verify and loc.checksums is not None
        meta = self._chunks.get(req.storage_index)
        ranged = (req.type != LoadItemType.BYTE_IO and loc.data_offset is not None and meta is not None
                  and meta[1] not in _QUANTIZED)  # quantized: scale and zero point live in the record's pickle
        if loc.compression is not None and ranged:
            zstandard_module()  # MissingDependencyError naming the extra, before any read
        elif loc.transform_descriptors:  # stream-transformed (stock's _extensions): whole items
            extensions = self._extensions_for(job)
            return self._plan_whole(job, planner, stats, verify, req.type == LoadItemType.BYTE_IO, extensions)
        if not ranged:
            return self._plan_whole(job, planner, stats, verify, as_bytes=req.type == LoadItemType.BYTE_IO)
        shape, dtype = meta
        esize = dtype.itemsize
        spans = box_spans(list(shape), list(req.storage_offsets), list(req.lengths), esize,
                          gap=self.store.coalesce_gap)
        stats.bytes_needed += spans.needed_bytes
        target = planner.resolve_tensor(req).detach()
        if tuple(target.shape) != tuple(req.lengths):
            raise DcpExtError(f"{req.storage_index.fqn}: planner target has shape {list(target.shape)} but the "
                              f"read is {list(req.lengths)}")
        if spans.needed_bytes == 0:
            job.finalize = lambda: planner.commit_tensor(req, target)
            return job
        # one exact span into a plain contiguous destination: bytes can land in place
        into_target = (spans.count == 1 and spans.exact and target.is_contiguous() and target.dtype == dtype
                       and target.device.type == "cpu"
                       and not target.is_conj() and not target.is_neg())  # bytes of a conj view are not its values
        if loc.compression is not None:
            return self._plan_compressed(job, planner, stats, verify, spans, dtype, target, into_target)
        stats.stored_bytes_needed += spans.needed_bytes
        data_base = loc.offset + loc.data_offset
        c = loc.checksums
        if verify:
            ranges = merge_ranges([c.block_range(s, s + spans.span_bytes) for s in spans.starts])
        else:
            ranges = [(s, s + spans.span_bytes) for s in spans.starts]
        direct = into_target and len(ranges) == 1 and ranges[0] == (spans.starts[0],
                                                                     spans.starts[0] + spans.needed_bytes)
        if direct:
            out = bytes_view(target)
            self._add_fetches(job, data_base, ranges[0][0], out, verify)
            job.finalize = lambda: planner.commit_tensor(req, target)
            return job
        if not verify and spans.count > 1:
            # read every span straight into its place in one packed buffer (small spans grouped
            # into one task each), then one strided copy into the target
            sb = spans.span_bytes
            packed = torch.empty(spans.count * sb, dtype=torch.uint8)
            pv = bytes_view(packed)
            group: Fetch | None = None
            for k, st in enumerate(spans.starts):
                view = pv[k * sb:(k + 1) * sb]
                if sb >= GROUP_BYTES:
                    self._add_fetches(job, data_base, st, view, False)
                elif group is not None and group.nbytes + sb <= GROUP_BYTES and len(group.more) < GROUP_SPANS:
                    group.more.append((data_base + st, view))
                else:
                    group = Fetch(loc.relative_path, data_base + st, view, [])
                    job.fetches.append(group)

            def finalize_packed() -> None:
                target.copy_(packed.view(dtype).as_strided(spans.lengths, spans.strides))
                planner.commit_tensor(req, target)

            job.finalize = finalize_packed
            return job
        # read the ranges into scratch, then copy the box out of them
        scratch = [torch.empty(e - s, dtype=torch.uint8) for s, e in ranges]
        for (s, _e), buf in zip(ranges, scratch):
            self._add_fetches(job, data_base, s, bytes_view(buf), verify)

        def finalize() -> None:
            copy_box(spans, ranges, scratch, dtype, target)
            planner.commit_tensor(req, target)

        job.finalize = finalize
        return job

    def _plan_compressed(self, job: ItemJob, planner: LoadPlanner, stats: LoadStats, verify: bool,
                         spans: BoxSpans, dtype: torch.dtype, target: torch.Tensor, into_target: bool) -> ItemJob:
        """Fetch and decompress only the frames of the blocks the box touches (consecutive frames
        in one request of up to ``PART_BYTES``); blocks wholly inside a box that is one contiguous
        byte range of the destination are decompressed straight into it, the others into scratch."""
        loc, req = job.loc, job.req
        ft = loc.compression
        assert ft is not None and loc.data_length is not None
        n, bs = loc.data_length, ft.block_size
        stats.stored_bytes_needed += spans.needed_bytes * ft.stored_data_bytes / max(1, n)
        blocks = sorted({b for st in spans.starts for b in range(st // bs, (st + spans.span_bytes - 1) // bs + 1)})
        dests: dict[int, memoryview] = {}
        edges: list[tuple[torch.Tensor, int, int]] = []  # (scratch, block start, block end)
        if into_target:
            a = spans.starts[0]
            b = a + spans.needed_bytes
            tv = bytes_view(target)
            for blk in blocks:
                s, e = ft.block_data(blk, n)
                if a <= s and e <= b:
                    dests[blk] = tv[s - a:e - a]
                else:
                    buf = torch.empty(e - s, dtype=torch.uint8)
                    dests[blk] = bytes_view(buf)
                    edges.append((buf, s, e))

            def finalize() -> None:
                for buf, s, e in edges:
                    lo, hi = max(a, s), min(b, e)
                    tv[lo - a:hi - a] = bytes_view(buf)[lo - s:hi - s]
                planner.commit_tensor(req, target)
        else:
            ranges = merge_ranges([ft.block_data(blk, n) for blk in blocks])
            scratch = [torch.empty(e - s, dtype=torch.uint8) for s, e in ranges]
            r = 0
            for blk in blocks:
                s, e = ft.block_data(blk, n)
                while ranges[r][1] < e:
                    r += 1
                dests[blk] = bytes_view(scratch[r])[s - ranges[r][0]:e - ranges[r][0]]

            def finalize() -> None:
                copy_box(spans, ranges, scratch, dtype, target)
                planner.commit_tensor(req, target)
        stats.blocks_direct += len(blocks) - (len(edges) if into_target else len(blocks))
        run: list[int] = []

        def flush() -> None:
            first, _ = ft.block_frame(run[0])
            last, last_size = ft.block_frame(run[-1])
            stored = torch.empty(last + last_size - first, dtype=torch.uint8)
            decode = [(blk, ft.block_frame(blk)[0] - first, ft.block_frame(blk)[1], dests[blk]) for blk in run]
            job.fetches.append(Fetch(loc.relative_path, loc.offset + first, bytes_view(stored), decode=decode))
            run.clear()

        for blk in blocks:
            if run and (blk != run[-1] + 1 or ft.block_frame(blk)[0] + ft.block_frame(blk)[1]
                        - ft.block_frame(run[0])[0] > PART_BYTES):
                flush()
            run.append(blk)
        flush()
        job.verify_decoded = verify
        job.finalize = finalize
        return job

    def _decode(self, job: ItemJob, f: Fetch) -> int:
        """Decompress the frames a fetch read into their destinations (and verify each block);
        returns the number of blocks verified."""
        verified = 0
        loc, s = job.loc, job.req.storage_index
        es = loc.compression.shuffle if loc.compression is not None else 0
        for blk, start, size, dest in f.decode or ():
            try:
                if es:  # byte-shuffled: decompress aside, then put each byte back in its element
                    shuffled = torch.empty(len(dest), dtype=torch.uint8)
                    decode_frame_into(f.out[start:start + size], bytes_view(shuffled))
                    unshuffle_into(bytes_view(shuffled), dest, es)
                else:
                    decode_frame_into(f.out[start:start + size], dest)
            except ValueError as e:
                raise frame_error(self.store.url, loc, blk + 1, s.fqn, list(s.offset or []), e) from e
            if job.verify_decoded:
                assert loc.compression is not None
                verified += self._verify(job, blk * loc.compression.block_size, dest)
        return verified

    def _plan_whole(self, job: ItemJob, planner: LoadPlanner, stats: LoadStats, verify: bool,
                    as_bytes: bool, extensions: list[Any] | None = None) -> ItemJob:
        """Read the whole record (bytes items, stock checkpoints without data offsets, and items
        stored through stream transforms, decoded by ``extensions`` after their stored bytes
        are verified)."""
        loc, req = job.loc, job.req
        buf = bytearray(loc.length)
        mv = memoryview(buf)
        stats.bytes_needed += loc.length
        stats.stored_bytes_needed += loc.length
        job.fetches.append(Fetch(loc.relative_path, loc.offset, mv))
        c = loc.checksums
        fqn = req.storage_index.fqn

        def finalize() -> None:
            nonlocal buf
            if verify and c is not None:
                d0, d1 = c.data_offset, c.data_offset + c.data_length
                self._verify(job, 0, mv[d0:d1], rest=(mv[:d0], mv[d1:]))
            if extensions:
                buf = self._untransform(job, buf, extensions)
            if as_bytes:
                # stock planners torch.load these bytes with weights_only=False: check them first
                raw = bytes(buf) if self.config.allow_pickle else checked_bytes_item(buf, fqn, self.store.url)
                planner.load_bytes(req, io.BytesIO(raw))
                return
            try:
                tensor = torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise CorruptCheckpointError(
                    f"{self.store.url}/{loc.relative_path}: record of {fqn} at byte {loc.offset} is unreadable"
                    f"{_format_hint(buf)}: {e}") from e
            for dim, (o, n) in enumerate(zip(req.storage_offsets, req.lengths)):
                tensor = tensor.narrow(dim, o, n)
            target = planner.resolve_tensor(req).detach()
            if target.size() != tensor.size():
                raise DcpExtError(f"{fqn}: size mismatch {list(target.size())} vs {list(tensor.size())}")
            target.copy_(tensor)
            planner.commit_tensor(req, target)

        job.finalize = finalize
        return job

    def _untransform(self, job: ItemJob, buf: bytearray, extensions: list[Any]) -> bytes:
        """Stored bytes of a stream-transformed item through the transforms' readers, as stock's
        ``FileSystemReader`` applies them."""
        stream: Any = io.BytesIO(buf)
        for ex in extensions:
            stream = ex.transform_from(stream)
        try:
            return stream.read(-1)
        except Exception as e:  # noqa: BLE001 - any codec's error: the stored bytes are damaged
            loc = job.loc
            raise CorruptCheckpointError(
                f"{self.store.url}/{loc.relative_path}: {job.req.storage_index.fqn} (bytes {loc.offset}-"
                f"{loc.offset + loc.length}) could not be decoded by its stream transforms "
                f"{list(loc.transform_descriptors or ())}: {e}") from e

    def _add_fetches(self, job: ItemJob, data_base: int, data_start: int, out: memoryview, verify: bool) -> None:
        """Split a contiguous read into block-aligned parts; each part verifies its own blocks."""
        n = len(out)
        part = PART_BYTES
        if job.loc.checksums is not None:
            bs = job.loc.checksums.block_size
            part = max(bs, (PART_BYTES // bs) * bs)
        pos = 0
        while pos < n:
            take = min(part, n - pos)
            f = Fetch(job.loc.relative_path, data_base + data_start + pos, out[pos:pos + take])
            if verify:
                f.verify_at = data_start + pos  # type: ignore[attr-defined]
            job.fetches.append(f)
            pos += take

    def _locate_stock_data(self, plan: LoadPlan) -> tuple[int, int]:
        """Stock checkpoints carry no data offsets; find the raw bytes where they can be found, so
        that ranged reads fetch only what the plan needs:

        * data files in stock's SAFETENSORS serialization format: tensor items point at their
          bytes in the file's safetensors blob. Only files whose every tensor item is exactly its
          data size can be in that format (a ``torch.save`` record is larger than its data), so
          stock's default format costs no extra request here;
        * ``torch.save`` records of which the plan needs only part (and at least
          ``RANGED_MIN_BYTES``): their zip directory and pickle are read
          (:func:`~dcp_ext.storage.stock_records.locate_record_data`, two small reads each, in
          parallel); records whose bytes are not plainly the values are read whole, as stock does.

        Returns the bytes and requests the probes took.
        """
        from .safetensors import locate_blob_items
        from .stock_records import RANGED_MIN_BYTES, locate_record_data

        store = CountingStore(self.store)
        wanted = {self.locations[r.storage_index].relative_path for r in plan.items
                  if r.type != LoadItemType.BYTE_IO and r.storage_index in self.locations} - self._probed
        for relpath in sorted(wanted):
            self._probed.add(relpath)
            items = {}
            for idx, loc in self.locations.items():
                meta = self._chunks.get(idx)
                if loc.relative_path != relpath or meta is None:
                    continue
                if loc.data_offset is not None or loc.length != math.prod(meta[0]) * meta[1].itemsize:
                    break  # a record (or already located): not the SAFETENSORS format
                items[idx] = (loc, meta[0], meta[1])
            else:
                if items:
                    found = locate_blob_items(store, relpath, items)
                    if found:
                        logger.debug("%s/%s is in stock's SAFETENSORS format", self.store.url, relpath)
                        self.locations.update(found)
        partial: dict[MetadataIndex, tuple[ItemLocation, torch.Size, torch.dtype]] = {}
        for r in plan.items:
            loc, meta = self.locations.get(r.storage_index), self._chunks.get(r.storage_index)
            if (r.type == LoadItemType.BYTE_IO or loc is None or meta is None or loc.data_offset is not None
                    or loc.transform_descriptors or meta[1] in _QUANTIZED or r.storage_index in self._probed
                    or math.prod(meta[0]) * meta[1].itemsize < RANGED_MIN_BYTES or list(r.lengths) == list(meta[0])):
                continue
            partial[r.storage_index] = (loc, meta[0], meta[1])

        def probe(idx: MetadataIndex, loc: ItemLocation, shape: torch.Size, dtype: torch.dtype) -> None:
            d0 = locate_record_data(store, loc.relative_path, loc.offset, loc.length, shape, dtype)
            if d0 is not None:
                self.locations[idx] = ItemLocation(loc.relative_path, loc.offset, loc.length, d0,
                                                   math.prod(shape) * dtype.itemsize)

        self._probed.update(partial)
        run_all("read", self.config.io_threads, probe, [(idx, *v) for idx, v in partial.items()])
        return store.bytes_read, store.requests

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        stats = LoadStats(items=len(plan.items))
        if self.stock_format == "dcp":
            stats.bytes_read, stats.requests = self._locate_stock_data(plan)
        jobs = [self._plan_item(req, planner, stats) for req in plan.items]
        total = sum(f.nbytes for j in jobs for f in j.fetches)
        progress = Progress(f"rank {self.rank}: loading from {self.store.url}", total,
                            self.config.progress if self.rank == 0 else False, logger)
        lock = threading.Lock()
        done_jobs: list[ItemJob] = []

        def run_fetch(job: ItemJob, f: Fetch) -> None:
            nblocks = 0
            vat = getattr(f, "verify_at", None)

            def check(start: int, view: memoryview) -> None:
                nonlocal nblocks
                nblocks += self._verify(job, vat + start, view)

            try:
                if vat is not None:  # verify each piece as it lands (still in cache)
                    self.store.read_into_pieces(f.relpath, f.offset, f.out, self._verify_piece(job), check)
                else:
                    self.store.read_into(f.relpath, f.offset, f.out)
                for off, out in f.more or ():
                    self.store.read_into(f.relpath, off, out)
            except CorruptCheckpointError as e:
                if isinstance(e.__cause__, ChecksumMismatch):  # from check(): it names the tensor already
                    raise
                raise CorruptCheckpointError(f"{e} (while reading {job.req.storage_index.fqn})") from e
            fetched(job, f, nblocks, f.nbytes, 1 + len(f.more or ()))

        def run_group(group: list[tuple[ItemJob, Fetch]]) -> None:
            """Small fetches of one file, close together: one request for their span, each
            fetch's bytes read into its destination (``Store.read_into_views``: straight from
            the socket on object stores), then verified (object stores: a request costs
            milliseconds, so 200 small tensors must not cost 200 requests)."""
            if len(group) == 1:
                run_fetch(*group[0])
                return
            first = group[0][1]
            start = end = first.offset
            views: list[memoryview] | None = []  # each fetch's destination, scratch for the bytes between
            for _, f in group:  # (sorted by offset)
                if f.offset < end or views is None:
                    views = None  # overlapping fetches: read the span, then copy
                    end = max(end, f.offset + len(f.out))
                    continue
                if f.offset > end:
                    views.append(memoryview(bytearray(f.offset - end)))
                views.append(f.out)
                end = f.offset + len(f.out)
            span = None if views is not None else memoryview(bytearray(end - start))
            try:
                if span is None:
                    self.store.read_into_views(first.relpath, start, views)
                else:
                    self.store.read_into(first.relpath, start, span)
            except CorruptCheckpointError as e:
                names = sorted({j.req.storage_index.fqn for j, _ in group})
                raise CorruptCheckpointError(f"{e} (while reading {', '.join(names[:5])}"
                                             f"{' ...' if len(names) > 5 else ''})") from e
            for i, (job, f) in enumerate(group):
                if span is not None:
                    f.out[:] = span[f.offset - start:f.offset - start + len(f.out)]
                vat = getattr(f, "verify_at", None)
                nblocks = self._verify(job, vat, f.out) if vat is not None else 0
                fetched(job, f, nblocks, end - start if i == 0 else 0, 1 if i == 0 else 0)

        def fetched(job: ItemJob, f: Fetch, nblocks: int, nbytes: int, nrequests: int) -> None:
            if f.decode:
                nblocks += self._decode(job, f)
            progress.advance(f.nbytes)
            with lock:
                stats.bytes_read += nbytes
                stats.requests += nrequests
                stats.blocks_verified += nblocks
                stats.blocks_decompressed += len(f.decode or ())
                job.remaining -= 1
                last = job.remaining == 0
            if last:
                done_jobs.append(job)

        for j in jobs:
            j.remaining = len(j.fetches)
        tasks = coalesce_small([(j, f) for j in jobs for f in j.fetches], self.store.coalesce_gap)
        # big parts first keeps all threads busy to the end
        tasks.sort(key=lambda g: -sum(f.nbytes for _, f in g))
        sd = plan.storage_data
        workers = cpu_workers(self.config.io_threads, self.store.cpu_bound,
                              sd.ranks_on_host if isinstance(sd, _ReadStorage) else ranks_on_hosts([None])[0])
        try:
            run_all("read", workers, run_group, [(g,) for g in tasks])
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

