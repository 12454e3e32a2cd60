"""``TensorStoreReader``: DCP's ``StorageReader`` for checkpoints saved by
:class:`~dcp_ext.storage.tensorstore.writer.TensorStoreWriter`.

* Refuses what is not whole (no ``.metadata``: incomplete), and a manifest from another save.
* Metadata from the JSON manifest (no unpickling); arrays opened from the recorded zarr3
  metadata (no ``zarr.json`` read per array and rank).
* Each read item reads only the chunks that hold its box, concurrently (TensorStore), straight
  into the destination tensor when its dtype matches (any strides: a DTensor shard's narrowed
  view included); otherwise into a scratch tensor and one copy. At most ``inflight_bytes`` of
  reads fly at once.
* Every chunk carries a crc32c (zarr3 codec): a flipped bit raises
  :class:`~dcp_ext.errors.CorruptCheckpointError` naming the tensor; so does a missing chunk.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ...config import Config
from ...errors import CorruptCheckpointError, DcpExtError, IncompleteCheckpointError
from ...integrity import checksum
from ...progress import Progress
from ...torch_compat import reports_metadata_errors
from ..commit import MANIFEST_NAME, METADATA_NAME, require_committed
from ..manifest import decode_manifest
from .arrays import LAYOUT, LAYOUT_VERSION, LocatedIO, Window, bytes_counter, numpy_view, translate_error
from .native import ByteCount, ShardIndexes, as_numpy, plan_reads
from ..reader import ExtStorageReader
from ..safe_pickle import checked_bytes_item, load_metadata

__all__ = ["TensorStoreReader", "TensorStoreLoadStats"]

logger = logging.getLogger(__name__)


@dataclass
class TensorStoreLoadStats:
    """What the last ``read_data`` on this rank did: ``bytes_read`` is TensorStore's own counter
    of bytes fetched from storage (process-wide: exact when one load runs per process) plus what
    :mod:`.native` read, ``bytes_needed`` the bytes of the boxes the rank asked for, ``direct``
    the tensor items read straight into their destination, ``native`` those read by
    :mod:`.native` (local files) rather than TensorStore."""

    bytes_read: int = 0
    bytes_needed: int = 0
    items: int = 0
    direct: int = 0
    native: int = 0
    seconds: float = 0.0


class TensorStoreReader(LocatedIO, StorageReader):
    """Loads a TensorStore (zarr3) checkpoint; build it with ``dcp_ext.storage_reader(url,
    backend="tensorstore")`` or a ``zarr3+...`` URL."""

    def __init__(self, url: str, config: Config):
        super().__init__(url, config)
        self.load_id = uuid.uuid4().hex
        self.refs: dict[MetadataIndex, dict] = {}
        self.array_metadata: dict[str, dict] = {}
        self.manifest_extra: dict = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.stats = TensorStoreLoadStats()
        self.rank = 0

    # -- metadata ----------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self._relocate(checkpoint_id)
        self.refs = {}
        self.load_id = uuid.uuid4().hex

    @reports_metadata_errors  # torch 2.9 would hide them
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise IncompleteCheckpointError(f"{self.store.url}: rank-local metadata is not supported")
        require_committed(self.store)
        raw = self.store.read_bytes(METADATA_NAME)
        if not self.store.exists(MANIFEST_NAME):
            raise DcpExtError(f"{self.store.url} is not a TensorStore checkpoint (it has no {MANIFEST_NAME}); "
                              f"load it without backend='tensorstore'")
        m = decode_manifest(self.store.read_bytes(MANIFEST_NAME), self.loc.describe(MANIFEST_NAME))
        if m.extra.get("layout") != LAYOUT:
            raise DcpExtError(f"{self.store.url} is not a TensorStore (zarr3) checkpoint; it holds DCP data files: "
                              f"load it without backend='tensorstore' (with the default backend for its URL)")
        if m.extra.get("layout_version", 1) > LAYOUT_VERSION:
            raise DcpExtError(f"{self.store.url}: layout version {m.extra['layout_version']} is newer than this "
                              f"dcp-ext understands ({LAYOUT_VERSION}); upgrade dcp-ext")
        if checksum(raw) != m.metadata_crc:
            raise CorruptCheckpointError(f"{self.store.url}: {METADATA_NAME} does not match {MANIFEST_NAME} (they "
                                         f"belong to different saves, or one is corrupt); refusing to load")
        md = m.metadata
        if not m.planner_data_complete:  # DCP metadata classes only, unless allow_pickle (safe_pickle)
            md.planner_data = load_metadata(raw, self.loc.describe(METADATA_NAME),
                                            self.config.allow_pickle).planner_data
        self.manifest_extra = m.extra
        self.array_metadata = m.extra["arrays"]
        self.refs = {MetadataIndex(fqn, None if off is None else torch.Size(off)): ref
                     for fqn, off, ref in m.extra["items"]}
        md.storage_data = dict(self.refs)
        want = self.config.expect_world_size
        if want is not None and m.extra.get("world_size") != want:
            raise DcpExtError(f"{self.store.url} was saved by {m.extra.get('world_size')} ranks but this load expects "
                              f"{want} (expect_world_size); its per-rank state would not line up")
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs.get("rank") or 0
        if not self.refs:
            self.refs = dict(metadata.storage_data or {})
        self.dtypes = {fqn: md.properties.dtype for fqn, md in metadata.state_dict_metadata.items()
                       if hasattr(md, "chunks")}

    #: plans pass through unchanged, as in the byte-file reader
    prepare_local_plan = ExtStorageReader.prepare_local_plan
    prepare_global_plan = ExtStorageReader.prepare_global_plan

    # -- data --------------------------------------------------------------------------
    def _ref(self, idx: MetadataIndex) -> dict:
        ref = self.refs.get(idx)
        if ref is None:
            raise CorruptCheckpointError(f"{self.store.url}: metadata has no location for {idx.fqn} chunk "
                                         f"{list(idx.offset or [])}")
        return ref

    def read_object(self, fqn: str, ref: dict) -> bytes:
        """The bytes of a non-tensor item, checked against its crc32c."""
        where = self.loc.describe(ref["object"])
        try:
            raw = self.arrays.get(ref["object"])
        except ValueError as e:
            raise translate_error(e, f"loading {fqn}", where) from e
        if raw is None:
            raise CorruptCheckpointError(f"{fqn}: {where} is missing (the checkpoint is corrupt or was modified)")
        if len(raw) != ref["length"] or checksum(raw) != ref["crc32c"]:
            raise CorruptCheckpointError(f"{fqn}: {self.loc.describe(ref['object'])} fails its crc32c checksum "
                                         f"(the checkpoint is corrupt or was modified)")
        return raw

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        stats = TensorStoreLoadStats(items=len(plan.items))
        counter = bytes_counter(self.loc.kind, "read")
        before = counter()
        total = sum(r.lengths.numel() * torch._utils._element_size(self.dtypes[r.storage_index.fqn])
                    for r in plan.items if r.type != LoadItemType.BYTE_IO)
        progress = Progress(f"rank {self.rank}: loading from {self.store.url}", total,
                            self.config.progress if self.rank == 0 else False, logger)
        window = Window(self.config.tensorstore.inflight_bytes)
        native_read = ByteCount()
        indexes = ShardIndexes()
        t0 = time.monotonic()
        try:
            for req in plan.items:
                idx = req.storage_index
                ref = self._ref(idx)
                if req.type == LoadItemType.BYTE_IO:
                    raw = self.read_object(idx.fqn, ref)
                    if not self.config.allow_pickle:  # stock planners unpickle fully: check first
                        raw = checked_bytes_item(raw, idx.fqn, self.store.url)
                    planner.load_bytes(req, io.BytesIO(raw))
                    continue
                self._read_tensor(req, ref, planner, window, progress, stats, (indexes, native_read))
        except BaseException:
            window.abandon()
            raise
        window.drain()
        progress.close()
        stats.bytes_needed = total
        stats.bytes_read = counter() - before + native_read.n
        stats.seconds = time.monotonic() - t0
        self.stats = stats
        logger.debug("rank %d read %d bytes for %d needed", self.rank, stats.bytes_read, total)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_tensor(self, req, ref: dict, planner: LoadPlanner, window: Window, progress: Progress,
                     stats: TensorStoreLoadStats, native_state: tuple[ShardIndexes, ByteCount]) -> None:
        idx = req.storage_index
        path = ref["array"]
        where = self.loc.describe(path)
        dtype = self.dtypes[idx.fqn]
        chunk_off = list(idx.offset) if idx.offset is not None else [0] * len(req.lengths)
        lo = [c + s - g for c, s, g in zip(chunk_off, req.storage_offsets, ref["origin"])]
        target = planner.resolve_tensor(req).detach()
        if list(target.shape) != list(req.lengths):
            raise DcpExtError(f"{idx.fqn}: planner target has shape {list(target.shape)} but the read is "
                              f"{list(req.lengths)}")
        n = target.numel() * torch._utils._element_size(dtype)
        what = f"loading {idx.fqn}"
        on_error = lambda e: translate_error(e, what, where)  # noqa: E731
        fmt = self.native_format(path, self.array_metadata[path], dtype)
        scratch = None
        if fmt is not None:  # our own preadv + crc32c (native.py)
            direct = target.device.type == "cpu" and target.dtype == dtype and not (target.is_conj() or target.is_neg())
            if not direct:  # another dtype or device: read into scratch, then one copy
                scratch = torch.empty(list(req.lengths), dtype=dtype)
            jobs = plan_reads(self.array_dir(path), fmt, lo, as_numpy(target if direct else scratch), what, where,
                              *native_state, rows=self.config.tensorstore.native_rowio)
            stats.direct += direct
            stats.native += 1
            window.defer([lambda job=job: self.submit(job) for job in jobs], 0 if direct else n,
                         self._committer(req, planner, target, scratch, progress, n), on_error)
        else:
            try:
                arr = self.arrays.open(path, self.array_metadata[path]).result()
            except ValueError as e:
                raise translate_error(e, what, where) from e
            dest = self._direct(target, dtype)
            direct = dest is not None
            if dest is None:
                scratch = torch.empty(list(req.lengths), dtype=dtype)
                dest = self.arrays.ts.array(numpy_view(scratch, dtype), copy=False, write=True)
            box = tuple(slice(l, l + k) for l, k in zip(lo, req.lengths))
            stats.direct += direct
            window.add(dest.write(arr[box]), n, self._committer(req, planner, target, scratch, progress, n), on_error)

    @staticmethod
    def _committer(req, planner: LoadPlanner, target: torch.Tensor, scratch: torch.Tensor | None, progress: Progress,
                   n: int) -> Callable[[], None]:
        """What to do once the item's reads completed: copy from scratch, commit, count."""

        def done() -> None:
            if scratch is not None:
                target.copy_(scratch)
            planner.commit_tensor(req, target)
            progress.advance(n)

        return done

    def _direct(self, target: torch.Tensor, dtype: torch.dtype):
        """A TensorStore view of ``target``'s own memory, or None if it cannot take the data as is."""
        if target.device.type != "cpu" or target.dtype != dtype or target.numel() == 0:
            return None
        try:
            return self.arrays.ts.array(numpy_view(target, dtype), copy=False, write=True)
        except (ValueError, TypeError, RuntimeError):  # e.g. memory NumPy cannot describe
            return None

    # -- inspect / verify (dcp-ext inspect, dcp-ext verify) -----------------------------
    def inspect(self) -> dict:
        """A JSON-able summary (the same keys as for byte-file checkpoints, plus ``layout``)."""
        md = self.read_metadata()
        tensors, objects = {}, []
        for fqn, m in sorted(md.state_dict_metadata.items()):
            if hasattr(m, "chunks"):
                tensors[fqn] = {"dtype": str(m.properties.dtype).removeprefix("torch."), "size": list(m.size),
                                "chunks": len(m.chunks), "array": self.manifest_extra["tensors"][fqn]["name"]}
            else:
                objects.append(fqn)
        files = {path: _array_nbytes(amd) for path, amd in self.array_metadata.items()}
        for ref in self.refs.values():
            if "object" in ref:
                files[ref["object"]] = ref["length"]
        return {"url": self.loc.url, "layout": LAYOUT, "tensors": tensors, "objects": objects, "files": files,
                "bytes": sum(files.values()), "world_size": self.manifest_extra.get("world_size"),
                "has_manifest": True, "checksummed": True}

    def verify(self, report, progress: bool | None = None):
        """Read every chunk of every array (each checks its crc32c) and every object; record each
        damaged tensor in ``report`` (a :class:`dcp_ext.verify.VerifyReport`)."""
        try:
            self.read_metadata()
        except CorruptCheckpointError as e:
            report.errors.append(str(e))
            return report
        total = sum(_array_nbytes(m) for m in self.array_metadata.values())
        bar = Progress(f"verifying {self.loc.url}", total, progress, logger)
        for fqn, ref in ((i.fqn, r) for i, r in self.refs.items() if "object" in r):
            report.items += 1
            try:
                report.bytes_checked += len(self.read_object(fqn, ref))
            except CorruptCheckpointError as e:
                report.errors.append(str(e))
        fqn_of = {}
        for idx, ref in self.refs.items():
            if "array" in ref:
                fqn_of[ref["array"]] = idx.fqn
        for path, amd in sorted(self.array_metadata.items()):
            report.items += 1
            fqn = fqn_of.get(path, path)
            try:
                report.bytes_checked += self._verify_array(path, amd, fqn, bar)
            except CorruptCheckpointError as e:
                report.errors.append(str(e))
        bar.close()
        return report

    def _verify_array(self, path: str, amd: dict, fqn: str, bar: Progress) -> int:
        """Read one array whole (in slabs of whole chunk rows, bounded by ``inflight_bytes``),
        its ``zarr.json`` read and checked against the manifest."""
        where = self.loc.describe(path)
        try:
            arr = self.arrays.open(path, amd, assume=False).result()
        except ValueError as e:
            raise translate_error(e, f"verifying {fqn}", where) from e
        shape = list(arr.shape)
        if not shape or 0 in shape:
            try:
                arr.read().result()
            except ValueError as e:
                raise translate_error(e, f"verifying {fqn}", where) from e
            return arr.dtype.numpy_dtype.itemsize * (1 if not shape else 0)
        rows = amd["chunk_grid"]["configuration"]["chunk_shape"][0]
        row_bytes = arr.dtype.numpy_dtype.itemsize * math.prod(shape[1:])
        step = max(rows, (self.config.tensorstore.inflight_bytes // max(1, row_bytes)) // rows * rows)
        done = 0
        for lo in range(0, shape[0], step):
            try:
                slab = arr[lo:min(lo + step, shape[0])].read().result()
            except ValueError as e:
                raise translate_error(e, f"verifying {fqn}", where) from e
            done += slab.nbytes
            bar.advance(slab.nbytes)
        return done


def _array_nbytes(amd: dict) -> int:
    """Logical (uncompressed) bytes of the array described by zarr3 metadata ``amd``."""
    from .arrays import import_tensorstore

    return math.prod(amd["shape"]) * import_tensorstore().dtype(amd["data_type"]).numpy_dtype.itemsize
