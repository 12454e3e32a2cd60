"""``ExtStorageWriter``: DCP's ``StorageWriter`` over any :class:`~dcp_ext.storage.base.Store`.

What it does better than stock ``FileSystemWriter`` (and why):

* **Parallel by default.** Each rank writes ``files_per_rank`` large sequential files from
  ``io_threads`` threads (stock: one thread unless told otherwise), items balanced by bytes.
* **No zip CRC32, block checksums instead.** Records stay standard ``torch.save`` zips, so
  stock readers load them, but checksums (xxh3_64 by default, or crc32c) are computed per
  block while the bytes are in cache, so a resharded load can verify the few MiB it reads
  (:mod:`dcp_ext.integrity`).
* **Commit protocol.** Data first; then the manifest (JSON, see
  :mod:`dcp_ext.storage.manifest`); then ``.metadata`` last, published atomically
  (``os.replace`` + directory fsync on file systems, one PUT on object stores), only after
  every rank's writes succeeded. Saving over a complete checkpoint is refused unless
  ``overwrite=True``; with it, the old ``.metadata`` is removed *before* any data is
  overwritten, so a crash mid-save leaves an incomplete checkpoint, never a wrong one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import pickle
import threading
import time
import uuid
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.futures import Future
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.filesystem import _split_by_size_and_type
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult

from ..config import Config
from ..errors import DcpExtError
from ..integrity import checksum, checksum_algorithm, item_block_size
from ..progress import Progress
from .base import Store
from .compressed_records import CompressionStats, RecordCompressor
from .commit import data_file_name, publish, refuse_overwrite, remove_stale_data, uncommit
from .manifest import ItemLocation, encode_manifest
from .records import write_bytes_record, write_tensor_record, write_transformed_record, zip_crc_disabled
from .threads import HostInfo, cpu_workers, ranks_on_hosts, run_all

__all__ = ["ExtStorageWriter", "SaveStats"]

logger = logging.getLogger(__name__)

DCP_VERSION = "1.0.0"
#: with ``files_per_rank`` unset, a rank's data is split over at most one file per
#: ``MIN_FILE_BYTES`` (small states are not scattered into many tiny files)
MIN_FILE_BYTES = 32 * 1024 * 1024


#: save ids this process has written, with how often a cached plan brought each one back
_SAVE_IDS_SEEN: dict[str, int] = {}
_SAVE_IDS_LOCK = threading.Lock()


def _fresh_save_id(save_id: str) -> str:
    """``save_id`` the first time this process writes it; after that a new id derived from it and
    the number of times it came back.

    Stock DCP's plan caching (``DefaultSavePlanner(enable_plan_caching=True)``) hands an unchanged
    rank its *cached* final plan, storage data included, so every repeat save would carry the
    first save's id; ids name saves (tiered checkpoints tell saves apart by them). Every rank
    takes part in every collective save, so all ranks count alike and derive the same id.
    (Our planners pass the fresh storage data through instead; then this never triggers.)
    """
    with _SAVE_IDS_LOCK:
        n = _SAVE_IDS_SEEN.get(save_id)
        _SAVE_IDS_SEEN[save_id] = 0 if n is None else n + 1
    if n is None:
        return save_id
    return hashlib.blake2b(f"{save_id}:{n + 1}".encode(), digest_size=16).hexdigest()


class _Cancelled(DcpExtError):
    """A file writer stopped because a sibling failed (the sibling's error is raised)."""


@dataclasses.dataclass
class _RankStorage:
    """Per-rank storage plan data: the rank whose data files these are, the save id shared
    by all ranks, and how many ranks of this save run on the rank's host."""

    rank: int
    save_id: str
    ranks_on_host: int = 1


@dataclasses.dataclass
class SaveStats:
    """What the last ``write_data`` on this rank did (for reports and benchmarks)."""

    bytes_written: int = 0
    files: int = 0
    items: int = 0
    seconds: float = 0.0
    #: what ``compression`` did (None when it is off)
    compression: CompressionStats | None = None


def _item_nbytes(item: WriteItem) -> int:
    """Bytes of a tensor item's data (0 for a bytes item): stock's ``tensor_storage_size``."""
    return item.tensor_storage_size() or 0


def split_items(items: list[WriteItem], bins: int) -> list[list[WriteItem]]:
    """Items over at most ``bins`` files (no empty one): stock ``FileSystemWriter``'s own split
    (largest tensors first onto the least-loaded file, bytes items round-robin).

    We had a copy of it (a heap instead of ``min``): same files for 2+ bins, and within noise
    of each other (about 0.25 s for 20,000 items either way, load average 10), so stock's is
    used; it keeps a single file in plan order instead of sorting it.
    """
    return [b for b in _split_by_size_and_type(max(1, min(bins, len(items))), items) if b]


def _check_extensions(extensions: Sequence[Any] | None) -> tuple[Any, ...]:
    """Stock DCP's ``_extensions`` (``StreamTransformExtension`` instances), validated."""
    if not extensions:
        return ()
    from torch.distributed.checkpoint._extension import StreamTransformExtension

    if isinstance(extensions, (str, bytes)) or not isinstance(extensions, Sequence):
        raise DcpExtError(f"_extensions: expected a sequence of StreamTransformExtension instances, got "
                          f"{type(extensions).__name__}")
    for ex in extensions:
        if not isinstance(ex, StreamTransformExtension):
            raise DcpExtError(f"_extensions: {ex!r} is a {type(ex).__name__}, not a "
                              f"torch.distributed.checkpoint._extension.StreamTransformExtension")
    return tuple(extensions)


class ExtStorageWriter(StorageWriter, BlockingAsyncStager):
    """Writes a standard DCP checkpoint (``.metadata`` + ``*.distcp``) through a Store.

    Build it with :func:`dcp_ext.storage_writer` rather than directly. ``extensions``: stock
    DCP's stream transforms (``_extensions`` of ``FileSystemWriter``, e.g. compression), applied
    to every item as stock applies them; such items are read by stock ``FileSystemReader`` with
    an ``ExtensionRegistry`` that knows them, and by ours (whole items, not ranged reads: see
    docs/backends.md). ``config.compression="zstd"`` compresses per block instead, keeping
    ranged reads (:mod:`dcp_ext.storage.compression`).
    """

    def __init__(self, store: Store, config: Config, extensions: Sequence[Any] | None = None):
        StorageWriter.__init__(self)
        # dcp.async_save without an async_stager stages with the writer when it is an AsyncStager,
        # as with stock FileSystemWriter; otherwise with DCP's DefaultStager, which drops the
        # conj/neg bits of views (torch 2.13): same staging as stock, same values as stock
        BlockingAsyncStager.__init__(self, cache_staged_state_dict=False)
        self.store = store
        self.config = config
        self.extensions = _check_extensions(extensions)
        if config.compression:
            RecordCompressor.check_available()  # fail when the writer is made, naming the extra
            self._check_compression()
        self.save_id = uuid.uuid4().hex
        self.rank = 0
        self.is_coordinator = True
        self.world_size = 1
        #: False for ``dcp.save(..., use_collectives=False)``: this rank commits its own part
        self.use_collectives = True
        self.stats = SaveStats()

    # -- DCP protocol ------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.store.url:
            self.store = type(self.store)(os.fspath(checkpoint_id), self.config)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.use_collectives = kwargs.get("use_collectives", True) is not False
        rank = kwargs.get("rank")
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.rank = rank

    @property
    def _part(self) -> int | None:
        """The rank whose rank-local part this save commits (None: a collective save)."""
        return None if self.use_collectives else self.rank

    def _check_compression(self) -> None:
        if self.config.compression and self.extensions:
            raise DcpExtError(f"compression={self.config.compression!r} and _extensions (stock stream transforms) "
                              f"cannot be combined: each would compress what the other wrote; use one of them")

    def _compressor(self) -> RecordCompressor | None:
        """A fresh compressor for one save (None without ``compression``)."""
        if not self.config.compression:
            return None
        workers = min(self.config.io_threads, os.cpu_count() or 1)
        return RecordCompressor(self.config.compression_level, self.config.compression_min_ratio, workers,
                                self.config.compression_shuffle)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self._check_compression()
        self.store.prepare_for_write()
        # a global checkpoint, or this rank's part of a rank-local one, is in the way
        refuse_overwrite(self.store, self.config.overwrite, rank=self.rank)
        # (the plan may be an empty "unchanged" plan under plan caching: it still carries the host)
        return dataclasses.replace(plan, storage_data=HostInfo())

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        if self.use_collectives:
            self.world_size = len(plans)
            ranks = range(len(plans))
        else:  # rank-local: every rank runs this on its own plan alone
            self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            ranks = [self.rank]
        if refuse_overwrite(self.store, self.config.overwrite, rank=self.rank):
            # overwrite=True (checked on every rank): un-commit before any data changes.
            logger.info("overwriting the checkpoint at %s: removing its metadata first", self.store.url)
            uncommit(self.store, rank=self._part)
        counts = ranks_on_hosts([p.storage_data for p in plans], self.use_collectives)
        return [dataclasses.replace(p, storage_data=_RankStorage(r, self.save_id, n))
                for r, p, n in zip(ranks, plans, counts)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        storage: _RankStorage = plan.storage_data
        self.save_id = _fresh_save_id(storage.save_id)
        total = sum(_item_nbytes(i) for i in plan.items)
        threads = cpu_workers(self.config.io_threads, self.store.cpu_bound, storage.ranks_on_host)
        nfiles = self.config.files_per_rank
        if nfiles is None:  # one file per thread, but no file smaller than MIN_FILE_BYTES
            nfiles = max(1, min(threads, total // MIN_FILE_BYTES))
        buckets = split_items(list(plan.items), nfiles)
        progress = Progress(f"rank {self.rank}: saving to {self.store.url}", total,
                            self.config.progress if self.rank == 0 else False, logger)
        largest = self.config.checksum_block_size
        algo = checksum_algorithm(self.config.checksum_algorithm)  # used only with checksums on
        compressor = self._compressor()
        results: list[WriteResult] = []
        lock = threading.Lock()
        cancel = threading.Event()

        def write_file(k: int, items: list[WriteItem]) -> None:
            name = data_file_name(storage.rank, k)
            out = self.store.open_writer(name)
            local: list[WriteResult] = []
            try:
                for item in items:
                    if cancel.is_set():
                        raise _Cancelled("cancelled because another file of this save failed")
                    data = planner.resolve_data(item)
                    if item.type == WriteItemType.BYTE_IO:
                        if not isinstance(data, io.BytesIO):
                            raise DcpExtError(f"{item.index.fqn}: planner returned {type(data).__name__} "
                                              "for a bytes item, expected io.BytesIO")
                    elif not isinstance(data, torch.Tensor):
                        raise DcpExtError(f"{item.index.fqn}: planner returned {type(data).__name__} "
                                          "for a tensor item")
                    frame = item_block_size(_item_nbytes(item), largest)
                    block = frame if self.config.checksum else None
                    if self.extensions:
                        loc = write_transformed_record(out, name, data, self.extensions, block, algo)
                    elif item.type == WriteItemType.BYTE_IO:
                        loc = write_bytes_record(out, name, data, block, algo)
                    elif compressor is not None:
                        loc = compressor.write(out, name, data, frame, algo if block is not None else None)
                    else:
                        loc = write_tensor_record(out, name, data, block, algo)
                    progress.advance(_item_nbytes(item))
                    local.append(WriteResult(index=item.index, size_in_bytes=loc.length, storage_data=loc))
                out.close()
            except BaseException:
                cancel.set()
                out.abort()
                raise
            with lock:
                results.extend(local)

        with zip_crc_disabled():
            if len(buckets) <= 1:
                for k, items in enumerate(buckets):
                    write_file(k, items)
            else:
                errors: list[BaseException] = []

                def job(k: int, items: list[WriteItem]) -> None:
                    try:
                        write_file(k, items)
                    except BaseException as e:  # noqa: BLE001 - collected: raise the root cause
                        errors.append(e)

                run_all("write", threads, job, list(enumerate(buckets)))
                if errors:  # the root cause, not the files cancelled because of it
                    raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
        dt = progress.close()
        self.stats = SaveStats(sum(r.size_in_bytes for r in results), len(buckets), len(results), dt,
                               compressor.stats if compressor is not None else None)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def build_commit(self, metadata: Metadata, results: list[list[WriteResult]],
                     created: float | None = None, checkpoint_id: str | None = None,
                     ) -> tuple[bytes, bytes, dict[MetadataIndex, ItemLocation]]:
        """Fill in ``metadata`` (version, storage data, storage meta) from every rank's write
        results and return ``(manifest_bytes, pickled_metadata, locations)``.

        Pure (no I/O), so a wrapper (the tiered writer) can compute the commit on any rank
        and publish it where it needs to; ``checkpoint_id`` overrides the recorded location.
        """
        locations: dict[MetadataIndex, ItemLocation] = {}
        for rank_results in results:
            for wr in rank_results:
                if not isinstance(wr.storage_data, ItemLocation):
                    raise DcpExtError(f"unexpected storage data for {wr.index}: {type(wr.storage_data).__name__}")
                if wr.index in locations:
                    raise DcpExtError(f"two ranks wrote the same item {wr.index.fqn} at offset "
                                      f"{list(wr.index.offset or [])}: the save plan is not deduplicated")
                locations[wr.index] = wr.storage_data
        metadata.version = DCP_VERSION
        metadata.storage_data = {idx: loc.storage_info() for idx, loc in locations.items()}
        modules = list(metadata.storage_meta.modules) if metadata.storage_meta else []
        metadata.storage_meta = StorageMeta(checkpoint_id=checkpoint_id or self.checkpoint_id, save_id=self.save_id,
                                            modules=modules)
        pickled = pickle.dumps(metadata)
        extra = {"world_size": len(results) if self.use_collectives else self.world_size, "writer": "dcp_ext",
                 "created": time.time() if created is None else created}
        if not self.use_collectives:
            extra["rank_local"] = self.rank
        manifest = encode_manifest(metadata, locations, self.save_id, checksum(pickled),
                                   self.config.checksum_algorithm if self.config.checksum else None, extra=extra)
        return manifest, pickled, locations

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        manifest, pickled, locations = self.build_commit(metadata, results)
        publish(self.store, manifest, pickled, rank=self._part)
        remove_stale_data(self.store, {loc.relative_path for loc in locations.values()}, rank=self._part)
        if self.use_collectives:
            logger.info("committed checkpoint %s (%d items, %d ranks)", self.store.url, len(locations), len(results))
        else:
            logger.info("committed rank %d's rank-local part of %s (%d items)", self.rank, self.store.url,
                        len(locations))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.store.url, save_id=self.save_id)

    @property
    def checkpoint_id(self) -> str:
        return self.store.url

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True
