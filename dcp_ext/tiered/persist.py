"""Background persistence: copy a committed fast-tier checkpoint to its durable location and
commit it there.

One FIFO worker thread per process runs the jobs in submission order (no collectives: ranks
coordinate through small marker objects in the durable location, named by
:func:`~dcp_ext.storage.commit.persist_marker`). One *attempt* (the save's own, or a later
resume, :mod:`dcp_ext.tiered.recovery`) goes:

1. The coordinator looks at the durable location first: a committed copy of this very save
   means nothing is left to do (an earlier attempt died after its commit); another committed
   checkpoint is refused (or, with ``overwrite``, un-committed) *before any data is written*.
   Then it writes ``START`` (the attempt id). The other ranks wait for it (or for the commit).
2. Each uploader copies the files of the saving ranks assigned to it and then writes
   ``rank<r>.json`` (names and sizes). A rank whose marker already exists (from an attempt that
   died later) is not copied again: its files are known complete.
3. The coordinator waits for every saving rank's marker, checks that every file the checkpoint
   needs is there with the recorded size, and publishes manifest and ``.metadata`` **last**
   (:func:`~dcp_ext.storage.commit.publish`). The others wait for that commit or ``FAILED``.
4. Every participant marks its node's fast copy persisted; the node's first rank applies
   retention.

A kill at any point leaves the durable location either committed (and whole) or without
``.metadata``: never a commit over missing or partial data.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import threading
import time
from typing import Any, Callable, NamedTuple

import torch

from ..errors import DcpExtError, PersistError, StorageError
from ..storage.base import Store
from ..storage.commit import (
    MANIFEST_NAME,
    PERSISTED_MARKER,
    is_committed,
    is_persist_marker,
    persist_marker,
    persist_marker_prefix,
    publish,
    refuse_overwrite,
    remove_stale_data,
    uncommit,
)
from ..storage.manifest import decode_manifest
from .faststore import FastStore, Lease
from .handles import PersistHandle, PersistResult, register

__all__ = ["PersistJob", "Upload", "UploadFile", "submit", "PROGRESS_EVERY_S"]

logger = logging.getLogger(__name__)

#: seconds between INFO progress lines of a background persistence (bytes copied so far)
PROGRESS_EVERY_S = 30.0

_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    # One FIFO worker per process: persistences run in save order and bound I/O. Its thread is
    # joined at interpreter exit, so a script that ends right after dcp.save still persists.
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dcp_ext-persist")
        return _EXECUTOR


def submit(job: "PersistJob") -> PersistHandle:
    """Queue ``job`` behind this process's earlier persistences; returns its handle."""
    register(job.handle)
    job.handle.state = "queued"
    _executor().submit(job.run)
    return job.handle


def _read(store: Store, name: str) -> bytes:
    """A small object that other ranks replace (markers, the manifest): read afresh each time
    (a store that keeps files open, like LocalStore, would keep reading the replaced one)."""
    try:
        return store.read_bytes(name)
    finally:
        close = getattr(store, "close_readers", None)
        if close is not None:
            close()


def _durable_save_id(store: Store) -> str | None:
    """The save id of the durable commit (None when it has no manifest)."""
    if not store.exists(MANIFEST_NAME):
        return None
    return decode_manifest(_read(store, MANIFEST_NAME), f"{store.url}/{MANIFEST_NAME}").save_id


class UploadFile(NamedTuple):
    """One data file to copy: where it is in the fast directory, its name, its size."""

    relpath: str
    name: str
    size: int


@dataclasses.dataclass
class Upload:
    """The files of one saving rank that this rank copies."""

    rank: int
    files: list[UploadFile]


