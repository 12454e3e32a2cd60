"""Stock DCP's safetensors formats, read with ranged reads.

torch 2.13 writes safetensors in two ways, and our reader loads both:

* ``FileSystemWriter(serialization_format=SerializationFormat.SAFETENSORS)`` (also
  ``FsspecWriter``): each data file ``__{rank}_{n}.distcp`` holds its bytes items as usual
  (``torch.save`` records, stream-transformed with ``_extensions``), then, with ``_extensions``,
  one empty transformed stream per tensor item, then **one safetensors blob** with every tensor
  of the file. ``.metadata`` gives each tensor item the blob's offset (or its empty stream's)
  and its byte size, and nothing says which format was used; stock ``FileSystemReader`` cannot
  load it (it ``torch.load``\\ s from there). :func:`locate_blob_items` finds the blob (it is the
  last thing in the file: its header's data end is the file's end) and turns each tensor item
  into the location of its raw bytes.
* ``HuggingFaceStorageWriter``: ``model-0000k-of-0000n.safetensors`` files (and
  ``model.safetensors.index.json``), or per-rank ``shard-...safetensors`` files whose
  ``__metadata__`` records each tensor's chunk offsets (``DCP_SHARDING_INFO``); no ``.metadata``
  at all. :func:`hf_metadata` builds the DCP ``Metadata`` from the headers, as stock's
  ``HuggingFaceStorageReader`` does, but through any byte store.

A safetensors blob is a little-endian u64 ``n``, ``n`` bytes of JSON (``{name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the data, each tensor
C-ordered and little-endian: its raw bytes are located, so ranged (resharded) reads fetch only
what a rank needs, exactly as for our own records.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ..errors import IncompleteCheckpointError, UnsupportedFormatError
from .base import Store
from .commit import HF_INDEX_NAME
from .manifest import ItemLocation
from .safetensors_format import DTYPE_OF_NAME, HEADER_PREFIX, METADATA_KEY, header_json

__all__ = ["DTYPES", "Blob", "read_blob_header", "locate_blob_items", "hf_metadata"]

logger = logging.getLogger(__name__)

#: safetensors dtype names (those ``safetensors.torch`` writes) -> torch dtypes
DTYPES: dict[str, torch.dtype] = DTYPE_OF_NAME
#: the key of ``__metadata__`` in which stock DCP records chunk offsets (``_hf_utils``)
SHARDING_KEY = "DCP_SHARDING_INFO"
SAVED_OFFSETS_KEY = "saved_offsets"
#: how far past the last tensor item's offset the blob may start (its empty transformed stream)
PROBE_WINDOW = 4 * 1024
#: read this much at a safetensors header first (the rest of a longer header is read after)
HEAD_READ = 4 * 1024


@dataclass
class Blob:
    """A parsed safetensors blob: where it starts in its file, its header, and where its data
    region starts (``start + 8 + header length``)."""

    start: int
    header: dict
    data_start: int

    @property
    def tensors(self) -> dict[str, dict]:
        return {k: v for k, v in self.header.items() if k != METADATA_KEY}

    @property
    def sharding(self) -> dict | None:
        """Stock DCP's per-tensor chunk offsets, if it recorded them."""
        raw = (self.header.get(METADATA_KEY) or {}).get(SHARDING_KEY)
        return json.loads(raw) if raw else None

    def data_end(self) -> int:
        return self.data_start + max((v["data_offsets"][1] for v in self.tensors.values()), default=0)


def _parse(raw: bytes, start: int, where: str) -> Blob:
    n = struct.unpack_from("<Q", raw, 0)[0]
    try:
        header = header_json(raw, n)
        for k, v in header.items():
            if k != METADATA_KEY and not (isinstance(v, dict) and len(v.get("data_offsets", ())) == 2):
                raise ValueError(f"entry {k!r} has no data_offsets")
    except (ValueError, UnicodeDecodeError) as e:
        raise UnsupportedFormatError(f"{where}: not a readable safetensors header at byte {start}: {e}") from e
    return Blob(start, header, start + HEADER_PREFIX + n)


