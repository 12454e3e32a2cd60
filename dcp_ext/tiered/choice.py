"""Pure decisions of a tiered load: which copy to read, and which files move where.

Every rank runs these on the same gathered reports and gets the same answer, so no further
agreement is needed; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..errors import CheckpointNotFoundError, IncompleteCheckpointError
from ..storage.commit import METADATA_NAME, data_file_rank, replica_dir_name
from .records import Choice, CopyKind, DurableState, DurableView, FileCopy, NodeView, Purpose, Tier, Transfer
from .topology import Topology

__all__ = ["choose_copy", "Holdings", "plan_load_transfers", "plan_repair_transfers"]


def _short(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")


def choose_copy(url: str, views: Sequence[NodeView], durable: DurableView) -> Choice:
    """The newest complete copy, preferring the fast tier when it is as new as the durable one.

    A fast copy is complete if every file its commit needs is on *some* node (own files or
    replicas) with enough bytes. Raises :class:`IncompleteCheckpointError` /
    :class:`CheckpointNotFoundError` when no copy can be assembled.
    """
    commits: dict[str, tuple] = {}
    for v in views:
        if v.commit is not None:
            c, holders = commits.setdefault(v.commit.save_id, (v.commit, []))
            holders.append(v.rank)
    notes: list[str] = []
    usable = []
    for sid, (commit, holders) in commits.items():
        avail: dict[str, int] = {}
        for v in views:
            for name, cp in v.copies_of(sid).items():
                avail[name] = max(avail.get(name, 0), cp.size)
        missing = sorted(f for f, need in commit.needed.items() if avail.get(f, -1) < need)
        if missing:
            notes.append(f"fast-tier copy {sid[:8]} lacks {_short(missing)} on every node")
        else:
            usable.append((commit.created, sid, tuple(holders)))
    usable.sort(reverse=True)
    complete = durable.state is DurableState.COMPLETE
    if usable:
        created, sid, holders = usable[0]
        same = complete and durable.save_id == sid
        if not complete or same or durable.created is None or created >= durable.created:
            if complete:
                why = "the durable copy is the same save" if same else "the durable copy is older"
            elif durable.state is DurableState.INCOMPLETE:
                why = "the durable copy is incomplete (a persist did not finish)"
            elif durable.state is DurableState.MISSING:
                why = "there is no durable copy yet"
            else:
                why = f"durable: {durable.describe()}"
            return Choice(Tier.FAST, sid, holders, why, same)
        notes.append(f"the fast-tier copy {sid[:8]} is older than the durable one")
    notes += [f"rank {v.rank}: {v.problem}" for v in views if v.problem]
    if complete:
        return Choice(Tier.DURABLE, durable.save_id, (), "; ".join(dict.fromkeys(notes)) or "no fast-tier copy")
    fast_desc = "; ".join(dict.fromkeys(notes)) or "no complete fast-tier copy on any node"
    if durable.state is DurableState.INCOMPLETE:
        raise IncompleteCheckpointError(
            f"{url} has no complete copy: the durable copy is incomplete ({durable.data_files} data file(s) but "
            f"no {METADATA_NAME}: a save or persist did not finish) and {fast_desc}; refusing to load it")
    if durable.state is DurableState.MISSING and not commits:
        raise CheckpointNotFoundError(f"no checkpoint at {url}: neither the durable location nor the fast tier "
                                      f"holds one")
    raise IncompleteCheckpointError(f"{url} has no loadable copy: durable: {durable.describe()}; fast tier: "
                                    f"{fast_desc}")


@dataclass
class Holdings:
    """The copies of one save each node holds (updated as files move or turn out bad)."""

    topo: Topology
    save_id: str
    by_node: dict[int, dict[str, FileCopy]] = field(default_factory=dict)
    #: (node, relpath) copies known to be bad (failed their checksums)
    bad: set[tuple[int, str]] = field(default_factory=set)

    @classmethod
    def from_views(cls, topo: Topology, save_id: str, views: Sequence[NodeView]) -> "Holdings":
        h = cls(topo, save_id)
        for v in views:
            h.by_node.setdefault(topo.node_of[v.rank], v.copies_of(save_id))
        return h

    def on(self, node: int) -> dict[str, FileCopy]:
        return self.by_node.setdefault(node, {})

    def drop(self, node: int, relpath: str) -> None:
        """Forget a copy that failed its checksum (never offered again)."""
        self.bad.add((node, relpath))
        for name, cp in list(self.on(node).items()):
            if cp.relpath == relpath:
                del self.on(node)[name]

    def add(self, node: int, cp: FileCopy) -> None:
        """Record a copy that arrived on ``node`` (an own copy stays preferred over a replica)."""
        self.bad.discard((node, cp.relpath))
        cur = self.on(node).get(cp.name)
        if cur is None or cp.kind is CopyKind.OWN:
            self.on(node)[cp.name] = cp

    def provider(self, name: str, need: int, not_node: int) -> tuple[int, FileCopy] | None:
        """A rank on another node with a good copy of ``name`` (its own copy before a replica,
        then the lowest rank)."""
        best = None
        for r in range(self.topo.world_size):
            n = self.topo.node_of[r]
            cp = self.by_node.get(n, {}).get(name)
            if n == not_node or cp is None or cp.size < need:
                continue
            key = (cp.kind is not CopyKind.OWN, r)
            if best is None or key < best[0]:
                best = (key, r, cp)
        return None if best is None else (best[1], best[2])


def _describe(topo: Topology, src: int, cp: FileCopy) -> str:
    return (f"restored over the process group from rank {src} on node {topo.node_of[src]} "
            f"(its {cp.describe()}) into")


def plan_load_transfers(holdings: Holdings, needs: Sequence[Iterable[str]], needed: dict[str, int],
                        ) -> tuple[list[Transfer], dict[int, list[str]]]:
    """Transfers bringing each rank's needed files onto its node, once per node and file, and
    the files no other node can provide (per rank). Deterministic: every rank computes the same
    list and runs its part in order (blocking send/recv cannot deadlock then)."""
    topo = holdings.topo
    out: list[Transfer] = []
    scheduled: set[tuple[int, str]] = set()
    unavailable: dict[int, list[str]] = {}
    for dst, names in enumerate(needs):
        node = topo.node_of[dst]
        for name in sorted(names):
            if name in holdings.on(node) or (node, name) in scheduled:
                continue
            got = holdings.provider(name, needed.get(name, 0), node)
            if got is None:
                unavailable.setdefault(dst, []).append(name)
                continue
            src, cp = got
            out.append(Transfer(src, dst, name, cp.size, cp.relpath, name, Purpose.LOAD, _describe(topo, src, cp)))
            scheduled.add((node, name))
    return out, unavailable


def plan_repair_transfers(holdings: Holdings, needed: dict[str, int], saved_world_size: int | None,
                          already: Sequence[Transfer]) -> list[Transfer]:
    """After a node lost its fast tier: bring back each saving rank's own files to its node and
    its replica to its partner's node, from other nodes (only when the load runs on as many ranks
    as the save, so that "rank r's node" means the same thing)."""
    topo = holdings.topo
    if saved_world_size != topo.world_size:
        return []
    taken = {(topo.node_of[t.dst], t.dst_relpath) for t in already}
    out: list[Transfer] = []
    for s in range(topo.world_size):
        files = sorted(f for f in needed if data_file_rank(f) == s)
        placements = [(s, "", Purpose.OWN)]
        if topo.replicates and not topo.same_node(s, topo.partner(s)):
            placements.append((topo.partner(s), replica_dir_name(s) + "/", Purpose.REPLICA))
        for dst, prefix, purpose in placements:
            node = topo.node_of[dst]
            held = holdings.on(node)
            if purpose is Purpose.OWN:
                todo = [f for f in files if f not in held and (node, f) not in taken]
            else:
                have = [f for f in files if (cp := held.get(f)) is not None and cp.kind is CopyKind.REPLICA
                        and cp.of_rank == s]
                todo = [] if len(have) == len(files) else files
            plan = []
            for f in todo:
                got = holdings.provider(f, needed[f], node)
                if got is None:
                    plan = []  # a partial copy protects nothing: all of the rank's files or none
                    break
                src, cp = got
                plan.append(Transfer(src, dst, f, cp.size, cp.relpath, prefix + f, purpose, _describe(topo, src, cp)))
            out += plan
    return out
