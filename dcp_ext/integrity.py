"""Block checksums: every stored item carries crc32c values of fixed-size blocks.

Why blocks and not one checksum per item: a rank that loads a quarter of a tensor reads
about a quarter of its bytes, and must still be able to verify what it read. With a
checksum per ``block_size`` bytes of an item's tensor data, a ranged read verifies only
the blocks it touches (at most one partial block of extra bytes at each end).

Layout of an item's checksums (see :class:`ItemChecksums`): the item's record is
``[0, length)``; its *data region* ``[data_offset, data_offset + data_length)`` holds the
raw tensor bytes (C order) and is covered by ``blocks`` (block ``i`` covers data bytes
``[i*block_size, (i+1)*block_size)``); every byte outside the data region (the
``torch.save`` zip headers) is covered by ``rest``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import crc32c as _crc32c

from .errors import CorruptCheckpointError

__all__ = ["ALGORITHM", "checksum", "item_block_size", "BlockHasher", "ItemChecksums", "ChecksumMismatch", "verify_range",
           "verify_rest"]

#: the checksum algorithm name recorded in manifests
ALGORITHM = "crc32c"

#: an item gets at least this many blocks, unless that would make them smaller than
#: :data:`MIN_ITEM_BLOCK` (see :func:`item_block_size`)
BLOCKS_PER_ITEM = 32
#: the smallest block :func:`item_block_size` picks on its own (a configured size below it is kept)
MIN_ITEM_BLOCK = 128 * 1024


def item_block_size(nbytes: int, largest: int) -> int:
    """The block size for one item of ``nbytes``: ``largest`` (the configured
    ``checksum_block_size``), halved while the item would have fewer than
    :data:`BLOCKS_PER_ITEM` blocks, down to :data:`MIN_ITEM_BLOCK` (never below a smaller
    configured size).

    Why: a block is the unit a ranged read must fetch whole (to verify it, or, compressed, to
    decompress it). A rank loading a quarter of a 2 MiB tensor stored in 1 MiB blocks reads the
    whole 1 MiB block holding its 512 KiB; with the item's blocks at 1/32 of it, a resharded read
    fetches a few percent more than it needs. Large items keep the configured size, so the
    manifest grows by at most ``BLOCKS_PER_ITEM`` entries per small item. The size is recorded
    per item, so readers need nothing new.
    """
    block = largest
    # (only while the half stays a multiple of 16 bytes, the largest element size: a compressed
    # block must hold whole elements)
    while block > MIN_ITEM_BLOCK and block % 32 == 0 and nbytes < BLOCKS_PER_ITEM * block:
        block = max(MIN_ITEM_BLOCK, block // 2)
    return block


def checksum(data, value: int = 0) -> int:
    """crc32c of ``data`` (any buffer), continuing from ``value``. Releases the GIL."""
    return _crc32c.crc32c(data, value)


class BlockHasher:
    """Incremental crc32c over consecutive blocks of ``block_size`` bytes."""

    __slots__ = ("block_size", "blocks", "_cur", "_fill")

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.blocks: list[int] = []
        self._cur = 0
        self._fill = 0

    def update(self, data, sink: Callable[[memoryview], Any] | None = None) -> None:
        """Hash ``data``; with ``sink``, also hand it on piece by piece (``sink(piece)``), each
        piece right after hashing it, while its bytes are still in the CPU cache: a large write
        then reads memory once instead of twice (once to hash, once to copy to the kernel).
        Pieces end on block boundaries, so they are at most a block long."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        pos = 0
        bs = self.block_size
        while pos < n:
            take = min(bs - self._fill, n - pos)
            piece = mv[pos:pos + take]
            self._cur = checksum(piece, self._cur)
            if sink is not None:
                sink(piece)
            self._fill += take
            pos += take
            if self._fill == bs:
                self.blocks.append(self._cur)
                self._cur = 0
                self._fill = 0

    def finish(self) -> list[int]:
        if self._fill:
            self.blocks.append(self._cur)
            self._cur = 0
            self._fill = 0
        return self.blocks


@dataclass
class ItemChecksums:
    """Checksums of one stored item (see the module docstring for the layout)."""

    data_offset: int
    data_length: int
    block_size: int
    blocks: list[int] = field(default_factory=list)
    rest: int = 0

    def block_range(self, start: int, end: int) -> tuple[int, int]:
        """Data-relative byte range ``[start, end)`` widened to whole blocks."""
        bs = self.block_size
        return (start // bs) * bs, min(self.data_length, -(-end // bs) * bs)


class ChecksumMismatch(CorruptCheckpointError):
    """Stored bytes of one item fail their checksum. ``start``/``end``: the failing range,
    relative to the item's data region (``block`` its index), or ``block`` None for the bytes
    outside it (the record's headers). Callers add the file and the tensor to the message."""

    def __init__(self, block: int | None, start: int, end: int):
        self.block, self.start, self.end = block, start, end
        what = f"data bytes {start}-{end} (block {block})" if block is not None else "record headers"
        super().__init__(f"checksum mismatch in {what}")


def verify_range(checks: ItemChecksums, data_start: int, buf) -> int:
    """Check ``buf``, the item's data bytes from ``data_start`` on, against their blocks.

    ``data_start`` must be block aligned and ``buf`` must end on a block boundary or at the end
    of the data (what :meth:`ItemChecksums.block_range` gives a ranged read). Returns the number
    of blocks checked; raises :class:`ChecksumMismatch` for the first failing one (or a block
    the checksums do not have, i.e. data longer than what was saved). The one block check every
    reader uses: ranged reads, whole records and ``dcp-ext verify``.
    """
    bs = checks.block_size
    if data_start % bs:
        raise ValueError(f"verify_range: data_start {data_start} is not a multiple of the block size {bs}")
    mv = memoryview(buf).cast("B")
    n = len(mv)
    first = data_start // bs
    for k in range(first, first + math.ceil(n / bs)):
        lo = (k - first) * bs
        hi = min(lo + bs, n)
        if k >= len(checks.blocks) or checksum(mv[lo:hi]) != checks.blocks[k]:
            raise ChecksumMismatch(k, data_start + lo, data_start + hi)
    return math.ceil(n / bs)


def verify_rest(checks: ItemChecksums, head, tail) -> None:
    """Check the bytes of the record outside its data region (``head``: before it, ``tail``:
    after it) against ``checks.rest``; :class:`ChecksumMismatch` with ``block`` None if not."""
    if checksum(tail, checksum(head)) != checks.rest:
        raise ChecksumMismatch(None, 0, len(head) + len(tail))
