"""The byte store a tiered load reads through: each data file from wherever this rank can get it.

:class:`SourceStore` is what the stock-protocol reader (:class:`~dcp_ext.storage.reader.ExtStorageReader`)
sees as "the checkpoint": data files resolve to this node's own copy, a replica it keeps, a file
restored from another node, or (only for a file no good fast copy is left of, when the durable copy
is the very same save) the durable location; the commit may be held in memory when it was shipped
from another node. It is read-only.
"""

from __future__ import annotations

from typing import Iterable

from ..errors import DcpExtError
from ..storage.base import BlobWriter, Store
from ..storage.fs import LocalStore
from .faststore import FastStore

__all__ = ["SourceStore"]


class SourceStore(Store):
    """Read-only: the fast directory, per-file routes, an in-memory commit, the durable store."""

    coalesce_gap = LocalStore.coalesce_gap

    def __init__(self, fast: FastStore, durable: Store, overlay: dict[str, bytes] | None = None):
        super().__init__(fast.root)
        self.fast = fast
        self.durable = durable
        self.overlay = dict(overlay or {})
        #: data file -> its path in the fast directory (own, replica or restored copy)
        self.fast_paths: dict[str, str] = {}
        #: data files read from the durable copy instead
        self.from_durable: set[str] = set()

    def _where(self, relpath: str) -> tuple[Store, str]:
        if relpath in self.from_durable:
            return self.durable, relpath
        return self.fast, self.fast_paths.get(relpath, relpath)

    def read_into(self, relpath: str, offset: int, out: memoryview) -> None:
        if relpath in self.overlay:
            data = self.overlay[relpath]
            out[:] = data[offset:offset + len(out)]
            return
        store, path = self._where(relpath)
        store.read_into(path, offset, out)

    def size(self, relpath: str) -> int:
        if relpath in self.overlay:
            return len(self.overlay[relpath])
        store, path = self._where(relpath)
        return store.size(path)

    def exists(self, relpath: str = "") -> bool:
        if relpath in self.overlay or (relpath == "" and self.overlay):
            return True
        store, path = self._where(relpath)
        return store.exists(path)

    def list(self) -> list[str]:
        return sorted(set(self.fast.list()) | set(self.overlay))

    def close_readers(self) -> None:
        self.fast.close_readers()
        close = getattr(self.durable, "close_readers", None)
        if close is not None:
            close()

    def _read_only(self) -> DcpExtError:
        return DcpExtError(f"{self.url}: a tiered load's sources are read-only")

    def prepare_for_write(self) -> None:
        raise self._read_only()

    def open_writer(self, relpath: str) -> BlobWriter:
        raise self._read_only()

    def put_atomic(self, relpath: str, data: bytes) -> None:
        raise self._read_only()

    def remove(self, relpaths: Iterable[str]) -> None:
        raise self._read_only()
