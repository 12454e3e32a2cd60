"""The manifest: a versioned JSON description of a checkpoint, written beside ``.metadata``.

Why: stock DCP's ``.metadata`` is a pickle, which must never be loaded from an untrusted
location and ties readers to Python class names. The manifest carries the same
information (every FQN, its dtype, global size and chunks; where each item's bytes live)
plus what we add (the offset of raw tensor data inside each ``torch.save`` record and
block checksums), so our reader needs no unpickling. ``.metadata`` is still written for
interop with stock ``FileSystemReader``/``FsspecReader``; it is written *last* and is the
commit marker: a manifest without ``.metadata`` belongs to an unfinished save.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from torch.distributed.checkpoint.filesystem import _StorageInfo

from ..errors import CorruptCheckpointError
from ..integrity import ALGORITHMS, CRC32C, ItemChecksums
from ..torch_compat import metadata_version
from .commit import MANIFEST_NAME, METADATA_NAME
from .compression import FrameTable

__all__ = ["MANIFEST_NAME", "METADATA_NAME", "FORMAT_VERSION", "BASE_VERSION", "ItemLocation", "encode_manifest",
           "decode_manifest", "manifest_version"]

FORMAT = "dcp-ext-manifest"
#: the newest manifest version this dcp-ext reads. Version 2 adds per-item frame tables
#: (``compression``); version 3 adds block checksums by an algorithm other than crc32c
#: (``checksum_algorithm``, e.g. ``"xxh3_64"``). A manifest is written as the lowest version that
#: describes its checkpoint (:func:`manifest_version`), so older dcp-ext releases keep reading
#: what they can (and refuse, by version, what they could not read)
FORMAT_VERSION = 3
#: what a manifest without compressed items and with crc32c (or no) checksums is written as
BASE_VERSION = 1


def manifest_version(compressed: bool, checksum_algorithm: str | None) -> int:
    """The lowest manifest version that describes a checkpoint: 3 if its block checksums are
    not crc32c (readers before version 3 know only crc32c), else 2 if it has compressed items,
    else :data:`BASE_VERSION`."""
    if checksum_algorithm not in (None, CRC32C.name):
        return 3
    return 2 if compressed else BASE_VERSION


def _algorithm(name: str | None, where: str):
    """The algorithm a manifest names (crc32c when it names none: manifests without checksums,
    and the only algorithm before version 3); :class:`CorruptCheckpointError` if unknown."""
    if name is None:
        return CRC32C
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise CorruptCheckpointError(
            f"{where}: the checkpoint's block checksums use the algorithm {name!r}, which this dcp-ext "
            f"does not know (known: {', '.join(ALGORITHMS)}); upgrade dcp-ext")
    return ALGORITHMS[name]


def _torch_dtypes() -> dict[str, torch.dtype]:
    """Every dtype this torch defines, by its name (``"float8_e8m0fnu"``), taken from torch
    itself: a dtype added by a newer torch never makes our own checkpoints unreadable."""
    out: dict[str, torch.dtype] = {}
    for name in dir(torch):
        d = getattr(torch, name, None)
        if isinstance(d, torch.dtype):
            out[str(d).removeprefix("torch.")] = d
    return out


_DTYPES = _torch_dtypes()
_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
                   "preserve": torch.preserve_format}


@dataclass
class ItemLocation:
    """Where one write item's bytes live, and how to check them.

    ``offset``/``length`` locate the whole record in ``relative_path``; ``checksums`` (or
    None when saved without checksums) also gives the raw data offset inside the record.
    ``data_offset`` is known even without checksums (None for stock checkpoints).
    """

    relative_path: str
    offset: int
    length: int
    data_offset: int | None = None
    data_length: int | None = None
    checksums: ItemChecksums | None = None
    #: stock stream transforms (``_extensions``) applied to the stored bytes, outermost last,
    #: as stock records them; None for plain records
    transform_descriptors: tuple[str, ...] | None = None
    #: for an item compressed per block (:mod:`dcp_ext.storage.compression`): where its frames
    #: lie. ``data_offset``/``data_length``/``checksums`` then describe the *uncompressed*
    #: record, ``offset``/``length`` the stored bytes
    compression: FrameTable | None = None

    def storage_info(self) -> Any:
        """The same location as stock DCP's ``_StorageInfo`` (what ``Metadata.storage_data``
        holds in stock checkpoints, and what DCP and user code expect to find there)."""
        info = _StorageInfo(self.relative_path, self.offset, self.length)
        if self.transform_descriptors:
            info.transform_descriptors = list(self.transform_descriptors)
        return info


def _enc_index(idx: MetadataIndex) -> list:
    return [idx.fqn, None if idx.offset is None else list(idx.offset)]


def _dec_index(v: list) -> MetadataIndex:
    return MetadataIndex(v[0], None if v[1] is None else torch.Size(v[1]))


def _enc_props(p: TensorProperties) -> dict:
    mf = {v: k for k, v in _MEMORY_FORMATS.items()}.get(p.memory_format, "contiguous")
    return {"dtype": str(p.dtype).removeprefix("torch."), "requires_grad": bool(p.requires_grad),
            "memory_format": mf, "pin_memory": bool(p.pin_memory)}


def _dec_props(d: dict) -> TensorProperties:
    if d["dtype"] not in _DTYPES:
        raise CorruptCheckpointError(f"manifest names the dtype {d['dtype']!r}, which torch {torch.__version__} "
                                     f"does not have (saved by a newer torch?)")
    return TensorProperties(dtype=_DTYPES[d["dtype"]], requires_grad=d["requires_grad"],
                            memory_format=_MEMORY_FORMATS[d["memory_format"]], pin_memory=d["pin_memory"])


def _jsonable(obj: Any) -> Any:
    """planner_data is usually tuples/lists of str/int (FQN paths); keep what JSON can hold."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {k: _jsonable(v) for k, v in obj.items()}
    raise TypeError(type(obj).__name__)


