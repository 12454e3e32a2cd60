"""The commit protocol: the one place that names a checkpoint's files and decides whether it
is committed.

A checkpoint location (a directory, an object prefix, a fast-tier directory) goes through:

1. *empty / missing*: nothing there;
2. *incomplete*: data files (``__{rank}_{n}.distcp``) and maybe a manifest, but no
   ``.metadata``: a save is under way there, or one died;
3. *committed*: ``.metadata`` exists. It is published last (:func:`publish`), after the JSON
   manifest and only once every rank's data is written, through
   :meth:`~dcp_ext.storage.base.Store.put_atomic` (temp name + ``os.replace`` + directory fsync
   on file systems, one PUT on object stores: never copy+delete).

Saving over a committed checkpoint (``overwrite=True``) first *un-commits* it
(:func:`uncommit`: ``.metadata`` goes before anything else), so a crash mid-overwrite leaves an
incomplete checkpoint, never a mix of two saves that looks whole. Orbax keeps the same
decision in one module (``atomicity.py``); every backend and the tiered code call this one.

**Rank-local checkpoints** (``dcp.save(..., use_collectives=False)``): no rank learns whether the
others succeeded, so there is no whole-checkpoint commit point. Each rank's *part* is committed
on its own, exactly like a checkpoint: its data files, then its manifest
``__{rank}.dcp_ext.json``, then ``__{rank}.metadata`` (stock DCP's name for rank-local metadata)
last, atomically; overwriting un-commits the part (its ``__{rank}.metadata`` first) before any of
its data changes. A rank loads only its own part, and only a committed one. What this cannot
give (no rule can, without collectives): a guarantee that every rank's part comes from the same
save after a rank failed *before* it began overwriting (it keeps its previous part). Use a new
location per save, or collective saves, where that matters (see docs/backends.md).

The tiered code's markers (a fast-tier copy persisted; a partner's replica; each rank's part
of a background persistence) are named here as well, so no other module invents file names.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass
from typing import Iterable

from ..errors import CheckpointExistsError, CheckpointNotFoundError, IncompleteCheckpointError, StorageError
from .base import Store

__all__ = [
    "METADATA_NAME",
    "MANIFEST_NAME",
    "DATA_FILE_RE",
    "PERSISTED_MARKER",
    "REPLICA_MARKER",
    "CommitState",
    "CommitStatus",
    "RANK_METADATA_RE",
    "data_file_name",
    "rank_metadata_name",
    "rank_manifest_name",
    "metadata_name",
    "manifest_name",
    "rank_local_parts",
    "data_file_rank",
    "is_data_file",
    "commit_status",
    "is_committed",
    "read_committed_metadata",
    "require_committed",
    "committed_parts",
    "refuse_overwrite",
    "uncommit",
    "publish",
    "remove_stale_data",
    "persist_marker",
    "persist_marker_prefix",
    "replica_dir_name",
    "replica_dir_rank",
    "STEP_INFO_NAME",
    "LATEST_NAME",
    "child_states",
    "remove_checkpoint",
    "TIER_RECORD",
    "NODE_ID_FILE",
    "PERSIST_LEASE",
    "OUTCOMES_DIR",
    "outcome_record_name",
    "is_persist_marker",
    "HF_INDEX_NAME",
    "SAFETENSORS_SUFFIX",
    "safetensors_checkpoint_files",
]

logger = logging.getLogger(__name__)

#: DCP's pickled metadata; its presence *is* the commit (stock readers look for it too)
METADATA_NAME = ".metadata"
#: our JSON manifest (:mod:`dcp_ext.storage.manifest`), written just before ``.metadata``
MANIFEST_NAME = ".dcp_ext.json"
#: data files, as stock ``FileSystemWriter`` names them: ``__{rank}_{n}.distcp``
DATA_FILE_RE = re.compile(r"^__(\d+)_(\d+)\.distcp$")
#: a rank-local part's metadata (``use_collectives=False``), as stock names it: ``__{rank}.metadata``
RANK_METADATA_RE = re.compile(r"^__(\d+)\.metadata$")

#: stock ``HuggingFaceStorageWriter`` checkpoints (no ``.metadata``): their tensor files, and the
#: index that rank-0 saves and consolidation write after them
SAFETENSORS_SUFFIX = ".safetensors"
HF_INDEX_NAME = "model.safetensors.index.json"

#: fast tier: the save id whose durable copy is committed (retention may then delete it)
PERSISTED_MARKER = ".dcp_ext_persisted"
#: fast tier: in ``replica_of_rank{r}/``, which save and files of rank r this node holds
REPLICA_MARKER = ".dcp_ext_replica.json"
#: checkpoint manager: a step directory's own record (``dcp_ext.manager``), written before the
#: save (so the manager knows the directory is its own) and completed after the commit
STEP_INFO_NAME = ".dcp_ext_step.json"
#: checkpoint manager: one line in the root naming its newest complete step directory
LATEST_NAME = "latest"
_PERSIST_MARKER_PREFIX = ".dcp_ext_persist."
_REPLICA_DIR_RE = re.compile(r"^replica_of_rank(\d+)$")
#: fast tier: which durable URL a committed fast-tier copy belongs to (written with its commit), so
#: that a later process can finish persisting it after a crash
TIER_RECORD = ".dcp_ext_tier.json"
#: cache root: a random id shared by every rank that sees this directory (ranks that read the same
#: id share the fast tier: they are one "node" whatever the hostnames or LOCAL_WORLD_SIZE say)
NODE_ID_FILE = ".dcp_ext_node_id"
#: fast tier: locked (``flock``) by every process persisting the copy, so recovery leaves it alone
PERSIST_LEASE = ".dcp_ext_persist.lock"
#: cache root: outcome records of persistences running in DCP's checkpoint process (PROCESS mode)
OUTCOMES_DIR = ".dcp_ext_outcomes"


def data_file_name(rank: int, n: int) -> str:
    """The ``n``-th data file of ``rank``: ``__{rank}_{n}.distcp``."""
    return f"__{rank}_{n}.distcp"


def rank_metadata_name(rank: int) -> str:
    """Rank ``rank``'s metadata in a rank-local checkpoint: ``__{rank}.metadata`` (stock's name)."""
    return f"__{rank}{METADATA_NAME}"


def rank_manifest_name(rank: int) -> str:
    """Rank ``rank``'s manifest in a rank-local checkpoint: ``__{rank}.dcp_ext.json``."""
    return f"__{rank}{MANIFEST_NAME}"


