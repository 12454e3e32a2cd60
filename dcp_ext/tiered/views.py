"""Reading what a node's fast tier and the durable location hold (no collectives).

The fast commit is parsed through :mod:`dcp_ext.storage.manifest` and checked against its
``.metadata`` (crc32c) before it counts: a torn or foreign commit is reported, not used.
"""

from __future__ import annotations

import logging

from ..errors import CorruptCheckpointError
from ..integrity import checksum
from ..storage.base import Store
from ..storage.commit import (
    MANIFEST_NAME,
    METADATA_NAME,
    PERSISTED_MARKER,
    REPLICA_MARKER,
    TIER_RECORD,
    CommitState,
    commit_status,
    is_committed,
    is_data_file,
    replica_dir_rank,
)
from ..storage.manifest import Manifest, decode_manifest
from .faststore import FastStore
from .naming import canonical_url
from .records import CopyKind, DurableState, DurableView, FastCommit, FileCopy, NodeView

__all__ = ["read_fast_commit", "read_commit_bytes", "read_node_view", "read_durable_view", "needed_sizes",
           "is_persisted"]

logger = logging.getLogger(__name__)


def needed_sizes(m: Manifest) -> dict[str, int]:
    """Data file -> the bytes a checkpoint needs from it (the end of its last record)."""
    need: dict[str, int] = {}
    for loc in m.locations.values():
        need[loc.relative_path] = max(need.get(loc.relative_path, 0), loc.offset + loc.length)
    return need


def read_commit_bytes(fast: FastStore) -> tuple[bytes, bytes]:
    """``(manifest, .metadata)`` of a node's fast commit."""
    return fast.read_bytes(MANIFEST_NAME), fast.read_bytes(METADATA_NAME)


def read_fast_commit(fast: FastStore) -> tuple[FastCommit | None, str | None]:
    """The node's fast commit, or ``(None, why not)``; ``(None, None)`` when there is none."""
    if not is_committed(fast):
        return None, None
    try:
        manifest, metadata = read_commit_bytes(fast)
    except FileNotFoundError:
        return None, f"{fast.root} has {METADATA_NAME} but no {MANIFEST_NAME}: not a dcp-ext fast-tier commit"
    try:
        m = decode_manifest(manifest, f"{fast.root}/{MANIFEST_NAME}")
    except CorruptCheckpointError as e:
        return None, str(e)
    if checksum(metadata) != m.metadata_crc:
        return None, f"{fast.root}: {METADATA_NAME} does not match {MANIFEST_NAME} (torn or corrupt commit)"
    rec = fast.read_json(TIER_RECORD)
    rec = rec if isinstance(rec, dict) and rec.get("save_id") == m.save_id else {}
    return FastCommit(m.save_id, float(m.extra.get("created", 0.0)), m.extra.get("world_size"), needed_sizes(m),
                      rec.get("url"), bool(rec.get("overwrite", False))), None


def is_persisted(fast: FastStore, save_id: str) -> bool:
    """Whether the node marked ``save_id``'s durable copy as committed."""
    try:
        return fast.read_bytes(PERSISTED_MARKER).decode() == save_id
    except OSError:
        return False


def _replica_copies(fast: FastStore, dirname: str, of_rank: int) -> list[FileCopy]:
    rec = fast.read_json(f"{dirname}/{REPLICA_MARKER}")
    if not isinstance(rec, dict) or not isinstance(rec.get("files"), dict):
        return []  # no marker: the replica was never completed
    out = []
    for name, size in sorted(rec["files"].items()):
        rel = f"{dirname}/{name}"
        try:
            if fast.size(rel) == size:
                out.append(FileCopy(name, rel, size, rec["save_id"], CopyKind.REPLICA, of_rank))
        except OSError:
            pass
    return out


def read_node_view(fast: FastStore, url: str, rank: int, node: str) -> NodeView:
    """What this rank's node holds of ``url`` (its fast directory ``fast``)."""
    canon = canonical_url(url)
    try:
        if not fast.isdir():
            return NodeView(rank, node, canon)
        commit, problem = read_fast_commit(fast)
        copies: list[FileCopy] = []
        names = fast.listdir()
        if commit is not None:
            copies += [FileCopy(n, n, fast.size(n), commit.save_id, CopyKind.OWN) for n in names if is_data_file(n)]
        for n in names:
            r = replica_dir_rank(n)
            if r is not None and fast.isdir(n):
                copies += _replica_copies(fast, n, r)
        persisted = commit is not None and is_persisted(fast, commit.save_id)
        return NodeView(rank, node, canon, commit, tuple(copies), persisted, problem)
    except OSError as e:
        return NodeView(rank, node, canon, problem=f"cannot read the fast tier {fast.root}: {e}")


def read_durable_view(store: Store) -> DurableView:
    """The durable copy's state (errors are reported in the view, not raised)."""
    try:
        st = commit_status(store)
        if st.state is CommitState.COMMITTED:
            if not store.exists(MANIFEST_NAME):
                return DurableView(DurableState.COMPLETE)
            m = decode_manifest(store.read_bytes(MANIFEST_NAME), f"{store.url}/{MANIFEST_NAME}")
            return DurableView(DurableState.COMPLETE, m.save_id, m.extra.get("created"))
        if st.state is CommitState.INCOMPLETE and st.data_files:
            return DurableView(DurableState.INCOMPLETE, data_files=len(st.data_files))
        return DurableView(DurableState.MISSING)
    except Exception as e:  # noqa: BLE001 - an unreachable store is a state to report, not a crash
        return DurableView(DurableState.ERROR, error=f"{type(e).__name__}: {e}")
