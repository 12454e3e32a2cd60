"""Generic fsspec backend: any protocol fsspec knows (``memory://``, ``hdfs://``, ...).

Object-store-like: ``put_atomic`` is a single ``pipe_file`` (no rename), ranged reads use
``cat_file(start, end)``. Dedicated backends exist for S3 and GCS; this one is for the
long tail and for tests (``memory://``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

from ..config import Config
from ..options import Options
from ..errors import CorruptCheckpointError, MissingDependencyError, StorageError
from .base import BlobWriter, Store

__all__ = ["FsspecOptions", "FsspecStore"]

logger = logging.getLogger(__name__)

#: fsspec protocols whose implementation one of our pip extras installs (for error messages)
PROTOCOL_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


@dataclass
class FsspecOptions(Options):
    """The ``[fsspec]`` section: the generic fsspec backend (``memory://``, ``hdfs://``, ...)."""

    #: passed to ``fsspec.core.url_to_fs(url, **storage_options)``
    storage_options: dict = field(default_factory=dict)


def _missing_implementation(url: str, err: ImportError) -> MissingDependencyError:
    proto = url.split("://", 1)[0].lower() if "://" in url else "file"
    extra = PROTOCOL_EXTRAS.get(proto)
    hint = (f"pip install 'dcp-ext[{extra}]'" if extra else
            f"install the fsspec implementation of {proto!r}")
    return MissingDependencyError(
        f"the fsspec protocol {proto!r} of {url!r} needs a Python package that is not installed "
        f"(fsspec says: {err}): {hint}")


class _FsspecWriter(BlobWriter):
    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        try:
            self.f = fs.open(path, "wb")
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"cannot create {path}: {e}") from e
        self.pos = 0

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        self.f.write(bytes(data) if n < 65536 else data)
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        try:
            self.f.close()
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"closing {self.path} failed: {e}") from e

    def abort(self) -> None:
        try:
            self.f.close()
            self.fs.rm_file(self.path)
        except Exception:  # noqa: BLE001
            pass


class FsspecStore(Store):
    """A checkpoint location reached through ``fsspec``."""

    coalesce_gap = 256 * 1024

    def __init__(self, url: str, config: Config | None = None):
        super().__init__(url)
        import fsspec

        self.config = config or Config()
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **self.config.fsspec.storage_options)
        except ImportError as e:
            raise _missing_implementation(url, e) from e
        self.root = self.root.rstrip("/")

    def _abs(self, relpath: str) -> str:
        return f"{self.root}/{relpath}" if relpath else self.root

    def prepare_for_write(self) -> None:
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"cannot create checkpoint location {self.url}: {e}") from e

    def open_writer(self, relpath: str) -> BlobWriter:
        return _FsspecWriter(self.fs, self._abs(relpath))

    def put_atomic(self, relpath: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._abs(relpath), data)
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"cannot write {self._abs(relpath)}: {e}") from e

    def read_into(self, relpath: str, offset: int, out: memoryview) -> None:
        path = self._abs(relpath)
        try:
            data = self.fs.cat_file(path, start=offset, end=offset + len(out))
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"{path} is missing: the checkpoint is damaged") from e
        if len(data) != len(out):
            raise CorruptCheckpointError(f"{path} is truncated: expected {len(out)} bytes at offset {offset}, "
                                         f"got {len(data)}")
        out[:] = data

    def size(self, relpath: str) -> int:
        return int(self.fs.size(self._abs(relpath)))

    def exists(self, relpath: str = "") -> bool:
        return bool(self.fs.exists(self._abs(relpath)))

    def list(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        n = len(self.root) + 1
        return sorted(p[n:] if p.startswith(self.root + "/") else p.split(self.root + "/", 1)[-1]
                      for p in self.fs.find(self.root))

    def remove(self, relpaths: Iterable[str]) -> None:
        for p in relpaths:
            try:
                self.fs.rm_file(self._abs(p))
            except FileNotFoundError:
                pass

    def remove_empty_dirs(self) -> None:
        try:
            if self.fs.exists(self.root) and not self.fs.find(self.root):
                self.fs.rm(self.root, recursive=True)
        except Exception as e:  # noqa: BLE001 - leftovers are harmless
            logger.debug("could not remove the empty location %s: %s", self.url, e)
