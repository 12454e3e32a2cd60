"""Typed records the tiered code passes between ranks and between its modules.

Everything a rank reports about its node, and every decision made from those reports, is one of
these frozen dataclasses (they pickle for ``all_gather_object``); nothing branches on display
strings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Tier", "CopyKind", "DurableState", "PersistState", "ResumeAction", "FileCopy", "FastCommit", "NodeView",
           "DurableView", "Choice", "Transfer", "Purpose", "Origin", "BadCopy"]


class Tier(str, enum.Enum):
    """Which copy a load reads (a ``str``: ``reader.tier == "fast"`` holds)."""

    FAST = "fast"
    DURABLE = "durable"

    def __str__(self) -> str:
        return self.value


class CopyKind(enum.Enum):
    """How a node holds a data file."""

    OWN = "own"  # in the fast directory itself (written by one of the node's ranks, or restored)
    REPLICA = "replica"  # in replica_of_rank{r}/, sent by partner source rank r at save time


class DurableState(str, enum.Enum):
    """The durable copy's commit state as a reader sees it (a ``str``)."""

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    MISSING = "missing"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


class PersistState(str, enum.Enum):
    """Where a node's fast-tier copy stands with its durable copy (a ``str``)."""

    PERSISTED = "persisted"  # the durable copy of this save is committed
    PERSISTING = "persisting"  # a live process holds the copy's persist lease
    INTERRUPTED = "interrupted"  # not persisted, and nobody is on it: recovery finishes it
    NONE = "none"  # no fast-tier commit on this node

    def __str__(self) -> str:
        return self.value


class ResumeAction(str, enum.Enum):
    """What recovery did about one interrupted persistence (a ``str``)."""

    RESUMED = "resumed"
    IN_PROGRESS = "in progress"
    IMPOSSIBLE = "impossible"

    def __str__(self) -> str:
        return self.value


class Purpose(enum.Enum):
    """Why a file moves between nodes during a load."""

    LOAD = "load"  # a rank on the destination node reads it now
    OWN = "own"  # the destination node's ranks wrote it: it belongs there
    REPLICA = "replica"  # the destination node keeps the replica of its source rank


@dataclass(frozen=True)
class FileCopy:
    """One data file of one save, as held by one node."""

    name: str  # the data file name, ``__{rank}_{n}.distcp``
    relpath: str  # where it is, relative to the fast directory
    size: int
    save_id: str
    kind: CopyKind
    of_rank: int | None = None  # for a replica: the rank it backs up

    def describe(self) -> str:
        return "fast tier" if self.kind is CopyKind.OWN else f"replica of rank {self.of_rank}"


@dataclass(frozen=True)
class FastCommit:
    """A node's committed fast-tier copy (from its manifest)."""

    save_id: str
    created: float
    world_size: int | None
    #: data file -> bytes the checkpoint needs from it (a shorter file is not a usable copy)
    needed: dict[str, int]
    #: the durable URL it belongs to (None for commits written before the tier record existed)
    url: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class NodeView:
    """What one rank sees of a checkpoint in its node's fast tier."""

    rank: int
    node_id: str
    url: str  # canonical URL this rank asked for
    commit: FastCommit | None = None
    copies: tuple[FileCopy, ...] = ()
    persisted: bool = False  # the durable copy of ``commit`` is committed (fast-tier marker)
    problem: str | None = None  # why the commit is unusable or the tier unreadable

    def copies_of(self, save_id: str) -> dict[str, FileCopy]:
        """Data files of ``save_id`` on this node, an own copy preferred over a replica."""
        out: dict[str, FileCopy] = {}
        for c in self.copies:
            if c.save_id == save_id and (c.name not in out or c.kind is CopyKind.OWN):
                out[c.name] = c
        return out


@dataclass(frozen=True)
class DurableView:
    """The durable copy's state, as read by one rank."""

    state: DurableState
    save_id: str | None = None
    created: float | None = None
    data_files: int = 0
    error: str | None = None

    def describe(self) -> str:
        return f"error: {self.error}" if self.state is DurableState.ERROR else self.state.value


@dataclass(frozen=True)
class Choice:
    """The copy every rank of a load reads (computed identically on every rank)."""

    tier: Tier
    save_id: str | None
    holders: tuple[int, ...] = ()  # ranks whose node holds the chosen fast commit
    reason: str = ""
    #: whether the durable copy is the same save (then its files may stand in for bad fast ones)
    durable_same_save: bool = False


@dataclass(frozen=True)
class Transfer:
    """Move one file from rank ``src``'s node to rank ``dst``'s node during a load."""

    src: int
    dst: int
    name: str
    size: int
    src_relpath: str
    dst_relpath: str
    purpose: Purpose
    describe_src: str = field(default="", compare=False)


@dataclass(frozen=True)
class Origin:
    """Where one rank reads one data file from during a load."""

    describe: str  # for reader.sources and the log
    from_node: int | None = None  # the node it was restored from during this load
    from_path: str | None = None  # ... and its path there


@dataclass(frozen=True)
class BadCopy:
    """A data file that failed its checksums on a rank's node."""

    name: str
    path: str  # its path on the reporting rank's node
    from_node: int | None = None  # where that copy came from during this load (also bad, then)
    from_path: str | None = None
