"""Fast-tier retention: keep the newest ``tier.keep_last`` checkpoints of a node's cache, never
deleting one whose durable copy is not committed."""

from __future__ import annotations

import logging
import os

from ..storage.commit import MANIFEST_NAME, is_committed
from ..storage.manifest import decode_manifest
from ..errors import CorruptCheckpointError
from .faststore import FastStore
from .naming import is_fast_dir_name
from .views import is_persisted

__all__ = ["apply_retention"]

logger = logging.getLogger(__name__)


def apply_retention(cache_root: str, keep_last: int) -> list[str]:
    """Keep the newest ``keep_last`` complete checkpoints in ``cache_root``; delete older ones
    whose durable copy is persisted (never one that is not). Incomplete directories older than
    the oldest kept checkpoint (left by crashed saves) are deleted too. Returns what was deleted."""
    root = FastStore(cache_root)
    if not root.isdir():
        return []
    complete, incomplete = [], []
    for name in root.listdir():
        d = root.sub(name)
        if not is_fast_dir_name(name) or not d.isdir():
            continue
        doc = None
        if is_committed(d):
            try:
                doc = decode_manifest(d.read_bytes(MANIFEST_NAME), f"{d.root}/{MANIFEST_NAME}")
            except (OSError, CorruptCheckpointError):
                doc = None
        if doc is not None:
            complete.append((float(doc.extra.get("created", 0.0)), name, doc.save_id))
        else:
            incomplete.append(name)
    complete.sort(reverse=True)
    deleted = []
    for _created, name, sid in complete[keep_last:]:
        d = root.sub(name)
        if not is_persisted(d, sid):
            logger.info("fast tier: keeping %s beyond keep_last=%d: its durable copy is not persisted", d.root,
                        keep_last)
            continue
        d.remove_tree()
        deleted.append(d.root)
    if complete[:keep_last]:
        oldest_kept = complete[:keep_last][-1][0]
        for name in incomplete:
            d = root.sub(name)
            try:
                if d.mtime() < oldest_kept:
                    d.remove_tree()
                    deleted.append(d.root)
            except OSError:
                pass
    if deleted:
        logger.info("fast tier: removed %d old checkpoint dir(s) from %s: %s", len(deleted), cache_root,
                    ", ".join(os.path.basename(d) for d in deleted))
    return deleted
