"""Block checksums: every stored item carries checksums of fixed-size blocks.

Why blocks and not one checksum per item: a rank that loads a quarter of a tensor reads
about a quarter of its bytes, and must still be able to verify what it read. With a
checksum per ``block_size`` bytes of an item's tensor data, a ranged read verifies only
the blocks it touches (at most one partial block of extra bytes at each end).

Layout of an item's checksums (see :class:`ItemChecksums`): the item's record is
``[0, length)``; its *data region* ``[data_offset, data_offset + data_length)`` holds the
raw tensor bytes (C order) and is covered by ``blocks`` (block ``i`` covers data bytes
``[i*block_size, (i+1)*block_size)``); every byte outside the data region (the
``torch.save`` zip headers) is covered by ``rest`` (one checksum of those bytes, head then tail).

Algorithms (:class:`ChecksumAlgorithm`, by name in :data:`ALGORITHMS`): ``"xxh3_64"`` (the
default for new saves: about twice as fast as crc32c on a hot block, so hashing no longer holds a
verified save or load back from the write/read limit) and ``"crc32c"`` (every checkpoint saved
before, still read and verified). A checkpoint records its algorithm in its manifest
(``checksum_algorithm``); every item of a checkpoint uses the same one. Values that are crc32c by
definition of a format (the manifest's ``metadata_crc32c``, zarr3's crc32c codec) use
:func:`checksum`, always crc32c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import crc32c as _crc32c
import xxhash as _xxhash

from .errors import CorruptCheckpointError

__all__ = ["ALGORITHM", "ALGORITHMS", "CRC32C", "DEFAULT_ALGORITHM", "XXH3_64", "ChecksumAlgorithm", "checksum",
           "checksum_algorithm", "item_block_size", "BlockHasher", "ItemChecksums", "ChecksumMismatch",
           "verify_range", "verify_rest"]

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
    """crc32c of ``data`` (any buffer), continuing from ``value``. Releases the GIL. For values
    that are crc32c by format (``metadata_crc32c``, zarr3's codec); item blocks use their
    checkpoint's :class:`ChecksumAlgorithm`."""
    return _crc32c.crc32c(data, value)


class _Crc32cStream:
    """Incremental crc32c with the interface of ``xxhash.xxh3_64()`` (``update``/``intdigest``)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = _crc32c.crc32c(data, self.value)

    def intdigest(self) -> int:
        return self.value


class ChecksumAlgorithm:
    """One block checksum algorithm: ``digest(data)`` hashes a buffer at once, ``stream()`` gives
    an incremental hasher (``update(data)``, ``intdigest()``) whose result equals ``digest`` of
    the concatenated pieces. Both release the GIL, so I/O threads hash in parallel. Instances are
    the module's singletons (:data:`CRC32C`, :data:`XXH3_64`) and pickle by name."""

    __slots__ = ("name", "digest", "stream")

    def __init__(self, name: str, digest: Callable[[Any], int], stream: Callable[[], Any]):
        self.name, self.digest, self.stream = name, digest, stream

    def digest_parts(self, *parts) -> int:
        """The checksum of the concatenation of ``parts`` (buffers), without joining them."""
        h = self.stream()
        for p in parts:
            h.update(p)
        return h.intdigest()

    def __reduce__(self):
        return checksum_algorithm, (self.name,)

    def __repr__(self) -> str:
        return f"ChecksumAlgorithm({self.name!r})"


#: crc32c (Castagnoli): what every checkpoint saved before xxh3 became the default carries
CRC32C = ChecksumAlgorithm("crc32c", _crc32c.crc32c, _Crc32cStream)
#: xxh3 64-bit (xxHash): the default for new saves (about 2x crc32c's speed on a hot block)
XXH3_64 = ChecksumAlgorithm("xxh3_64", _xxhash.xxh3_64_intdigest, _xxhash.xxh3_64)
#: every algorithm this dcp-ext reads and writes, by the name recorded in manifests
ALGORITHMS: dict[str, ChecksumAlgorithm] = {a.name: a for a in (CRC32C, XXH3_64)}
#: the name new saves use unless configured otherwise (``checksum_algorithm``)
DEFAULT_ALGORITHM = "xxh3_64"
#: the algorithm of checkpoints whose manifest names none (kept for code that read it)
ALGORITHM = CRC32C.name


def checksum_algorithm(name: str) -> ChecksumAlgorithm:
    """The algorithm called ``name``; :class:`ValueError` naming the known ones if there is none."""
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown checksum algorithm {name!r}; known: "
                         f"{', '.join(repr(n) for n in ALGORITHMS)}") from None


class BlockHasher:
    """Incremental checksums (by ``algorithm``, crc32c unless given) over consecutive blocks of
    ``block_size`` bytes."""

    __slots__ = ("block_size", "algorithm", "blocks", "_stream", "_fill")

    def __init__(self, block_size: int, algorithm: ChecksumAlgorithm = CRC32C):
        self.block_size = block_size
        self.algorithm = algorithm
        self.blocks: list[int] = []
        self._stream: Any = None  # the incremental hasher of a block that arrived in pieces
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
            if take == bs:  # a whole block at once: one-shot (no hasher object)
                self.blocks.append(self.algorithm.digest(piece))
            else:
                if self._stream is None:
                    self._stream = self.algorithm.stream()
                self._stream.update(piece)
                self._fill += take
            if sink is not None:
                sink(piece)
            pos += take
            if self._fill == bs:
                self._end_block()

    def _end_block(self) -> None:
        self.blocks.append(self._stream.intdigest())
        self._stream = None
        self._fill = 0

    def finish(self) -> list[int]:
        """The checksums of every block, the last (partial) one included."""
        if self._fill:
            self._end_block()
        return self.blocks


@dataclass
class ItemChecksums:
    """Checksums of one stored item (see the module docstring for the layout)."""

    data_offset: int
    data_length: int
    block_size: int
    blocks: list[int] = field(default_factory=list)
    #: the checksum of the bytes outside the data region (``algorithm.digest(b"")`` if none)
    rest: int = 0
    #: the checkpoint's algorithm (recorded once per manifest, not per item)
    algorithm: ChecksumAlgorithm = CRC32C

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
    digest = checks.algorithm.digest
    for k in range(first, first + math.ceil(n / bs)):
        lo = (k - first) * bs
        hi = min(lo + bs, n)
        if k >= len(checks.blocks) or digest(mv[lo:hi]) != checks.blocks[k]:
            raise ChecksumMismatch(k, data_start + lo, data_start + hi)
    return math.ceil(n / bs)


def verify_rest(checks: ItemChecksums, head, tail) -> None:
    """Check the bytes of the record outside its data region (``head``: before it, ``tail``:
    after it) against ``checks.rest``; :class:`ChecksumMismatch` with ``block`` None if not."""
    if checks.algorithm.digest_parts(head, tail) != checks.rest:
        raise ChecksumMismatch(None, 0, len(head) + len(tail))
