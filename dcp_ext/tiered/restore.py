"""Running the file moves of a tiered load (:func:`~dcp_ext.tiered.choice.plan_load_transfers`,
:func:`~dcp_ext.tiered.choice.plan_repair_transfers`) over the side group.

Every rank walks the same list in order and takes part in the transfers that concern it
(blocking send/recv: no deadlock, since everyone agrees on the order). Received files stay under
temporary names until every rank has reported how its transfers went; then a file appears under
its name only if both its sender and its receiver succeeded, and a rebuilt replica gets its
marker last.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Sequence

from ..storage.commit import REPLICA_MARKER, replica_dir_name, replica_dir_rank
from .exchange import FileSink, FileSource, barrier, gather, stream_files
from .faststore import FastStore
from .records import Purpose, Transfer

__all__ = ["run_transfers"]

logger = logging.getLogger(__name__)


def run_transfers(transfers: Sequence[Transfer], rank: int, group: Any, fast: FastStore, chunk: int,
                  save_id: str) -> set[int]:
    """Run ``transfers``; returns the indices that succeeded (the same set on every rank)."""
    t0 = time.perf_counter()
    for s in sorted({replica_dir_rank(t.dst_relpath.split("/")[0]) for t in transfers
                     if t.dst == rank and t.purpose is Purpose.REPLICA}):
        rep = fast.sub(replica_dir_name(s))  # an old replica goes first, its marker before its files
        rep.remove([REPLICA_MARKER])
        rep.remove_tree()
    sinks: dict[int, FileSink] = {}
    errors: dict[int, str] = {}
    nbytes = 0
    for i, t in enumerate(transfers):
        if rank == t.src:
            source = FileSource(fast, [(t.src_relpath, t.size)])
            stream_files(source, t.dst, None, t.src, group, chunk, f"restore of {t.name}")
            if source.error is not None:
                errors[i] = f"rank {rank} could not read {fast.path(t.src_relpath)}: {source.error}"
            nbytes += t.size
        elif rank == t.dst:
            sink = FileSink(fast, [(t.dst_relpath, t.size)], publish=False)
            stream_files(None, t.dst, sink, t.src, group, chunk, f"restore of {t.name}")
            sinks[i] = sink
            if sink.error is not None:
                errors[i] = f"rank {rank} could not write {fast.path(t.dst_relpath)}: {sink.error}"
            nbytes += t.size
    failed: dict[int, str] = {}
    for errs in gather(errors, group, "restore outcome") if transfers else ():
        failed.update(errs)
    publish_error: BaseException | None = None
    try:
        for i, sink in sinks.items():
            if i in failed:
                sink.abort()
            else:
                for f in sink.done:
                    f.publish()
        _mark_replicas(transfers, failed, rank, fast, save_id)
    except BaseException as e:  # noqa: BLE001 - raised after the barrier, so no peer waits for us
        publish_error = e
    # a file received by one rank of a node is read by the others: none reads before it is published
    if transfers:
        barrier(group, "restore published")
    if publish_error is not None:
        raise publish_error
    for i, msg in sorted(failed.items()):
        logger.warning("rank %d: restoring %s from rank %d failed: %s", rank, transfers[i].name, transfers[i].src, msg)
    if any(rank in (t.src, t.dst) for t in transfers):
        logger.info("rank %d: fast-tier restore moved %d file(s) over the process group (%.1f MiB by this rank, "
                    "%.2fs)", rank, len(transfers), nbytes / 2**20, time.perf_counter() - t0)
    return set(range(len(transfers))) - set(failed)


def _mark_replicas(transfers: Sequence[Transfer], failed: dict[int, str], rank: int, fast: FastStore,
                   save_id: str) -> None:
    """A rebuilt replica is vouched for (marker) only when all of its files arrived."""
    by_dir: dict[str, list[tuple[int, Transfer]]] = {}
    for i, t in enumerate(transfers):
        if t.dst == rank and t.purpose is Purpose.REPLICA:
            by_dir.setdefault(t.dst_relpath.split("/")[0], []).append((i, t))
    for d, items in by_dir.items():
        if any(i in failed for i, _t in items):
            continue
        of_rank = replica_dir_rank(d)
        fast.sub(d).put_atomic(REPLICA_MARKER, json.dumps(
            {"save_id": save_id, "rank": of_rank, "files": {t.name: t.size for _i, t in items}}).encode())
        logger.info("rank %d: rebuilt the replica of rank %d (%d file(s)) in %s", rank, of_rank, len(items),
                    fast.path(d))
