"""The small blob-store interface every byte-oriented backend implements.

The DCP logic (plans, file layout, checksums, the commit protocol, ranged reads) lives
once in :mod:`dcp_ext.storage.writer` and :mod:`dcp_ext.storage.reader`; a backend only
moves bytes. Paths given to a :class:`Store` are relative to the checkpoint root
(``"__0_0.distcp"``, ``".metadata"``), always with ``/`` separators.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Iterable


class BlobWriter(abc.ABC):
    """A sequential writer for one data file / object.

    ``close()`` makes the data durable (fsync on a file system, multipart completion on an
    object store). ``abort()`` discards whatever was written (best effort, never raises).
    """

    @abc.abstractmethod
    def write(self, data: memoryview | bytes) -> int:
        """Append ``data``; returns the number of bytes written."""

    @abc.abstractmethod
    def tell(self) -> int:
        """Bytes written so far (the offset the next write lands at)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and make the data durable. Raises on failure."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard the partial file/object. Must not raise."""

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Store(abc.ABC):
    """Bytes in and out of one checkpoint location (a directory or an object prefix).

    A class attribute tunes the generic reader for the medium:

    * ``coalesce_gap``: two byte ranges closer than this are read as one request
      (small on local disk, where a request is cheap; ~1 MiB on object stores).
    * ``cpu_bound``: reads and writes cost CPU, not waiting (local file systems).
    """

    coalesce_gap: ClassVar[int] = 64 * 1024
    #: whether moving bytes is CPU work rather than waiting (a local file system copies to and from
    #: the page cache): then a rank reads and writes with no more threads than its share of the
    #: host's cores (:func:`~dcp_ext.storage.threads.cpu_workers`)
    cpu_bound: ClassVar[bool] = False
    #: attributes holding process-local resources (clients, connections, file descriptors,
    #: locks): left out when the store is pickled (``dcp.async_save`` with
    #: ``AsyncCheckpointerType.PROCESS`` sends the storage writer to its checkpoint process) and
    #: rebuilt there by :meth:`_init_local_state`
    _unpicklable: ClassVar[tuple[str, ...]] = ()

    def __init__(self, url: str):
        self.url = url

    def _init_local_state(self) -> None:
        """Create the process-local state named in ``_unpicklable`` (after unpickling; stores
        that build it lazily need nothing here)."""

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        for k in self._unpicklable:
            d.pop(k, None)
        return d

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_local_state()

    # -- writing -----------------------------------------------------------------------
    @abc.abstractmethod
    def prepare_for_write(self) -> None:
        """Create the location if needed; raise a clear error if it is not writable."""

    @abc.abstractmethod
    def open_writer(self, relpath: str) -> BlobWriter:
        """Open a sequential writer for a (new) data file."""

    @abc.abstractmethod
    def put_atomic(self, relpath: str, data: bytes) -> None:
        """Publish a small file so readers see either nothing or all of it.

        File systems: temporary name, fsync, ``os.replace``, fsync of the directory.
        Object stores: a single PUT (objects appear atomically), never copy+delete.
        """

    # -- reading -----------------------------------------------------------------------
    @abc.abstractmethod
    def read_into(self, relpath: str, offset: int, out: memoryview) -> None:
        """Fill ``out`` with ``len(out)`` bytes of ``relpath`` starting at ``offset``.

        Raises :class:`~dcp_ext.errors.CorruptCheckpointError` if the file is shorter.
        """

    def read_into_pieces(self, relpath: str, offset: int, out: memoryview, piece: int,
                         done: Callable[[int, memoryview], Any]) -> None:
        """Fill ``out`` as :meth:`read_into` does and call ``done(start, view)`` for each
        consecutive ``piece`` bytes of it (the last may be shorter), in order, once they are in
        ``out``. The reader verifies each piece in ``done``: a store that reads in steps (local
        files) calls it as each piece lands, while its bytes are still in the CPU cache; this
        default reads everything first (one request, as object stores want)."""
        self.read_into(relpath, offset, out)
        for s in range(0, len(out), piece):
            done(s, out[s:s + piece])

    def read_bytes(self, relpath: str) -> bytes:
        """Read a whole (small) file."""
        size = self.size(relpath)
        buf = bytearray(size)
        if size:
            self.read_into(relpath, 0, memoryview(buf))
        return bytes(buf)

    def read_into_views(self, relpath: str, offset: int, views: list[memoryview]) -> None:
        """Fill consecutive ``views`` (together bytes ``[offset, offset + their total)``) with one
        read. This default reads the span into one buffer and copies it out; object stores
        override it to fill each view straight from the socket."""
        span = memoryview(bytearray(sum(len(v) for v in views)))
        self.read_into(relpath, offset, span)
        pos = 0
        for v in views:
            v[:] = span[pos:pos + len(v)]
            pos += len(v)

    def read_bytes_if_exists(self, relpath: str) -> bytes | None:
        """A whole (small) file, or None if it does not exist. Object stores answer with one
        GET (a missing object is a 404), not a HEAD and then a GET: the metadata reads that
        come before a load's first data byte are round trips."""
        if not self.exists(relpath):
            return None
        return self.read_bytes(relpath)

    @abc.abstractmethod
    def size(self, relpath: str) -> int:
        """Size in bytes; raises ``FileNotFoundError`` if absent."""

    @abc.abstractmethod
    def exists(self, relpath: str = "") -> bool:
        """Whether ``relpath`` (or, for ``""``, the location itself) exists."""

    @abc.abstractmethod
    def list(self) -> list[str]:
        """Relative paths of every file under the location (recursive, sorted)."""

    @abc.abstractmethod
    def remove(self, relpaths: Iterable[str]) -> None:
        """Delete files; missing ones are ignored."""

    def remove_empty_dirs(self) -> None:
        """Remove directories left empty under (and including) the location, where the medium
        has directories (object stores have none: nothing to do). Never raises."""

    def close(self) -> None:
        """Release clients, pools and connections."""
