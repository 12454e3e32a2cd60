"""``TieredStorageWriter``: commit to the fast tier inside ``dcp.save``, persist in the background.

Why the exchanges happen inside ``write_data``: DCP calls the storage writer on every rank only
up to ``write_data``; after it, only the coordinator's ``finish`` runs, while the other ranks
wait in DCP's final broadcast. The fast commit must be on every node before ``dcp.save``
returns (that is what makes the checkpoint safe early), and the replica must be on the
partner's node before that commit. So ``write_data`` is the last place where every rank can
still act: there each rank writes its files, the ranks exchange what they wrote (and where they
are), send their replicas, agree that everything succeeded, and every node publishes the commit.
The commit needs DCP's global metadata, which DCP hands to the storage writer only in
``finish``; the coordinator takes it from the planner, where ``DefaultSavePlanner`` (and every
subclass) keeps it as ``planner.metadata`` after ``create_global_plan`` (the same object
``finish`` receives). With a planner that keeps none, only the coordinator's node commits (in
``finish``) and readers ship that commit to the other nodes.

The durable location is never touched inside the save except for one bounded question
(``tier.durable_check_timeout``): does it already hold a checkpoint (then the save is refused
unless ``overwrite``)? An unreachable durable tier cannot stall or fail the fast commit; the
background persistence checks again and reports through ``wait_persisted`` / ``PersistError``.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..config import Config
from ..errors import CheckpointExistsError, DcpExtError, StorageError
from ..storage.base import Store
from ..storage.commit import (
    PERSIST_LEASE,
    PERSISTED_MARKER,
    REPLICA_MARKER,
    TIER_RECORD,
    data_file_rank,
    is_data_file,
    persist_marker,
    publish,
    refuse_overwrite,
    replica_dir_name,
    uncommit,
)
from ..storage.writer import ExtStorageWriter
from .exchange import FileSink, FileSource, broadcast, gather, stream_files
from .faststore import FastStore, Lease, node_id
from .handles import PersistHandle, PersistResult
from .naming import cache_root, check_cache_root, fast_dir_name
from .outcomes import attach_recorder, issue_ticket, record_saving
from .persist import PersistJob, Upload, UploadFile, submit
from .recovery import HeldCopy, claim_scan, new_attempt, plan_resumes, start_resumes
from .retention import apply_retention
from .topology import Topology, build_topology, dist_info, side_group

__all__ = ["TieredStorageWriter"]

logger = logging.getLogger(__name__)

_WARNED: set[tuple] = set()


@dataclass(frozen=True)
class _WriteReport:
    """What each rank tells the others after writing its fast-tier files."""

    rank: int
    node: str
    error: str | None
    files: dict[str, int]
    scan: list[HeldCopy] | None = None
    attempt: str = ""


@dataclass(frozen=True)
class _Agreement:
    rank: int
    error: str | None
    results: list[WriteResult]


class TieredStorageWriter(StorageWriter):
    """A DCP ``StorageWriter``: fast-tier commit inside ``dcp.save``, durable copy in the background.

    Build it with ``dcp_ext.storage_writer(url, cache=...)``. Every rank must build its writer
    (a dedicated gloo group is created on first use when ``torch.distributed`` is initialised),
    and the save's process group must span all ranks (the default group, or a ``new_group`` of
    all ranks kept for checkpointing). It pickles for ``dcp.async_save(...,
    async_checkpointer_type=AsyncCheckpointerType.PROCESS)``: the save and its persistence then
    run in DCP's checkpoint process, and :attr:`persisted` / :meth:`wait_persisted` follow them
    from the trainer.
    """

    def __init__(self, url: str, config: Config, durable: Store):
        super().__init__()
        self._setup(os.fspath(url), config, durable)
        self.rank, self.world_size = dist_info()
        self._group = side_group("write", config.tier.exchange_timeout) if self.world_size > 1 else None
        self._ticket: str | None = None

    def _setup(self, url: str, config: Config, durable: Store) -> None:
        self.url = url
        self.config = config
        self.durable = durable
        self.cache_root = cache_root(config.tier.cache)
        check_cache_root(self.cache_root)
        self.node = node_id(self.cache_root, config)
        self.fast_dir = os.path.join(self.cache_root, fast_dir_name(url))
        self.fast = FastStore(self.fast_dir, config)
        self.inner = ExtStorageWriter(self.fast, config)
        self.is_coordinator = True
        self.replicate = False
        self._handle: PersistHandle | None = None
        self._commit: tuple[bytes, bytes] | None = None
        self._created: float | None = None
        self._results: list[WriteResult] = []
        self._lease: Lease | None = None
        self._leader = True  # the first rank of this node (applies retention)
        #: seconds spent in the last save's phases on this rank (local write, replication, commit)
        self.timings: dict[str, float] = {}

    # -- pickling: DCP's process-based async executor ----------------------------------------
    def __getstate__(self) -> dict:
        # The copy runs in DCP's checkpoint process; this writer follows its persistence there.
        self._handle = issue_ticket(self.url, self.rank, self.cache_root)
        # the durable store pickles itself (clients and descriptors are rebuilt over there)
        return {"url": self.url, "config": self.config, "durable": self.durable, "ticket": self._handle.ticket}

    def __setstate__(self, state: dict) -> None:
        StorageWriter.__init__(self)
        self._setup(state["url"], state["config"], state["durable"])
        self.rank, self.world_size = dist_info()
        self._group = None  # created in set_up_storage_writer, where every rank of the save is
        self._ticket = state["ticket"]

    # -- public API ------------------------------------------------------------------------
    @property
    def persisted(self) -> concurrent.futures.Future:
        """A ``concurrent.futures.Future`` for the last save's durable copy (a
        :class:`PersistResult`, or a :class:`~dcp_ext.errors.PersistError`)."""
        if self._handle is None:
            raise DcpExtError(f"no checkpoint has been committed with this writer ({self.url}) yet")
        watch = getattr(self._handle, "watch", None)
        if watch is not None:
            watch()
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

    # -- DCP protocol ----------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.url:
            from .durable import durable_store

            handle = self._handle
            self._setup(os.fspath(checkpoint_id), self.config, durable_store(os.fspath(checkpoint_id), self.config))
            self._handle = handle
        self.inner.reset()

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise DcpExtError("the tiered writer needs use_collectives=True: its fast commit on every node and the "
                              "replicas are agreed on by all ranks (save rank-local parts without cache=...)")
        self.inner.set_up_storage_writer(is_coordinator, *args, **kwargs)
        self.is_coordinator = is_coordinator
        self.rank = self.inner.rank
        self.world_size = dist_info()[1]
        if self.world_size > 1 and self._group is None:
            self._group = side_group("write", self.config.tier.exchange_timeout)
        self.inner.save_id = uuid.uuid4().hex
        self._commit = None
        self._created = None
        self.timings = {}
        if self._ticket is not None:
            record_saving(self.cache_root, self._ticket, self.url, self.rank)

    def storage_meta(self) -> StorageMeta:
        return StorageMeta(checkpoint_id=self.url, save_id=self.inner.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        try:
            self.fast.prepare_for_write()
        except StorageError as e:
            raise StorageError(f"fast tier (tier.cache={self.cache_root}): {e}") from e
        if refuse_overwrite(self.fast, self.config.overwrite, f"the fast tier {self.fast_dir} (cache of {self.url})"):
            uncommit(self.fast, also=[PERSISTED_MARKER, TIER_RECORD])  # this node's copy, before any data changes
        if self.config.overwrite:  # our own files of an older save
            self.fast.remove([p for p in self.fast.listdir() if data_file_rank(p) == self.rank])
        if self.is_coordinator:
            self._check_durable()
        return plan

    def _check_durable(self) -> None:
        """Refuse early if the durable location already holds a checkpoint (and overwrite is off),
        but never wait more than ``tier.durable_check_timeout`` for the answer."""
        limit = self.config.tier.durable_check_timeout
        if limit <= 0:
            return
        box: dict[str, BaseException] = {}

        def ask() -> None:
            try:
                refuse_overwrite(self.durable, self.config.overwrite)
            except BaseException as e:  # noqa: BLE001 - handed to the saving thread
                box["error"] = e

        t = threading.Thread(target=ask, name="dcp_ext-durable-check", daemon=True)
        t.start()
        t.join(limit)
        err = box.get("error")
        if isinstance(err, CheckpointExistsError):
            raise err
        if t.is_alive() or err is not None:
            why = f"did not answer within {limit:g}s" if t.is_alive() else f"failed ({type(err).__name__}: {err})"
            logger.warning("the durable tier %s %s (tier.durable_check_timeout): committing to the fast tier anyway; "
                           "the background persistence checks it again and reports a failure through "
                           "wait_persisted() / PersistError", self.url, why)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self.world_size = len(plans)
        return self.inner.prepare_global_plan(plans)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        # every rank's last call in the save: see the module docstring for why the exchanges are here
        t0 = time.perf_counter()
        error: BaseException | None = None
        results: list[WriteResult] = []
        files: dict[str, int] = {}
        try:
            results = self.inner.write_data(plan, planner).wait()
            files = {n: self.fast.size(n) for n in sorted({r.storage_data.relative_path for r in results})}
        except BaseException as e:  # noqa: BLE001 - the other ranks must still hear from us
            error = e
        self.timings["write_local_s"] = time.perf_counter() - t0
        save_id = plan.storage_data.save_id
        mine = _WriteReport(self.rank, self.node, None if error is None else f"{type(error).__name__}: {error}", files,
                            claim_scan(self.cache_root, self.config), new_attempt())
        if self._group is not None:
            reports = gather(mine, self._group, "write report")
        else:
            reports = [mine]
        self.world_size = len(reports)
        topo = build_topology([r.node for r in reports], self.config)
        self._leader = topo.leader(self.rank) == self.rank
        failed = {r.rank: r.error for r in reports if r.error}
        if failed:
            if error is not None:
                raise error
            raise DcpExtError(f"not committing {self.url} in the fast tier: rank(s) {sorted(failed)} failed to write "
                              f"their part: " + "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items())))
        all_results = [results]
        if self._group is not None:
            all_results = self._replicate_and_agree(topo, reports, save_id, results)
        md = getattr(planner, "metadata", None)  # see the module docstring: DCP's global metadata
        commit = self._agree_commit(md, all_results)
        if commit is not None:
            self._commit, self._created = commit[:2], commit[2]
            self._publish_everywhere(topo, reports)
        elif self.rank != 0:
            logger.warning("rank %d: the save planner (%s) exposes no global metadata, so only the coordinator's "
                           "node gets the fast-tier commit; use DefaultSavePlanner (or a subclass) for a "
                           "self-contained copy on every node", self.rank, type(planner).__name__)
        self._results = results
        self._recover([r.scan for r in reports], topo, reports[0].attempt)
        if not self.is_coordinator:
            self._launch(files, None, {})
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
            self._report_failure(e)
            raise
        if self._commit is None:  # the planner had no metadata for write_data: commit here
            self._commit = (manifest, pickled)
            self._lease = self.fast.lease(PERSIST_LEASE, exclusive=False, wait_s=5.0)
            self._fast_commit(self._commit, None, None)
        needed: dict[str, int] = {}
        for loc in locations.values():
            needed[loc.relative_path] = max(needed.get(loc.relative_path, 0), loc.offset + loc.length)
        my_files = {n: self.fast.size(n) for n in sorted({wr.storage_data.relative_path for wr in self._results})}
        logger.info("committed %s in the fast tier %s (%d items, %d ranks); persisting in the background",
                    self.url, self.fast_dir, len(locations), len(results))
        self._launch(my_files, self._commit, needed)
        self.timings["finish_s"] = time.perf_counter() - t0

    # -- internals -------------------------------------------------------------------------
    def _replicate_and_agree(self, topo: Topology, reports: list[_WriteReport], save_id: str,
                             results: list[WriteResult]) -> list[list[WriteResult]]:
        t1 = time.perf_counter()
        self.replicate = bool(self.config.tier.replicate and topo.replicates)
        rep_err = None
        if self.replicate:
            self._warn_partners(topo)
            rep_err = self._replicate(topo, reports, save_id)
        self.timings["replicate_s"] = time.perf_counter() - t1
        agreed = gather(_Agreement(self.rank, rep_err, results), self._group, "agreement")
        failed = {a.rank: a.error for a in agreed if a.error}
        if failed:
            raise DcpExtError(f"not committing {self.url} in the fast tier: rank(s) {sorted(failed)} failed: "
                              + "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items())))
        return [a.results for a in agreed]

    def _agree_commit(self, md: Any, all_results: list[list[WriteResult]]) -> tuple[bytes, bytes, float] | None:
        """The coordinator builds the commit from the global metadata; everyone gets it."""
        box: tuple | None = None
        if self.is_coordinator and isinstance(md, Metadata):
            try:
                created = time.time()
                manifest, pickled, _ = self.inner.build_commit(copy.deepcopy(md), all_results, created=created,
                                                               checkpoint_id=self.url)
                box = ("ok", (manifest, pickled, created))
            except Exception as e:  # noqa: BLE001 - every rank must hear about it
                box = ("error", f"{type(e).__name__}: {e}")
        if self._group is not None:
            box = broadcast(box, 0, self._group, "commit")
        if box is not None and box[0] == "error":
            raise DcpExtError(f"not committing {self.url} in the fast tier: the coordinator could not build the "
                              f"commit: {box[1]}")
        return None if box is None else box[1]

    def _publish_everywhere(self, topo: Topology, reports: list[_WriteReport]) -> None:
        """Every node publishes its fast commit; if one cannot, every node withdraws its own, so a
        save that raises leaves no commit behind (short of a process dying in between)."""
        self._lease = self.fast.lease(PERSIST_LEASE, exclusive=False, wait_s=5.0)  # recovery leaves it to us
        err = None
        try:
            self._fast_commit(self._commit, topo, reports)
        except (OSError, StorageError) as e:
            err = f"rank {self.rank}: {type(e).__name__}: {e}"
        try:
            errors = [err] if self._group is None else gather(err, self._group, "fast commit")
        except BaseException:  # a peer died: this node does not keep a commit the others may lack
            self._withdraw()
            raise
        failed = [e for e in errors if e]
        if failed:
            self._withdraw()
            raise DcpExtError(f"not committing {self.url} in the fast tier: a node could not publish its commit "
                              f"({'; '.join(failed)}); the commit was withdrawn from every node")

    def _withdraw(self) -> None:
        uncommit(self.fast, also=[TIER_RECORD])
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def _fast_commit(self, commit: tuple[bytes, bytes], topo: Topology | None,
                     reports: list[_WriteReport] | None) -> None:
        """Publish this node's fast commit; first drop data files this save did not write on this
        node (left by an overwritten save or an earlier restore), so the commit covers no stranger."""
        if topo is not None and reports is not None:
            here = {f for r in reports if topo.same_node(r.rank, self.rank) for f in r.files}
            self.fast.remove([p for p in self.fast.listdir() if is_data_file(p) and p not in here])
        self.fast.put_atomic(TIER_RECORD, json.dumps({"url": self.url, "save_id": self.inner.save_id,
                                                      "overwrite": self.config.overwrite}).encode())
        publish(self.fast, *commit)  # this node's fast-tier commit point

    def _warn_partners(self, topo: Topology) -> None:
        same = topo.partners_on_own_node()
        key = (topo.offset, topo.node_of)
        if same and self.rank == 0 and key not in _WARNED:  # once per layout, not per save
            _WARNED.add(key)
            rpn = len(topo.ranks_on(0))
            logger.warning(
                "fast-tier replication: the replica partner (r + %d) %% %d of rank(s) %s is on the same node "
                "(tier.ranks_per_node=%d), so their fast-tier data is lost with that node; set "
                "tier.replica_offset to a multiple of ranks_per_node (default: ranks_per_node)", topo.offset,
                topo.world_size, same if len(same) <= 8 else f"{same[:8]} and {len(same) - 8} more", rpn)

    def _replicate(self, topo: Topology, reports: list[_WriteReport], save_id: str) -> str | None:
        """Send this rank's fast-tier files to its partner; keep the files of the rank we back up
        under ``replica_of_rank{src}/`` (bounded memory: ``tier.chunk_size`` messages)."""
        dst, src = topo.partner(self.rank), topo.source(self.rank)
        rdir = replica_dir_name(src)
        replica = self.fast.sub(rdir)
        err: BaseException | None = None
        try:  # the previous replica goes before the new one is written: its marker first
            replica.remove([REPLICA_MARKER])
            replica.remove_tree()
        except (OSError, StorageError) as e:
            err = e
        out = sorted(reports[self.rank].files.items())
        incoming = sorted(reports[src].files.items())
        source, sink = FileSource(self.fast, out), FileSink(replica, incoming)
        stream_files(source, dst, sink, src, self._group, int(self.config.tier.chunk_size), "replication")
        err = err or source.error or sink.error
        if err is None:
            try:
                replica.put_atomic(REPLICA_MARKER, json.dumps({"save_id": save_id, "rank": src,
                                                               "files": dict(incoming)}).encode())
            except (OSError, StorageError) as e:
                err = e
        nbytes = sum(s for _f, s in incoming)
        logger.info("rank %d: replicated %d file(s) to rank %d; holding %d file(s), %.1f MiB of rank %d in %s",
                    self.rank, len(out), dst, len(incoming), nbytes / 2**20, src, replica.root)
        if err is not None:
            return (f"fast-tier replication with partner rank {dst} / source rank {src} failed: "
                    f"{type(err).__name__}: {err}")
        return None

    def _recover(self, scans: list, topo: Topology, attempt: str) -> None:
        """This process's first save here: finish persistences a crash interrupted."""
        if not any(scans):
            return
        from .durable import durable_store

        plans, skipped = plan_resumes(scans, topo, attempt)
        start_resumes(plans, skipped, self.rank, self.cache_root, self.config,
                      lambda url: durable_store(url, self.config))

    def _report_failure(self, err: BaseException) -> None:
        doc = json.dumps({"attempt": "0", "error": f"{type(err).__name__}: {err}"}).encode()
        name = persist_marker(self.inner.save_id, "FAILED")
        # in a thread: an unreachable durable tier must not stall the save's error either
        threading.Thread(target=lambda: _quiet(self.durable.put_atomic, name, doc), daemon=True).start()

    def _launch(self, files: dict[str, int], commit: tuple[bytes, bytes] | None, needed: dict[str, int]) -> None:
        h = PersistHandle(self.url, self.inner.save_id, self.rank)
        if self._ticket is not None:
            attach_recorder(h, self.cache_root, self._ticket)
        leader = self._leader
        root, keep = self.cache_root, self.config.tier.keep_last
        job = PersistJob(h, FastStore(self.fast_dir, self.config), self.durable, "0", self.world_size,
                         [Upload(self.rank, [UploadFile(n, n, s) for n, s in files.items()])], self.is_coordinator, commit,
                         needed, self.config.overwrite, self.config.tier.persist_timeout,
                         int(self.config.tier.chunk_size),
                         after=(lambda: apply_retention(root, keep)) if leader else None, lease=self._lease)
        self._lease = None
        self._handle = submit(job)


def _quiet(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except BaseException:  # noqa: BLE001 - best effort
        pass
