"""Tiered checkpoints: commit to a fast local tier, persist to the durable URL in the background.

``dcp_ext.storage_writer("s3://b/run/step_100", cache="/dev/shm/dcp_ext")`` (or the ``[tier]``
config section) returns a :class:`TieredStorageWriter`:

1. **Inside** ``dcp.save`` each rank writes its data files into the fast tier (a directory
   ``<cache>/<name>-<hash>`` on its node, named after the durable URL), then, if there is more
   than one node, sends them to a partner rank on another node, which keeps them under
   ``replica_of_rank{r}/`` (``tier.replica_offset``). The ranks agree that every write succeeded,
   and every rank publishes the manifest and ``.metadata`` in its node's directory (temp name +
   ``os.replace``): the checkpoint is *committed in the fast tier* when ``dcp.save`` returns
   (or the synchronous part of ``dcp.async_save`` finishes).
2. **In the background** (one FIFO worker thread per process, no collectives) each rank copies
   its own data files through the durable backend's :class:`~dcp_ext.storage.base.Store` and
   then writes a small marker object ``.dcp_ext_persist.<save_id>.rank<r>.json``. The
   coordinator waits for every rank's marker, checks that the files the manifest names were all
   persisted with the right sizes, then writes the manifest and ``.metadata`` last: the durable
   commit. Other ranks wait for that commit (or a ``FAILED`` marker) so every rank's
   :attr:`TieredStorageWriter.persisted` future means "durable".

:class:`TieredStorageReader` picks the newest *complete* copy, preferring the fast tier when it
is as new as the durable one, and restores files a node lacks (lost node, or data another node
wrote) from other ranks over a dedicated gloo group before reading: node B never reads node A's
disk. See ``docs/async.md`` (section "Tiered checkpoints") for the guarantees and limits.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ..config import Config
from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    DcpExtError,
    IncompleteCheckpointError,
    PersistError,
    StorageError,
)
from .base import Store
from .fs import LocalStore
from .manifest import MANIFEST_NAME, METADATA_NAME
from .reader import ExtStorageReader
from .commit import DATA_FILE_RE
from .writer import ExtStorageWriter

__all__ = [
    "TieredStorageWriter",
    "TieredStorageReader",
    "PersistHandle",
    "PersistResult",
    "TierStatus",
    "fast_dir_for",
    "tier_status",
    "wait_persisted",
    "pending_persists",
    "choose_copy",
]

logger = logging.getLogger(__name__)

PERSISTED_MARKER = ".dcp_ext_persisted"
REPLICA_MARKER = ".dcp_ext_replica.json"
REPLICA_DIR_RE = re.compile(r"^replica_of_rank(\d+)$")
_MARKER_PREFIX = ".dcp_ext_persist."
_RANK_OF_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


# -- naming ----------------------------------------------------------------------------------

def _canonical_url(url: str) -> str:
    url = os.fspath(url)
    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        return "file://" + os.path.abspath(os.path.expanduser(path))
    return url.rstrip("/")


def fast_dir_name(url: str) -> str:
    """Stable directory name in the cache root for a durable URL: ``<last parts>-<sha1[:12]>``."""
    canon = _canonical_url(url)
    tail = "_".join([p for p in canon.split("://", 1)[-1].split("/") if p][-2:]) or "root"
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", tail)[:80]
    return f"{tail}-{hashlib.sha1(canon.encode()).hexdigest()[:12]}"


def fast_dir_for(url: str | os.PathLike, cache: str | os.PathLike) -> str:
    """The fast-tier directory of durable ``url`` under the cache root ``cache``."""
    return os.path.join(os.path.abspath(os.path.expanduser(os.fspath(cache))), fast_dir_name(os.fspath(url)))


def _check_cache_root(root: str) -> None:
    """Create the cache root and prove it is writable (``os.access`` lies for root)."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise StorageError(f"tier.cache {root!r} is not usable: it exists and is not a directory")
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".dcp_ext_probe.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.unlink(probe)
    except OSError as e:
        raise StorageError(f"tier.cache {root!r} is not usable: cannot create files there "
                           f"({e.strerror or e}); point tier.cache at a writable directory "
                           f"(e.g. /dev/shm/dcp_ext or a local NVMe path)") from e


# -- ranks, nodes, partners --------------------------------------------------------------------

def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ranks_per_node(config: Config, world_size: int) -> int:
    """``tier.ranks_per_node``, else ``LOCAL_WORLD_SIZE``, else the world size (one node)."""
    rpn = config.tier.ranks_per_node
    if rpn is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        rpn = int(env) if env and env.isdigit() and int(env) > 0 else world_size
    return max(1, min(rpn, world_size))


def partner_offset(config: Config, world_size: int) -> int:
    """The replica partner of rank r is ``(r + offset) % world_size``."""
    off = config.tier.replica_offset
    if off is None:
        off = ranks_per_node(config, world_size)
    return off % world_size if world_size else 0


