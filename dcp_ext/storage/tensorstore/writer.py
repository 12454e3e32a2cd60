"""``TensorStoreWriter``: DCP's ``StorageWriter`` that saves each global tensor as a zarr3 array.

Protocol (the same commit protocol as every other backend, :mod:`dcp_ext.storage.commit`):

1. every rank (``prepare_local_plan``): the location is writable; a committed checkpoint
   there is refused unless ``overwrite=True``;
2. the coordinator (``prepare_global_plan``): un-commits an old checkpoint and deletes its
   arrays, chooses each tensor's chunk grid from *every* rank's boxes (no zarr chunk is
   written by two ranks), creates the arrays (``zarr.json``) and hands each rank the layout
   of the tensors it writes;
3. every rank (``write_data``): writes its boxes straight from its tensors (TensorStore
   references them, no copy), at most ``inflight_bytes`` at a time; non-tensor items go to
   ``__objects/`` as plain files with a crc32c;
4. the coordinator (``finish``, after every rank succeeded): the JSON manifest, then
   ``.metadata`` (the commit point).
"""

from __future__ import annotations

import dataclasses
import errno
import io
import logging
import os
import pickle
import time
import uuid

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ...config import Config
from ...errors import ConfigError, DcpExtError, ReshardError, StorageError
from ...integrity import checksum
from ...progress import Progress
from ...save_dedup import split_hints
from ..commit import MANIFEST_NAME, publish, refuse_overwrite, uncommit
from ..manifest import decode_manifest, encode_manifest
from ..threads import run_all
from .arrays import (LAYOUT, LAYOUT_VERSION, LocatedIO, Window, array_metadata, bytes_counter, numpy_view,
                     translate_error)
from ..writer import ExtStorageWriter
from .layout import OBJECTS_DIR, ArrayPlan, array_json, object_path, plan_array
from .native import ByteCount, as_numpy, plan_writes, sync_dirs

__all__ = ["TensorStoreWriter", "TensorStoreSaveStats"]

logger = logging.getLogger(__name__)

DCP_VERSION = "1.0.0"
#: the root of a checkpoint is a zarr3 group, so zarr tools list its arrays
ROOT_GROUP = b'{"zarr_format":3,"node_type":"group","attributes":{"dcp_ext":{"layout":"zarr3","version":1}}}'


@dataclasses.dataclass
class _RankLayout:
    """What the coordinator hands each rank: the save id and the layout of its tensors."""

    save_id: str
    arrays: dict[str, ArrayPlan]
    metadata: dict[str, dict]  # array path -> zarr3 metadata


@dataclasses.dataclass
class TensorStoreSaveStats:
    """What the last ``write_data`` on this rank did (``bytes_written``: stored bytes, compressed:
    TensorStore's own counter, for the whole process, plus what :mod:`.native` wrote;
    ``native``: tensor items written by :mod:`.native` rather than TensorStore)."""

    bytes_written: int = 0
    tensor_bytes: int = 0
    items: int = 0
    seconds: float = 0.0
    native: int = 0


def _sizes_and_dtype(item) -> tuple[list[int], list[int], list[int], torch.dtype]:
    td = item.tensor_data
    return list(td.chunk.offsets), list(td.chunk.sizes), list(td.size), td.properties.dtype


