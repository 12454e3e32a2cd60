"""Writing tensor items compressed, per block (``compression="zstd"``; layout and reading:
:mod:`dcp_ext.storage.compression`).

What does not compress is not compressed: a tensor whose sample shrinks less than
``compression_min_ratio`` is written as a plain record (no CPU spent on it; it is read straight
into the destination, and stock reads it without zstd), and a block that compresses worse than
that is stored as a raw zstd frame. Tensors under ``MIN_ITEM_BYTES`` and quantized tensors (read
whole, as stock does) are always plain records.

Blocks are compressed in a shared pool (zstd releases the GIL) while the data file's writer
thread writes the finished frames in order: compressing block k+1 overlaps writing (or
uploading) block k, and a single data file still uses every core.

With ``compression_shuffle`` each data block is byte-shuffled by the tensor's element size before
it is compressed (and sampled that way); see :mod:`dcp_ext.storage.compression`.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..integrity import ChecksumAlgorithm, ItemChecksums
from ..torch_compat import torch_save
from .base import BlobWriter
from .compression import (ZSTD_DESCRIPTOR, FrameTable, compressor, raw_frame, shuffle, shuffle_descriptor,
                          zstandard_module)
from .manifest import ItemLocation
from .records import DataLocator, compact_cpu, write_tensor_record
from .threads import io_pool

__all__ = ["CompressionStats", "RecordCompressor", "MIN_ITEM_BYTES", "SAMPLE_BYTES", "SAMPLES"]

#: tensors with fewer data bytes are written as plain records: frames would not pay
MIN_ITEM_BYTES = 16 * 1024
#: bytes per sample, and samples per tensor, for the "does it compress?" estimate
SAMPLE_BYTES = 64 * 1024
SAMPLES = 4


@dataclass
class CompressionStats:
    """What compression did during one save on this rank (for reports, benchmarks and tests)."""

    #: tensor items written compressed (as frames) and as plain records (too small, or their
    #: sample compressed worse than ``compression_min_ratio``)
    items_compressed: int = 0
    items_plain: int = 0
    #: data blocks stored compressed / raw (they compressed worse than ``compression_min_ratio``)
    blocks_compressed: int = 0
    blocks_raw: int = 0
    #: data bytes in, stored bytes out (frames, heads and tails included) of compressed items
    bytes_in: int = 0
    bytes_out: int = 0
    #: names of the threads that compressed blocks (the writer's I/O pool)
    threads: set = field(default_factory=set)

    def add(self, other: "CompressionStats") -> None:
        """Add ``other``'s counts to these (the caller serialises concurrent adds)."""
        for k in ("items_compressed", "items_plain", "blocks_compressed", "blocks_raw", "bytes_in", "bytes_out"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.threads |= other.threads

    @property
    def ratio(self) -> float:
        """Data bytes per stored byte over the compressed items (1.0 when none)."""
        return self.bytes_in / self.bytes_out if self.bytes_out else 1.0


class _RecordSplitter(io.RawIOBase):
    """Where ``torch.save`` writes a record: keeps the bytes before the tensor data (``head``)
    and after it (``tail``); the data itself is not copied (we compress it from the tensor)."""

    def __init__(self, data_length: int):
        super().__init__()
        self.locator = DataLocator()
        self.data_length = data_length
        self.head = bytearray()
        self.tail = bytearray()
        self.pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        n = len(mv)
        if not n:
            return 0
        pos = self.pos
        d0 = self.locator.feed(mv, pos)
        if d0 is None:
            self.head += mv
        else:
            d1 = d0 + self.data_length
            a = min(max(d0 - pos, 0), n)
            z = min(max(d1 - pos, 0), n)
            self.head += mv[:a]
            self.tail += mv[z:]
        self.pos += n
        return n


class RecordCompressor:
    """Writes tensor items as per-block zstd frames (see the module docstring); one per writer.

    ``level``: zstd level; ``min_ratio``: a block (or an item's sample) must shrink by at least
    this factor to be stored compressed; ``workers``: compression threads (a shared pool);
    ``shuffle``: byte-shuffle data blocks by element size first.
    """

    def __init__(self, level: int = 3, min_ratio: float = 1.1, workers: int = 4, shuffle: bool = False):
        self.check_available()
        self.level = level
        self.min_ratio = min_ratio
        self.workers = max(1, workers)
        self.shuffle = shuffle
        self.stats = CompressionStats()
        self._lock = threading.Lock()  # data files are written by several threads

    @staticmethod
    def check_available() -> None:
        """:class:`~dcp_ext.errors.MissingDependencyError` naming the extra without ``zstandard``."""
        zstandard_module()

    # -- decisions ---------------------------------------------------------------------
    def _encode(self, mv: memoryview, es: int = 0) -> tuple[Any, bool]:
        """One frame for ``mv`` (byte-shuffled by ``es`` first, if set): compressed if that pays,
        else raw. Returns (frame, compressed)."""
        data: Any = memoryview(shuffle(mv, es)) if es else mv
        z = compressor(self.level).compress(data)
        if len(z) * self.min_ratio <= len(mv):
            return z, True
        return raw_frame(data), False

    def shuffle_size(self, t: torch.Tensor, block_size: int) -> int:
        """The element size ``t``'s blocks are shuffled by (0: not shuffled)."""
        es = t.element_size()
        return es if self.shuffle and 1 < es <= 16 and block_size % es == 0 else 0

    def sample_ratio(self, mv: memoryview, es: int = 0, block_size: int = SAMPLE_BYTES) -> float:
        """Estimated compression ratio of ``mv`` as its blocks would be stored (shuffled by
        ``es``): ``SAMPLES`` evenly spread pieces of ``min(SAMPLE_BYTES, block_size)`` bytes,
        each compressed on its own like a block."""
        n = len(mv)
        piece = min(SAMPLE_BYTES, block_size, n)
        c = compressor(self.level)

        def stored(p: memoryview) -> int:
            return len(c.compress(memoryview(shuffle(p, es)) if es else p))

        count = min(SAMPLES, n // piece)
        step = (n - piece) // max(1, count - 1) // max(1, es) * max(1, es)  # whole elements
        starts = [i * step for i in range(count)]
        return count * piece / max(1, sum(stored(mv[s:s + piece]) for s in starts))

    def wants(self, t: torch.Tensor, es: int = 0, block_size: int = SAMPLE_BYTES) -> bool:
        """Whether ``t`` (compact, CPU) is written compressed: big enough, not quantized (their
        records are read whole), and its sample compresses by ``min_ratio`` or more."""
        nbytes = t.numel() * t.element_size()
        if nbytes < MIN_ITEM_BYTES or t.is_quantized:
            return False
        return self.sample_ratio(_bytes_of(t), es, block_size) >= self.min_ratio

    # -- writing -------------------------------------------------------------------------
    def write(self, out: BlobWriter, relative_path: str, tensor: torch.Tensor, block_size: int,
              checksums: ChecksumAlgorithm | None) -> ItemLocation:
        """Append ``tensor`` compressed (or as a plain record when that does not pay); returns
        where it landed. ``block_size``: the frame and checksum block size; ``checksums``: the
        algorithm of the block checksums (of the uncompressed bytes, as for a plain record), or
        None for none."""
        t = compact_cpu(tensor)
        local = CompressionStats()
        es = self.shuffle_size(t, block_size)
        if not self.wants(t, es, block_size):
            local.items_plain = 1
            with self._lock:
                self.stats.add(local)
            if checksums is None:
                return write_tensor_record(out, relative_path, t, None)
            return write_tensor_record(out, relative_path, t, block_size, checksums)
        nbytes = t.numel() * t.element_size()
        split = _RecordSplitter(nbytes)
        torch_save(t, split)  # not torch.save: older torch keeps the storage (torch_compat)
        if split.locator.data_offset is None:  # pragma: no cover - torch changed its zip writer
            raise RuntimeError("could not locate the tensor data inside the torch.save record")
        head, tail, data = split.head, split.tail, _bytes_of(t)
        start = out.tell()
        frames: list[int] = []
        sums: list[int] = []

        def put(frame: Any) -> None:
            out.write(frame)
            frames.append(len(frame))

        put(self._encode(memoryview(head))[0])
        with contextlib.closing(self._blocks(data, block_size, checksums, local, es)) as blocks:
            for frame, compressed, block_sum in blocks:  # a failed write closes the pipeline at once
                put(frame)
                if compressed:
                    local.blocks_compressed += 1
                else:
                    local.blocks_raw += 1
                if block_sum is not None:
                    sums.append(block_sum)
        put(self._encode(memoryview(tail))[0])
        stored = out.tell() - start
        local.items_compressed, local.bytes_in, local.bytes_out = 1, nbytes, stored
        with self._lock:
            self.stats.add(local)
        checks = None
        if checksums is not None:
            checks = ItemChecksums(len(head), nbytes, block_size, sums, checksums.digest_parts(head, tail), checksums)
        descriptor = shuffle_descriptor(es) if es else ZSTD_DESCRIPTOR
        return ItemLocation(relative_path, start, stored, len(head), nbytes, checks, (descriptor,),
                            FrameTable("zstd", block_size, tuple(frames), es))

    def _blocks(self, data: memoryview, bs: int, algo: ChecksumAlgorithm | None, stats: CompressionStats, es: int):
        """``(frame, compressed, checksum)`` of every block of ``data``, in order, compressed on the
        shared pool while the caller writes the ones before (at most ``2 * workers`` ahead)."""
        n = len(data)
        nblocks = math.ceil(n / bs)

        def job(k: int) -> tuple[Any, bool, int | None]:
            mv = data[k * bs:min(n, (k + 1) * bs)]
            frame, compressed = self._encode(mv, es)
            stats.threads.add(threading.current_thread().name)
            return frame, compressed, algo.digest(mv) if algo is not None else None

        if nblocks <= 1 or self.workers <= 1:
            for k in range(nblocks):
                yield job(k)
            return
        pool = io_pool("compress", self.workers)
        pending: deque[Future] = deque()
        try:
            for k in range(nblocks):
                pending.append(pool.submit(job, k))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the caller failed (or we did): no job may still read the tensor afterwards
            for f in pending:
                f.cancel()
            for f in pending:
                if not f.cancelled():
                    f.exception()


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The raw bytes of a compact CPU tensor (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
