"""Ranks, nodes and replica partners, and the side process groups the tier talks over.

A *node* here is a set of ranks that see the same fast-tier directory. It is established from
the data, not guessed: every rank reads the random id kept in its cache root
(:func:`~dcp_ext.tiered.faststore.node_id`) and the ranks exchange them, so two machines
launched without ``LOCAL_WORLD_SIZE`` (srun, mpirun) are still two nodes. ``tier.ranks_per_node``
/ ``LOCAL_WORLD_SIZE`` only choose the default replica partner; where they are absent it is
derived from the node ids.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from ..config import Config

__all__ = ["Topology", "build_topology", "dist_info", "ranks_per_node", "partner_offset",
           "replicas_on_own_node", "side_group", "abandon_group"]

logger = logging.getLogger(__name__)


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, ``(0, 1)`` without ``torch.distributed``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _configured_ranks_per_node(config: Config) -> int | None:
    rpn = config.tier.ranks_per_node
    if rpn is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        rpn = int(env) if env and env.isdigit() and int(env) > 0 else None
    return rpn


def ranks_per_node(config: Config, world_size: int) -> int:
    """``tier.ranks_per_node``, else ``LOCAL_WORLD_SIZE``, else the world size (one node)."""
    rpn = _configured_ranks_per_node(config) or world_size
    return max(1, min(rpn, world_size))


def partner_offset(config: Config, world_size: int) -> int:
    """The replica partner of rank r is ``(r + offset) % world_size``."""
    off = config.tier.replica_offset
    if off is None:
        off = ranks_per_node(config, world_size)
    return off % world_size if world_size else 0


def replicas_on_own_node(config: Config, world_size: int) -> list[int]:
    """Ranks whose replica partner ``(r + offset) % world_size`` is on their own node by the
    configured ``ranks_per_node``: their replica does not survive the loss of that node."""
    rpn = ranks_per_node(config, world_size)
    off = partner_offset(config, world_size)
    return [r for r in range(world_size) if (r + off) % world_size // rpn == r // rpn]


@dataclass(frozen=True)
class Topology:
    """Which node each rank is on, and who backs up whom (pure; the same on every rank)."""

    #: node index of each rank (ranks sharing a fast-tier directory share an index)
    node_of: tuple[int, ...]
    #: the replica partner of rank r is ``(r + offset) % world_size``
    offset: int

    @property
    def world_size(self) -> int:
        return len(self.node_of)

    @property
    def nodes(self) -> int:
        return len(set(self.node_of))

    def partner(self, rank: int) -> int:
        """The rank that keeps ``rank``'s replica."""
        return (rank + self.offset) % self.world_size

    def source(self, rank: int) -> int:
        """The rank whose replica ``rank`` keeps."""
        return (rank - self.offset) % self.world_size

    def same_node(self, a: int, b: int) -> bool:
        return self.node_of[a] == self.node_of[b]

    def ranks_on(self, node: int) -> list[int]:
        return [r for r, n in enumerate(self.node_of) if n == node]

    def leader(self, rank: int) -> int:
        """The lowest rank on ``rank``'s node."""
        return self.node_of.index(self.node_of[rank])

    @property
    def replicates(self) -> bool:
        """Whether replicas go anywhere: more than one node and a partner other than oneself."""
        return self.nodes > 1 and self.offset % self.world_size != 0

    def partners_on_own_node(self) -> list[int]:
        """Ranks whose partner shares their node (their replica dies with it)."""
        return [r for r in range(self.world_size) if self.same_node(r, self.partner(r))]


def _derived_offset(node_of: list[int]) -> int:
    """The default partner offset when nothing is configured: the node size when the nodes are
    equal contiguous blocks of ranks (the same local rank on the next node), else the smallest
    offset that puts every partner on another node, else 0 (no useful partner)."""
    ws = len(node_of)
    sizes = [node_of.count(n) for n in sorted(set(node_of))]
    block = sizes[0]
    if len(set(sizes)) == 1 and all(node_of[r] == r // block for r in range(ws)):
        return block % ws
    for off in range(1, ws):
        if all(node_of[r] != node_of[(r + off) % ws] for r in range(ws)):
            return off
    return 0


def build_topology(node_ids: list[str], config: Config) -> Topology:
    """The topology of ranks that reported ``node_ids`` (in rank order)."""
    index: dict[str, int] = {}
    node_of = [index.setdefault(n, len(index)) for n in node_ids]
    ws = len(node_of)
    if config.tier.replica_offset is not None:
        off = config.tier.replica_offset % ws
    elif _configured_ranks_per_node(config) is not None:
        off = partner_offset(config, ws)
    else:
        off = _derived_offset(node_of)
    return Topology(tuple(node_of), off)


_GROUPS: dict[tuple, Any] = {}
_GROUPS_LOCK = threading.Lock()


def side_group(kind: str, timeout_s: float):
    """A dedicated gloo group (one per purpose, cached per default group): our exchanges never
    interleave with the training job's or DCP's own collectives. Its timeout
    (``tier.exchange_timeout``) bounds how long a rank waits for a peer that hangs; a peer that
    dies is noticed at once (its connections close). Every rank must create it at the same
    point of its program (the first writer / reader / status call, and again for another
    ``tier.exchange_timeout``)."""
    import torch.distributed as dist

    default = dist.group.WORLD
    key = (kind, id(default), dist.get_world_size(), float(timeout_s))
    with _GROUPS_LOCK:
        g = _GROUPS.get(key)
        if g is None:
            g = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
            _GROUPS[key] = g
    return g


def abandon_group(group: Any) -> None:
    """After a peer was lost: forget ``group`` (the next writer/reader makes a new one; the job's
    default group has lost a member too, so it is usually restarted anyway) and ask it to abort.

    The abort does nothing on a gloo group (torch 2.7 to 2.13: ``ProcessGroupGloo`` keeps
    ``Backend.abort``'s empty default): a rank still waiting on this one notices at once only
    when this process dies (its connections close), else at ``tier.exchange_timeout`` (checked
    on torch 2.7.0 and 2.13.0). Nothing is freed here either: the group stays in c10d's registry
    until ``dist.destroy_process_group()``, long after its failed collective ended, so torch
    2.7's destructor that holds the GIL (see ``torch_compat.destroy_process_groups``) does not
    meet a worker thread still finishing that collective."""
    with _GROUPS_LOCK:
        for k, g in list(_GROUPS.items()):
            if g is group:
                del _GROUPS[k]
    try:
        group.abort()
    except Exception:  # noqa: BLE001 - best effort
        pass
