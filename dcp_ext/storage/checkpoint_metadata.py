"""What a checkpoint's metadata says, read without running its pickles: our JSON manifest checked
against ``.metadata`` (a mismatch is refused), stock ``.metadata`` through the restricted
unpickler, or a ``HuggingFaceStorageWriter`` checkpoint's safetensors headers; each item's
location (:class:`~dcp_ext.storage.manifest.ItemLocation`), and the ``expect_world_size`` check.
:class:`~dcp_ext.storage.reader.ExtStorageReader` reads its metadata through this module.
"""

from __future__ import annotations

import contextvars
import logging
from concurrent import futures
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta

from ..config import Config
from ..errors import CorruptCheckpointError, DcpExtError, IncompleteCheckpointError
from ..integrity import checksum
from .base import Store
from .commit import METADATA_NAME, data_file_rank, manifest_name, metadata_name, read_committed_metadata
from .commit import require_committed
from .commit import safetensors_checkpoint_files
from .manifest import ItemLocation, decode_manifest
from .safe_pickle import load_metadata
from .threads import io_pool

__all__ = ["CheckpointMetadata", "check_world_size", "location_of", "read_checkpoint_metadata", "unpickle_metadata"]

logger = logging.getLogger(__name__)


@dataclass
class CheckpointMetadata:
    """A checkpoint's ``Metadata`` (``storage_data`` values: stock ``_StorageInfo``) and what only
    we keep: richer item locations, the manifest's extra fields, and the stock format if any."""

    metadata: Metadata
    locations: dict[MetadataIndex, ItemLocation]
    #: the manifest's extra fields (``world_size``, ``writer``, ...); empty without a manifest
    extra: dict
    #: None, or the format of a checkpoint without our manifest: "dcp" (stock ``.metadata``: its
    #: data files may be in the SAFETENSORS format) or "hf" (``HuggingFaceStorageWriter``)
    stock_format: str | None


def location_of(info: Any) -> ItemLocation:
    """An :class:`ItemLocation` from a ``.metadata`` entry (stock ``_StorageInfo`` or ours)."""
    if isinstance(info, ItemLocation):
        return info
    transforms = getattr(info, "transform_descriptors", None)
    return ItemLocation(info.relative_path, info.offset, info.length,
                        transform_descriptors=tuple(transforms) if transforms else None)


def unpickle_metadata(store: Store, config: Config, raw: bytes, name: str = METADATA_NAME) -> Metadata:
    """Stock ``.metadata``: DCP metadata classes only, unless ``allow_pickle``."""
    return load_metadata(raw, f"{store.url}/{name}", config.allow_pickle)