class TensorStoreWriter(LocatedIO, StorageWriter):
    """Saves a DCP checkpoint as zarr3 arrays through TensorStore (file, S3 or GCS).

    Build it with ``dcp_ext.storage_writer(url, backend="tensorstore")`` or a ``zarr3+...``
    URL rather than directly.
    """

    def __init__(self, url: str, config: Config):
        super().__init__(url, config)
        self.save_id = uuid.uuid4().hex
        self.rank = 0
        self.is_coordinator = True
        self.layout: dict[str, ArrayPlan] = {}
        self._metadata: dict[str, dict] = {}
        self.stats = TensorStoreSaveStats()

    # -- DCP protocol ------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self._relocate(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    #: rank, coordinator and the use_collectives check: exactly as the byte-file writer
    set_up_storage_writer = ExtStorageWriter.set_up_storage_writer

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.store.prepare_for_write()
        refuse_overwrite(self.store, self.config.overwrite)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        if any(not p.usable for p in plans):  # checked before anything at the location is touched
            raise ConfigError(
                f"{self.store.url}: the TensorStore backend lays out every array from all ranks' full save plans, "
                f"but DCP's plan caching (enable_plan_caching=True) hands a repeat save the plans of unchanged "
                f"ranks empty; save to a TensorStore location with plan caching off")
        old = self._take_out_of_service()
        layout = self._plan_layout(plans)
        metadata = {path: array_metadata(shape, p.dtype, grid, self.config, p.fqn)
                    for p in layout.values() for path, shape, grid in p.arrays()}
        self._create_arrays(layout, metadata, old)
        self.layout, self._metadata = layout, metadata
        out = []
        for p in plans:
            fqns = {i.index.fqn for i in p.items if i.type != WriteItemType.BYTE_IO}
            mine = {f: layout[f] for f in fqns}
            md = {path: metadata[path] for f in fqns for path, _s, _g in layout[f].arrays()}
            out.append(dataclasses.replace(p, storage_data=_RankLayout(self.save_id, mine, md)))
        return out

    def _take_out_of_service(self) -> list[str]:
        """Refuse or un-commit an existing checkpoint; the top-level names its data used."""
        if not refuse_overwrite(self.store, self.config.overwrite):
            return []
        logger.info("overwriting the checkpoint at %s: removing its metadata first", self.store.url)
        names: list[str] = []
        try:
            m = decode_manifest(self.store.read_bytes(MANIFEST_NAME), self.loc.describe(MANIFEST_NAME))
            if m.extra.get("layout") == LAYOUT:
                names = sorted({t["name"] for t in m.extra.get("tensors", {}).values()} | {OBJECTS_DIR})
        except (OSError, DcpExtError) as e:  # the old data is junk either way once un-committed
            logger.warning("could not read the old manifest of %s (%s); its arrays stay until overwritten",
                           self.store.url, e)
        uncommit(self.store)
        return names

    def _plan_layout(self, plans: list[SavePlan]) -> dict[str, ArrayPlan]:
        boxes: dict[str, list] = {}
        info: dict[str, tuple[list[int], torch.dtype]] = {}
        seen: set[tuple] = set()
        for rank, p in enumerate(plans):
            for item in p.items:
                if item.type == WriteItemType.BYTE_IO:
                    continue
                offsets, sizes, size, dtype = _sizes_and_dtype(item)
                key = (item.index.fqn, tuple(offsets))
                if key in seen:
                    raise ReshardError(f"two write items for {item.index.fqn} at offsets {offsets} (rank {rank}): "
                                       f"the save plan is not deduplicated, or two shards collide")
                seen.add(key)
                prev = info.setdefault(item.index.fqn, (size, dtype))
                if prev != (size, dtype):
                    raise ReshardError(f"{item.index.fqn}: ranks disagree on its global size/dtype ({prev[0]} "
                                       f"{prev[1]} vs {size} {dtype})")
                boxes.setdefault(item.index.fqn, []).append((offsets, sizes))
        t = self.config.tensorstore
        hints = split_hints(plans)  # dims a ReshardSavePlanner layout says loads may cut
        return {fqn: plan_array(fqn, info[fqn][0], info[fqn][1], bxs, t.chunk_size, t.shard_size or None, t.layout,
                                hints.get(fqn))
                for fqn, bxs in boxes.items()}

    def _create_arrays(self, layout: dict[str, ArrayPlan], metadata: dict[str, dict], old: list[str]) -> None:
        names = sorted(set(old) | {p.name for p in layout.values()})
        self.arrays.delete_prefixes(names)  # old arrays and leftovers of a save that died here
        self.store.put_atomic("zarr.json", ROOT_GROUP)
        # the parts of a per-box tensor live in a zarr3 group named like the tensor
        futs = [(f"{p.name}/zarr.json", self.arrays.put(f"{p.name}/zarr.json", _group_json(p)))
                for p in layout.values() if p.per_box]
        dtypes = {path: p.dtype for p in layout.values() for path, _s, _g in p.arrays()}
        own = [path for path, md in metadata.items() if self.native_format(path, md, dtypes[path]) is not None]
        futs += [(path, self.arrays.create(path, md)) for path, md in metadata.items() if path not in own]
        run_all("tensorstore-meta", 8, self._write_array_json, [(path, metadata[path]) for path in own])
        if own and self.config.fs.fsync:  # each directory (and ancestor) once, not once per array
            sync_dirs({self.array_dir(path) for path in own}, self.loc.root["path"])
        for path, f in futs:
            try:
                f.result()
            except ValueError as e:
                raise translate_error(e, f"creating array {path}", self.loc.describe(path)) from e
        logger.debug("created %d zarr3 arrays under %s", len(futs), self.store.url)

    def _write_array_json(self, path: str, metadata: dict) -> None:
        """Create array ``path`` on local files by writing its ``zarr.json`` (what TensorStore
        would write, :func:`~.layout.array_json`), fsynced when ``fs.fsync`` is on (the caller
        fsyncs the directories): the array's chunks are then written by :mod:`.native`. Not
        ``Store.put_atomic``: the file is new in a directory made for it (no temp file and
        rename needed: an uncommitted checkpoint is never read), and its own directory must
        be made and synced, not the root only."""
        d = self.array_dir(path)
        f = os.path.join(d, "zarr.json")
        try:
            os.makedirs(d, exist_ok=True)
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                data = array_json(metadata)
                if os.write(fd, data) != len(data):
                    raise OSError(errno.EIO, "short write")
                if self.config.fs.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise StorageError(f"creating array {path}: cannot write {f}: {e.strerror or e}") from e

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        lay: _RankLayout = plan.storage_data
        self.save_id = lay.save_id
        counter = bytes_counter(self.loc.kind, "written")
        before = counter()
        written = ByteCount()
        total = sum(torch._utils._element_size(i.tensor_data.properties.dtype) * i.tensor_data.chunk.sizes.numel()
                    for i in plan.items if i.type != WriteItemType.BYTE_IO)
        progress = Progress(f"rank {self.rank}: saving to {self.store.url}", total,
                            self.config.progress if self.rank == 0 else False, logger)
        dtypes = {path: p.dtype for p in lay.arrays.values() for path, _s, _g in p.arrays()}
        native = {path: self.native_format(path, md, dtypes[path]) for path, md in lay.metadata.items()}
        opened = {path: self.arrays.open(path, md) for path, md in lay.metadata.items() if native[path] is None}
        made_dirs: set[str] = set()
        native_items = 0
        results: list[WriteResult] = []
        window = Window(self.config.tensorstore.inflight_bytes)
        try:
            for item in plan.items:
                fqn = item.index.fqn
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    results.append(self._write_object(item, data))
                    continue
                if not isinstance(data, torch.Tensor):
                    raise DcpExtError(f"{fqn}: planner returned {type(data).__name__} for a tensor item")
                offsets, sizes, _size, dtype = _sizes_and_dtype(item)
                p = lay.arrays[fqn]
                path, origin = p.location(offsets)
                where = self.loc.describe(path)
                src = data.detach()
                if src.device.type != "cpu":
                    src = src.cpu()
                if src.is_conj() or src.is_neg():  # lazy views: their memory does not hold the values
                    src = src.resolve_conj().resolve_neg()
                if src.dtype != dtype or list(src.shape) != sizes:
                    raise DcpExtError(f"{fqn}: planner returned a {src.dtype} tensor of shape {list(src.shape)} "
                                      f"for a {dtype} chunk of shape {sizes}")
                n = src.numel() * src.element_size()
                lo = [o - g for o, g in zip(offsets, origin)]
                on_error = lambda e, fqn=fqn, where=where: translate_error(e, f"saving {fqn}", where)  # noqa: E731
                done = lambda n=n: progress.advance(n)  # noqa: E731
                fmt = native[path]
                jobs = None if fmt is None else plan_writes(self.array_dir(path), fmt, lo, as_numpy(src),
                                                            self.config.fs.fsync, made_dirs, written, f"saving {fqn}",
                                                            self.config.tensorstore.native_rowio)
                if jobs is not None:  # whole chunks, straight from the tensor (native.py)
                    native_items += 1
                    window.defer([lambda job=job: self.submit(job) for job in jobs], n, done, on_error)
                else:
                    if path not in opened:
                        opened[path] = self.arrays.open(path, lay.metadata[path])
                    try:
                        arr = opened[path].result()
                    except ValueError as e:
                        raise translate_error(e, f"saving {fqn}", where) from e
                    box = tuple(slice(l, l + s) for l, s in zip(lo, sizes))
                    fut = arr[box].write(numpy_view(src, dtype), can_reference_source_data_indefinitely=True)
                    window.add(fut, n, done, on_error)
                results.append(WriteResult(index=item.index, size_in_bytes=n,
                                           storage_data={"array": path, "origin": origin}))
        except BaseException:
            window.abandon()
            raise
        window.drain()
        if self.config.fs.fsync:
            sync_dirs(made_dirs, self.loc.root["path"])
        dt = progress.close()
        self.stats = TensorStoreSaveStats(counter() - before + written.n, total, len(results), dt, native_items)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_object(self, item, data) -> WriteResult:
        if not isinstance(data, io.BytesIO):
            raise DcpExtError(f"{item.index.fqn}: planner returned {type(data).__name__} for a bytes item, "
                              f"expected io.BytesIO")
        raw = data.getvalue()
        path = object_path(item.index.fqn)
        try:
            self.arrays.put(path, raw).result()
        except ValueError as e:
            raise translate_error(e, f"saving {item.index.fqn}", self.loc.describe(path)) from e
        return WriteResult(index=item.index, size_in_bytes=len(raw),
                           storage_data={"object": path, "length": len(raw), "crc32c": checksum(raw)})

    def build_commit(self, metadata: Metadata, results: list[list[WriteResult]]) -> tuple[bytes, bytes]:
        """``(manifest, pickled .metadata)`` for every rank's write results (no I/O)."""
        refs: dict[MetadataIndex, dict] = {}
        for rank_results in results:
            for wr in rank_results:
                if wr.index in refs:
                    raise DcpExtError(f"two ranks wrote the same item {wr.index.fqn} at offset "
                                      f"{list(wr.index.offset or [])}: the save plan is not deduplicated")
                refs[wr.index] = wr.storage_data
        metadata.version = DCP_VERSION
        metadata.storage_data = refs
        modules = list(metadata.storage_meta.modules) if metadata.storage_meta else []
        metadata.storage_meta = StorageMeta(checkpoint_id=self.loc.url, save_id=self.save_id, modules=modules)
        pickled = pickle.dumps(metadata)
        extra = {
            "writer": "dcp_ext.tensorstore", "layout": LAYOUT, "layout_version": LAYOUT_VERSION,
            "world_size": len(results), "created": time.time(),
            "tensors": {p.fqn: {"name": p.name, "per_box": p.per_box} for p in self.layout.values()},
            "arrays": self._metadata,
            "items": [[idx.fqn, None if idx.offset is None else list(idx.offset), ref] for idx, ref in refs.items()],
        }
        manifest = encode_manifest(metadata, {}, self.save_id, checksum(pickled), None, extra=extra)
        return manifest, pickled

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        manifest, pickled = self.build_commit(metadata, results)
        publish(self.store, manifest, pickled)
        logger.info("committed TensorStore checkpoint %s (%d arrays, %d ranks)", self.store.url,
                    len(self._metadata), len(results))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.loc.url, save_id=self.save_id)


def _group_json(p: ArrayPlan) -> bytes:
    import json

    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"dcp_ext": {
        "fqn": p.fqn, "shape": p.shape, "dtype": str(p.dtype).removeprefix("torch."),
        "parts": [{"array": n, "offsets": list(o), "sizes": s} for o, (n, s, _g) in p.parts.items()]}}},
        separators=(",", ":")).encode()