def _tupleize(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tupleize(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _tupleize(v) for k, v in obj.items()}
    return obj


def encode_manifest(metadata: Metadata, locations: dict[MetadataIndex, ItemLocation],
                    save_id: str, metadata_crc: int, checksum_algorithm: str | None,
                    extra: dict | None = None) -> bytes:
    """Serialise ``metadata`` and item locations into the manifest JSON (bytes)."""
    sdm: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            sdm[fqn] = {"type": "tensor", "properties": _enc_props(md.properties), "size": list(md.size),
                        "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks]}
        elif isinstance(md, BytesStorageMetadata):
            sdm[fqn] = {"type": "bytes"}
        else:
            raise TypeError(f"cannot describe metadata of type {type(md).__name__} for {fqn!r}")
    try:
        planner_data = _jsonable(metadata.planner_data)
        planner_data_ok = True
    except TypeError:
        planner_data, planner_data_ok = None, False
    items = []
    for idx, loc in locations.items():
        c = loc.checksums
        if c is not None and c.algorithm.name != checksum_algorithm:
            raise ValueError(f"{idx.fqn}: its block checksums are {c.algorithm.name}, the manifest says "
                             f"{checksum_algorithm}")
        items.append({
            "index": _enc_index(idx), "file": loc.relative_path, "offset": loc.offset, "length": loc.length,
            "data_offset": loc.data_offset, "data_length": loc.data_length,
            "checksums": None if c is None else {"block_size": c.block_size, "blocks": c.blocks, "rest": c.rest},
            **({"transforms": list(loc.transform_descriptors)} if loc.transform_descriptors else {}),
            **({"compression": loc.compression.to_json()} if loc.compression is not None else {}),
        })
    compressed = any(loc.compression is not None for loc in locations.values())
    doc = {
        "format": FORMAT, "version": manifest_version(compressed, checksum_algorithm), "save_id": save_id,
        "dcp_version": metadata.version, "checksum_algorithm": checksum_algorithm,
        "metadata_crc32c": metadata_crc, "planner_data": planner_data,
        "planner_data_complete": planner_data_ok,
        "modules": list(metadata.storage_meta.modules) if metadata.storage_meta else [],
        "checkpoint_id": (os.fspath(metadata.storage_meta.checkpoint_id)
                          if metadata.storage_meta and metadata.storage_meta.checkpoint_id is not None else None),
        # records hold resolved values: no conj/neg bit in any record's pickle (see records.compact_cpu)
        "views_resolved": True,
        "state_dict_metadata": sdm, "items": items, "extra": extra or {},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class Manifest:
    """A decoded manifest."""

    metadata: Metadata
    locations: dict[MetadataIndex, ItemLocation]
    save_id: str
    metadata_crc: int
    checksum_algorithm: str | None
    planner_data_complete: bool
    extra: dict
    #: False for manifests written before the writer resolved conj/neg views: a record of
    #: such a checkpoint may carry the bit in its pickle, so its raw bytes are not its values
    views_resolved: bool = True


def decode_manifest(raw: bytes, where: str) -> Manifest:
    """Parse manifest bytes; :class:`CorruptCheckpointError` naming ``where`` if malformed."""
    try:
        doc = json.loads(raw)
        if doc.get("format") != FORMAT:
            raise ValueError("not a dcp-ext manifest")
        if doc["version"] > FORMAT_VERSION:
            raise CorruptCheckpointError(
                f"{where}: manifest version {doc['version']} is newer than this dcp-ext understands "
                f"({FORMAT_VERSION}); upgrade dcp-ext")
        algorithm = _algorithm(doc["checksum_algorithm"], where)
        sdm: dict[str, Any] = {}
        for fqn, d in doc["state_dict_metadata"].items():
            if d["type"] == "tensor":
                sdm[fqn] = TensorStorageMetadata(
                    properties=_dec_props(d["properties"]), size=torch.Size(d["size"]),
                    chunks=[ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in d["chunks"]])
            else:
                sdm[fqn] = BytesStorageMetadata()
        locations: dict[MetadataIndex, ItemLocation] = {}
        for it in doc["items"]:
            c = it["checksums"]
            checks = None
            if c is not None:
                checks = ItemChecksums(it["data_offset"] or 0, it["data_length"] or 0, c["block_size"],
                                       list(c["blocks"]), c["rest"], algorithm)
            transforms = it.get("transforms")
            frames = None if it.get("compression") is None else FrameTable.from_json(it["compression"])
            if frames is not None and (frames.nblocks != math.ceil((it["data_length"] or 0) / frames.block_size)
                                       or frames.stored_length != it["length"]):
                raise ValueError(f"the frame table of {it['index'][0]} does not match its length")
            locations[_dec_index(it["index"])] = ItemLocation(
                it["file"], it["offset"], it["length"], it["data_offset"], it["data_length"], checks,
                tuple(transforms) if transforms else None, frames)
        md = Metadata(state_dict_metadata=sdm, planner_data=_tupleize(doc["planner_data"]),
                      storage_data=None, storage_meta=StorageMeta(checkpoint_id=doc.get("checkpoint_id"),
                                                                  save_id=doc["save_id"],
                                                                  modules=doc.get("modules", [])),
                      **metadata_version(doc.get("dcp_version")))
        return Manifest(md, locations, doc["save_id"], doc["metadata_crc32c"], doc["checksum_algorithm"],
                        doc.get("planner_data_complete", True), doc.get("extra", {}),
                        bool(doc.get("views_resolved", False)))
    except CorruptCheckpointError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CorruptCheckpointError(f"{where}: unreadable manifest ({type(e).__name__}: {e})") from e
