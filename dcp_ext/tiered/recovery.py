"""Finishing persistences that a crash interrupted.

A tiered save is committed in the fast tier before its durable copy exists; if the process dies
during the background persistence, the fast copy stays (retention never deletes an unpersisted
copy) and the durable location has no ``.metadata``. Each node's cache says which copies those
are: a valid commit, a tier record naming the durable URL, no "persisted" marker, and no live
process holding the copy's persist lease. The ranks exchange what their nodes hold (own files
and replicas), pick for every saving rank one rank whose node holds all of its files, and run an
ordinary persistence attempt (:mod:`dcp_ext.tiered.persist`) with those uploads: parts an earlier
attempt finished are not copied again, and the durable commit comes last as always.

This runs by itself once per process and cache (in the first tiered writer's and reader's
exchange), and on demand through :func:`resume_persists`.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..config import Config
from ..storage.commit import PERSIST_LEASE, data_file_rank, replica_dir_name
from .faststore import FastStore
from .handles import PersistHandle
from .naming import is_fast_dir_name
from .persist import PersistJob, Upload, UploadFile, submit
from .records import CopyKind, ResumeAction
from .retention import apply_retention
from .topology import Topology
from .views import read_commit_bytes, read_node_view

__all__ = ["HeldCopy", "ResumePlan", "ResumeOutcome", "scan_cache", "plan_resumes", "start_resumes",
           "claim_scan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldCopy:
    """One save of one fast directory, as one node holds it (a rank's scan entry)."""

    dirname: str
    save_id: str
    url: str | None = None
    created: float = 0.0
    world_size: int | None = None
    overwrite: bool = False
    has_commit: bool = False
    persisted: bool = False
    busy: bool = False
    needed: dict[str, int] = field(default_factory=dict)
    own: dict[str, int] = field(default_factory=dict)
    replicas: dict[int, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ResumePlan:
    """How one interrupted persistence is finished (the same on every rank)."""

    dirname: str
    url: str
    save_id: str
    attempt: str
    world_size: int
    needed: dict[str, int]
    overwrite: bool
    coordinator: int
    uploads: dict[int, tuple[Upload, ...]]
    #: one rank per node holding the copy: marks it persisted, applies retention
    markers: tuple[int, ...]

    def participants(self) -> set[int]:
        return {self.coordinator, *self.uploads, *self.markers}


@dataclass
class ResumeOutcome:
    """What recovery did about one interrupted persistence (see :func:`resume_persists`)."""

    url: str | None
    save_id: str
    #: resumed, in progress (a live process is persisting it) or impossible (see ``reason``)
    action: ResumeAction
    reason: str = ""
    #: this rank's part of the resumed persistence (None if it takes no part)
    handle: PersistHandle | None = None


def scan_cache(root: str, config: Config | None = None) -> list[HeldCopy]:
    """Every save this node holds in the cache root ``root`` that may need persisting: committed
    and not marked persisted, plus the replicas it holds (sources for other nodes' saves)."""
    cache = FastStore(root, config)
    out: list[HeldCopy] = []
    for name in cache.listdir():
        d = cache.sub(name)
        if not is_fast_dir_name(name) or not d.isdir():
            continue
        v = read_node_view(d, d.root, 0, "")
        busy = d.is_leased(PERSIST_LEASE)
        reps: dict[str, dict[int, dict[str, int]]] = {}
        for cp in v.copies:
            if cp.kind is CopyKind.REPLICA:
                reps.setdefault(cp.save_id, {}).setdefault(cp.of_rank, {})[cp.name] = cp.size
        c = v.commit
        if c is not None and not v.persisted:
            own = {cp.name: cp.size for cp in v.copies if cp.kind is CopyKind.OWN}
            out.append(HeldCopy(name, c.save_id, c.url, c.created, c.world_size, c.overwrite, True, False, busy,
                                dict(c.needed), own, reps.pop(c.save_id, {})))
        for sid, r in reps.items():
            out.append(HeldCopy(name, sid, busy=busy, replicas=r))
    return out


_SCANNED: set[str] = set()
_SCANNED_LOCK = threading.Lock()


def claim_scan(root: str, config: Config | None = None) -> list[HeldCopy] | None:
    """This process's first look at cache ``root``: its scan (None on later calls: recovery runs by
    itself once per process; :func:`resume_persists` runs it again on demand)."""
    with _SCANNED_LOCK:
        if root in _SCANNED:
            return None
        _SCANNED.add(root)
    try:
        return scan_cache(root, config)
    except OSError as e:
        logger.warning("cannot scan the fast tier %s for interrupted persistences: %s", root, e)
        return []


def plan_resumes(scans: Sequence[Sequence[HeldCopy] | None], topo: Topology, attempt: str,
                 ) -> tuple[list[ResumePlan], list[ResumeOutcome]]:
    """Pure: from every rank's scan, the persistences to resume and those that cannot be."""
    groups: dict[tuple[str, str], list[tuple[int, HeldCopy]]] = {}
    for rank, scan in enumerate(scans):
        for h in scan or ():
            groups.setdefault((h.dirname, h.save_id), []).append((rank, h))
    plans, skipped = [], []
    for (dirname, sid), entries in sorted(groups.items()):
        commits = [(r, h) for r, h in entries if h.has_commit]
        if not commits:
            continue  # replicas of a save no node needs persisted
        url = next((h.url for _r, h in commits if h.url), None)
        busy = sorted({topo.node_of[r] for r, h in entries if h.busy})
        if busy:
            skipped.append(ResumeOutcome(url, sid, ResumeAction.IN_PROGRESS, f"a process on node(s) {busy} is persisting it"))
            continue
        first = commits[0][1]
        if url is None or first.world_size is None:
            skipped.append(ResumeOutcome(url, sid, ResumeAction.IMPOSSIBLE, f"the fast copy {dirname} does not record its "
                                         f"durable URL or saving world size (written by an older dcp-ext)"))
            continue
        uploads: dict[int, list[Upload]] = {}
        missing = []
        for s in range(first.world_size):
            files = {f: n for f, n in first.needed.items() if data_file_rank(f) == s}
            best = None
            for r, h in entries:
                for kind, held, prefix in ((0, h.own, ""), (1, h.replicas.get(s, {}), replica_dir_name(s) + "/")):
                    if all(held.get(f, -1) >= n for f, n in files.items()) and (held or not files):
                        key = (kind, topo.leader(r))
                        if best is None or key < best[0]:
                            best = (key, topo.leader(r), prefix)
            if best is None:
                missing.append(s)
                continue
            _key, up, prefix = best
            uploads.setdefault(up, []).append(
                Upload(s, [UploadFile(prefix + f, f, first.needed[f]) for f in sorted(files)]))
        if missing:
            skipped.append(ResumeOutcome(url, sid, ResumeAction.IMPOSSIBLE, f"the files of saving rank(s) {missing} are on no "
                                         f"node (lost with their node and their replica partner's)"))
            continue
        holders = sorted({topo.leader(r) for r, _h in commits})
        plans.append(ResumePlan(dirname, url, sid, attempt, first.world_size, dict(first.needed), first.overwrite,
                                holders[0], {r: tuple(u) for r, u in uploads.items()}, tuple(holders)))
    return plans, skipped


def new_attempt() -> str:
    return uuid.uuid4().hex[:12]


def start_resumes(plans: Sequence[ResumePlan], skipped: Sequence[ResumeOutcome], rank: int, cache_root: str,
                  config: Config, make_store: Any) -> list[ResumeOutcome]:
    """Run this rank's part of every plan in the background; report every plan.

    ``make_store(url)`` builds the durable store of a URL.
    """
    out = list(skipped)
    for p in plans:
        handle = None
        if rank in p.participants():
            try:
                durable = make_store(p.url)
            except Exception as e:  # noqa: BLE001 - the same on every rank: nobody starts this attempt
                out.append(ResumeOutcome(p.url, p.save_id, ResumeAction.IMPOSSIBLE, f"cannot open the durable tier: {e}"))
                logger.warning("rank %d: not resuming %s: cannot open the durable tier: %s", rank, p.url, e)
                continue
            fast = FastStore(os.path.join(cache_root, p.dirname), config)
            lease = fast.lease(PERSIST_LEASE, exclusive=False, wait_s=5.0)
            handle = PersistHandle(p.url, p.save_id, rank)
            leader = rank in p.markers
            job = PersistJob(
                handle, fast, durable, p.attempt, p.world_size, list(p.uploads.get(rank, ())),
                rank == p.coordinator, read_commit_bytes(fast) if rank == p.coordinator else None, p.needed,
                p.overwrite, config.tier.persist_timeout, int(config.tier.chunk_size),
                after=(lambda: apply_retention(cache_root, config.tier.keep_last)) if leader else None, lease=lease)
            submit(job)
        out.append(ResumeOutcome(p.url, p.save_id, ResumeAction.RESUMED, f"uploads by rank(s) {sorted(p.uploads)}, committed by "
                                 f"rank {p.coordinator} (attempt {p.attempt})", handle))
        if rank == min(p.participants()):
            logger.info("resuming the interrupted persistence of %s (save %s): %s", p.url, p.save_id[:8],
                        out[-1].reason)
    for s in skipped:
        if rank == 0:
            level = logging.INFO if s.action is ResumeAction.IN_PROGRESS else logging.WARNING
            logger.log(level, "not resuming the persistence of %s (save %s): %s: %s", s.url, s.save_id[:8], s.action,
                       s.reason)
    return out
