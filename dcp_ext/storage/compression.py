"""zstd framing that keeps ranged reads: the codec and the frame table of a compressed item.

Why per block: stock DCP's ``ZStandard`` extension compresses each item as one stream, so a
rank that needs a quarter of a tensor must fetch and decompress all of it. A compressed dcp-ext
item is cut into independent zstd frames instead, one per checksum block of the tensor's raw
bytes, and the manifest records each frame's stored size (:class:`FrameTable`): a ranged or
resharded load fetches and decompresses only the frames of the blocks it touches, and verifies
each block's crc32c after decompressing it, exactly as an uncompressed block.

Stored layout of a compressed item, the ``torch.save`` record cut in pieces::

    [head frame][block 0 frame] ... [block n-1 frame][tail frame]

``head``: the record's bytes before the tensor data (zip local header, pickle); block ``k``:
data bytes ``[k*block_size, (k+1)*block_size)``; ``tail``: the bytes after the data (zip central
directory). Each piece is one zstd frame: compressed when that pays, otherwise a frame of *raw*
zstd blocks built without running the compressor (:func:`raw_frame`). Concatenated, the frames
are a standard multi-frame zstd stream of the whole record, so the item carries stock's
``stream.zstd/1`` transform descriptor: stock ``FileSystemReader`` (with ``zstandard`` or
``pyzstd`` installed) decompresses it and ``torch.load``\\ s it as it would a record it
compressed itself. Writing: :mod:`dcp_ext.storage.compressed_records`.
"""

from __future__ import annotations

import functools
import math
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CorruptCheckpointError, MissingDependencyError

if TYPE_CHECKING:
    from .manifest import ItemLocation

__all__ = ["CODECS", "ZSTD_DESCRIPTOR", "MAX_BLOCK_BYTES", "FrameTable", "raw_frame", "decode_frame_into", "decode_frame",
           "zstandard_module", "compressor", "frame_error"]

#: codecs ``compression=`` accepts
CODECS = ("zstd",)
#: stock DCP's descriptor of its ``ZStandard`` stream transform (``ZStandard().get_descriptor()``):
#: our frames, concatenated, are what it decodes
ZSTD_DESCRIPTOR = "stream.zstd/1"
#: the largest block (frame) size: zstd decoders refuse windows above 128 MiB by default
MAX_BLOCK_BYTES = 64 * 1024 * 1024

_MAGIC = b"\x28\xb5\x2f\xfd"
_RAW_BLOCK = 128 * 1024  # zstd's largest block
_local = threading.local()


def zstandard_module() -> Any:
    """The ``zstandard`` module, or :class:`MissingDependencyError` naming the extra."""
    try:
        import zstandard
    except ImportError as e:
        raise MissingDependencyError(
            "zstd compression needs the Python package 'zstandard', which is not installed: "
            "pip install 'dcp-ext[zstd]'") from e
    return zstandard


def compressor(level: int) -> Any:
    """This thread's zstd compression context for ``level`` (contexts are not thread-safe)."""
    cur = getattr(_local, "cctx", None)
    if cur is None or cur[0] != level:
        cur = (level, zstandard_module().ZstdCompressor(level=level, write_content_size=True))
        _local.cctx = cur
    return cur[1]


def _decompressor() -> Any:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard_module().ZstdDecompressor()
    return d


def raw_frame(data: Any) -> bytearray:
    """A zstd frame holding ``data`` in raw blocks (what zstd itself emits for incompressible
    data), built without running the compressor: a 9-byte frame header (single segment, 4-byte
    content size) and a 3-byte header per 128 KiB block."""
    mv = memoryview(data).cast("B")
    n = len(mv)
    if n > MAX_BLOCK_BYTES:
        raise ValueError(f"raw_frame: {n} bytes is more than one frame may hold ({MAX_BLOCK_BYTES})")
    nblocks = max(1, math.ceil(n / _RAW_BLOCK))
    out = bytearray(9 + 3 * nblocks + n)
    out[0:4] = _MAGIC
    out[4] = 0b10_1_00000  # content size field: 4 bytes; single segment; no checksum, no dictionary
    struct.pack_into("<I", out, 5, n)
    pos, src = 9, 0
    for b in range(nblocks):
        take = min(_RAW_BLOCK, n - src)
        last = b == nblocks - 1
        out[pos:pos + 3] = (int(last) | (take << 3)).to_bytes(3, "little")  # block type 0: raw
        out[pos + 3:pos + 3 + take] = mv[src:src + take]
        pos += 3 + take
        src += take
    return out


