"""Rank 0's bookkeeping of a manager's root: which steps are complete or being written, claiming a
step before a save, the record and ``latest`` after a commit, retention and leftovers.

No collectives: :class:`~dcp_ext.manager.CheckpointManager` runs these on rank 0 and hands the
answers (or errors) to every rank. The deletion policy itself is :mod:`dcp_ext.manager.gc`'s.
"""

from __future__ import annotations

import logging
import threading
import time

from ..config import Config
from ..errors import CheckpointExistsError, CheckpointNotFoundError, DcpExtError, IncompleteCheckpointError
from ..storage.commit import CommitState, commit_status, is_committed
from .gc import leftover_victims, retention_victims
from .retention import RetentionPolicy
from .root import CheckpointRoot, StepEntry, StepInfo

__all__ = ["RootBookkeeper"]

logger = logging.getLogger("dcp_ext.manager.manager")  # one logger for everything the manager logs


class RootBookkeeper:
    """The complete and in-flight steps of one root, as rank 0 knows them, and what changes them."""

    def __init__(self, root: CheckpointRoot, config: Config, policy: RetentionPolicy) -> None:
        self.root = root
        self.config = config
        self.policy = policy
        self.url = root.url
        self.tiered = bool(config.tier.cache)
        self._lock = threading.Lock()  # guards the two sets below
        #: held while claiming a step directory and while pruning the root, so a step being
        #: claimed is never chosen as a leftover between the scan and the deletion
        self._root_lock = threading.Lock()
        self._inflight: set[int] = set()  # steps being written (never deleted)
        self._committed: set[int] = set()  # complete steps it knows of

    def start(self, cleanup: bool) -> list[int]:
        """Scan the root (removing leftovers of dead saves if ``cleanup``); the complete steps."""
        if cleanup:
            with self._root_lock:
                entries = self.root.scan()
                self._remove_leftovers(entries)
        else:
            entries = self.root.scan()
        with self._lock:
            self._committed = {e.step for e in entries if e.committed}
            return sorted(self._committed)

    def scan_committed(self) -> list[int]:
        """The complete steps under the root now, oldest first."""
        steps = sorted(e.step for e in self.root.scan(with_info=False) if e.committed)
        with self._lock:
            self._committed = set(steps)
        return steps

    def require_step(self, step: int) -> None:
        """Raise unless ``step`` has a complete checkpoint (the error lists the complete steps)."""
        name = self.root.step_name(step)
        st = commit_status(self.root.step_store(name))
        if st.state is CommitState.COMMITTED:
            return
        avail = self.scan_committed()
        listed = ", ".join(map(str, avail[-20:])) or "none"
        if st.state is CommitState.INCOMPLETE:
            raise IncompleteCheckpointError(
                f"step {step} under {self.url} is incomplete (a save did not finish: {len(st.data_files)} data "
                f"file(s), no .metadata); complete steps: {listed}")
        raise CheckpointNotFoundError(f"no checkpoint for step {step} under {self.url} ({self.root.step_url(name)} "
                                      f"is {st.state.value}); complete steps: {listed}")

    def claim(self, name: str, info: StepInfo, forced: bool) -> bool:
        """Before a save: skip a step that is already complete (unless forced: then it needs
        ``overwrite``), else write the step record (marking the directory as ours)."""
        step = info.step
        with self._root_lock:
            with self._lock:
                busy = step in self._inflight
            if busy:
                raise DcpExtError(f"step {step} is still being saved by this manager; wait() before saving it again")
            if is_committed(self.root.step_store(name)):
                if not forced:
                    logger.warning("step %d already has a complete checkpoint at %s; not saving it again (force=True "
                                   "with overwrite=True replaces it)", step, self.root.step_url(name))
                    return False
                if not self.config.overwrite:
                    raise CheckpointExistsError(
                        f"Checkpoint already exists: step {step} at {self.root.step_url(name)} is complete; pass "
                        f"overwrite=True to the CheckpointManager to replace it")
            with self._lock:  # in flight before its record exists: a scan that sees the record sees this
                self._inflight.add(step)
            try:
                self.root.write_info(name, info)
            except BaseException:
                with self._lock:
                    self._inflight.discard(step)
                raise
        return True

    def finished(self, step: int) -> None:
        """The save of ``step`` is over (committed or failed): it is no longer protected."""
        with self._lock:
            self._inflight.discard(step)

    def committed(self, step: int, name: str, info: StepInfo, t0: float) -> None:
        """After ``step`` committed: its record, ``latest`` if it is the newest, then retention."""
        info.committed = time.time()
        info.metadata.setdefault("save_seconds", round(time.perf_counter() - t0, 3))
        self.root.write_info(name, info)
        with self._lock:
            self._committed.add(step)
            newest = max(self._committed)
        if step >= newest:
            self.root.write_latest(name)
        logger.info("step %d: committed at %s (%.2fs)", step, self.root.step_url(name), time.perf_counter() - t0)
        self.prune(just_committed=step)

    def prune(self, just_committed: int | None = None) -> None:
        """Apply retention and remove leftovers of failed saves."""
        with self._root_lock:
            entries = self.root.scan()
            with self._lock:
                protected = set(self._inflight)
                self._committed = {e.step for e in entries if e.committed}
            if just_committed is not None:
                protected.add(just_committed)
            for e in retention_victims(self.root, entries, self.policy, protected):
                self._delete(e, "retention")
            self._remove_leftovers(entries)

    def _remove_leftovers(self, entries: list[StepEntry]) -> None:
        """Delete incomplete step directories the manager created whose save is over (crashed
        or failed): never one this manager is writing, one whose writer still runs on this host,
        or (tiered) one whose fast-tier copy is complete here (it may still be persisted)."""
        with self._lock:
            busy = set(self._inflight)
        keep_if = (lambda e: _fast_copy_complete(e.url, self.config)) if self.tiered else None
        for e in leftover_victims(entries, busy=busy, keep_if=keep_if):
            self._delete(e, "leftover of a save that did not finish")

    def _delete(self, e: StepEntry, why: str) -> None:
        try:
            self.root.delete(e.name)
            logger.info("removed %s (%s)", e.url, why)
        except Exception as ex:  # noqa: BLE001 - retried at the next pass
            logger.warning("could not remove %s (%s): %s", e.url, why, ex)


def _fast_copy_complete(url: str, config: Config) -> bool:
    """Whether this node's fast tier holds a complete copy of ``url`` (then its durable copy may
    still be persisted by the tiered code: not a leftover)."""
    try:
        from ..tiered import tier_status

        return bool(tier_status(url, config=config).fast_complete)
    except Exception as e:  # noqa: BLE001 - when unsure, keep it
        logger.debug("tier status of %s unknown (%s): keeping it", url, e)
        return True
