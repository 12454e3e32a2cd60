"""Zarr3 chunks on local files without TensorStore's codec pipeline: the same bytes on disk,
written and read by dcp-ext's own code (``pwritev``/``preadv`` straight from/into the tensor,
crc32c by the CPU's crc32 instructions: ``dcp_ext.storage.tensorstore._rowio``, or the ``crc32c`` package).

Why: TensorStore's wheels compute the ``crc32c`` codec with abseil's portable table code (their
SSE4.2/PCLMUL path is compiled out: ``absl::crc_internal::CRC32::Extend`` is a fifth of a
profiled read), about 1.8 GB/s per core against ~15 GB/s here, and they read each chunk into a
fresh buffer (page faults) before copying it into the destination. On tmpfs that made saves
0.6-0.8x and loads 0.25-0.45x of our byte-file backend; see ``docs/benchmarks.md``.

Handled here (:func:`chunk_format` says whether an array qualifies): regular chunk grid, default
chunk keys (``c/i/j``), codecs exactly ``bytes`` + ``crc32c``, optionally inside a
``sharding_indexed`` codec whose index (at the end) is ``bytes`` + ``crc32c``: every array
dcp-ext writes without compression. Everything else (zstd, S3, GCS) goes through TensorStore.

Format (zarr3 spec; TensorStore writes and reads exactly this, which the tests check both ways):

* a chunk is its elements in C order over the *full* chunk shape (past the array's end: the
  fill value, 0), little-endian, followed by the crc32c of those bytes (4 bytes, little-endian);
* without shards each chunk is the file ``<array>/c/<i>/<j>...`` (``c`` for a 0-dim array);
* with shards the file ``<array>/c/<i>/<j>`` is a shard: its inner chunks (each as above) back
  to back in C order, then the index, one ``(offset, nbytes)`` pair of little-endian uint64 per
  inner chunk in C order (``2**64-1`` twice for a chunk not stored: wholly past the array's end),
  then the index's crc32c.

Writes go through :class:`Job` s (a run of chunks of one file, about :data:`JOB_BYTES`) that a
thread pool runs; reads likewise. A whole chunk whose tensor side has a contiguous last dim
(:func:`row_set`: any row strides, any number of dims) goes straight between the tensor's rows
and the file: the ``dcp_ext.storage.tensorstore._rowio`` C extension ``pwritev``s it from the source rows (in
256 KiB batches, each hashed into the crc32c just before it goes out, then the crc) or
``preadv``s it into the destination rows, then computes the crc32c over them and compares it
with the stored one: no scratch, no copy (:func:`rowio` says whether
the extension is there, the CPU has hardware crc32c and ``tensorstore.native_rowio`` is on).
Otherwise a chunk that is a contiguous run of the tensor is written from it or read into it, and
others are gathered into, or read into, a per-thread scratch buffer and copied
(:func:`copy_rows`). Every chunk's crc32c (and every shard index's) is checked; on the scratch
path before the data reaches the tensor, on the in-place paths after (as with the byte-file
backends): a load that fails leaves the destination's content undefined. Measured and dropped
(``docs/benchmarks.md``): reading a tile in cache-sized pieces (more calls, no less CPU), and
``preadv`` into the destination rows with a crc32c call per row from Python (the Python calls
cost more than the copy they save: hence the C extension).
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ...errors import CorruptCheckpointError, StorageError
from ...integrity import checksum

try:
    from . import _rowio
except ImportError:  # not built (no C compiler at install): the NumPy path
    _rowio = None

log = logging.getLogger(__name__)

__all__ = ["ChunkFormat", "chunk_format", "chunk_key", "as_numpy", "copy_rows", "plan_writes", "plan_reads",
           "sync_dirs", "ShardIndexes", "Job", "ByteCount", "JOB_BYTES"]

#: bytes of chunk data one job writes or reads (a run of chunks of one file)
JOB_BYTES = 4 * 1024 * 1024
#: an index entry of a chunk that is not stored
MISSING = 2**64 - 1
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)


def _plain_bytes(c: dict) -> bool:
    cfg = c.get("configuration") or {}
    return c.get("name") == "bytes" and cfg.get("endian", "little") == "little"


def _bytes_crc(codecs: Sequence[dict]) -> bool:
    return len(codecs) == 2 and _plain_bytes(codecs[0]) and codecs[1].get("name") == "crc32c"


@dataclass(frozen=True)
class ChunkFormat:
    """What this module needs of a zarr3 array: its shape, the file-level chunk grid, the
    inner chunk shape when the files are shards, and the element size."""

    shape: tuple[int, ...]
    chunk: tuple[int, ...]
    inner: tuple[int, ...] | None
    itemsize: int

    @property
    def unit(self) -> tuple[int, ...]:
        """Shape of the checksummed unit: an inner chunk, or the chunk itself."""
        return self.inner if self.inner is not None else self.chunk

    @property
    def per_shard(self) -> tuple[int, ...]:
        """Inner chunks along each dim of a shard."""
        assert self.inner is not None
        return tuple(-(-c // i) for c, i in zip(self.chunk, self.inner))

    def index_bytes(self) -> int:
        return 16 * math.prod(self.per_shard) + 4


def chunk_format(md: dict, itemsize: int) -> ChunkFormat | None:
    """The :class:`ChunkFormat` of the array with zarr3 metadata ``md`` if this module reads and
    writes it exactly (see the module docstring), else None."""
    if sys.byteorder != "little":
        return None
    grid = md.get("chunk_grid", {})
    keys = md.get("chunk_key_encoding", {})
    if grid.get("name") != "regular" or keys.get("name") != "default" or \
            (keys.get("configuration") or {}).get("separator", "/") != "/":
        return None
    shape = tuple(md["shape"])
    chunk = tuple(grid["configuration"]["chunk_shape"])
    codecs = md.get("codecs", [])
    if _bytes_crc(codecs):
        return ChunkFormat(shape, chunk, None, itemsize)
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        cfg = codecs[0]["configuration"]
        if _bytes_crc(cfg.get("codecs", [])) and _bytes_crc(cfg.get("index_codecs", [])) and \
                cfg.get("index_location", "end") == "end":
            inner = tuple(cfg["chunk_shape"])
            if len(inner) == len(chunk) and all(c % i == 0 for c, i in zip(chunk, inner)):
                return ChunkFormat(shape, chunk, inner, itemsize)
    return None


def chunk_key(idx: Sequence[int]) -> str:
    """The default zarr3 key of chunk ``idx`` (``c/1/0``; ``c`` for a 0-dim array)."""
    return "/".join(["c", *map(str, idx)])


_SAME_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of CPU tensor ``t`` (same memory and strides) as a plain type of its element
    size. Jobs slice and copy with NumPy: its cheap calls keep the GIL and its copies release it,
    where every torch call releases and retakes the GIL (each a chance for another thread to
    hold it for a switch interval) and a big copy starts an OpenMP team in the pool thread."""
    return t.detach().view(_SAME_SIZE[t.element_size()]).numpy()