def decode_frame_into(frame: Any, out: memoryview) -> None:
    """Decompress one zstd frame into ``out``, which must be exactly its content size.
    ``ValueError`` when the frame is damaged or holds another number of bytes."""
    zstd = zstandard_module()
    mv = memoryview(frame).cast("B")
    want = len(out)
    try:
        size = zstd.frame_content_size(mv)
    except zstd.ZstdError as e:
        raise ValueError(f"not a zstd frame ({e})") from e
    if size != want:
        raise ValueError(f"the frame holds {size} bytes, expected {want}")
    if want == 0:
        return
    try:
        reader = _decompressor().stream_reader(mv, read_across_frames=False)
        got = 0
        while got < want:
            n = reader.readinto(out[got:])
            if not n:
                break
            got += n
    except zstd.ZstdError as e:
        raise ValueError(f"zstd could not decompress it ({e})") from e
    if got != want:
        raise ValueError(f"it decompressed to {got} bytes, expected {want}")


def decode_frame(frame: Any) -> bytearray:
    """Decompress one zstd frame whose header records its content size (all of ours do)."""
    zstd = zstandard_module()
    try:
        size = zstd.frame_content_size(memoryview(frame).cast("B"))
    except zstd.ZstdError as e:
        raise ValueError(f"not a zstd frame ({e})") from e
    if size < 0:
        raise ValueError("the frame does not record its size")
    out = bytearray(size)
    decode_frame_into(frame, memoryview(out))
    return out


@dataclass(frozen=True)
class FrameTable:
    """Where the frames of one compressed item lie (recorded in the manifest).

    ``frames``: stored sizes, in order: the head frame, one frame per data block of
    ``block_size`` bytes (the last one may be shorter), the tail frame. Offsets are relative
    to the item's start (``ItemLocation.offset``).
    """

    codec: str
    block_size: int
    frames: tuple[int, ...]

    @functools.cached_property
    def _starts(self) -> tuple[int, ...]:
        out, pos = [], 0
        for f in self.frames:
            out.append(pos)
            pos += f
        out.append(pos)
        return tuple(out)

    @property
    def nblocks(self) -> int:
        return len(self.frames) - 2

    @property
    def stored_length(self) -> int:
        return self._starts[-1]

    @property
    def stored_data_bytes(self) -> int:
        """Stored bytes of the data blocks' frames (head and tail left out)."""
        return self._starts[-2] - self._starts[1]

    def frame_span(self, k: int) -> tuple[int, int]:
        """``(start, size)`` of frame ``k`` (0: head, 1..n: data blocks, n+1: tail)."""
        return self._starts[k], self.frames[k]

    def block_frame(self, b: int) -> tuple[int, int]:
        """``(start, size)`` of data block ``b``'s frame."""
        return self.frame_span(b + 1)

    def block_data(self, b: int, data_length: int) -> tuple[int, int]:
        """Data-relative ``[start, end)`` of block ``b``."""
        s = b * self.block_size
        return s, min(s + self.block_size, data_length)

    def to_json(self) -> dict:
        return {"codec": self.codec, "block_size": self.block_size, "frames": list(self.frames)}

    @classmethod
    def from_json(cls, d: dict) -> "FrameTable":
        if d["codec"] not in CODECS:
            raise ValueError(f"unknown codec {d['codec']!r}")
        return cls(d["codec"], int(d["block_size"]), tuple(int(f) for f in d["frames"]))


def frame_error(url: str, loc: ItemLocation, frame: int, fqn: str, chunk: list, e: Exception) -> CorruptCheckpointError:
    """The error for a frame of a compressed item that does not decode: names the file, the
    stored byte range, the block and the tensor."""
    ft = loc.compression
    assert ft is not None
    start, size = ft.frame_span(frame)
    what = "record header" if frame in (0, ft.nblocks + 1) else f"data block {frame - 1}"
    return CorruptCheckpointError(
        f"{url}/{loc.relative_path}: compressed {what} of {fqn} chunk {chunk} (bytes {loc.offset + start}-"
        f"{loc.offset + start + size}) is damaged: {e}")