def read_blob_header(store: Store, relpath: str, start: int = 0, size: int | None = None) -> Blob:
    """Parse the safetensors header at byte ``start`` of ``relpath``."""
    size = store.size(relpath) if size is None else size
    where = f"{store.url}/{relpath}"
    if size - start < 8:
        raise UnsupportedFormatError(f"{where}: too short for a safetensors header at byte {start}")
    first = bytearray(min(HEAD_READ, size - start))
    store.read_into(relpath, start, memoryview(first))
    n = struct.unpack_from("<Q", first, 0)[0]
    if 8 + n > size - start:
        raise UnsupportedFormatError(f"{where}: the safetensors header at byte {start} claims {n} bytes, more than "
                                     f"the file holds")
    if 8 + n > len(first):
        rest = bytearray(8 + n - len(first))
        store.read_into(relpath, start + len(first), memoryview(rest))
        first += rest
    return _parse(first, start, where)


def _find_blob(store: Store, relpath: str, after: int) -> Blob | None:
    """The safetensors blob stock's SAFETENSORS format put at the end of ``relpath``, starting at
    ``after`` or within ``PROBE_WINDOW`` bytes of it (None if there is none)."""
    size = store.size(relpath)
    if size - after < 8:
        return None
    window = bytearray(min(size - after, PROBE_WINDOW + 8))
    store.read_into(relpath, after, memoryview(window))
    for p in range(len(window) - 8):
        n = struct.unpack_from("<Q", window, p)[0]
        start = after + p
        if not 2 <= n <= size - start - 8:
            continue
        if p + 8 < len(window) and window[p + 8] != ord("{"):
            continue
        try:
            if p + 8 + n <= len(window):  # the header is in the window already
                blob = _parse(window[p:], start, f"{store.url}/{relpath}")
            else:
                blob = read_blob_header(store, relpath, start, size)
        except UnsupportedFormatError:
            continue
        if blob.data_end() == size:  # stock writes the blob last: its data ends the file
            return blob
    return None


def _dtype(entry: dict, fqn: str, where: str) -> torch.dtype:
    """The torch dtype of a header entry; a clear error for a dtype name we do not know."""
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise UnsupportedFormatError(f"{where}: {fqn} has the safetensors dtype {entry.get('dtype')!r}, which "
                                     f"dcp-ext cannot read (known: {', '.join(DTYPES)})")
    return dtype


def _check_entry(entry: dict, fqn: str, sizes: Any, dtype: torch.dtype, where: str) -> int:
    """Byte length of a header entry, after checking it against the chunk DCP's metadata names."""
    b, e = entry["data_offsets"]
    shape = list(entry.get("shape", []))
    st_dtype = _dtype(entry, fqn, where)
    if shape != list(sizes) or st_dtype.itemsize != dtype.itemsize or e - b != math.prod(shape) * dtype.itemsize:
        raise UnsupportedFormatError(f"{where}: the safetensors entry of {fqn} ({entry.get('dtype')} {shape}) does not "
                                     f"match the checkpoint's metadata ({dtype} {list(sizes)})")
    return e - b


def locate_blob_items(store: Store, relpath: str, items: dict[MetadataIndex, tuple[ItemLocation, Any, torch.dtype]],
                      ) -> dict[MetadataIndex, ItemLocation] | None:
    """Raw-data locations of the tensor items ``items`` (every tensor item of data file
    ``relpath``: index -> (location, chunk sizes, dtype)) if the file is in stock's SAFETENSORS
    format, else None (it holds ``torch.save`` records)."""
    after = max(loc.offset for loc, _, _ in items.values())
    blob = _find_blob(store, relpath, after)
    if blob is None:
        return None
    where = f"{store.url}/{relpath}"
    tensors, sharding = blob.tensors, blob.sharding or {}
    out = {}
    for idx, (loc, sizes, dtype) in items.items():
        entry = tensors.get(idx.fqn)
        if entry is None:
            raise UnsupportedFormatError(f"{where}: the safetensors blob of this file has no tensor {idx.fqn}")
        saved = sharding.get(idx.fqn, {}).get(SAVED_OFFSETS_KEY)
        if saved is not None and idx.offset is not None and list(saved) != list(idx.offset):
            # stock's SAFETENSORS writer keys a file's tensors by FQN: a second chunk of the same
            # FQN in one file replaced the first (torch 2.13); the data is not there
            raise UnsupportedFormatError(
                f"{where}: chunk {list(idx.offset)} of {idx.fqn} is not stored (the file's safetensors blob holds its "
                f"chunk {list(saved)}: stock's SAFETENSORS format keeps one chunk per tensor name and data file)")
        n = _check_entry(entry, idx.fqn, sizes, dtype, where)
        out[idx] = ItemLocation(relpath, blob.data_start + entry["data_offsets"][0], n, 0, n)
    return out