_local = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """This thread's scratch buffer of at least ``nbytes`` (reused: valid until the next call)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _local.buf = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
    return buf


def copy_rows(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy tile ``src`` into ``dst`` (same shape and dtype, any strides): ``np.copyto``, which
    releases the GIL for these plain types. (Viewing each row as one opaque ``V<row bytes>``
    element, an earlier variant, was measured against it per tile, both directions, 512x512 to
    512x64 tiles: on NumPy 2.4 plain was as fast or faster, up to 1.4x on 128-byte rows; on
    NumPy 1.26 the two were within 10% either way. So plain.)"""
    np.copyto(dst, src)


_rowio_said: bool | None = None


def rowio(wanted: bool = True) -> bool:
    """Whether whole chunks go straight between the tensor's rows and the file (``_rowio``):
    ``wanted`` (the ``tensorstore.native_rowio`` option), the extension built, and the CPU has
    hardware crc32c. Logs the path taken at debug level when it changes."""
    global _rowio_said
    use = wanted and _rowio is not None and _rowio.HARDWARE
    if use != _rowio_said:
        _rowio_said = use
        why = ("off by tensorstore.native_rowio" if not wanted else
               "not built" if _rowio is None else "no hardware crc32c on this CPU")
        log.debug("zarr3 native chunk I/O: %s", "rows read/written in place (dcp_ext.storage.tensorstore._rowio)" if use
                  else f"through scratch buffers ({why})")
    return use


