"""``TieredStorageReader``: load the newest complete copy, preferring the fast tier.

``dcp.load`` calls ``read_metadata`` and ``read_data`` on every rank; with ``torch.distributed``
initialised both are collective over a dedicated gloo group:

* ``read_metadata``: the ranks exchange what they asked for (they must all ask for the same
  checkpoint: :class:`~dcp_ext.errors.CheckpointMismatchError` otherwise) and what their node
  holds, and all choose the same copy (:func:`~dcp_ext.tiered.choice.choose_copy`). A node that
  lost the chosen commit gets it shipped.
* ``read_data``: files a node lacks come from a rank whose node has them, and a node that lost
  its fast tier also gets back its ranks' own files and the replicas it keeps for its partners.
  A file that fails its checksums is dropped and read again from the next good copy (another
  node's own copy or replica, then the durable copy when it is the same save), with a warning;
  nothing unverified is loaded. A file received from another node is checked whole against the
  checkpoint's checksums before it is published (:mod:`~dcp_ext.tiered.restore`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..config import Config
from ..errors import CheckpointMismatchError, CorruptCheckpointError, IncompleteCheckpointError
from ..storage.commit import (
    MANIFEST_NAME,
    METADATA_NAME,
    PERSISTED_MARKER,
    TIER_RECORD,
    is_data_file,
    publish,
    replica_dir_rank,
    uncommit,
)
from ..storage.reader import ExtStorageReader
from ..torch_compat import reports_metadata_errors
from .choice import Holdings, choose_copy, plan_load_transfers, plan_repair_transfers
from .durable import durable_store
from .exchange import broadcast, gather
from .faststore import FastStore, node_id
from .naming import cache_root, fast_dir_name
from .records import BadCopy, Choice, CopyKind, DurableView, FastCommit, FileCopy, NodeView, Origin, Purpose, Tier
from .recovery import HeldCopy, claim_scan, new_attempt, plan_resumes, start_resumes
from .restore import run_transfers, verify_received
from .sources import SourceStore
from .topology import build_topology, dist_info, side_group
from .views import read_commit_bytes, read_durable_view, read_node_view

__all__ = ["TieredStorageReader"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ReadReport:
    rank: int
    view: NodeView
    durable: DurableView | None  # rank 0's look at the durable copy
    scan: list[HeldCopy] | None
    attempt: str


@dataclass(frozen=True)
class _Status:
    """One rank's outcome of one read round."""

    rank: int
    bad: tuple[BadCopy, ...] = ()
    fatal: str | None = None


