"""Exceptions raised by dcp-ext. All derive from :class:`DcpExtError` (an ``Exception``).

Note that stock DCP wraps errors raised on any rank into
``torch.distributed.checkpoint.api.CheckpointException``, which derives from
``BaseException``; our messages are kept intact inside it.
"""

from __future__ import annotations

__all__ = [
    "DcpExtError",
    "ConfigError",
    "UnknownBackendError",
    "MissingDependencyError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CorruptCheckpointError",
    "CheckpointExistsError",
    "StorageError",
    "StorageAuthError",
    "BucketNotFoundError",
    "LayoutError",
    "ReshardError",
    "OptimizerStateError",
    "StagingError",
    "StagingBudgetError",
    "StagingPoolBusyError",
    "PersistError",
    "ConvertError",
    "CheckpointKeyError",
    "CheckpointMismatchError",
    "PeerLostError",
    "UnsafePickleError",
    "UnsupportedFormatError",
]


class DcpExtError(Exception):
    """Base class of every error dcp-ext raises on purpose."""


class ConfigError(DcpExtError, ValueError):
    """A configuration key is unknown, or a value has the wrong type or range."""


class UnknownBackendError(ConfigError):
    """No backend is registered for a URL scheme or backend name."""


class MissingDependencyError(DcpExtError, ImportError):
    """An optional dependency for a backend is not installed (the message names the extra)."""


class CheckpointNotFoundError(DcpExtError, FileNotFoundError):
    """The checkpoint location does not exist."""


class IncompleteCheckpointError(DcpExtError):
    """The location holds data but no committed metadata: a save never finished there."""


class CorruptCheckpointError(DcpExtError):
    """Stored bytes do not match their checksum, or a file is truncated or unreadable."""


class CheckpointExistsError(DcpExtError, FileExistsError):
    """Saving over an existing complete checkpoint without ``overwrite=True``."""


class StorageError(DcpExtError, OSError):
    """An I/O operation failed for good (after retries); the message names the object."""


class StorageAuthError(StorageError, PermissionError):
    """The object store refused our credentials (or found none); the message says where to set them."""


class BucketNotFoundError(StorageError, FileNotFoundError):
    """The bucket named in an ``s3://`` / ``gs://`` URL does not exist."""


class LayoutError(DcpExtError, ValueError):
    """A parallel layout, shard spec or piece is invalid, or a tensor does not fit its layout."""


class ReshardError(DcpExtError, RuntimeError):
    """A resharding save/load plan is inconsistent: colliding chunks, missing or unexpected keys,
    shape mismatches (the message names the saved and the target layout)."""


class OptimizerStateError(DcpExtError, ValueError):
    """Optimizer state or a flat-buffer description does not fit the model/optimizer."""


class StagingError(DcpExtError):
    """Staging a state dict into host memory failed (unsupported value, misuse of a stager)."""


class StagingBudgetError(StagingError, ConfigError):
    """The staging pool needed for a state dict does not fit the configured memory budget."""


class StagingPoolBusyError(StagingError, TimeoutError):
    """Every staging pool is still held by an unfinished upload and the wait timed out."""


class PersistError(StorageError):
    """Persisting a fast-tier checkpoint to its durable location failed (tiered writer).

    Raised by ``wait_persisted()`` / the ``persisted`` future; the message names the object.
    """


class ConvertError(DcpExtError, ValueError):
    """A conversion (``dcp-ext convert``, :func:`dcp_ext.export_checkpoint` /
    :func:`dcp_ext.import_checkpoint`) cannot proceed: unsupported input, a key selection that
    matches nothing, colliding names, or an output that already exists."""


class CheckpointKeyError(DcpExtError, KeyError):
    """A key (FQN) or step asked for is not in the checkpoint or root; the message lists what is."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointMismatchError(DcpExtError, ValueError):
    """The ranks of one collective call (a tiered load, ``newest_loadable``) were given different
    checkpoints; the message names what each rank asked for."""


class PeerLostError(DcpExtError, RuntimeError):
    """A rank died, hung past its timeout or became unreachable during one of dcp-ext's own
    exchanges between ranks (tiered replication, restore, agreement); nothing was committed."""


class UnsafePickleError(DcpExtError):
    """Loading a value (or stock ``.metadata``) would need full unpickling, which can run code;
    refused unless ``allow_pickle=True`` (the message names the key and the option)."""


class UnsupportedFormatError(DcpExtError):
    """A checkpoint, or an item of it, is stored in a format this reader cannot read (an unknown
    stream transform, a safetensors dtype or header it does not know); the message names it."""