def metadata_name(rank: int | None = None) -> str:
    """The commit marker: ``.metadata``, or rank ``rank``'s part's ``__{rank}.metadata``."""
    return METADATA_NAME if rank is None else rank_metadata_name(rank)


def manifest_name(rank: int | None = None) -> str:
    """The manifest beside :func:`metadata_name`."""
    return MANIFEST_NAME if rank is None else rank_manifest_name(rank)


def data_file_rank(relpath: str) -> int | None:
    """The rank that wrote data file ``relpath`` (its base name), or None if it is not one."""
    m = DATA_FILE_RE.match(relpath.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def is_data_file(relpath: str) -> bool:
    """Whether ``relpath`` (its base name) is a DCP data file."""
    return data_file_rank(relpath) is not None


def safetensors_checkpoint_files(files: Iterable[str]) -> list[str]:
    """The top-level ``*.safetensors`` files among ``files`` (a location's listing): a location
    without ``.metadata`` that has them is a ``HuggingFaceStorageWriter`` checkpoint, which has no
    commit marker of its own (see :func:`dcp_ext.storage.safetensors.hf_metadata` for what is
    checked instead). Subdirectories (``sharded/`` of a consolidated save) are not part of it."""
    return sorted(f for f in files if "/" not in f and f.endswith(SAFETENSORS_SUFFIX))


def persist_marker_prefix(save_id: str) -> str:
    """Prefix of every background-persistence marker object of save ``save_id``."""
    return f"{_PERSIST_MARKER_PREFIX}{save_id}."


def persist_marker(save_id: str, what: str) -> str:
    """A background-persistence marker in the durable location (``what``: ``rank3.json``,
    ``rank3.failed``, ``FAILED``); never part of a committed checkpoint's data."""
    return persist_marker_prefix(save_id) + what


def is_persist_marker(relpath: str) -> bool:
    """Whether ``relpath`` is a background-persistence marker (of any save)."""
    return relpath.rsplit("/", 1)[-1].startswith(_PERSIST_MARKER_PREFIX)


def outcome_record_name(ticket: str) -> str:
    """The outcome record (under the cache root) of the persistence of pickled writer ``ticket``."""
    return f"{OUTCOMES_DIR}/{ticket}.json"


def replica_dir_name(rank: int) -> str:
    """The fast-tier subdirectory holding rank ``rank``'s replica on its partner's node."""
    return f"replica_of_rank{rank}"


def replica_dir_rank(name: str) -> int | None:
    """``replica_of_rank3`` -> 3; None for any other name."""
    m = _REPLICA_DIR_RE.match(name)
    return int(m.group(1)) if m else None


class CommitState(enum.Enum):
    """Where a checkpoint location stands in the commit protocol."""

    MISSING = "missing"  # the location does not exist
    EMPTY = "empty"  # it exists and holds nothing
    INCOMPLETE = "incomplete"  # files, but no .metadata: a save is running or died
    COMMITTED = "committed"  # .metadata exists
    RANK_LOCAL = "rank_local"  # no .metadata, but committed rank-local parts (__{rank}.metadata)


@dataclass(frozen=True)
class CommitStatus:
    """:func:`commit_status`'s answer: the state, and for an incomplete location the data
    files found (so errors can say how much a dead save left behind)."""

    url: str
    state: CommitState
    data_files: tuple[str, ...] = ()
    #: ranks whose rank-local part is committed (state RANK_LOCAL)
    ranks: tuple[int, ...] = ()

    @property
    def committed(self) -> bool:
        return self.state is CommitState.COMMITTED


def is_committed(store: Store, rank: int | None = None) -> bool:
    """Whether ``store`` holds a committed checkpoint, or (``rank`` given) a committed
    rank-local part of that rank (one existence check)."""
    return store.exists(metadata_name(rank))


def read_committed_metadata(store: Store, rank: int | None = None) -> bytes | None:
    """The bytes of ``store``'s metadata (``rank`` given: of that rank's rank-local part) if it
    is committed, else None: one read, as a location is committed exactly when its metadata
    exists (:func:`is_committed`), so a load needs no existence checks before it (on an object
    store they were a LIST and a HEAD in front of every load); :func:`require_committed` says
    what is wrong when this returns None."""
    return store.read_bytes_if_exists(metadata_name(rank))


def rank_local_parts(files: Iterable[str]) -> tuple[int, ...]:
    """The ranks whose committed rank-local part (``__{rank}.metadata``) is among ``files``."""
    return tuple(sorted(int(m.group(1)) for f in files if "/" not in f and (m := RANK_METADATA_RE.match(f))))


def commit_status(store: Store) -> CommitStatus:
    """Classify ``store``'s location (two existence checks when committed: the location first,
    whose failure on an object store carries the server's error code, e.g. a wrong key)."""
    if not store.exists(""):
        return CommitStatus(store.url, CommitState.MISSING)
    if store.exists(METADATA_NAME):
        return CommitStatus(store.url, CommitState.COMMITTED)
    files = store.list()
    if not files:
        return CommitStatus(store.url, CommitState.EMPTY)
    data = tuple(f for f in files if is_data_file(f))
    ranks = rank_local_parts(files)
    if ranks:
        return CommitStatus(store.url, CommitState.RANK_LOCAL, data, ranks)
    return CommitStatus(store.url, CommitState.INCOMPLETE, data)


def require_committed(store: Store, rank: int | None = None) -> None:
    """Raise unless ``store`` holds a committed checkpoint (``rank`` given: a committed
    rank-local part of that rank): :class:`CheckpointNotFoundError` for a missing or empty
    location, :class:`IncompleteCheckpointError` for one a save did not finish (never load such
    a location as if it were whole), or that holds only rank-local parts when a global
    checkpoint is asked for."""
    if rank is not None and is_committed(store, rank):
        return
    st = commit_status(store)
    if rank is None and st.state is CommitState.COMMITTED:
        return
    if st.state is CommitState.MISSING:
        raise CheckpointNotFoundError(f"no checkpoint at {store.url}: the location does not exist")
    if st.state is CommitState.EMPTY:
        raise CheckpointNotFoundError(f"no checkpoint at {store.url}: the location is empty")
    if rank is not None:
        raise IncompleteCheckpointError(
            f"{store.url} has no committed rank-local part of rank {rank}: no {rank_metadata_name(rank)} "
            f"(rank {rank}'s save with use_collectives=False did not finish there"
            + (f"; committed parts: ranks {list(st.ranks)}" if st.ranks else "") + "); refusing to load it")
    if st.state is CommitState.RANK_LOCAL:
        raise IncompleteCheckpointError(
            f"{store.url} holds a rank-local checkpoint (saved with use_collectives=False; parts of ranks "
            f"{list(st.ranks)}) and no global {METADATA_NAME}: each rank loads its own part")
    raise IncompleteCheckpointError(
        f"{store.url} is an incomplete checkpoint: it holds {len(st.data_files)} data file(s) but no "
        f"{METADATA_NAME} (a save did not finish there); refusing to load it")


def committed_parts(store: Store) -> tuple[int | None, ...]:
    """What a committed location holds: ``(None,)`` for a checkpoint, the ranks of its parts for
    a rank-local one; raises as :func:`require_committed` for anything else."""
    st = commit_status(store)
    if st.state is CommitState.COMMITTED:
        return (None,)
    if st.state is CommitState.RANK_LOCAL:
        return st.ranks
    require_committed(store)
    raise AssertionError("unreachable")  # pragma: no cover - require_committed raised


def refuse_overwrite(store: Store, overwrite: bool, what: str | None = None, rank: int | None = None) -> bool:
    """Before a save: raise :class:`CheckpointExistsError` if ``store`` is committed and
    ``overwrite`` is false; return whether it is committed (the caller must then
    :func:`uncommit` it before changing any data). ``what`` names the location in the message
    (default: its URL). The message starts with stock DCP's phrase, which user code matches.

    With ``rank`` (a rank-local save of that rank) the location counts as committed if it holds
    a global checkpoint or rank ``rank``'s own part; other ranks' parts are theirs to check (a
    fast rank's fresh part must not make a slower rank refuse the same save).
    """
    committed = is_committed(store) or (rank is not None and is_committed(store, rank))
    if committed and not overwrite:
        part = "" if rank is None or is_committed(store) else f" (rank {rank}'s rank-local part)"
        raise CheckpointExistsError(
            f"Checkpoint already exists: {what or store.url} already holds a complete checkpoint{part}; "
            f"refusing to overwrite it (pass overwrite=True to replace it, or save to a new location)")
    return committed


def uncommit(store: Store, also: Iterable[str] = (), rank: int | None = None) -> None:
    """Take a committed checkpoint out of service before it is overwritten: ``.metadata``
    first (from then on it is *incomplete*), then the manifest and ``also`` (markers).

    Without ``rank`` (a collective save) the rank-local parts of an earlier rank-local save are
    un-committed too (their ``__{rank}.metadata`` after ``.metadata``: one listing, only here).
    With ``rank`` (a rank-local save): the global checkpoint, if any, then that rank's part.
    """
    store.remove([METADATA_NAME])
    if rank is None:
        parts = rank_local_parts(store.list())
        store.remove([rank_metadata_name(r) for r in parts])
        rest = [MANIFEST_NAME, *(rank_manifest_name(r) for r in parts), *also]
    else:
        store.remove([rank_metadata_name(rank)])
        rest = [MANIFEST_NAME, rank_manifest_name(rank), *also]
    store.remove(rest)


def publish(store: Store, manifest: bytes, metadata: bytes, rank: int | None = None) -> None:
    """Commit: the manifest, then ``.metadata`` (the commit point), each atomically. Call it
    only once every rank's data is durable (``rank`` given: once that rank's data is durable;
    it commits that rank's rank-local part)."""
    store.put_atomic(manifest_name(rank), manifest)
    store.put_atomic(metadata_name(rank), metadata)


def remove_stale_data(store: Store, used: Iterable[str], rank: int | None = None) -> list[str]:
    """Delete data files that the committed checkpoint does not use (left by the save it
    overwrote), only those of ``rank`` when given (a rank-local part). After a global commit
    (``rank`` None) rank-local parts of an earlier save are stale too. Never raises: the
    checkpoint is committed and leftovers are harmless. Returns what was removed."""
    keep = set(used)
    try:
        files = store.list()
        stale = [p for p in files if "/" not in p and is_data_file(p) and p not in keep
                 and (rank is None or data_file_rank(p) == rank)]
        if rank is None:  # commit markers first: a part is never committed over removed data
            parts = rank_local_parts(files)
            stale = [*(rank_metadata_name(r) for r in parts), *(rank_manifest_name(r) for r in parts), *stale]
        if stale:
            store.remove(stale)
        return stale
    except (OSError, StorageError) as e:
        logger.warning("could not remove stale files in %s: %s", store.url, e)
        return []


def child_states(store: Store, listing: Iterable[str] | None = None) -> dict[str, CommitStatus]:
    """Classify every immediate subdirectory of ``store`` (a root holding one checkpoint per
    subdirectory, e.g. a manager's step directories) from one recursive listing (``listing``:
    ``store.list()`` if already fetched): committed when it holds its own ``.metadata``, else
    incomplete. Files directly in the root are ignored."""
    files: dict[str, list[str]] = {}
    for path in store.list() if listing is None else listing:
        if "/" in path:
            child, rest = path.split("/", 1)
            files.setdefault(child, []).append(rest)
    out = {}
    for child, rel in sorted(files.items()):
        url = f"{store.url.rstrip('/')}/{child}"
        if METADATA_NAME in rel:
            out[child] = CommitStatus(url, CommitState.COMMITTED)
        else:
            out[child] = CommitStatus(url, CommitState.INCOMPLETE,
                                      tuple(f for f in rel if "/" not in f and is_data_file(f)))
    return out


def remove_checkpoint(store: Store) -> list[str]:
    """Delete the checkpoint at ``store`` and everything else under its location.

    ``.metadata`` goes first (:func:`uncommit`), so from the first deletion on no new load can
    start from it (readers see it as incomplete); then the manifest and every other file, then
    the emptied directories. Returns the files removed."""
    uncommit(store)
    rest = store.list()
    store.remove(rest)
    store.remove_empty_dirs()
    return [METADATA_NAME, MANIFEST_NAME, *rest]