def check_same_checkpoint(urls: list[str], what: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless every rank asked for the same thing."""
    if len(set(urls)) <= 1:
        return
    by: dict[str, list[int]] = {}
    for r, u in enumerate(urls):
        by.setdefault(u, []).append(r)
    raise CheckpointMismatchError(
        f"the ranks of this {what} asked for different checkpoints: "
        + "; ".join(f"rank(s) {rs}: {u}" for u, rs in sorted(by.items(), key=lambda kv: kv[1]))
        + ". Every rank must load the same checkpoint; pick it with dcp_ext.newest_loadable(urls, cache=...) "
          "(a collective that gives every rank the same answer)")


class TieredStorageReader(StorageReader):
    """A DCP ``StorageReader`` that loads the newest complete copy, preferring the fast tier.

    With ``torch.distributed`` initialised, ``read_metadata`` and ``read_data`` are collective
    over a dedicated gloo group (as ``dcp.load`` calls them on every rank): ranks check that they
    load the same checkpoint, agree on the tier, and files a node lacks are sent to it by a rank
    that has them. After a load, :attr:`tier` says which tier was read and :attr:`sources`
    where each file came from.
    """

    def __init__(self, url: str, config: Config, durable_reader: ExtStorageReader):
        super().__init__()
        self._setup(os.fspath(url), config, durable_reader)
        self._group = side_group("read", config.tier.exchange_timeout) if self.world_size > 1 else None

    def _setup(self, url: str, config: Config, durable_reader: ExtStorageReader) -> None:
        self.url = url
        self.config = config
        self.durable_reader = durable_reader
        self.cache_root = cache_root(config.tier.cache)
        self.fast_dir = os.path.join(self.cache_root, fast_dir_name(url))
        self.fast = FastStore(self.fast_dir, config)
        self.rank, self.world_size = dist_info()
        self.inner: ExtStorageReader | None = None
        #: "fast" or "durable" after read_metadata
        self.tier: Tier | None = None
        #: data file -> where this rank read it from (after read_data)
        self.sources: dict[str, str] = {}
        self.choice: Choice | None = None
        self._error: BaseException | None = None

    def __getstate__(self) -> dict:
        return {"url": self.url, "config": self.config, "durable": self.durable_reader}

    def __setstate__(self, state: dict) -> None:
        StorageReader.__init__(self)
        self._setup(state["url"], state["config"], state["durable"])
        self._group = None

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
            from .durable import durable_reader

            self._setup(os.fspath(checkpoint_id), self.config, durable_reader(os.fspath(checkpoint_id), self.config))
        self.durable_reader.reset()
        self.inner, self.tier, self.sources, self.choice, self._error = None, None, {}, None, None

    # -- metadata ----------------------------------------------------------------------------
    @reports_metadata_errors  # torch 2.9 would hide them
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
        if self.world_size > 1 and self._group is None:
            self._group = side_group("read", self.config.tier.exchange_timeout)
        node = node_id(self.cache_root, self.config)
        view = read_node_view(self.fast, self.url, self.rank, node)
        durable = read_durable_view(self.durable_reader.store) if self.rank == 0 else None
        mine = _ReadReport(self.rank, view, durable, claim_scan(self.cache_root, self.config), new_attempt())
        reports = gather(mine, self._group, "load: what each node holds") if self._group is not None else [mine]
        check_same_checkpoint([r.view.url for r in reports], "load")
        self._views = [r.view for r in reports]
        self._topo = build_topology([v.node_id for v in self._views], self.config)
        self._durable = reports[0].durable
        for v in self._views:
            if v.problem and v.rank == self.rank:
                logger.warning("rank %d: %s", v.rank, v.problem)
        self._recover([r.scan for r in reports], reports[0].attempt)
        choice = self.choice = choose_copy(self.url, self._views, self._durable)
        self.tier = choice.tier
        if choice.tier is Tier.DURABLE:
            self.inner = self.durable_reader
            logger.info("rank %d: loading %s from the durable tier (%s)", self.rank, self.url, choice.reason)
            return self.inner.read_metadata()
        sid = choice.save_id
        self._lacking = [v.rank for v in self._views if v.commit is None or v.commit.save_id != sid]
        overlay: dict[str, bytes] = {}
        if self._lacking and self._group is not None:  # ship the commit to ranks whose node lost it
            src = min(choice.holders)
            box = broadcast(read_commit_bytes(self.fast) if self.rank == src else None, src, self._group, "commit")
            if self.rank in self._lacking:
                overlay = {MANIFEST_NAME: box[0], METADATA_NAME: box[1]}
        self._holdings = Holdings.from_views(self._topo, sid, self._views)
        self._store = SourceStore(self.fast, self.durable_reader.store, overlay)
        self._origin: dict[str, Origin] = {}  # data file -> where this rank reads it from
        self._route_local()
        self.inner = ExtStorageReader(self._store, self.config)
        logger.info("rank %d: loading %s from the fast tier %s (save %s; %s)", self.rank, self.url, self.fast_dir,
                    sid[:8], choice.reason)
        return self.inner.read_metadata()

    def _recover(self, scans: list, attempt: str) -> None:
        if any(scans):
            plans, skipped = plan_resumes(scans, self._topo, attempt)
            start_resumes(plans, skipped, self.rank, self.cache_root, self.config,
                          lambda url: durable_store(url, self.config))

    def _route_local(self) -> None:
        """Point every file this node holds at its copy here."""
        for name, cp in self._holdings.on(self._topo.node_of[self.rank]).items():
            self._store.fast_paths[name] = cp.relpath
            self._store.from_durable.discard(name)
            self._origin.setdefault(name, Origin(f"{cp.describe()} on this node ({self.fast.path(cp.relpath)})"))

    # -- plan --------------------------------------------------------------------------------
    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        assert self.inner is not None, "read_metadata must run first"
        self.rank = kwargs.get("rank") or self.rank
        self.inner.set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return self.inner.prepare_global_plan(plans)

    # -- data --------------------------------------------------------------------------------
    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        assert self.inner is not None, "read_metadata must run first"
        if self.tier is Tier.DURABLE:
            needed = self._files_of(plan)
            self.sources = {f: f"durable tier {self.url}" for f in needed}
            self._log_sources()
            return self.inner.read_data(plan, planner)
        self._load_fast(plan, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _files_of(self, plan: LoadPlan) -> list[str]:
        locs = self.inner.locations
        return sorted({locs[r.storage_index].relative_path for r in plan.items if r.storage_index in locs})

    def _load_fast(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        """Rounds of: bring missing files onto the node, read and verify; a file that fails its
        checksums is dropped and fetched again from the next copy."""
        topo, h = self._topo, self._holdings
        needed = self._commit_of_choice().needed
        self._files_of_plan = self._files_of(plan)
        needs = {self.rank: set(self._files_of_plan)}
        if self._group is not None:
            needs = dict(enumerate(gather(needs[self.rank], self._group, "load: files each rank reads")))
        if self.rank in self._lacking and self._views[self.rank].commit is not None:
            uncommit(self.fast, also=[PERSISTED_MARKER, TIER_RECORD])  # an older save's commit: superseded
        pending = {r for r in range(topo.world_size) if needs.get(r)}
        for rnd in range(2 + topo.nodes):
            transfers, unavailable = plan_load_transfers(h, [needs.get(r, set()) for r in range(topo.world_size)],
                                                         needed)
            if rnd == 0 and self._group is not None:
                transfers += plan_repair_transfers(h, needed, self._commit_of_choice().world_size, transfers)
            self._transfer(transfers)
            status, exc = self._read_round(plan, planner, needs.get(self.rank, set()) if self.rank in pending
                                           else set(), unavailable.get(self.rank, []))
            statuses = gather(status, self._group, "load: read outcome") if self._group is not None else [status]
            if exc is not None:
                raise exc
            if any(s.fatal for s in statuses):
                return  # this rank's data is loaded; DCP reports the other rank's failure
            self._drop_bad(statuses)
            pending = {s.rank for s in statuses if s.bad}
            if not pending:
                break
            needs = {s.rank: {b.name for b in s.bad} for s in statuses if s.bad}
        else:
            raise CorruptCheckpointError(f"{self.url}: gave up after {2 + topo.nodes} rounds of bad copies")
        self._finish_restore()
        self._log_sources()

    def _commit_of_choice(self) -> FastCommit:
        return next(v.commit for v in self._views if v.commit and v.commit.save_id == self.choice.save_id)

    def _transfer(self, transfers: list) -> None:
        if not transfers:
            return
        ok = run_transfers(transfers, self.rank, self._group, self.fast, int(self.config.tier.chunk_size),
                           self.choice.save_id, self._items_by_file())
        for i, t in enumerate(transfers):
            if i not in ok:  # not offered again: the next round takes another copy (or the durable one)
                self._holdings.drop(self._topo.node_of[t.src], t.src_relpath)
                continue
            replica = t.purpose is Purpose.REPLICA
            self._holdings.add(self._topo.node_of[t.dst], FileCopy(
                t.name, t.dst_relpath, t.size, self.choice.save_id, CopyKind.REPLICA if replica else CopyKind.OWN,
                replica_dir_rank(t.dst_relpath.split("/")[0]) if replica else None))
            if t.purpose is Purpose.LOAD and self._topo.same_node(t.dst, self.rank):
                self._origin[t.name] = Origin(f"{t.describe_src} {self.fast.path(t.dst_relpath)}",
                                              self._topo.node_of[t.src], t.src_relpath)
        self._route_local()

    def _items_by_file(self) -> dict[str, list]:
        """Data file -> ``(index, location)`` of every item the chosen save stores in it (the
        checksums a file received from another node must match)."""
        out: dict[str, list] = {}
        for idx, loc in self.inner.locations.items():
            out.setdefault(loc.relative_path, []).append((idx, loc))
        return out

    def _read_round(self, plan: LoadPlan, planner: LoadPlanner, wanted: set[str], unavailable: list[str],
                    ) -> tuple[_Status, BaseException | None]:
        """Read this rank's items (if it has anything to read this round); report bad files, or
        the error that ends the load (also returned, to be raised after everyone heard of it)."""
        if not wanted:
            return _Status(self.rank), None
        for name in unavailable:
            if not self.choice.durable_same_save:
                e = IncompleteCheckpointError(
                    f"{self.url}: no good copy of {name} is left in the fast tier of any node, and the durable copy "
                    f"is not the same save (durable: {self._durable.describe() if self._durable else 'unknown'}); "
                    f"bad copies were removed, so loading again uses the durable copy if it is complete")
                return _Status(self.rank, fatal=str(e)), e
            self._store.from_durable.add(name)
            self._origin[name] = Origin(f"durable tier {self.url} (no good copy in the fast tier)")
            logger.warning("rank %d: reading %s of %s from the durable tier: no good copy is left in the fast tier",
                           self.rank, name, self.url)
        try:
            self.inner.read_data(plan, planner).wait()
            self._keep_from_durable(unavailable)
            return _Status(self.rank), None
        except CorruptCheckpointError as first:
            bad = self._find_bad(plan, planner)
            if not bad:
                return _Status(self.rank, fatal=str(first)), first
            last = [n for n in bad if n in self._store.from_durable]
            if last:
                e = CorruptCheckpointError(
                    f"{self.url}: no good copy of {', '.join(last)} is left: the fast-tier copies failed their checksums "
                    f"or were lost, and reading the durable copy failed too: {first}")
                return _Status(self.rank, fatal=str(e)), e
        except Exception as e:  # noqa: BLE001 - the other ranks must hear about it, not wait
            return _Status(self.rank, fatal=f"{type(e).__name__}: {e}"), e
        out = []
        for name in bad:
            origin = self._origin.get(name, Origin(""))
            out.append(BadCopy(name, self._store.fast_paths.get(name, name), origin.from_node, origin.from_path))
            logger.warning("rank %d: %s of %s failed its checksums (%s); dropping that copy and reading the file "
                           "from the next good copy", self.rank, name, self.url, origin.describe)
        return _Status(self.rank, tuple(out)), None

    def _keep_from_durable(self, names: list[str]) -> None:
        """Files read from the durable copy go back into this node's fast tier (best effort),
        so the next load finds them there and can rebuild their replicas; each is checked whole
        against the checkpoint's checksums first (this rank may have read only some of its
        blocks), and not put back if it fails."""
        chunk = int(self.config.tier.chunk_size)
        items = self._items_by_file()
        for name in names:
            if name not in self._store.from_durable:
                continue
            out = self.fast.open_atomic(name)
            try:
                size, pos = self.durable_reader.store.size(name), 0
                buf = bytearray(min(chunk, max(size, 1)))
                while pos < size:
                    n = min(len(buf), size - pos)
                    self.durable_reader.store.read_into(name, pos, memoryview(buf)[:n])
                    out.write(memoryview(buf)[:n])
                    pos += n
                out.finish()
                problem = verify_received(self.fast, out.tmp, name, items.get(name, ()), self.rank, "the durable copy")
                if problem is not None:
                    raise CorruptCheckpointError(problem)
                out.publish()
                logger.info("rank %d: put %s back into the fast tier from the durable copy", self.rank, name)
            except Exception as e:  # noqa: BLE001 - the load itself succeeded
                out.abort()
                logger.warning("rank %d: could not put %s back into the fast tier: %s", self.rank, name, e)

    def _find_bad(self, plan: LoadPlan, planner: LoadPlanner) -> list[str]:
        """Which files of the plan fail verification (one sub-plan per file)."""
        locs = self.inner.locations
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(locs[item.storage_index].relative_path, []).append(item)
        bad = []
        for name, items in sorted(by_file.items()):
            try:
                self.inner.read_data(LoadPlan(items=items), planner).wait()
            except CorruptCheckpointError:
                bad.append(name)
        return bad

    def _drop_bad(self, statuses: list[_Status]) -> None:
        """Everyone forgets the bad copies; each node's first rank deletes its own."""
        me_node = self._topo.node_of[self.rank]
        for s in statuses:
            node = self._topo.node_of[s.rank]
            for b in s.bad:
                self._holdings.drop(node, b.path)
                if b.from_node is not None and b.from_path is not None:
                    self._holdings.drop(b.from_node, b.from_path)
                for n, p in ((node, b.path), (b.from_node, b.from_path)):
                    if n == me_node and p is not None and self._topo.leader(self.rank) == self.rank:
                        self.fast.remove([p])
                if node == me_node:
                    self._store.fast_paths.pop(b.name, None)
                    self._origin.pop(b.name, None)

    def _finish_restore(self) -> None:
        """A node that lacked the commit gets it last, once its files are in place (and loses data
        files that are not part of it)."""
        if self.rank not in self._lacking:
            return
        mine = {cp.relpath for cp in self._holdings.on(self._topo.node_of[self.rank]).values()}
        self.fast.remove([p for p in self.fast.listdir() if is_data_file(p) and p not in mine])
        manifest, metadata = self._store.overlay[MANIFEST_NAME], self._store.overlay[METADATA_NAME]
        self.fast.put_atomic(TIER_RECORD, json.dumps({"url": self.url, "save_id": self.choice.save_id}).encode())
        publish(self.fast, manifest, metadata)
        if self.choice.durable_same_save:
            self.fast.put_atomic(PERSISTED_MARKER, self.choice.save_id.encode())
        logger.info("rank %d: restored the fast-tier commit of %s (save %s) in %s", self.rank, self.url,
                    self.choice.save_id[:8], self.fast_dir)

    def _log_sources(self) -> None:
        if self.tier is Tier.FAST:
            self.sources = {f: self._origin[f].describe for f in self._files_of_plan if f in self._origin}
        logger.info("rank %d: read %s from: %s", self.rank, self.url,
                    "; ".join(f"{f}: {s}" for f, s in sorted(self.sources.items())) or "(nothing)")
