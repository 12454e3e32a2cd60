"""The safetensors file format: header encode/decode and dtype names (no ``safetensors`` import needed).

A file is an 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a
multiple of 8), then the tensors' raw bytes back to back, each at the ``data_offsets`` its header
entry gives (relative to the end of the header)::

    {"__metadata__": {"format": "pt"},
     "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, ...}

Why not the ``safetensors`` package: it writes from tensors that are all in memory at once and
reads local files only (``mmap``); a conversion that streams one tensor at a time through any
dcp-ext backend needs the header before the data and ranged reads. The tests check every file we
write with ``safetensors.torch.load_file`` and read files ``safetensors`` wrote.

The one place that knows the header's bytes: conversions (:mod:`dcp_ext.convert`) encode and
decode whole files with it, :mod:`dcp_ext.storage.safetensors` parses the blobs stock DCP's
safetensors formats write (:func:`header_json`, :data:`DTYPE_OF_NAME`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import ConvertError, CorruptCheckpointError
from .commit import HF_INDEX_NAME

__all__ = ["DTYPES", "DTYPE_OF_NAME", "TensorEntry", "SafetensorsHeader", "encode_header", "decode_header",
           "header_json", "header_length", "HEADER_PREFIX", "INDEX_NAME", "METADATA_KEY", "shard_name"]

#: safetensors dtype names (as ``safetensors.torch`` maps them)
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2: "F8_E5M2", torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.complex64: "C64",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16",
}
#: safetensors dtype names -> torch dtypes
DTYPE_OF_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPES.items()}
#: the header's entry that holds free-form string metadata, not a tensor
METADATA_KEY = "__metadata__"

#: bytes before the JSON header (its length)
HEADER_PREFIX = 8
#: safetensors refuses headers above 100 MB
MAX_HEADER = 100_000_000
#: Hugging Face's index of a sharded model (its name is the commit protocol's: :mod:`.commit`)
INDEX_NAME = HF_INDEX_NAME


def shard_name(i: int, n: int) -> str:
    """Hugging Face's shard names: ``model-00001-of-00003.safetensors`` (one file: ``model.safetensors``)."""
    return "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its dtype, shape and byte range after the header."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A decoded header: the entries in file order, the free-form metadata, where data starts."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def _nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * torch._utils._element_size(dtype)


def encode_header(tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                  metadata: dict[str, str] | None = None) -> tuple[bytes, list[TensorEntry]]:
    """The bytes that start a safetensors file holding ``tensors`` (name, dtype, shape), in that
    order and back to back; and the entries (whose offsets say where each tensor's bytes go)."""
    doc: dict = {}
    if metadata:
        doc[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
    entries = []
    pos = 0
    for name, dtype, shape in tensors:
        if name == METADATA_KEY:
            raise ConvertError("a tensor cannot be named '__metadata__' in a safetensors file")
        if name in doc:
            raise ConvertError(f"two tensors are named {name!r}")
        if dtype not in DTYPES:
            raise ConvertError(f"{name}: safetensors cannot hold dtype {dtype} (it holds "
                              f"{', '.join(sorted(str(d).removeprefix('torch.') for d in DTYPES))})")
        n = _nbytes(dtype, shape)
        doc[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        entries.append(TensorEntry(name, dtype, tuple(shape), pos, pos + n))
        pos += n
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + HEADER_PREFIX) % 8)  # data starts 8-byte aligned
    if len(raw) > MAX_HEADER:
        raise ConvertError(f"safetensors header of {len(raw)} bytes is over the format's {MAX_HEADER}-byte limit: "
                          f"split the tensors over more files (a smaller max shard size)")
    return struct.pack("<Q", len(raw)) + raw, entries


def header_length(prefix: bytes, where: str) -> int:
    """The JSON header length from a file's first 8 bytes."""
    if len(prefix) < HEADER_PREFIX:
        raise CorruptCheckpointError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", prefix[:HEADER_PREFIX])
    if n > MAX_HEADER:
        raise CorruptCheckpointError(f"{where}: not a safetensors file (header length {n} is implausible)")
    return n


def header_json(raw: bytes | bytearray | memoryview, n: int) -> dict:
    """The JSON object of an ``n``-byte header that follows the 8-byte length at ``raw[0]``;
    ``ValueError`` (the caller's error class names the file) if it is not one."""
    doc = json.loads(bytes(raw[HEADER_PREFIX:HEADER_PREFIX + n]))
    if not isinstance(doc, dict):
        raise ValueError("the header is not a JSON object")
    return doc


def decode_header(raw: bytes, where: str, file_size: int | None = None) -> SafetensorsHeader:
    """Parse a header (``raw``: the file's first ``8 + N`` bytes); check offsets are contiguous
    and, given ``file_size``, that the data fits the file."""
    n = header_length(raw, where)
    try:
        doc = header_json(raw, n)
        meta = doc.pop(METADATA_KEY, None) or {}
        entries = []
        for name, d in doc.items():
            if d["dtype"] not in DTYPE_OF_NAME:
                raise ValueError(f"{name}: unknown dtype {d['dtype']!r}")
            b, e = (int(x) for x in d["data_offsets"])
            shape = tuple(int(s) for s in d["shape"])
            entry = TensorEntry(name, DTYPE_OF_NAME[d["dtype"]], shape, b, e)
            if entry.nbytes != _nbytes(entry.dtype, shape):
                raise ValueError(f"{name}: {entry.nbytes} bytes do not match shape {list(shape)} of {d['dtype']}")
            entries.append(entry)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{where}: unreadable safetensors header ({e})") from e
    entries.sort(key=lambda t: t.begin)
    pos = 0
    for t in entries:
        if t.begin != pos:
            raise CorruptCheckpointError(f"{where}: tensor {t.name} starts at {t.begin}, expected {pos} "
                                         f"(overlapping or gapped data)")
        pos = t.end
    start = HEADER_PREFIX + n
    if file_size is not None and start + pos != file_size:
        raise CorruptCheckpointError(f"{where}: the header describes {start + pos} bytes but the file has "
                                     f"{file_size} (truncated or not a safetensors file)")
    return SafetensorsHeader({t.name: t for t in entries}, {str(k): str(v) for k, v in meta.items()}, start)