#: a row set: (address, row bytes, counts, byte strides of the leading dims), as ``_rowio`` takes it
Rows = tuple[int, int, tuple[int, ...], tuple[int, ...]]


def row_set(a: np.ndarray) -> Rows | None:
    """``a`` as a row set for ``_rowio`` (its rows: runs of its last dim, merged with the dims
    before it wherever they are contiguous), or None if its last dim is not contiguous."""
    item = a.itemsize
    if a.ndim and a.shape[-1] != 1 and a.strides[-1] != item:
        return None
    row = item * (a.shape[-1] if a.ndim else 1)
    counts, strides = list(a.shape[:-1]), list(a.strides[:-1])
    while counts and (counts[-1] == 1 or strides[-1] == row):
        row *= counts.pop()
        strides.pop()
    return a.__array_interface__["data"][0], row, tuple(counts), tuple(strides)


def _contiguous_range(region: Sequence[tuple[int, int]], cshape: Sequence[int]) -> tuple[int, int] | None:
    """``(first, count)`` elements if ``region`` ([lo, hi) per dim) of a C-order chunk of
    ``cshape`` is one contiguous run of it, else None."""
    n = len(cshape)
    d = n - 1
    while d >= 0 and region[d] == (0, cshape[d]):  # full trailing dims
        d -= 1
    if any(hi - lo != 1 for lo, hi in region[:max(d, 0)]):
        return None
    first = 0
    for k in range(n):
        first = first * cshape[k] + region[k][0]
    return first, math.prod(hi - lo for lo, hi in region)


class ByteCount:
    """A thread-safe byte counter (what the jobs of one save or load transferred)."""

    def __init__(self):
        self.n = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.n += n


@dataclass
class Job:
    """One unit of work for a pool thread: call :meth:`run`; ``nbytes``: its chunk data;
    ``file``: the file it writes (jobs writing one file run one at a time: ``submit_in_turn``)."""

    run: Callable[[], None]
    nbytes: int
    file: str | None = None


# -- writing --------------------------------------------------------------------------------

class _File:
    """A chunk/shard file written by one or more jobs: created (truncated) by the first job to
    run, fsynced (when asked) and closed by the last one to finish."""

    def __init__(self, path: str, users: int, fsync: bool, what: str):
        self.path = path
        self.what = what
        self.users = users
        self.fsync = fsync
        self._fd: int | None = None
        self._lock = threading.Lock()

    def fd(self) -> int:
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                except OSError as e:
                    raise StorageError(f"{self.what}: cannot create {self.path}: {e.strerror or e}") from e
            return self._fd

    def release(self, ok: bool) -> None:
        with self._lock:
            self.users -= 1
            fd = self._fd if self.users == 0 else None
        if fd is None:
            return
        try:
            if ok and self.fsync:
                os.fsync(fd)
        except OSError as e:
            raise StorageError(f"{self.what}: writing {self.path} failed: {e.strerror or e}") from e
        finally:
            os.close(fd)


def _vectored(op: Callable, fd: int, bufs: list, offset: int) -> int:
    """``op`` (``os.preadv`` or ``os.pwritev``) over all of ``bufs`` from ``offset``, resumed after
    short transfers; bytes transferred (fewer only where the file ends). OSError as raised."""
    views = [memoryview(b).cast("B") for b in bufs]
    total = 0
    i = 0
    while i < len(views):
        batch = views[i:i + _IOV_MAX]
        want = sum(len(v) for v in batch)
        n = op(fd, batch, offset)
        total += n
        offset += n
        if n == 0:
            return total
        if n == want:
            i += len(batch)
            continue
        while n >= len(views[i]):  # a short transfer: go on with the rest
            n -= len(views[i])
            i += 1
        views[i] = views[i][n:]
    return total


