"""Tiered checkpoints: commit to a fast local tier, persist to the durable URL in the background.

``dcp_ext.storage_writer("s3://b/run/step_100", cache="/dev/shm/dcp_ext")`` (or the ``[tier]``
config section) returns a :class:`TieredStorageWriter`; ``storage_reader`` with the same cache a
:class:`TieredStorageReader`. See ``docs/async.md`` ("Tiered checkpoints") for the protocol, the
guarantees after each kind of failure, and the tests behind them.

Modules, one concern each: :mod:`.naming` (where a copy lives), :mod:`.faststore` (fast-tier
I/O), :mod:`.topology` (nodes, partners, side groups), :mod:`.exchange` (moving objects and files
between ranks), :mod:`.records` (typed reports and decisions), :mod:`.views` (reading what a
tier holds), :mod:`.choice` (which copy to load, which files move), :mod:`.handles` and
:mod:`.persist` (background persistence), :mod:`.outcomes` (persistence in DCP's checkpoint
process), :mod:`.retention`, :mod:`.recovery` (finishing interrupted persistences),
:mod:`.writer`, :mod:`.reader`, :mod:`.sources` and :mod:`.restore` (the load's data path),
:mod:`.status` (looking at checkpoints after a restart), :mod:`.durable` (the durable tier's store).
"""

from __future__ import annotations

from ..config import Config
from ..storage import Backend
from .durable import durable_reader, durable_store
from .handles import PersistHandle, PersistResult, pending_persists, wait_persisted
from .naming import fast_dir_for
from .reader import TieredStorageReader
from .recovery import ResumeOutcome
from .status import TierStatus, newest_loadable, resume_persists, tier_status
from .writer import TieredStorageWriter

__all__ = [
    "TieredStorageWriter",
    "TieredStorageReader",
    "PersistHandle",
    "PersistResult",
    "ResumeOutcome",
    "TierStatus",
    "fast_dir_for",
    "newest_loadable",
    "pending_persists",
    "resume_persists",
    "tier_status",
    "tiered_reader",
    "tiered_writer",
    "wait_persisted",
]


def tiered_writer(url: str, config: Config, backend: Backend | None = None) -> TieredStorageWriter:
    """The tiered writer for durable ``url`` (``config.tier.cache`` set); what
    :func:`dcp_ext.storage_writer` returns with ``cache=``."""
    return TieredStorageWriter(url, config, durable_store(url, config, backend))


def tiered_reader(url: str, config: Config, backend: Backend | None = None) -> TieredStorageReader:
    """The tiered reader for durable ``url``; what :func:`dcp_ext.storage_reader` returns with ``cache=``."""
    return TieredStorageReader(url, config, durable_reader(url, config, backend))