def _chunk_offsets(blob: Blob, fqn: str, ndim: int) -> list[int]:
    saved = (blob.sharding or {}).get(fqn, {}).get(SAVED_OFFSETS_KEY)
    return list(saved) if saved is not None else [0] * ndim


def hf_metadata(store: Store, files: list[str]) -> tuple[Metadata, dict[MetadataIndex, ItemLocation]]:
    """DCP ``Metadata`` and raw-data locations of a ``HuggingFaceStorageWriter`` checkpoint made
    of the safetensors ``files`` (as stock's ``HuggingFaceStorageReader.read_metadata`` builds it:
    chunk offsets from ``DCP_SHARDING_INFO`` when present, else whole tensors). Refuses a location
    whose ``model.safetensors.index.json`` names files or tensors that are not there, and one
    whose chunks leave part of a tensor uncovered (a rank's file missing)."""
    sdm: dict[str, TensorStorageMetadata] = {}
    locations: dict[MetadataIndex, ItemLocation] = {}
    for f in files:
        blob = read_blob_header(store, f)
        where = f"{store.url}/{f}"
        for fqn, entry in blob.tensors.items():
            dtype = _dtype(entry, fqn, where)
            shape = list(entry["shape"])
            offsets = _chunk_offsets(blob, fqn, len(shape))
            n = _check_entry(entry, fqn, shape, dtype, where)
            idx = MetadataIndex(fqn, torch.Size(offsets))
            if idx in locations:
                raise UnsupportedFormatError(f"{store.url}: {fqn} chunk {offsets} is stored twice ({locations[idx].relative_path}"
                                             f" and {f})")
            locations[idx] = ItemLocation(f, blob.data_start + entry["data_offsets"][0], n, 0, n)
            chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(shape))
            md = sdm.get(fqn)
            if md is None:
                sdm[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(
                    [o + s for o, s in zip(offsets, shape)]), [chunk])
            else:
                if md.properties.dtype != dtype:
                    raise UnsupportedFormatError(f"{store.url}: chunks of {fqn} have different dtypes")
                md.chunks.append(chunk)
                md.size = torch.Size([max(a, o + s) for a, o, s in zip(md.size, offsets, shape)])
    _check_index(store, files, sdm)
    gaps = [(fqn, sum(math.prod(c.sizes) for c in md.chunks), math.prod(md.size)) for fqn, md in sorted(sdm.items())]
    gaps = [g for g in gaps if g[1] != g[2]]
    if gaps:
        fqn, covered, total = gaps[0]
        raise IncompleteCheckpointError(
            f"{store.url}: the safetensors chunks of {fqn} cover {covered} of its {total} elements"
            + (f" ({len(gaps) - 1} more tensors likewise)" if len(gaps) > 1 else "")
            + " (a rank's file is missing, or chunks overlap); refusing to load it")
    md = Metadata(state_dict_metadata=sdm, storage_data=None, storage_meta=StorageMeta())
    return md, locations


def _check_index(store: Store, files: list[str], sdm: dict) -> None:
    """``model.safetensors.index.json`` (written last by rank-0 saves and by consolidation) must
    name only files and tensors that are there."""
    if not store.exists(HF_INDEX_NAME):
        logger.info("%s has no %s (a save_distributed safetensors checkpoint): its files are read as they are",
                    store.url, HF_INDEX_NAME)
        return
    try:
        weight_map = json.loads(store.read_bytes(HF_INDEX_NAME))["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise UnsupportedFormatError(f"{store.url}/{HF_INDEX_NAME} is not a safetensors index: {e}") from e
    missing_files = sorted({f for f in weight_map.values() if f not in files})
    missing = sorted(k for k in weight_map if k not in sdm)
    if missing_files or missing:
        raise IncompleteCheckpointError(
            f"{store.url}: {HF_INDEX_NAME} names " + (f"files that are not there ({missing_files})" if missing_files
                                                      else f"tensors no file holds ({missing[:5]})")
            + "; refusing to load it")