def _pwritev_all(fd: int, bufs: list, offset: int) -> None:
    """Write all of ``bufs`` at ``offset`` (OSError as raised)."""
    want = sum(memoryview(b).nbytes for b in bufs)
    if _vectored(os.pwritev, fd, bufs, offset) != want:
        raise OSError(errno.EIO, "the file system wrote nothing")


@dataclass
class _Piece:
    """One stored chunk of a write: the source of its valid region and its full shape;
    ``rows``: the source as a row set where ``_rowio`` writes it in place (a whole chunk)."""

    src: np.ndarray
    valid: tuple[int, ...]
    cshape: tuple[int, ...]
    nbytes: int
    rows: Rows | None = None

    @property
    def direct(self) -> bool:
        return self.valid == self.cshape and self.src.flags.c_contiguous


def _write_job(file: _File, offset: int, pieces: list[_Piece], tail: bytes | None, count: ByteCount) -> Job:
    def run() -> None:
        ok = False
        try:
            pos = offset
            for i, p in enumerate(pieces):  # one chunk at a time: a gathered one stays in cache
                last = tail if tail is not None and i == len(pieces) - 1 else b""
                if p.rows is not None:  # straight from the source rows: no gather
                    _rowio.write_rows_crc(file.fd(), pos, *p.rows, last)  # rows, their crc32c, ``last``
                    pos += p.nbytes + 4
                    continue
                if p.direct:
                    data = p.src
                else:
                    data = _scratch(p.nbytes)[:p.nbytes]
                    if p.valid != p.cshape:
                        data.fill(0)  # the fill value past the array's end
                    typed = data.view(p.src.dtype).reshape(p.cshape)
                    copy_rows(typed[tuple(slice(0, v) for v in p.valid)], p.src)
                bufs = [data, checksum(data).to_bytes(4, "little")]
                if last:
                    bufs.append(last)
                _pwritev_all(file.fd(), bufs, pos)
                pos += p.nbytes + 4
            if tail is not None and not pieces:
                _pwritev_all(file.fd(), [tail], pos)
            count.add(pos - offset + (len(tail) if tail is not None else 0))
            ok = True
        except OSError as e:
            raise StorageError(f"{file.what}: writing {file.path} failed: {e.strerror or e}") from e
        finally:
            file.release(ok)

    return Job(run, sum(p.nbytes for p in pieces), file.path)