@dataclasses.dataclass
class PersistJob:
    """One rank's part of one persistence attempt."""

    handle: PersistHandle
    fast: FastStore
    durable: Store
    attempt: str
    world_size: int  # ranks that saved the checkpoint (one marker each)
    uploads: list[Upload]
    is_coordinator: bool
    commit: tuple[bytes, bytes] | None  # (manifest, .metadata), coordinator only
    needed: dict[str, int]  # coordinator: file -> bytes the checkpoint needs
    overwrite: bool
    timeout: float
    chunk: int
    after: Callable[[], None] | None = None  # retention, run before the future resolves
    lease: Lease | None = None
    _last_progress: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def save_id(self) -> str:
        return self.handle.save_id

    def _marker(self, what: str) -> str:
        return persist_marker(self.save_id, what)

    def run(self) -> None:
        h = self.handle
        t0 = time.perf_counter()
        try:
            res = self._run(t0)
        except BaseException as e:  # noqa: BLE001 - reported through the future
            err = e if isinstance(e, PersistError) else PersistError(
                f"persisting {self.fast.root} to {self.durable.url} failed on rank {h.rank}: "
                f"{type(e).__name__}: {e}")
            if err is not e:
                err.__cause__ = e
            logger.error("rank %d: %s", h.rank, err)
            self._tell_others(err)
            self._release()
            h.resolve(error=err)
            return
        if self.after is not None:  # before the future resolves: a caller of wait_persisted() sees it done
            try:
                self.after()
            except Exception as e:  # noqa: BLE001 - retention must never fail a checkpoint
                logger.warning("fast-tier retention after persisting %s failed: %s", self.durable.url, e)
        self._release()
        h.resolve(res)

    def _release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def _tell_others(self, err: BaseException) -> None:
        """Leave a failure marker, so no rank waits for a commit that cannot come."""
        doc = json.dumps({"attempt": self.attempt, "error": str(err)}).encode()
        names = ["FAILED"] if self.is_coordinator else [f"rank{u.rank}.failed" for u in self.uploads[:1]]
        for what in names:
            try:
                self.durable.put_atomic(self._marker(what), doc)
            except BaseException:  # noqa: BLE001 - the durable tier may be what failed
                pass

    def _poll(self, check: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + self.timeout
        delay = 0.02
        while True:
            r = check()
            if r is not None:
                return r
            if time.monotonic() > deadline:
                raise PersistError(f"timed out after {self.timeout:.0f}s (tier.persist_timeout) waiting for {what}")
            self.handle.state = f"waiting for {what}"
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)

    def _failure(self, name: str) -> str | None:
        """The message of failure marker ``name`` if it belongs to this attempt."""
        try:
            doc = json.loads(_read(self.durable, name))
        except (ValueError, OSError, DcpExtError):
            return None
        return doc.get("error", "") if isinstance(doc, dict) and doc.get("attempt") == self.attempt else None

    # -- the attempt ------------------------------------------------------------------------
    def _run(self, t0: float) -> PersistResult:
        h = self.handle
        h.state = "starting"
        if self.is_coordinator:
            committed = self._prepare_durable()
        else:
            committed = self._wait_start()
        files = [f for u in self.uploads for f in u.files]
        h.bytes_total = sum(size for _rel, _name, size in files)
        if not committed:
            self._upload()
            if self.is_coordinator:
                self._commit_durable()
            else:
                self._wait_for_commit()
        try:
            self.fast.put_atomic(PERSISTED_MARKER, self.save_id.encode())
        except (OSError, StorageError) as e:  # the fast dir may have been pruned / wiped
            logger.debug("could not mark %s persisted: %s", self.fast.root, e)
        dt = time.perf_counter() - t0
        logger.info("rank %d: %s persisted (%.1f MiB from this rank in %.2fs)%s", h.rank, self.durable.url,
                    h.bytes_done / 2**20, dt, "; committed the durable copy" if self.is_coordinator else "")
        return PersistResult(self.durable.url, self.save_id, h.rank, len(files), h.bytes_done, dt,
                             self.is_coordinator)

    def _prepare_durable(self) -> bool:
        """Coordinator, before anyone writes: returns whether this save is already committed."""
        self.durable.prepare_for_write()
        if is_committed(self.durable):
            if _durable_save_id(self.durable) == self.save_id:  # an earlier attempt died after its commit
                self._remove_markers(self.durable.list())
                return True
            else:
                try:
                    refuse_overwrite(self.durable, self.overwrite)
                except Exception as e:  # CheckpointExistsError: say it is the durable tier refusing
                    raise PersistError(f"not persisting to {self.durable.url}: {e}") from e
                logger.info("overwriting the checkpoint at %s: removing its durable metadata first", self.durable.url)
                uncommit(self.durable)
        self.durable.put_atomic(self._marker("START"), json.dumps({"attempt": self.attempt}).encode())
        return False

    def _wait_start(self) -> bool:
        start, failed = self._marker("START"), self._marker("FAILED")

        def check():
            if self.durable.exists(failed) and (msg := self._failure(failed)) is not None:
                raise PersistError(f"the coordinator did not commit {self.durable.url}: {msg}")
            try:
                doc = json.loads(_read(self.durable, start)) if self.durable.exists(start) else None
            except (ValueError, OSError, DcpExtError):
                return None
            if isinstance(doc, dict) and doc.get("attempt") == self.attempt:
                return {"committed": False}
            if doc is None and self._committed_here():  # committed already, or while we were queued
                return {"committed": True}
            return None

        return self._poll(check, f"the coordinator to start persisting {self.durable.url}")["committed"]

    def _upload(self) -> None:
        buf = torch.empty(max(1, min(self.chunk, max(self.handle.bytes_total, 1))), dtype=torch.uint8)
        for up in self.uploads:
            marker = self._marker(f"rank{up.rank}.json")
            if self.durable.exists(marker):
                logger.info("rank %d: rank %d's part of %s was persisted by an earlier attempt", self.handle.rank,
                            up.rank, self.durable.url)
                continue
            if up.rank != self.handle.rank:
                logger.info("rank %d: persisting rank %d's part of %s (%d file(s))", self.handle.rank, up.rank,
                            self.durable.url, len(up.files))
            sizes = {}
            for relpath, name, _size in up.files:
                self.handle.state = f"copying {name}"
                sizes[name] = self._copy(relpath, name, buf)
            self.fast.close_readers()
            self.durable.put_atomic(marker, json.dumps({"rank": up.rank, "files": sizes}).encode())

    def _copy(self, relpath: str, name: str, buf: torch.Tensor) -> int:
        h = self.handle
        size = self.fast.size(relpath)
        mv = memoryview(buf.numpy()).cast("B")
        try:
            out = self.durable.open_writer(name)
        except BaseException as e:
            raise PersistError(f"persisting {self.fast.root}/{relpath} to {self.durable.url}/{name} failed: "
                               f"cannot open it for writing: {e}") from e
        pos = 0
        try:
            while pos < size:
                n = min(len(mv), size - pos)
                self.fast.read_into(relpath, pos, mv[:n])
                out.write(mv[:n])
                pos += n
                h.bytes_done += n
                now = time.monotonic()
                if now - self._last_progress >= PROGRESS_EVERY_S:  # long uploads say how far they are
                    self._last_progress = now
                    logger.info("rank %d: persisting %s: %.1f of %.1f MiB (%.0f%%), %.1fs so far", h.rank,
                                self.durable.url, h.bytes_done / 2**20, h.bytes_total / 2**20,
                                100.0 * h.bytes_done / max(h.bytes_total, 1), time.time() - h.started)
            out.close()
        except BaseException as e:
            out.abort()
            raise PersistError(f"persisting {self.fast.root}/{relpath} to {self.durable.url}/{name} failed "
                               f"after {pos} of {size} bytes: {type(e).__name__}: {e}") from e
        return size

    def _commit_durable(self) -> None:
        prefix = persist_marker_prefix(self.save_id)
        want = {self._marker(f"rank{r}.json") for r in range(self.world_size)}

        def check():
            listing = set(self.durable.list())
            for p in sorted(listing):
                if p.startswith(prefix) and p.endswith(".failed") and (msg := self._failure(p)) is not None:
                    raise PersistError(f"not committing {self.durable.url}: another rank failed to persist its "
                                       f"part ({p}): {msg}")
            return listing if want <= listing else None

        listing = self._poll(check, f"all {self.world_size} ranks' persisted markers in {self.durable.url}")
        persisted: dict[str, int] = {}
        for m in sorted(want):
            persisted.update(json.loads(_read(self.durable, m))["files"])
        for name, need in sorted(self.needed.items()):
            got = persisted.get(name, -1)
            if got < need or self.durable.size(name) != got:
                raise PersistError(f"not committing {self.durable.url}: {name} was persisted with "
                                   f"{persisted.get(name)} bytes but the checkpoint needs {need}")
        manifest, pickled = self.commit
        self.handle.state = "committing"
        publish(self.durable, manifest, pickled)  # the durable commit point
        remove_stale_data(self.durable, self.needed)
        self._remove_markers(listing)

    def _remove_markers(self, listing: Any) -> None:
        """After the commit: the markers of every attempt (ours and older ones) go."""
        try:
            self.durable.remove(sorted(p for p in listing if is_persist_marker(p)))
        except Exception as e:  # noqa: BLE001 - the checkpoint is committed; markers are harmless
            logger.debug("could not remove persist markers in %s: %s", self.durable.url, e)

    def _wait_for_commit(self) -> None:
        failed = self._marker("FAILED")

        def check():
            if self.durable.exists(failed) and (msg := self._failure(failed)) is not None:
                raise PersistError(f"the coordinator did not commit {self.durable.url}: {msg}")
            return True if self._committed_here() else None

        self._poll(check, f"the coordinator's commit of {self.durable.url}")

    def _committed_here(self) -> bool:
        """Whether the durable location holds this save's commit."""
        try:
            return is_committed(self.durable) and _durable_save_id(self.durable) == self.save_id
        except (OSError, ValueError, DcpExtError):  # a commit being replaced: ask again later
            return False