def replicas_on_own_node(config: Config, world_size: int) -> list[int]:
    """Ranks whose replica partner ``(r + offset) % world_size`` is on their own node: their
    replica does not survive the loss of that node (pure; used for a warning)."""
    rpn = ranks_per_node(config, world_size)
    off = partner_offset(config, world_size)
    return [r for r in range(world_size) if (r + off) % world_size // rpn == r // rpn]


_GROUPS: dict[tuple, Any] = {}
_WARNED: dict[tuple, bool] = {}
_GROUPS_LOCK = threading.Lock()


def _side_group(kind: str, timeout_s: float):
    """A dedicated gloo group (one per purpose, cached): our exchanges never interleave with
    the training job's or DCP's own collectives on the default group."""
    import torch.distributed as dist

    default = dist.distributed_c10d._get_default_group()
    key = (kind, id(default), dist.get_world_size())
    with _GROUPS_LOCK:
        g = _GROUPS.get(key)
        if g is None:
            g = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
            _GROUPS[key] = g
    return g


# -- byte exchange helpers -------------------------------------------------------------------

def _exchange_bytes(payload: bytes, dst: int, src: int, group) -> bytes:
    """Send ``payload`` to ``dst`` while receiving one from ``src`` (length first)."""
    import torch.distributed as dist

    n_out = torch.tensor([len(payload)], dtype=torch.int64)
    n_in = torch.zeros(1, dtype=torch.int64)
    w = [dist.isend(n_out, dst, group=group), dist.irecv(n_in, src, group=group)]
    for x in w:
        x.wait()
    out = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
    inc = torch.zeros(int(n_in.item()), dtype=torch.uint8)
    w = []
    if len(payload):
        w.append(dist.isend(out, dst, group=group))
    if inc.numel():
        w.append(dist.irecv(inc, src, group=group))
    for x in w:
        x.wait()
    return inc.numpy().tobytes()


class _FileStream:
    """Reads a list of files as one byte stream, ``chunk`` bytes at a time."""

    def __init__(self, paths_sizes: list[tuple[str, int]]):
        self.items = paths_sizes
        self.i = 0
        self.pos = 0
        self.f = None
        self.error: BaseException | None = None

    def fill(self, buf: memoryview) -> None:
        got = 0
        while got < len(buf):
            path, size = self.items[self.i]
            if self.pos >= size:
                self.i += 1
                self.pos = 0
                if self.f is not None:
                    self.f.close()
                    self.f = None
                continue
            take = min(len(buf) - got, size - self.pos)
            try:
                if self.error is None:
                    if self.f is None:
                        self.f = open(path, "rb")
                        self.f.seek(self.pos)
                    n = self.f.readinto(buf[got:got + take])
                    if n != take:
                        raise StorageError(f"{path} is shorter than {size} bytes")
                else:
                    buf[got:got + take] = bytes(take)
            except (OSError, StorageError) as e:  # keep the exchange in step; report after
                self.error = self.error or e
                buf[got:got + take] = bytes(take)
            got += take
            self.pos += take

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class _FileSink:
    """Writes one byte stream into a list of files (temp name, then ``os.replace``)."""

    def __init__(self, root: str, names_sizes: list[tuple[str, int]], fsync: bool):
        self.root = root
        self.items = [(n, s) for n, s in names_sizes]
        self.i = 0
        self.pos = 0
        self.f = None
        self.fsync = fsync
        self.error: BaseException | None = None
        self.done: list[str] = []
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            self.error = e
        self._skip_empty()

    def _final(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _close_current(self) -> None:
        name = self.items[self.i][0]
        if self.f is not None:
            try:
                self.f.flush()
                if self.fsync:
                    os.fsync(self.f.fileno())
                self.f.close()
                os.replace(self._final(name) + ".part", self._final(name))
                self.done.append(name)
            except OSError as e:
                self.error = self.error or e
            self.f = None
        elif self.error is None:  # an empty file
            try:
                open(self._final(name), "wb").close()
                self.done.append(name)
            except OSError as e:
                self.error = e

    def _skip_empty(self) -> None:
        while self.i < len(self.items) and self.items[self.i][1] == 0:
            self._close_current()
            self.i += 1

    def write(self, data: memoryview) -> None:
        got = 0
        while got < len(data):
            name, size = self.items[self.i]
            take = min(len(data) - got, size - self.pos)
            if self.error is None:
                try:
                    if self.f is None:
                        self.f = open(self._final(name) + ".part", "wb")
                    self.f.write(data[got:got + take])
                except OSError as e:
                    self.error = e
            got += take
            self.pos += take
            if self.pos == size:
                self._close_current()
                self.i += 1
                self.pos = 0
                self._skip_empty()


def _stream_exchange(out_files: list[tuple[str, int]], in_root: str, in_files: list[tuple[str, int]],
                     dst: int, src: int, group, chunk: int, fsync: bool) -> tuple[_FileStream, _FileSink]:
    """Send the files ``out_files`` (paths, sizes) to ``dst`` and receive ``in_files`` from
    ``src`` into ``in_root``, ``chunk`` bytes per message each way (bounded memory)."""
    import torch.distributed as dist

    total_out = sum(s for _, s in out_files)
    total_in = sum(s for _, s in in_files)
    n_out, n_in = math.ceil(total_out / chunk), math.ceil(total_in / chunk)
    sbuf = torch.empty(min(chunk, total_out), dtype=torch.uint8)
    rbuf = torch.empty(min(chunk, total_in), dtype=torch.uint8)
    smv = memoryview(sbuf.numpy()).cast("B") if sbuf.numel() else None
    rmv = memoryview(rbuf.numpy()).cast("B") if rbuf.numel() else None
    source = _FileStream(out_files)
    sink = _FileSink(in_root, in_files, fsync)
    try:
        for i in range(max(n_out, n_in)):
            works = []
            if i < n_out:
                k = min(chunk, total_out - i * chunk)
                source.fill(smv[:k])
                works.append(dist.isend(sbuf[:k], dst, group=group))
            k_in = 0
            if i < n_in:
                k_in = min(chunk, total_in - i * chunk)
                works.append(dist.irecv(rbuf[:k_in], src, group=group))
            for w in works:
                w.wait()
            if k_in:
                sink.write(rmv[:k_in])
    finally:
        source.close()
    return source, sink


# -- background persistence ------------------------------------------------------------------

@dataclasses.dataclass
class PersistResult:
    """What a finished background persistence did on this rank."""

    url: str
    save_id: str
    rank: int
    files: int
    bytes: int
    seconds: float
    committed_by_this_rank: bool


class PersistHandle:
    """One checkpoint's background persistence on this rank (see :func:`pending_persists`)."""

    def __init__(self, url: str, save_id: str, rank: int):
        self.url = url
        self.save_id = save_id
        self.rank = rank
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.state = "queued"
        self.bytes_done = 0
        self.bytes_total = 0
        self.started = time.time()
        #: the outcome was handed to a caller (module-level wait_persisted skips it then)
        self.reported = False

    def done(self) -> bool:
        return self.future.done()

    def wait(self, timeout: float | None = None) -> PersistResult:
        """Block until persisted; :class:`~dcp_ext.errors.PersistError` if it failed,
        ``TimeoutError`` (naming the URL and what is still under way) after ``timeout`` s."""
        try:
            res = self.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"{self.url} (save {self.save_id[:8]}) was not persisted to its durable location within "
                f"{timeout}s on rank {self.rank}: {self.state} ({self.bytes_done}/{self.bytes_total} "
                f"bytes copied); call wait_persisted() again, or with a longer timeout") from None
        except BaseException:
            self.reported = True
            raise
        self.reported = True
        return res

    def __repr__(self) -> str:
        return f"PersistHandle({self.url!r}, save={self.save_id[:8]}, rank={self.rank}, {self.state})"


#: seconds between INFO progress lines of a background persistence (bytes copied so far)
PROGRESS_EVERY_S = 30.0

_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_HANDLES: list[PersistHandle] = []
_HANDLES_LOCK = threading.Lock()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    # One FIFO worker per process: persistences run in save order and bound I/O. Its thread is
    # joined at interpreter exit, so a script that ends right after dcp.save still persists.
    global _EXECUTOR
    with _HANDLES_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dcp_ext-persist")
        return _EXECUTOR


def pending_persists() -> list[PersistHandle]:
    """Background persistences of this process that have not finished yet."""
    with _HANDLES_LOCK:
        return [h for h in _HANDLES if not h.done()]


def wait_persisted(timeout: float | None = None) -> list[PersistResult]:
    """Wait for every background persistence started by this process (all tiered writers)
    whose outcome was not already collected through its writer's ``wait_persisted``.

    Waits for all of them, then raises the first :class:`~dcp_ext.errors.PersistError`;
    ``TimeoutError`` when ``timeout`` seconds (in total) pass first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with _HANDLES_LOCK:
        handles = [h for h in _HANDLES if not h.reported]
    out, errors = [], []
    for h in handles:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            out.append(h.wait(left))
        except PersistError as e:
            errors.append(e)
    with _HANDLES_LOCK:
        _HANDLES[:] = [h for h in _HANDLES if not (h.done() and h.reported)]
    if errors:
        raise errors[0]
    return out


def _marker(save_id: str, what: str) -> str:
    return f"{_MARKER_PREFIX}{save_id}.{what}"


def _poll(check, timeout: float, what: str, handle: PersistHandle):
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        r = check()
        if r is not None:
            return r
        if time.monotonic() > deadline:
            raise PersistError(f"timed out after {timeout:.0f}s (tier.persist_timeout) waiting for {what}")
        handle.state = f"waiting for {what}"
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)


@dataclasses.dataclass
class _PersistJob:
    handle: PersistHandle
    fast: LocalStore
    durable: Store
    files: list[str]
    world_size: int
    is_coordinator: bool
    commit: tuple[bytes, bytes] | None  # (manifest, .metadata) on the coordinator
    needed_sizes: dict[str, int]  # coordinator: file -> minimum size the manifest needs
    timeout: float
    chunk: int
    cache_root: str
    keep_last: int
    run_retention: bool
    _last_progress: float = dataclasses.field(default_factory=time.monotonic)

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
            h.state = f"failed: {err}"
            logger.error("rank %d: %s", h.rank, err)
            try:
                what = "FAILED" if self.is_coordinator else f"rank{h.rank}.failed"
                self.durable.put_atomic(_marker(h.save_id, what), str(err).encode())
            except BaseException:  # noqa: BLE001
                pass
            h.future.set_exception(err)
            return
        if self.run_retention:  # before the future resolves: a caller of wait_persisted() sees it done
            try:
                apply_retention(self.cache_root, self.keep_last)
            except Exception as e:  # noqa: BLE001 - retention must never fail a checkpoint
                logger.warning("fast-tier retention in %s failed: %s", self.cache_root, e)
        h.state = "persisted"
        h.future.set_result(res)

    def _copy(self, name: str, buf: torch.Tensor) -> int:
        h = self.handle
        size = self.fast.size(name)
        mv = memoryview(buf.numpy()).cast("B")
        try:
            out = self.durable.open_writer(name)
        except BaseException as e:
            raise PersistError(f"persisting {self.fast.root}/{name} to {self.durable.url}/{name} failed: "
                               f"cannot open it for writing: {e}") from e
        pos = 0
        try:
            while pos < size:
                n = min(len(mv), size - pos)
                self.fast.read_into(name, pos, mv[:n])
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
            raise PersistError(f"persisting {self.fast.root}/{name} to {self.durable.url}/{name} failed "
                               f"after {pos} of {size} bytes: {type(e).__name__}: {e}") from e
        return size

    def _run(self, t0: float) -> PersistResult:
        h = self.handle
        h.state = "copying"
        h.bytes_total = sum(self.fast.size(f) for f in self.files)
        logger.info("rank %d: persisting %d file(s), %.1f MiB of %s from the fast tier", h.rank,
                    len(self.files), h.bytes_total / 2**20, self.durable.url)
        self.durable.prepare_for_write()
        buf = torch.empty(max(1, min(self.chunk, max(h.bytes_total, 1))), dtype=torch.uint8)
        sizes = {}
        for name in self.files:
            h.state = f"copying {name}"
            sizes[name] = self._copy(name, buf)
            logger.debug("rank %d: persisted %s (%d bytes)", h.rank, name, sizes[name])
        self.fast.close_readers()
        self.durable.put_atomic(_marker(h.save_id, f"rank{h.rank}.json"),
                                json.dumps({"rank": h.rank, "files": sizes}).encode())
        if self.is_coordinator:
            self._commit_durable()
        else:
            self._wait_for_commit()
        try:
            self.fast.put_atomic(PERSISTED_MARKER, h.save_id.encode())
        except (OSError, StorageError) as e:  # the fast dir may have been pruned / wiped
            logger.debug("could not mark %s persisted: %s", self.fast.root, e)
        dt = time.perf_counter() - t0
        logger.info("rank %d: %s persisted (%.1f MiB from this rank in %.2fs)%s", h.rank, self.durable.url,
                    h.bytes_total / 2**20, dt, "; committed the durable copy" if self.is_coordinator else "")
        return PersistResult(self.durable.url, h.save_id, h.rank, len(self.files), h.bytes_total, dt,
                             self.is_coordinator)

    def _commit_durable(self) -> None:
        h = self.handle
        sid = h.save_id
        want = {_marker(sid, f"rank{r}.json") for r in range(self.world_size)}

        def check():
            listing = set(self.durable.list())
            failed = sorted(p for p in listing if p.startswith(_marker(sid, "")) and p.endswith(".failed"))
            if failed:
                msg = self.durable.read_bytes(failed[0]).decode(errors="replace")
                raise PersistError(f"not committing {self.durable.url}: another rank failed to persist its "
                                   f"part ({failed[0]}): {msg}")
            return listing if want <= listing else None

        _poll(check, self.timeout, f"all {self.world_size} ranks' persisted markers in {self.durable.url}", h)
        persisted: dict[str, int] = {}
        for m in sorted(want):
            doc = json.loads(self.durable.read_bytes(m))
            persisted.update(doc["files"])
        for name, need in sorted(self.needed_sizes.items()):
            if persisted.get(name, -1) < need:
                raise PersistError(f"not committing {self.durable.url}: {name} was persisted with "
                                   f"{persisted.get(name)} bytes but the checkpoint needs {need}")
        manifest, pickled = self.commit
        h.state = "committing"
        self.durable.put_atomic(MANIFEST_NAME, manifest)
        self.durable.put_atomic(METADATA_NAME, pickled)  # the durable commit point
        try:
            self.durable.remove(sorted(want))
        except Exception as e:  # noqa: BLE001 - the checkpoint is committed; markers are harmless
            logger.debug("could not remove persist markers in %s: %s", self.durable.url, e)

    def _wait_for_commit(self) -> None:
        sid = self.handle.save_id

        def check():
            if self.durable.exists(_marker(sid, "FAILED")):
                msg = self.durable.read_bytes(_marker(sid, "FAILED")).decode(errors="replace")
                raise PersistError(f"the coordinator did not commit {self.durable.url}: {msg}")
            if self.durable.exists(METADATA_NAME) and self.durable.exists(MANIFEST_NAME):
                try:
                    doc = json.loads(self.durable.read_bytes(MANIFEST_NAME))
                except (ValueError, OSError, StorageError):
                    return None
                if doc.get("save_id") == sid:
                    return True
            return None

        _poll(check, self.timeout, f"the coordinator's commit of {self.durable.url}", self.handle)


# -- retention ------------------------------------------------------------------------------

def _read_manifest_doc(root: str) -> dict | None:
    try:
        with open(os.path.join(root, MANIFEST_NAME), "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def apply_retention(cache_root: str, keep_last: int) -> list[str]:
    """Keep the newest ``keep_last`` complete checkpoints in ``cache_root``; delete older ones
    whose durable copy is persisted (never one that is not). Incomplete directories older than
    the oldest kept checkpoint (left by crashed saves) are deleted too. Returns what was deleted."""
    if not os.path.isdir(cache_root):
        return []
    complete, incomplete = [], []
    for name in os.listdir(cache_root):
        d = os.path.join(cache_root, name)
        if not os.path.isdir(d) or not re.search(r"-[0-9a-f]{12}$", name):
            continue
        doc = _read_manifest_doc(d) if os.path.exists(os.path.join(d, METADATA_NAME)) else None
        if doc is not None:
            complete.append((float(doc.get("extra", {}).get("created", 0.0)), d, doc.get("save_id")))
        else:
            incomplete.append(d)
    complete.sort(reverse=True)
    deleted = []
    for created, d, sid in complete[keep_last:]:
        try:
            with open(os.path.join(d, PERSISTED_MARKER), "rb") as f:
                persisted = f.read().decode() == sid
        except OSError:
            persisted = False
        if not persisted:
            logger.info("fast tier: keeping %s beyond keep_last=%d: its durable copy is not persisted", d,
                        keep_last)
            continue
        shutil.rmtree(d, ignore_errors=True)
        deleted.append(d)
    if complete[:keep_last]:
        oldest_kept = complete[:keep_last][-1][0]
        for d in incomplete:
            try:
                if os.path.getmtime(d) < oldest_kept:
                    shutil.rmtree(d, ignore_errors=True)
                    deleted.append(d)
            except OSError:
                pass
    if deleted:
        logger.info("fast tier: removed %d old checkpoint dir(s) from %s: %s", len(deleted), cache_root,
                    ", ".join(os.path.basename(d) for d in deleted))
    return deleted


# -- the writer ------------------------------------------------------------------------------

class TieredStorageWriter(StorageWriter):
    """A DCP ``StorageWriter``: fast-tier commit inside ``dcp.save``, durable copy in the background.

    Build it with ``dcp_ext.storage_writer(url, cache=...)``. Every rank must build its writer
    (a dedicated gloo group is created on first use when ``torch.distributed`` is initialised),
    and the save's process group must span all ranks (the default group, or a ``new_group`` of
    all ranks kept for checkpointing).
    """

    def __init__(self, url: str, config: Config, durable: Store):
        super().__init__()
        self.url = os.fspath(url)
        self.config = config
        self.durable = durable
        self.cache_root = os.path.abspath(os.path.expanduser(config.tier.cache))
        _check_cache_root(self.cache_root)
        self.fast_dir = os.path.join(self.cache_root, fast_dir_name(self.url))
        self.fast = LocalStore(self.fast_dir, config)
        self.inner = ExtStorageWriter(self.fast, config)
        self.rank, self.world_size = _dist_info()
        self.is_coordinator = self.rank == 0
        self.ranks_per_node = ranks_per_node(config, self.world_size)
        self.nodes = math.ceil(self.world_size / self.ranks_per_node)
        self._group = _side_group("write", config.tier.exchange_timeout) if self.world_size > 1 else None
        self.replicate = bool(config.tier.replicate and self.world_size > 1 and self.nodes > 1
                              and partner_offset(config, self.world_size) != 0)
        off = partner_offset(config, self.world_size)
        warn_key = ("own_node", off, self.ranks_per_node, self.world_size)
        if self.replicate and self.rank == 0 and warn_key not in _WARNED:  # once per layout, not per save
            same = replicas_on_own_node(config, self.world_size)
            if same:
                _WARNED[warn_key] = True
                logger.warning(
                    "fast-tier replication: the replica partner (r + %d) %% %d of rank(s) %s is on the same node "
                    "(tier.ranks_per_node=%d), so their fast-tier data is lost with that node; set "
                    "tier.replica_offset to a multiple of ranks_per_node (default: ranks_per_node)", off,
                    self.world_size, same if len(same) <= 8 else f"{same[:8]} and {len(same) - 8} more",
                    self.ranks_per_node)
        self._handle: PersistHandle | None = None
        self._commit: tuple[bytes, bytes] | None = None
        self._created: float | None = None
        self._results: list[WriteResult] = []
        #: seconds spent in the last save's phases on this rank (local write, replication, commit)
        self.timings: dict[str, float] = {}

    # -- public API ------------------------------------------------------------------------
    @property
    def persisted(self) -> concurrent.futures.Future:
        """A ``concurrent.futures.Future`` for the last save's durable copy (a
        :class:`PersistResult`, or a :class:`~dcp_ext.errors.PersistError`)."""
        if self._handle is None:
            raise DcpExtError(f"no checkpoint has been committed with this writer ({self.url}) yet")
        return self._handle.future

    def wait_persisted(self, timeout: float | None = None) -> PersistResult:
        """Block until the last save is committed in the durable tier (see :class:`PersistHandle`)."""
        if self._handle is None:
            raise DcpExtError(f"no checkpoint has been committed with this writer ({self.url}) yet; "
                              "call wait_persisted() after dcp.save / the async save's future")
        return self._handle.wait(timeout)

    @property
    def checkpoint_id(self) -> str:
        return self.url

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def __getstate__(self):
        raise DcpExtError("the tiered writer cannot be pickled: use dcp.save or dcp.async_save with the "
                          "default thread executor (AsyncCheckpointerType.THREAD), not the process executor")

    # -- DCP protocol ----------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.url:
            from . import _durable_store

            self.url = os.fspath(checkpoint_id)
            self.durable = _durable_store(self.url, self.config)
            self.fast_dir = os.path.join(self.cache_root, fast_dir_name(self.url))
            self.fast = LocalStore(self.fast_dir, self.config)
            self.inner = ExtStorageWriter(self.fast, self.config)
        self.inner.reset()

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.inner.set_up_storage_writer(is_coordinator, *args, **kwargs)
        self.is_coordinator = is_coordinator
        self.rank = self.inner.rank
        self.inner.save_id = uuid.uuid4().hex
        self._commit = None
        self._created = None
        self.timings = {}

    def storage_meta(self):
        from torch.distributed.checkpoint.metadata import StorageMeta

        return StorageMeta(checkpoint_id=self.url, save_id=self.inner.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        try:
            self.fast.prepare_for_write()
        except StorageError as e:
            raise StorageError(f"fast tier (tier.cache={self.cache_root}): {e}") from e
        if self.fast.exists(METADATA_NAME):
            if not self.config.overwrite:
                raise CheckpointExistsError(
                    f"the fast tier {self.fast_dir} (cache of {self.url}) already holds a complete checkpoint; "
                    f"refusing to overwrite it (pass overwrite=True, or save to a new location)")
            # un-commit this node's copy before any rank writes data (all ranks pass here first)
            self.fast.remove([METADATA_NAME, MANIFEST_NAME, PERSISTED_MARKER])
        if self.config.overwrite:  # our own files of an older save, and the replica we keep
            self.fast.remove([p for p in self.fast.list() if _RANK_OF_FILE.match(p)
                              and int(_RANK_OF_FILE.match(p).group(1)) == self.rank])
        if self.is_coordinator:
            self.durable.prepare_for_write()
            if self.durable.exists(METADATA_NAME) and not self.config.overwrite:
                raise CheckpointExistsError(
                    f"{self.url} already holds a complete checkpoint; refusing to overwrite it "
                    f"(pass overwrite=True to replace it, or save to a new location)")
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self.world_size = len(plans)
        if self.durable.exists(METADATA_NAME):  # overwrite=True: un-commit before any data changes
            logger.info("overwriting the checkpoint at %s: removing its durable metadata first", self.url)
            self.durable.remove([METADATA_NAME, MANIFEST_NAME])
        return self.inner.prepare_global_plan(plans)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        t0 = time.perf_counter()
        error: BaseException | None = None
        results: list[WriteResult] = []
        try:
            results = self.inner.write_data(plan, planner).wait()
        except BaseException as e:  # noqa: BLE001 - the other ranks must still hear from us
            error = e
        self.timings["write_local_s"] = time.perf_counter() - t0
        my_files = sorted({wr.storage_data.relative_path for wr in results})
        if self._group is not None:
            t1 = time.perf_counter()
            if self.replicate:
                rep_err = self._replicate(my_files if error is None else [], plan.storage_data.save_id)
                error = error or rep_err
            self.timings["replicate_s"] = time.perf_counter() - t1
            all_results = self._agree(error, results)
            box: list[Any] = [None]
            if self.is_coordinator:
                md = getattr(planner, "metadata", None)
                try:
                    if isinstance(md, Metadata):
                        box = [("ok", self._build_commit(copy.deepcopy(md), all_results))]
                except Exception as e:  # noqa: BLE001 - every rank must hear about it
                    box = [("error", f"{type(e).__name__}: {e}")]
            import torch.distributed as dist

            dist.broadcast_object_list(box, src=0, group=self._group)
            if box[0] is not None and box[0][0] == "error":
                raise DcpExtError(f"not committing {self.url} in the fast tier: the coordinator could not "
                                  f"build the commit: {box[0][1]}")
            commit = None if box[0] is None else box[0][1]
        else:
            if error is not None:
                raise error
            md = getattr(planner, "metadata", None)
            commit = self._build_commit(copy.deepcopy(md), [results]) if isinstance(md, Metadata) else None
        if commit is not None:
            self._commit, self._created = commit[:2], commit[2]
            self._fast_commit(self._commit)
        elif self.rank != 0 and self.world_size > 1:
            logger.warning("rank %d: the save planner (%s) exposes no global metadata, so only the "
                           "coordinator's node gets the fast-tier commit; use DefaultSavePlanner (or a "
                           "subclass) for a self-contained copy on every node", self.rank,
                           type(planner).__name__)
        self._results = results
        if not self.is_coordinator:
            self._launch(my_files, None, {})
        self.timings["write_data_s"] = time.perf_counter() - t0
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        t0 = time.perf_counter()
        try:
            manifest, pickled, locations = self.inner.build_commit(metadata, results, created=self._created,
                                                                   checkpoint_id=self.url)
        except BaseException as e:  # the other ranks' persistence waits for our commit: tell them
            try:
                self.durable.put_atomic(_marker(self.inner.save_id, "FAILED"), f"{type(e).__name__}: {e}".encode())
            except BaseException:  # noqa: BLE001
                pass
            raise
        if self._commit is None:  # the planner had no metadata for write_data: commit here
            self._commit = (manifest, pickled)
            self._fast_commit(self._commit)
        needed: dict[str, int] = {}
        for loc in locations.values():
            needed[loc.relative_path] = max(needed.get(loc.relative_path, 0), loc.offset + loc.length)
        my_files = sorted({wr.storage_data.relative_path for wr in self._results})
        logger.info("committed %s in the fast tier %s (%d items, %d ranks); persisting in the background",
                    self.url, self.fast_dir, len(locations), len(results))
        self._launch(my_files, self._commit, needed)
        self.timings["finish_s"] = time.perf_counter() - t0

    # -- internals -------------------------------------------------------------------------
    def _build_commit(self, md: Metadata, all_results: list[list[WriteResult]]) -> tuple[bytes, bytes, float]:
        created = time.time()
        manifest, pickled, _ = self.inner.build_commit(md, all_results, created=created, checkpoint_id=self.url)
        return manifest, pickled, created

    def _fast_commit(self, commit: tuple[bytes, bytes]) -> None:
        manifest, pickled = commit
        self.fast.put_atomic(MANIFEST_NAME, manifest)
        self.fast.put_atomic(METADATA_NAME, pickled)  # this node's fast-tier commit point

    def _agree(self, error: BaseException | None, results: list[WriteResult]) -> list[list[WriteResult]]:
        """All ranks learn whether every rank's fast-tier write succeeded, and all results."""
        import torch.distributed as dist

        mine = (self.rank, None if error is None else f"{type(error).__name__}: {error}",
                results if error is None else [])
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self._group)
        failed = {r: msg for r, msg, _ in gathered if msg is not None}
        if failed:
            if error is not None:
                raise error
            raise DcpExtError(f"not committing {self.url} in the fast tier: rank(s) {sorted(failed)} failed to "
                              f"write their part: " + "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items())))
        return [res for _r, _m, res in sorted(gathered, key=lambda g: g[0])]

    def _replicate(self, my_files: list[str], save_id: str) -> BaseException | None:
        """Send this rank's fast-tier files to its partner; keep the files of the rank we
        back up under ``replica_of_rank{src}/`` (bounded memory: ``tier.chunk_size`` messages)."""
        off = partner_offset(self.config, self.world_size)
        dst, src = (self.rank + off) % self.world_size, (self.rank - off) % self.world_size
        rdir = os.path.join(self.fast_dir, f"replica_of_rank{src}")
        err: BaseException | None = None
        out = []
        for f in my_files:
            p = os.path.join(self.fast_dir, f)
            try:
                out.append((p, os.path.getsize(p), f))
            except OSError as e:
                err = err or e
        if err is not None:
            out = []
        header = json.dumps({"save_id": save_id, "files": [[f, s] for _p, s, f in out]}).encode()
        incoming = json.loads(_exchange_bytes(header, dst, src, self._group))
        try:  # the previous replica of this rank goes before the new one is written
            if os.path.isdir(rdir):
                shutil.rmtree(rdir)
        except OSError as e:
            err = err or e
        in_files = [(f, int(s)) for f, s in incoming["files"]]
        source, sink = _stream_exchange([(p, s) for p, s, _f in out], rdir, in_files, dst, src, self._group,
                                        int(self.config.tier.chunk_size), self.config.fs.fsync)
        err = err or source.error or sink.error
        if err is None:
            try:
                with open(os.path.join(rdir, REPLICA_MARKER), "w") as f:
                    json.dump({"save_id": incoming["save_id"], "rank": src, "files": dict(in_files)}, f)
            except OSError as e:
                err = e
        nbytes = sum(s for _f, s in in_files)
        logger.info("rank %d: replicated %d file(s) to rank %d; holding %d file(s), %.1f MiB of rank %d in %s",
                    self.rank, len(out), dst, len(in_files), nbytes / 2**20, src, rdir)
        if err is not None:
            return StorageError(f"rank {self.rank}: fast-tier replication with partner rank {dst} / source rank "
                                f"{src} failed: {err}")
        return None

    def _launch(self, my_files: list[str], commit: tuple[bytes, bytes] | None, needed: dict[str, int]) -> None:
        h = PersistHandle(self.url, self.inner.save_id, self.rank)
        job = _PersistJob(h, LocalStore(self.fast_dir, self.config), self.durable, my_files, self.world_size,
                          self.is_coordinator, commit, needed, self.config.tier.persist_timeout,
                          int(self.config.tier.chunk_size), self.cache_root, self.config.tier.keep_last,
                          run_retention=self.rank % self.ranks_per_node == 0)
        self._handle = h
        with _HANDLES_LOCK:  # forget finished handles whose outcome was collected (long runs)
            _HANDLES[:] = [x for x in _HANDLES if not (x.done() and x.reported)]
            _HANDLES.append(h)
        _executor().submit(job.run)


# -- reading -------------------------------------------------------------------------------

@dataclasses.dataclass
class TierStatus:
    """What this node sees of a checkpoint in each tier (see :func:`tier_status`)."""

    url: str
    fast_dir: str
    fast_complete: bool
    fast_save_id: str | None
    fast_created: float | None
    fast_persisted: bool
    durable_state: str  # "complete", "incomplete", "missing" or "error: ..."
    durable_save_id: str | None
    durable_created: float | None

    @property
    def loadable(self) -> bool:
        """A complete copy exists here (fast copies of other nodes are not considered)."""
        return self.fast_complete or self.durable_state == "complete"


def _node_view(fast_dir: str) -> dict:
    """This node's fast-tier copy: commit state and the data files it can serve (with sizes)."""
    v: dict[str, Any] = {"save_id": None, "created": None, "needed": None, "have": {}, "error": None}
    try:
        if not os.path.isdir(fast_dir):
            return v
        if os.path.exists(os.path.join(fast_dir, METADATA_NAME)):
            doc = _read_manifest_doc(fast_dir)
            if doc is not None:
                v["save_id"] = doc.get("save_id")
                v["created"] = doc.get("extra", {}).get("created")
                need: dict[str, int] = {}
                for it in doc.get("items", []):
                    need[it["file"]] = max(need.get(it["file"], 0), it["offset"] + it["length"])
                v["needed"] = need
        for name in sorted(os.listdir(fast_dir)):
            p = os.path.join(fast_dir, name)
            if DATA_FILE_RE.match(name) and v["save_id"] is not None:
                v["have"][name] = (p, "fast tier", os.path.getsize(p), v["save_id"])
            m = REPLICA_DIR_RE.match(name)
            if m and os.path.isdir(p):
                try:
                    with open(os.path.join(p, REPLICA_MARKER)) as f:
                        rep = json.load(f)
                except (OSError, ValueError):
                    continue
                for fname, size in rep.get("files", {}).items():
                    fp = os.path.join(p, fname)
                    if fname not in v["have"] and os.path.exists(fp) and os.path.getsize(fp) == size:
                        v["have"][fname] = (fp, f"replica of rank {m.group(1)}", size, rep["save_id"])
    except OSError as e:
        v["error"] = f"{fast_dir}: {e}"
    return v


def _durable_view(store: Store) -> dict:
    v: dict[str, Any] = {"state": "missing", "save_id": None, "created": None, "files": 0}
    try:
        if store.exists(METADATA_NAME):
            v["state"] = "complete"
            if store.exists(MANIFEST_NAME):
                doc = json.loads(store.read_bytes(MANIFEST_NAME))
                v["save_id"] = doc.get("save_id")
                v["created"] = doc.get("extra", {}).get("created")
        elif store.exists(""):
            files = [f for f in store.list() if f.endswith(".distcp")]
            if files:
                v["state"] = "incomplete"
                v["files"] = len(files)
    except Exception as e:  # noqa: BLE001 - reported in the decision
        v["state"] = f"error: {type(e).__name__}: {e}"
    return v


def choose_copy(url: str, views: list[dict], durable: dict) -> dict:
    """Pick the newest complete copy, preferring the fast tier (pure; same answer on every rank).

    ``views[r]`` is rank r's :func:`_node_view`; ``durable`` the :func:`_durable_view`. Returns
    ``{"tier": "fast"|"durable", "save_id", "holders": [ranks with the metadata], "why": str}``
    or raises :class:`IncompleteCheckpointError` / :class:`CheckpointNotFoundError`.
    """
    cands: dict[str, dict] = {}
    for r, v in enumerate(views):
        if v.get("save_id") is not None and v.get("needed") is not None:
            c = cands.setdefault(v["save_id"], {"created": v.get("created") or 0.0, "needed": v["needed"],
                                                "holders": []})
            c["holders"].append(r)
    notes = []
    usable = []
    for sid, c in cands.items():
        avail: dict[str, int] = {}
        for v in views:
            for f, (_p, _k, size, fsid) in v.get("have", {}).items():
                if fsid == sid:
                    avail[f] = max(avail.get(f, 0), size)
        missing = sorted(f for f, need in c["needed"].items() if avail.get(f, -1) < need)
        if missing:
            notes.append(f"fast-tier copy {sid[:8]} lacks {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''} on every node")
        else:
            usable.append((c["created"], sid, c))
    usable.sort(reverse=True)
    dstate = durable.get("state", "missing")
    if usable:
        created, sid, c = usable[0]
        d_created = durable.get("created")
        if dstate != "complete" or durable.get("save_id") == sid or d_created is None or created >= d_created:
            why = {"complete": "the durable copy is the same save" if durable.get("save_id") == sid
                   else "the durable copy is older",
                   "incomplete": "the durable copy is incomplete (a persist did not finish)",
                   "missing": "there is no durable copy yet"}.get(dstate, f"durable: {dstate}")
            return {"tier": "fast", "save_id": sid, "holders": c["holders"], "why": why}
        notes.append(f"the fast-tier copy {sid[:8]} is older than the durable one")
    if dstate == "complete":
        return {"tier": "durable", "save_id": durable.get("save_id"), "holders": [],
                "why": "; ".join(notes) or "no fast-tier copy"}
    fast_desc = "; ".join(notes) or "no complete fast-tier copy on any node"
    if dstate == "incomplete":
        raise IncompleteCheckpointError(
            f"{url} has no complete copy: the durable copy is incomplete ({durable.get('files')} data file(s) but "
            f"no {METADATA_NAME}: a save or persist did not finish) and {fast_desc}; refusing to load it")
    if dstate == "missing" and not cands:
        raise CheckpointNotFoundError(f"no checkpoint at {url}: neither the durable location nor the fast tier "
                                      f"holds one")
    raise IncompleteCheckpointError(f"{url} has no loadable copy: durable: {dstate}; fast tier: {fast_desc}")


def tier_status(url: str | os.PathLike, *, config: Any = None, **options: Any) -> TierStatus:
    """What this node sees of ``url`` in each tier (no collectives; ``cache=`` as for writers).

    Useful after a restart to find the newest loadable checkpoint among several step dirs.
    """
    from . import _durable_store, _tier_shorthand
    from ..config import load_config

    cfg = load_config(config, **_tier_shorthand(options))
    if not cfg.tier.cache:
        raise DcpExtError("tier_status needs a fast tier: pass cache=... or set tier.cache")
    fd = fast_dir_for(url, cfg.tier.cache)
    v = _node_view(fd)
    d = _durable_view(_durable_store(os.fspath(url), cfg))
    persisted = False
    try:
        with open(os.path.join(fd, PERSISTED_MARKER), "rb") as f:
            persisted = v["save_id"] is not None and f.read().decode() == v["save_id"]
    except OSError:
        pass
    complete = v["save_id"] is not None and all(
        f in v["have"] and v["have"][f][2] >= n for f, n in (v["needed"] or {}).items())
    return TierStatus(os.fspath(url), fd, complete, v["save_id"], v["created"], persisted, d["state"],
                      d["save_id"], d["created"])


class _NodeStore(LocalStore):
    """The fast tier of this node: data files resolved to their own/replica/restored paths,
    metadata possibly held in memory (shipped from another node)."""

    def __init__(self, root: str, config: Config, paths: dict[str, str], overlay: dict[str, bytes]):
        super().__init__(root, config)
        self.paths = paths
        self.overlay = overlay

    def _abs(self, relpath: str) -> str:
        return self.paths.get(relpath) or super()._abs(relpath)

    def exists(self, relpath: str = "") -> bool:
        if relpath == "" and self.overlay:
            return True
        return relpath in self.overlay or super().exists(relpath)

    def size(self, relpath: str) -> int:
        if relpath in self.overlay:
            return len(self.overlay[relpath])
        return super().size(relpath)

    def read_into(self, relpath: str, offset: int, out: memoryview) -> None:
        if relpath in self.overlay:
            out[:] = self.overlay[relpath][offset:offset + len(out)]
            return
        super().read_into(relpath, offset, out)


class TieredStorageReader(StorageReader):
    """A DCP ``StorageReader`` that loads the newest complete copy, preferring the fast tier.

    With ``torch.distributed`` initialised, ``read_metadata`` and ``read_data`` are collective
    over a dedicated gloo group (as ``dcp.load`` calls them on every rank): ranks agree on the
    tier, and files a node lacks are sent to it by a rank that has them. After a load,
    :attr:`tier` says which tier was read and :attr:`sources` where each file came from.
    """

    def __init__(self, url: str, config: Config, durable_reader: ExtStorageReader):
        super().__init__()
        self.url = os.fspath(url)
        self.config = config
        self.durable_reader = durable_reader
        self.cache_root = os.path.abspath(os.path.expanduser(config.tier.cache))
        self.fast_dir = os.path.join(self.cache_root, fast_dir_name(self.url))
        self.rank, self.world_size = _dist_info()
        self.ranks_per_node = ranks_per_node(config, self.world_size)
        self._group = _side_group("read", config.tier.exchange_timeout) if self.world_size > 1 else None
        self.inner: ExtStorageReader | None = None
        #: "fast" or "durable" after read_metadata
        self.tier: str | None = None
        #: data file -> where this rank read it from (after read_data)
        self.sources: dict[str, str] = {}
        self._decision: dict | None = None
        self._paths: dict[str, tuple[str, str]] = {}
        self._restore_md: tuple[bytes, bytes] | None = None
        self._error: BaseException | None = None

    @property
    def checkpoint_id(self) -> str:
        return self.url

    @property
    def stats(self):
        return self.inner.stats if self.inner is not None else None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.url:
            from . import _durable_reader

            self.url = os.fspath(checkpoint_id)
            self.durable_reader = _durable_reader(self.url, self.config)
            self.fast_dir = os.path.join(self.cache_root, fast_dir_name(self.url))
        self.durable_reader.reset()
        self.inner, self.tier, self.sources, self._decision, self._error = None, None, {}, None, None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's rank-local fallback after a failed global read
            raise self._error or IncompleteCheckpointError(
                f"{self.url}: rank-local metadata is not supported by the tiered reader")
        try:
            return self._read_metadata()
        except Exception as e:
            self._error = e
            raise

    def _read_metadata(self) -> Metadata:
        view = _node_view(self.fast_dir)
        durable = _durable_view(self.durable_reader.store) if self.rank == 0 else None
        if self._group is not None:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, (view, durable), group=self._group)
            views = [g[0] for g in gathered]
            durable = gathered[0][1]
        else:
            views = [view]
        for r, v in enumerate(views):
            if v.get("error"):
                logger.warning("rank %d cannot read its fast tier: %s", r, v["error"])
        d = choose_copy(self.url, views, durable)
        self._decision = d
        self.tier = d["tier"]
        if d["tier"] == "durable":
            self.inner = self.durable_reader
            logger.info("rank %d: loading %s from the durable tier (%s)", self.rank, self.url, d["why"])
            return self.inner.read_metadata()
        sid = d["save_id"]
        overlay: dict[str, bytes] = {}
        lacking = [r for r, v in enumerate(views) if v.get("save_id") != sid]
        if lacking and self._group is not None:  # ship the commit to ranks whose node lost it
            import torch.distributed as dist

            src = min(d["holders"])
            box = [None]
            if self.rank == src:
                box = [(_read_file(self.fast_dir, MANIFEST_NAME), _read_file(self.fast_dir, METADATA_NAME))]
            dist.broadcast_object_list(box, src=src, group=self._group)
            if self.rank in lacking:
                self._restore_md = box[0]
                overlay = {MANIFEST_NAME: box[0][0], METADATA_NAME: box[0][1]}
        self._paths = {f: (p, kind) for f, (p, kind, _s, fsid) in view["have"].items() if fsid == sid}
        store = _NodeStore(self.fast_dir, self.config, {f: p for f, (p, _k) in self._paths.items()}, overlay)
        self.inner = ExtStorageReader(store, self.config)
        logger.info("rank %d: loading %s from the fast tier %s (save %s; %s)", self.rank, self.url, self.fast_dir,
                    sid[:8], d["why"])
        return self.inner.read_metadata()

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        assert self.inner is not None, "read_metadata must run first"
        self.rank = kwargs.get("rank") or self.rank
        self.inner.set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return self.inner.prepare_global_plan(plans)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        assert self.inner is not None, "read_metadata must run first"
        needed = sorted({self.inner.locations[r.storage_index].relative_path for r in plan.items
                         if r.storage_index in self.inner.locations})
        if self.tier == "durable":
            self.sources = {f: f"durable tier {self.url}" for f in needed}
        else:
            self._restore(needed)
            self.sources = {f: (f"{self._paths[f][1]} {self._paths[f][0]}" if self._paths[f][1].startswith("restored")
                                else f"{self._paths[f][1]} on this node ({self._paths[f][0]})")
                            for f in needed if f in self._paths}
        logger.info("rank %d: read %s from: %s", self.rank, self.url,
                    "; ".join(f"{f}: {s}" for f, s in sorted(self.sources.items())) or "(nothing)")
        return self.inner.read_data(plan, planner)

    def _restore(self, needed: list[str]) -> None:
        """Bring the files this rank needs onto its node: a rank that has each one sends it
        (in ``tier.chunk_size`` messages) over the dedicated group; then restore this node's
        commit if it had lost it."""
        missing = [f for f in needed if f not in self._paths]
        if self._group is None:
            if missing:
                raise IncompleteCheckpointError(f"{self.url}: the fast tier {self.fast_dir} lacks {missing}")
            return
        import torch.distributed as dist

        have = {f: (os.path.getsize(p), k) for f, (p, k) in self._paths.items()}
        node = self.rank // self.ranks_per_node
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (node, missing, have), group=self._group)
        transfers = restore_schedule(gathered)
        chunk = int(self.config.tier.chunk_size)
        buf = torch.empty(chunk, dtype=torch.uint8)
        mv = memoryview(buf.numpy()).cast("B")
        t0 = time.perf_counter()
        nbytes = 0
        for src, dst, f, size in transfers:
            if self.rank == src:
                path = self._paths[f][0]
                with open(path, "rb") as fh:
                    pos = 0
                    while pos < size:
                        n = min(chunk, size - pos)
                        if fh.readinto(mv[:n]) != n:
                            raise StorageError(f"{path} is shorter than {size} bytes")
                        dist.send(buf[:n], dst, group=self._group)
                        pos += n
                nbytes += size
            elif self.rank == dst:
                os.makedirs(self.fast_dir, exist_ok=True)
                final = os.path.join(self.fast_dir, f)
                tmp = f"{final}.{uuid.uuid4().hex[:8]}.part"
                with open(tmp, "wb") as fh:
                    pos = 0
                    while pos < size:
                        n = min(chunk, size - pos)
                        dist.recv(buf[:n], src, group=self._group)
                        fh.write(mv[:n])
                        pos += n
                    fh.flush()
                    if self.config.fs.fsync:
                        os.fsync(fh.fileno())
                os.replace(tmp, final)
                nbytes += size
        dist.barrier(group=self._group)  # every transfer into this node is complete
        for src, dst, f, _size in transfers:
            if gathered[dst][0] == node and f in missing:
                kind = gathered[src][2][f][1]
                self._paths[f] = (os.path.join(self.fast_dir, f),
                                  f"restored over the process group from rank {src} on node {gathered[src][0]} "
                                  f"(its {kind}) into")
        still = [f for f in missing if f not in self._paths]
        if still:
            raise IncompleteCheckpointError(f"{self.url}: no rank could provide {still} from its fast tier")
        if self._restore_md is not None:  # this node lost its commit: restore it, last
            store = LocalStore(self.fast_dir, self.config)
            store.put_atomic(MANIFEST_NAME, self._restore_md[0])
            store.put_atomic(METADATA_NAME, self._restore_md[1])
        inner_store = self.inner.store
        if isinstance(inner_store, _NodeStore):
            inner_store.paths = {f: p for f, (p, _k) in self._paths.items()}
        if transfers:
            logger.info("rank %d: fast-tier restore moved %d file(s) over the process group (%.1f MiB by this "
                        "rank, %.2fs)", self.rank, len(transfers), nbytes / 2**20, time.perf_counter() - t0)


def restore_schedule(gathered: list[tuple[int, list[str], dict[str, tuple[int, str]]]],
                     ) -> list[tuple[int, int, str, int]]:
    """Transfers ``(src, dst, file, size)`` so that every rank's missing files reach its node
    once (pure and deterministic: every rank computes the same list and runs its part in order,
    which cannot deadlock with blocking send/recv)."""
    out = []
    scheduled: set[tuple[int, str]] = set()
    for dst, (node, missing, _have) in enumerate(gathered):
        for f in sorted(missing):
            if (node, f) in scheduled:
                continue
            providers = [r for r, (n, _m, h) in enumerate(gathered) if f in h and n != node]
            if not providers:
                continue  # reported by the caller as not restorable
            # prefer a node's own copy over a replica, then the lowest rank
            src = min(providers, key=lambda r: (gathered[r][2][f][1] != "fast tier", r))
            out.append((src, dst, f, gathered[src][2][f][0]))
            scheduled.add((node, f))
    return out


def _read_file(root: str, name: str) -> bytes:
    with open(os.path.join(root, name), "rb") as f:
        return f.read()
