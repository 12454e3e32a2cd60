"""Looking at tiered checkpoints after a restart: :func:`tier_status` (this node, no
collectives), :func:`newest_loadable` and :func:`resume_persists` (collective: every rank calls
them with the same arguments and gets the same answer)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

from ..config import Config, load_config
from ..errors import CheckpointNotFoundError, DcpExtError, IncompleteCheckpointError
from ..storage import expand_shorthands
from ..storage.commit import PERSIST_LEASE
from .choice import choose_copy
from .durable import durable_store
from .exchange import broadcast, gather
from .faststore import FastStore, node_id
from .naming import cache_root, check_cache_root, fast_dir_for
from .reader import check_same_checkpoint
from .records import DurableState, NodeView, PersistState
from .recovery import ResumeOutcome, new_attempt, plan_resumes, scan_cache, start_resumes
from .topology import build_topology, dist_info, side_group
from .views import read_durable_view, read_node_view

__all__ = ["TierStatus", "tier_status", "newest_loadable", "resume_persists"]

logger = logging.getLogger(__name__)


def _tier_config(config: Any, cache: Any, options: dict, what: str) -> Config:
    if cache is not None:
        options = {**options, "cache": cache}
    cfg = load_config(config, **expand_shorthands(options))
    if not cfg.tier.cache:
        raise DcpExtError(f"{what} needs a fast tier: pass cache=... or set tier.cache")
    return cfg


@dataclass
class TierStatus:
    """What this node sees of a checkpoint in each tier (see :func:`tier_status`)."""

    url: str
    fast_dir: str
    fast_complete: bool
    fast_save_id: str | None
    fast_created: float | None
    fast_persisted: bool
    durable_state: DurableState  # a str: "complete", "incomplete", "missing" or "error"
    durable_save_id: str | None
    durable_created: float | None
    #: a str: "persisted", "persisting" (a live process is copying it now), "interrupted" (its
    #: persistence died: :func:`resume_persists`, or the next tiered writer/reader, finishes it when
    #: every saving rank's files are on some node) or "none" (no fast-tier commit here)
    persist_state: PersistState = PersistState.NONE
    durable_error: str | None = None

    @property
    def loadable(self) -> bool:
        """A complete copy exists here (fast copies of other nodes are not considered: use
        :func:`newest_loadable` on every rank for the collective answer)."""
        return self.fast_complete or self.durable_state is DurableState.COMPLETE


def tier_status(url: str | os.PathLike, *, config: Any = None, **options: Any) -> TierStatus:
    """What this node sees of ``url`` in each tier (no collectives; ``cache=`` as for writers)."""
    cfg = _tier_config(config, None, options, "tier_status")
    fast = FastStore(fast_dir_for(url, cfg.tier.cache), cfg)
    v = read_node_view(fast, os.fspath(url), 0, "")
    d = read_durable_view(durable_store(url, cfg))
    c = v.commit
    complete = c is not None and all((cp := v.copies_of(c.save_id).get(f)) is not None and cp.size >= n
                                     for f, n in c.needed.items())
    if c is None:
        state = PersistState.NONE
    elif v.persisted or (d.state is DurableState.COMPLETE and d.save_id == c.save_id):
        state = PersistState.PERSISTED
    elif fast.is_leased(PERSIST_LEASE):
        state = PersistState.PERSISTING
    else:
        state = PersistState.INTERRUPTED
    return TierStatus(os.fspath(url), fast.root, complete, c and c.save_id, c and c.created, v.persisted, d.state,
                      d.save_id, d.created, state, d.error)


def newest_loadable(urls: Sequence[str | os.PathLike], *, cache: Any = None, config: Any = None,
                    **options: Any) -> str | None:
    """The first of ``urls`` (newest first) that a load would succeed on, the same on every rank.

    Collective when ``torch.distributed`` is initialised: every rank passes the same list and
    gets the same answer, the first URL for which a complete copy can be assembled from the
    ranks' fast tiers (own files and replicas, on any node) or the durable tier; None if there is
    none. Use it after a restart instead of checking :func:`tier_status` rank by rank, which lets
    ranks pick different steps.
    """
    cfg = _tier_config(config, cache, options, "newest_loadable")
    urls = [os.fspath(u) for u in urls]
    root = cache_root(cfg.tier.cache)
    check_cache_root(root)
    rank, world = dist_info()
    node = node_id(root, cfg)
    mine = [read_node_view(FastStore(fast_dir_for(u, root), cfg), u, rank, node) for u in urls]
    if world > 1:
        group = side_group("read", cfg.tier.exchange_timeout)
        reports: list[list[NodeView]] = gather(mine, group, "newest_loadable")
        check_same_checkpoint([" | ".join(v.url for v in r) for r in reports], "newest_loadable call")
    else:
        group, reports = None, [mine]
    answer = None
    if rank == 0:
        for i, u in enumerate(urls):
            try:
                choice = choose_copy(u, [r[i] for r in reports], read_durable_view(durable_store(u, cfg)))
            except (IncompleteCheckpointError, CheckpointNotFoundError) as e:
                logger.info("newest_loadable: skipping %s: %s", u, e)
                continue
            logger.info("newest_loadable: %s (%s tier, save %s: %s)", u, choice.tier,
                        (choice.save_id or "?")[:8], choice.reason)
            answer = i
            break
    if group is not None:
        answer = broadcast(answer, 0, group, "newest_loadable answer")
    return None if answer is None else urls[answer]


def resume_persists(*, cache: Any = None, config: Any = None, **options: Any) -> list[ResumeOutcome]:
    """Finish the background persistences that a crash interrupted, for every checkpoint in this
    cache (collective when ``torch.distributed`` is initialised: call it on every rank).

    The ranks exchange what their nodes hold; each interrupted checkpoint whose saving ranks'
    files are all on some node (own files or replicas) is persisted again in the background (see
    :func:`wait_persisted`), the others are reported with the reason. The first tiered writer and
    reader of a process do this by themselves; call it to retry, e.g. after a durable-tier outage.
    """
    cfg = _tier_config(config, cache, options, "resume_persists")
    root = cache_root(cfg.tier.cache)
    check_cache_root(root)
    rank, world = dist_info()
    mine = (node_id(root, cfg), scan_cache(root, cfg), new_attempt())
    if world > 1:
        reports = gather(mine, side_group("read", cfg.tier.exchange_timeout), "resume_persists")
    else:
        reports = [mine]
    topo = build_topology([n for n, _s, _a in reports], cfg)
    plans, skipped = plan_resumes([s for _n, s, _a in reports], topo, reports[0][2])
    return start_resumes(plans, skipped, rank, root, cfg, lambda url: durable_store(url, cfg))
