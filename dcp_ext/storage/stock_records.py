"""Locating the raw tensor bytes inside a ``torch.save`` record that stock DCP wrote.

Stock checkpoints carry no data offsets, so a reader that needs a quarter of a tensor would read
the whole record. But a ``torch.save`` record of one tensor is a zip whose ``.../data/0`` entry
is the tensor's storage, stored uncompressed: its zip central directory (at the record's end)
and local header (at its start) give the offset, and its ``data.pkl`` says how the tensor views
the storage. When that view is the plain C-contiguous tensor of the chunk DCP's metadata names
(storage offset 0, C strides, no conj/neg bit, the storage exactly its bytes), the raw bytes are
the values and the reader can fetch only the byte ranges it needs, as for our own records. Anything
else (a view, a quantized tensor, a pickle we do not understand) gives None: the record is read
whole, as stock reads it. Two small reads per record (its first and last few KiB); nothing in the
pickle is executed (:class:`_ViewUnpickler` only records the calls it would make).

Stock's records carry a zip CRC32 of ``data/0``, but ``torch.load`` does not check it (tested), so
a ranged read loses no check a whole read had.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any, Sequence

import torch

from .base import Store

__all__ = ["locate_record_data", "RANGED_MIN_BYTES"]

#: records whose tensor is smaller than this are read whole (a probe would cost more than it saves)
RANGED_MIN_BYTES = 256 * 1024
#: the probe reads the record in pieces of this size (its head and its tail, usually)
_PIECE = 8 * 1024
_REBUILDS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3")}


class _RecordFile(io.RawIOBase):
    """A read-only, seekable view of ``[start, start + length)`` of a stored file, fetched in
    cached ``_PIECE``-aligned pieces (what :mod:`zipfile` reads: the end, then the start)."""

    def __init__(self, store: Store, relpath: str, start: int, length: int):
        super().__init__()
        self.store, self.relpath, self.start, self.length = store, relpath, start, length
        self.pos = 0
        self.pieces: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + offset
        return self.pos

    def _piece(self, k: int) -> bytes:
        if k not in self.pieces:
            lo = k * _PIECE
            buf = bytearray(min(_PIECE, self.length - lo))
            self.store.read_into(self.relpath, self.start + lo, memoryview(buf))
            self.pieces[k] = bytes(buf)
        return self.pieces[k]

    def readinto(self, b) -> int:
        out = memoryview(b).cast("B")
        n = max(0, min(len(out), self.length - self.pos))
        got = 0
        while got < n:
            k, off = divmod(self.pos + got, _PIECE)
            piece = self._piece(k)[off:off + n - got]
            out[got:got + len(piece)] = piece
            got += len(piece)
        self.pos += n
        return n


class _Call:
    """A call the pickle would make (recorded, not made)."""

    def __init__(self, name: str, args: tuple):
        self.name, self.args = name, args


class _ViewUnpickler(pickle.Unpickler):
    """Reads a tensor record's ``data.pkl`` without running it: the rebuild call is recorded,
    storages are their persistent ids, dtypes are torch's; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REBUILDS:
            return lambda *args: _Call(name, args)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            return ("storage-type", name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain tensor record")

    def persistent_load(self, pid: Any) -> Any:
        return ("persistent", pid)


def _c_strides(shape: Sequence[int]) -> list[int]:
    out, acc = [0] * len(shape), 1
    for j in range(len(shape) - 1, -1, -1):
        out[j] = acc
        acc *= shape[j]
    return out


def _legacy_storage_name(dtype: torch.dtype) -> str | None:
    """The legacy typed storage class ``torch.save`` names for ``dtype`` (``"FloatStorage"``)."""
    try:
        return torch.storage._dtype_to_storage_type_map().get(dtype)
    except AttributeError:  # pragma: no cover - a torch without the table: read whole
        return None


def _plain_view(call: Any, shape: Sequence[int], dtype: torch.dtype) -> str | None:
    """The storage key of the record's tensor if it is exactly the C-contiguous ``shape`` of
    ``dtype`` over a whole storage of its own, else None."""
    if not isinstance(call, _Call):
        return None
    a = call.args
    v3 = call.name == "_rebuild_tensor_v3"
    if len(a) < (7 if v3 else 6):
        return None
    storage, offset, size, stride = a[0], a[1], list(a[2]), list(a[3])
    metadata = a[7] if v3 and len(a) > 7 else a[6] if not v3 and len(a) > 6 else None
    if metadata and (metadata.get("conj") or metadata.get("neg")):
        return None  # the stored bytes are not the values
    if v3 and a[6] != dtype:
        return None
    if not (isinstance(storage, tuple) and storage[0] == "persistent" and isinstance(storage[1], tuple)):
        return None
    pid = storage[1]
    if len(pid) != 5 or pid[0] != "storage":
        return None
    _, stype, key, _location, numel = pid
    nbytes = 1
    for s in shape:
        nbytes *= s
    nbytes *= dtype.itemsize
    stored = numel if v3 else numel * dtype.itemsize  # v3: an UntypedStorage counts bytes
    if not v3 and (not isinstance(stype, tuple) or _legacy_storage_name(dtype) != stype[1]):
        return None  # a legacy typed storage class must be the dtype's own
    if offset != 0 or size != list(shape) or stored != nbytes:
        return None
    if any(st != want for st, want, n in zip(stride, _c_strides(shape), shape) if n > 1):
        return None
    return str(key)


def locate_record_data(store: Store, relpath: str, offset: int, length: int, shape: Sequence[int],
                       dtype: torch.dtype) -> int | None:
    """Offset of the raw tensor bytes inside the stock ``torch.save`` record at
    ``[offset, offset + length)`` of ``relpath``, relative to the record, if those bytes are the
    C-ordered values of a ``shape`` tensor of ``dtype``; None otherwise (read it whole)."""
    f = _RecordFile(store, relpath, offset, length)
    try:
        z = zipfile.ZipFile(f)
        infos = z.infolist()
        pkl = next((i for i in infos if i.filename.endswith("/data.pkl")), None)
        if pkl is None:
            return None
        if pkl.file_size > _PIECE * 8:  # a plain tensor's pickle is a few hundred bytes
            return None
        prefix = pkl.filename[:-len("data.pkl")]
        order = next((i for i in infos if i.filename == prefix + "byteorder"), None)
        if order is not None and z.read(order).strip() != b"little":
            return None
        key = _plain_view(_ViewUnpickler(io.BytesIO(z.read(pkl))).load(), shape, dtype)
        data = next((i for i in infos if i.filename == f"{prefix}data/{key}"), None)
        if key is None or data is None or data.compress_type != zipfile.ZIP_STORED:
            return None
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        if data.file_size != nbytes:
            return None
        f.seek(data.header_offset)
        head = f.read(30)
        if head[:4] != b"PK\x03\x04":
            return None
        start = data.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
        return start if start + nbytes <= length else None
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError,
            AttributeError):
        return None
