"""Checkpoint manager: step directories, interval, retention, resume and preemption on DCP.

* :mod:`~dcp_ext.manager.manager`: :class:`CheckpointManager` (saves, loads, rank coordination)
* :mod:`~dcp_ext.manager.bookkeeping`: rank 0's view of the root (complete and in-flight steps,
  claims, records and ``latest`` after a commit, retention and leftover passes)
* :mod:`~dcp_ext.manager.gc`: which step directories a pass deletes (retention victims, leftovers)
* :mod:`~dcp_ext.manager.root`: a root's step directories, their records and ``latest`` (no
  collectives; also used by ``dcp-ext ls/gc/rm``)
* :mod:`~dcp_ext.manager.retention`: which steps to delete (pure policy)
* :mod:`~dcp_ext.manager.signals`: preemption signal handlers
"""

from .manager import CheckpointManager
from .retention import RetentionPolicy, StepRecord, steps_to_delete
from .root import CheckpointRoot, StepEntry, StepInfo

__all__ = ["CheckpointManager", "CheckpointRoot", "RetentionPolicy", "StepEntry", "StepInfo", "StepRecord",
           "steps_to_delete"]