def read_checkpoint_metadata(store: Store, config: Config, rank: int | None = None) -> CheckpointMetadata:
    """The metadata of the checkpoint in ``store`` (``rank``: that rank's part of a rank-local
    checkpoint); refuses an incomplete checkpoint, a manifest that does not match ``.metadata``,
    a checkpoint of another layout, and (``expect_world_size``) one saved by other ranks."""
    md_name, man_name = metadata_name(rank), manifest_name(rank)
    # the manifest is read while .metadata is: on an object store each is a round trip before a
    # load's first data byte. Both belong to one save only if the manifest's CRC of .metadata
    # matches (checked below), whichever order they were read in.
    man_read = io_pool("metadata", 1).submit(contextvars.copy_context().run, store.read_bytes_if_exists, man_name)
    try:
        raw_md = read_committed_metadata(store, rank)
    finally:
        futures.wait([man_read])  # no request of ours still running when this returns or raises
    if raw_md is None:  # not committed: say why (or read a checkpoint that has no .metadata)
        try:
            require_committed(store, rank)
        except IncompleteCheckpointError:
            hf = safetensors_checkpoint_files(store.list()) if rank is None else []
            if not hf:
                raise
            return _read_hf_metadata(store, config, hf)  # a HuggingFaceStorageWriter checkpoint: no .metadata of its own
        raw_md = store.read_bytes(md_name)  # committed since the first look: its manifest too
        raw_man = store.read_bytes_if_exists(man_name)
    else:
        raw_man = man_read.result()
    extra: dict = {}
    stock_format = None
    if raw_man is not None:
        where = f"{store.url}/{man_name}"
        m = decode_manifest(raw_man, where)
        if m.extra.get("layout") is not None:  # e.g. "zarr3": arrays, not DCP data files
            raise DcpExtError(f"{store.url} is a {m.extra['layout']} checkpoint written by "
                              f"{m.extra.get('writer')}; load it with backend='tensorstore' (or a zarr3+ URL)")
        if checksum(raw_md) != m.metadata_crc:
            raise CorruptCheckpointError(
                f"{store.url}: {md_name} does not match {man_name} (they belong to "
                f"different saves, or one is corrupt); refusing to load")
        metadata = m.metadata
        if not m.planner_data_complete:  # planner data JSON could not hold: take it from the pickle
            metadata.planner_data = unpickle_metadata(store, config, raw_md, md_name).planner_data
        locations = m.locations
        extra = m.extra
        if not m.views_resolved:
            # written before the writer resolved conj/neg views: a record's pickle may carry the
            # bit, which only torch.load of the whole record honours (no ranged reads then)
            logger.info("%s was saved by an older dcp-ext: reading whole records", store.url)
            for loc in locations.values():
                loc.data_offset = None
        metadata.storage_data = {idx: loc.storage_info() for idx, loc in m.locations.items()}
    else:
        metadata = unpickle_metadata(store, config, raw_md, md_name)
        locations = {idx: location_of(si) for idx, si in (metadata.storage_data or {}).items()}
        stock_format = "dcp"
    check_world_size(store, config, extra, locations)
    if metadata.storage_meta is None:
        metadata.storage_meta = StorageMeta()
    return CheckpointMetadata(metadata, locations, extra, stock_format)


def _read_hf_metadata(store: Store, config: Config, files: list[str]) -> CheckpointMetadata:
    """Metadata of a ``HuggingFaceStorageWriter`` checkpoint, from its safetensors headers."""
    from .safetensors import hf_metadata

    metadata, locations = hf_metadata(store, files)
    logger.info("%s is a safetensors checkpoint (HuggingFaceStorageWriter): %d file(s), %d tensors",
                store.url, len(files), len(metadata.state_dict_metadata))
    check_world_size(store, config, {}, locations)
    metadata.storage_data = {idx: loc.storage_info() for idx, loc in locations.items()}
    metadata.storage_meta.checkpoint_id = store.url
    return CheckpointMetadata(metadata, locations, {}, "hf")


def check_world_size(store: Store, config: Config, extra: dict, locations: dict[MetadataIndex, ItemLocation]) -> None:
    """``expect_world_size``: refuse a checkpoint saved by another number of ranks."""
    want = config.expect_world_size
    if want is None:
        return
    ws = extra.get("world_size")
    if ws is not None:
        if ws != want:
            raise DcpExtError(f"{store.url} was saved by {ws} ranks but this load expects {want} "
                              f"(expect_world_size); its per-rank state would not line up")
        return
    # no manifest (a stock checkpoint): data file names __{rank}_{n}.distcp give a lower bound
    ranks = {r for loc in locations.values() if (r := data_file_rank(loc.relative_path)) is not None}
    if ranks and max(ranks) + 1 > want:
        raise DcpExtError(f"{store.url} was saved by at least {max(ranks) + 1} ranks (it has data files "
                          f"of rank {max(ranks)}) but this load expects {want} (expect_world_size); its "
                          f"per-rank state would not line up")
    logger.warning("%s has no dcp-ext manifest, so the number of ranks that saved it is unknown; "
                   "expect_world_size=%d could not be checked", store.url, want)
