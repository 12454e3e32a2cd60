"""The fast tier's byte store: :class:`~dcp_ext.storage.fs.LocalStore` plus what tiering needs.

Every fast-tier file the tiered code writes goes through here: data files streamed from another
rank (a replica, a restore) appear under their final name only when complete and fsync'd
(temporary name, ``os.replace``, fsync of the directory), small records through
:meth:`~dcp_ext.storage.fs.LocalStore.put_atomic`. A *lease* (``flock``) tells other processes
that a copy is being persisted; the kernel drops it when its process dies, so a crash never
leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from typing import Any

from ..config import Config
from ..errors import StorageError
from ..storage.base import BlobWriter
from ..storage.commit import NODE_ID_FILE
from ..storage.fs import LocalStore

__all__ = ["FastStore", "AtomicFile", "Lease", "node_id"]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse directory fsync
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


class AtomicFile(BlobWriter):
    """A file written under a temporary name: :meth:`publish` (or ``close``) puts it in place
    whole; :meth:`abort` leaves nothing behind."""

    def __init__(self, store: "FastStore", relpath: str):
        self.store = store
        self.relpath = relpath
        self.tmp = f"{relpath}.{uuid.uuid4().hex[:8]}.part"
        self.inner = store.open_writer(self.tmp)
        self._finished = False

    def write(self, data: memoryview | bytes) -> int:
        return self.inner.write(data)

    def tell(self) -> int:
        return self.inner.tell()

    def finish(self) -> None:
        """Flush and fsync the temporary file (not yet visible under its name)."""
        if not self._finished:
            self.inner.close()
            self._finished = True

    def publish(self) -> None:
        """Make the file visible under its final name (atomic), and the rename durable."""
        self.finish()
        final = self.store.path(self.relpath)
        try:
            os.replace(self.store.path(self.tmp), final)
            if self.store.config.fs.fsync:
                _fsync_dir(os.path.dirname(final))
        except OSError as e:
            raise StorageError(f"cannot publish {final}: {e.strerror or e}") from e

    def close(self) -> None:
        self.publish()

    def abort(self) -> None:
        if not self._finished:
            self.inner.abort()
        try:
            os.unlink(self.store.path(self.tmp))
        except OSError:
            pass


class Lease:
    """A held ``flock`` on a file; released by :meth:`release` or by the process's death."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class FastStore(LocalStore):
    """A directory of the fast tier (a checkpoint's fast directory, or a replica subdirectory)."""

    def __init__(self, root: str, config: Config | None = None):
        super().__init__(root, config)

    def path(self, relpath: str = "") -> str:
        """Absolute path of ``relpath`` in this directory."""
        return os.path.join(self.root, relpath) if relpath else self.root

    def sub(self, relpath: str) -> "FastStore":
        """The store of a subdirectory (e.g. ``replica_of_rank3``)."""
        return FastStore(self.path(relpath), self.config)

    def open_atomic(self, relpath: str) -> AtomicFile:
        """A writer whose file appears under ``relpath`` only when published whole."""
        os.makedirs(os.path.dirname(self.path(relpath)) or self.root, exist_ok=True)
        return AtomicFile(self, relpath)

    def listdir(self, relpath: str = "") -> list[str]:
        """Names in a directory (sorted; empty if it does not exist)."""
        try:
            return sorted(os.listdir(self.path(relpath)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def isdir(self, relpath: str = "") -> bool:
        return os.path.isdir(self.path(relpath))

    def remove_tree(self, relpath: str = "") -> None:
        """Delete a subdirectory (or this whole directory) and everything in it."""
        self.close_readers()
        try:
            shutil.rmtree(self.path(relpath))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot remove {self.path(relpath)}: {e.strerror or e}") from e

    def read_bytes(self, relpath: str) -> bytes:
        """A whole small file, read through a descriptor of its own (records are replaced by
        ``os.replace``: a cached descriptor would keep reading the old one)."""
        with open(self.path(relpath), "rb") as f:
            return f.read()

    def read_json(self, relpath: str) -> Any:
        """A small JSON record, or None if it is missing or unreadable (a torn or foreign file)."""
        try:
            return json.loads(self.read_bytes(relpath))
        except (OSError, ValueError, StorageError):
            return None

    def mtime(self, relpath: str = "") -> float:
        return os.path.getmtime(self.path(relpath))

    def lease(self, name: str, *, exclusive: bool, wait_s: float = 0.0) -> Lease | None:
        """Take a shared (persisting) or exclusive (probing) lock on ``name``, trying for up to
        ``wait_s`` seconds; None if another process keeps a conflicting one."""
        os.makedirs(self.root, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(self.path(name), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                return Lease(fd)
            except BlockingIOError:
                os.close(fd)
            except OSError:
                os.close(fd)
                raise
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    def is_leased(self, name: str, wait_s: float = 0.5) -> bool:
        """Whether some process (this one included) keeps a lease on ``name`` for ``wait_s``
        seconds (a process that just died may hold it for a moment while it is torn down)."""
        if not os.path.exists(self.path(name)):
            return False
        probe = self.lease(name, exclusive=True, wait_s=wait_s)
        if probe is None:
            return True
        probe.release()
        return False


def node_id(root: str, config: Config | None = None) -> str:
    """The id of the fast tier at cache root ``root``, created on first use: every rank that sees
    this directory reads the same id, so ranks sharing a fast tier are found whatever the
    hostnames, containers or ``LOCAL_WORLD_SIZE`` say. A replaced node (empty cache) gets a new one."""
    store = FastStore(root, config)
    path = store.path(NODE_ID_FILE)
    for _ in range(3):
        try:
            with open(path, "rb") as f:
                got = f.read().decode().strip()
            if got:
                return got
        except FileNotFoundError:
            pass
        os.makedirs(root, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(uuid.uuid4().hex.encode())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another rank created it first: then read theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    raise StorageError(f"cannot establish the fast-tier id in {root} ({path} stays empty)")