def _box_chunks(lo: Sequence[int], hi: Sequence[int], chunk: Sequence[int]):
    """Indices of the chunks of a ``chunk`` grid that intersect the box [lo, hi)."""
    return itertools.product(*(range(l // c, -(-h // c)) for l, h, c in zip(lo, hi, chunk)))


def plan_writes(array_dir: str, fmt: ChunkFormat, lo: Sequence[int], src: np.ndarray, fsync: bool,
                made_dirs: set[str], count: ByteCount, what: str = "saving", rows: bool = True) -> list[Job] | None:
    """The jobs writing the box ``src`` (:func:`as_numpy` of the tensor; array coordinates
    ``lo``..``lo + src.shape``) as whole chunk files of the array in ``array_dir``; None if the
    box is not made of whole chunks (the caller then lets TensorStore write it). Creates the
    directories now; the first job to run of a file creates it (truncated), the last closes it
    (fsynced first with ``fsync``). Errors are :class:`StorageError` s starting with ``what``.
    ``rows``: whole chunks go from the source rows to the file where :func:`rowio` allows."""
    hi = [l + s for l, s in zip(lo, src.shape)]
    if src.size == 0:
        return []
    for l, h, c, s in zip(lo, hi, fmt.chunk, fmt.shape):
        if l % c or (h % c and h != s):
            return None
    jobs: list[Job] = []
    direct = rowio(rows)
    for idx in _box_chunks(lo, hi, fmt.chunk):
        jobs += _chunk_file_jobs(array_dir, fmt, idx, lo, src, fsync, made_dirs, count, what, direct)
    return jobs


def _chunk_file_jobs(array_dir: str, fmt: ChunkFormat, idx: Sequence[int], lo: Sequence[int], src: np.ndarray,
                     fsync: bool, made_dirs: set[str], count: ByteCount, what: str, direct: bool) -> list[Job]:
    """The jobs writing chunk (or shard) file ``idx``, which lies inside the box at ``lo``
    (whole chunks from their source rows where ``direct``: see :func:`rowio`)."""
    clo = [i * c for i, c in zip(idx, fmt.chunk)]
    path = os.path.join(array_dir, *chunk_key(idx).split("/"))
    d = os.path.dirname(path)
    if d not in made_dirs:
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{what}: cannot create {d}: {e.strerror or e}") from e
        made_dirs.add(d)
    if fmt.inner is None:
        units = [clo]
    else:
        units = [[c + j * i for c, j, i in zip(clo, jdx, fmt.inner)]
                 for jdx in itertools.product(*(range(n) for n in fmt.per_shard))]
    cshape = fmt.unit
    nbytes = math.prod(cshape) * fmt.itemsize
    pieces: list[_Piece | None] = []
    for ulo in units:
        if any(u >= s for u, s in zip(ulo, fmt.shape)):
            pieces.append(None)  # wholly past the array's end: not stored
            continue
        valid = tuple(min(c, s - u) for u, c, s in zip(ulo, cshape, fmt.shape))
        view = src[(*(slice(u - l, u - l + v) for u, l, v in zip(ulo, lo, valid)), ...)]  # a view, even 0-dim
        rows = row_set(view) if direct and valid == tuple(cshape) else None
        pieces.append(_Piece(view, valid, tuple(cshape), nbytes, rows))
    tail = None
    if fmt.inner is not None:
        index: list[int] = []
        off = 0
        for p in pieces:
            index += [MISSING, MISSING] if p is None else [off, nbytes + 4]
            off += 0 if p is None else nbytes + 4
        raw = np.array(index, dtype="<u8").tobytes()
        tail = raw + checksum(raw).to_bytes(4, "little")
    stored = [p for p in pieces if p is not None]
    per_job = max(1, JOB_BYTES // max(1, nbytes))
    groups = [stored[i:i + per_job] for i in range(0, len(stored), per_job)] or [[]]
    file = _File(path, len(groups), fsync, what)
    return [_write_job(file, g * per_job * (nbytes + 4), group, tail if g == len(groups) - 1 else None, count)
            for g, group in enumerate(groups)]


def sync_dirs(dirs: set[str], root: str) -> None:
    """fsync each directory in ``dirs`` and its ancestors below ``root`` (so that the new chunk
    files and directories survive a crash once the checkpoint is committed)."""
    todo: set[str] = set()
    root = os.path.abspath(root)
    for d in dirs:
        while len(d) > len(root) and d not in todo:
            todo.add(d)
            d = os.path.dirname(d)
    for d in sorted(todo, key=len, reverse=True):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as e:  # some network file systems refuse directory fsync
            if e.errno not in (errno.EINVAL, errno.EBADF):
                raise StorageError(f"fsync of {d} failed: {e.strerror or e}") from e
        finally:
            os.close(fd)


# -- reading --------------------------------------------------------------------------------

def _corrupt(what: str, where: str, kind: str, detail: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{what}: {kind} in {where} ({detail}; the checkpoint is corrupt or was modified)")


class ShardIndexes:
    """Shard indexes read (and checked) during one load, by file path."""

    def __init__(self):
        self._cache: dict[str, tuple[list[int], int]] = {}

    def get(self, path: str, key: str, fmt: ChunkFormat, what: str, where: str,
            count: ByteCount) -> tuple[list[int], int]:
        """The flat ``[offset, nbytes, ...]`` index of shard file ``path`` (chunk key ``key``)
        and where its chunk data ends."""
        hit = self._cache.get(path)
        if hit is not None:
            return hit
        n = fmt.index_bytes()
        fd = _open_chunk(path, key, what, where)
        try:
            size = os.fstat(fd).st_size
            if size < n:
                raise _corrupt(what, where, "a chunk has the wrong size",
                               f"shard {key} has {size} bytes, its index alone {n}")
            raw = os.pread(fd, n, size - n)
        except OSError as e:
            raise StorageError(f"{what}: reading {path} failed: {e.strerror or e}") from e
        finally:
            os.close(fd)
        count.add(len(raw))
        if len(raw) != n or checksum(memoryview(raw)[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise _corrupt(what, where, "a chunk fails its crc32c checksum", f"the index of shard {key}")
        hit = self._cache[path] = (np.frombuffer(raw, dtype="<u8", count=(n - 4) // 8).tolist(), size - n)
        return hit


def _open_chunk(path: str, key: str, what: str, where: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError as e:
        raise _corrupt(what, where, "a chunk is missing", f"{key} does not exist") from e
    except OSError as e:
        raise StorageError(f"{what}: cannot open {path}: {e.strerror or e}") from e


@dataclass
class _Read:
    """One checksummed unit to read: where it is, its full shape, the needed part of it
    (``region``, chunk coordinates) and its destination (``dest``, a NumPy view); ``run``:
    (first byte, bytes) of the unit that go straight into ``dest`` (None: via scratch);
    ``rows``: ``dest`` as a row set where ``_rowio`` reads the whole unit into it in place."""

    path: str
    key: str
    offset: int
    cshape: tuple[int, ...]
    nbytes: int
    region: tuple[tuple[int, int], ...]
    dest: np.ndarray
    whole_file: bool  # the unit is a whole file: it must end right after its crc32c
    run: tuple[int, int] | None
    rows: Rows | None = None


def _read_job(reads: list[_Read], what: str, where: str, count: ByteCount) -> Job:
    def run() -> None:
        fds: dict[str, int] = {}
        tail = bytearray(5)  # the crc32c, and one byte more for a unit that must end the file
        crc = memoryview(tail)[:4]
        try:
            for r in reads:  # one unit at a time: its scratch stays in the core's cache
                fd = fds.get(r.path)
                if fd is None:
                    fd = fds[r.path] = _open_chunk(r.path, r.key, what, where)
                want = r.nbytes + 4
                end = tail if r.whole_file else crc
                parts: list[np.ndarray] = []
                try:
                    if r.rows is not None:  # straight into the destination rows: no scratch
                        addr, row, counts, strides = r.rows
                        got = _rowio.preadv_rows(fd, r.offset, addr, row, counts, strides, end)
                    else:
                        if r.run is None:
                            parts = [_scratch(r.nbytes)[:r.nbytes]]
                        else:
                            first, length = r.run
                            rest = r.nbytes - length
                            buf = _scratch(rest)
                            parts = [buf[:first], r.dest, buf[first:rest]] if rest else [r.dest]
                            parts = [p for p in parts if p.size]
                        got = _vectored(os.preadv, fd, [*parts, end], r.offset)
                except OSError as e:
                    raise StorageError(f"{what}: reading {r.path} failed: {e.strerror or e}") from e
                count.add(min(got, want))
                if got != want:
                    raise _corrupt(what, where, "a chunk has the wrong size",
                                   f"{r.key} is {'longer' if got > want else 'shorter'} than its {want} bytes")
                if r.rows is not None:  # hashed in one go after the read: in batches was no faster
                    value = _rowio.crc32c_rows(addr, row, counts, strides)
                else:
                    value = 0
                    for p in parts:
                        value = checksum(p, value)
                if value != int.from_bytes(crc, "little"):
                    raise _corrupt(what, where, "a chunk fails its crc32c checksum", r.key)
                if r.rows is None and r.run is None:
                    typed = parts[0].view(r.dest.dtype).reshape(r.cshape)
                    copy_rows(r.dest, typed[tuple(slice(a, b) for a, b in r.region)])
        finally:
            for fd in fds.values():
                os.close(fd)

    return Job(run, sum(r.nbytes for r in reads))


def plan_reads(array_dir: str, fmt: ChunkFormat, lo: Sequence[int], dest: np.ndarray, what: str, where: str,
               indexes: ShardIndexes, count: ByteCount, rows: bool = True) -> list[Job]:
    """The jobs reading the box ``lo``..``lo + dest.shape`` of the array in ``array_dir`` into
    ``dest`` (:func:`as_numpy` of the target, any strides). Shard indexes are read (and
    checked) now; every chunk's crc32c is checked by its job (``rows``: whole chunks are read
    straight into the destination rows, then checked there, where :func:`rowio` allows)."""
    hi = [l + s for l, s in zip(lo, dest.shape)]
    if dest.size == 0:
        return []
    cshape = fmt.unit
    full = tuple((0, c) for c in cshape)
    direct = rowio(rows)
    nbytes = math.prod(cshape) * fmt.itemsize
    reads: list[_Read] = []
    for idx in _box_chunks(lo, hi, fmt.chunk):
        key = chunk_key(idx)
        path = os.path.join(array_dir, *key.split("/"))
        clo = [i * c for i, c in zip(idx, fmt.chunk)]
        units = [(clo, 0, key)] if fmt.inner is None else \
            _shard_units(path, key, fmt, clo, lo, hi, nbytes, indexes, what, where, count)
        for ulo, off, ukey in units:
            region = tuple((max(l, u) - u, min(h, u + c) - u) for l, h, u, c in zip(lo, hi, ulo, cshape))
            view = dest[(*(slice(u + a - l, u + b - l) for (a, b), u, l in zip(region, ulo, lo)), ...)]  # a view
            rng = _contiguous_range(region, cshape) if view.flags.c_contiguous else None
            run = None if rng is None else (rng[0] * fmt.itemsize, rng[1] * fmt.itemsize)
            rows = row_set(view) if direct and region == full else None
            reads.append(_Read(path, ukey, off, tuple(cshape), nbytes, region, view, fmt.inner is None, run, rows))
    jobs: list[Job] = []
    group: list[_Read] = []
    size = 0
    for r in reads:
        if group and size + r.nbytes > JOB_BYTES:
            jobs.append(_read_job(group, what, where, count))
            group, size = [], 0
        group.append(r)
        size += r.nbytes
    if group:
        jobs.append(_read_job(group, what, where, count))
    return jobs


def _shard_units(path: str, key: str, fmt: ChunkFormat, clo: list[int], lo: Sequence[int], hi: Sequence[int],
                 nbytes: int, indexes: ShardIndexes, what: str, where: str, count: ByteCount):
    """``(origin, file offset, name)`` of the inner chunks of shard ``key`` that the box needs."""
    index, end = indexes.get(path, key, fmt, what, where, count)
    rel_lo = [max(l, c) - c for l, c in zip(lo, clo)]
    rel_hi = [min(c + n, h) - c for c, n, h in zip(clo, fmt.chunk, hi)]
    assert fmt.inner is not None
    per_shard = fmt.per_shard  # computed, once per shard rather than per inner chunk
    units = []
    for jdx in _box_chunks(rel_lo, rel_hi, fmt.inner):
        k = 0
        for j, n in zip(jdx, per_shard):
            k = k * n + j
        off, size = index[2 * k], index[2 * k + 1]
        name = f"inner chunk {list(jdx)} of shard {key}"
        if off == MISSING and size == MISSING:
            raise _corrupt(what, where, "a chunk is missing", name)
        if size != nbytes + 4 or off + size > end:
            raise _corrupt(what, where, "a chunk has the wrong size",
                           f"{name}: {size} bytes at {off}, expected {nbytes + 4}")
        units.append(([c + j * i for c, j, i in zip(clo, jdx, fmt.inner)], off, name))
    return units
