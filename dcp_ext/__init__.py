"""dcp-ext: storage, staging and resharding plugins for ``torch.distributed.checkpoint``.

Hand our objects to stock DCP::

    import torch.distributed.checkpoint as dcp
    import dcp_ext

    dcp.save(state, storage_writer=dcp_ext.storage_writer("/ckpt/step_100"))
    dcp.load(state, storage_reader=dcp_ext.storage_reader("/ckpt/step_100"))
"""

from __future__ import annotations

import re as _re

import torch as _torch

#: the oldest torch dcp-ext runs on (CI tests 2.13; tests/old_torch.sh checks this one by hand:
#: docs/architecture.md, "The torch floor")
MIN_TORCH = (2, 7)


def _check_torch(version: str) -> None:
    """Refuse a torch older than :data:`MIN_TORCH` with an error that says what to do.

    Older torch would fail deep inside DCP calls (its planner, metadata and async APIs differ
    beyond what :mod:`dcp_ext.torch_compat` bridges), long after import; pip enforces the floor,
    but a torch installed some other way (conda, ``--no-deps``) would not be checked.
    """
    m = _re.match(r"(\d+)\.(\d+)", version)
    if m and (int(m.group(1)), int(m.group(2))) < MIN_TORCH:
        raise ImportError(f"dcp-ext needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, but torch {version} is installed: "
                          f"pip install 'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}'")


_check_torch(_torch.__version__)

from .config import Config, load_config  # noqa: E402
from .errors import (  # noqa: E402
    BucketNotFoundError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    DcpExtError,
    IncompleteCheckpointError,
    MissingDependencyError,
    StorageAuthError,
    StorageError,
    UnknownBackendError,
    UnsafePickleError,
    UnsupportedFormatError,
)
from .storage import Backend, backends, register_backend, storage_reader, storage_writer  # noqa: E402
from .storage.compression import extension_registry  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BucketNotFoundError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "Config",
    "ConfigError",
    "CorruptCheckpointError",
    "DcpExtError",
    "IncompleteCheckpointError",
    "MissingDependencyError",
    "StorageAuthError",
    "StorageError",
    "UnknownBackendError",
    "UnsafePickleError",
    "UnsupportedFormatError",
    "backends",
    "extension_registry",
    "load_config",
    "register_backend",
    "storage_reader",
    "storage_writer",
]

# --- feature modules (each issue adds its public names below this line) ---
from .errors import LayoutError, ReshardError
from .layout import GlobalPieces, ParallelLayout, Piece, PieceMap, ShardSpec, TensorMapping
from .planner import ReshardLoadPlanner, ReshardReport, ReshardSavePlanner, saved_layout

__all__ += [
    "GlobalPieces",
    "LayoutError",
    "ParallelLayout",
    "Piece",
    "PieceMap",
    "ReshardError",
    "ReshardLoadPlanner",
    "ReshardReport",
    "ReshardSavePlanner",
    "ShardSpec",
    "TensorMapping",
    "saved_layout",
]

from .optim import (  # noqa: E402  (issue 6: optimizer state)
    FlatBufferSpec,
    FlatParam,
    OptimizerState,
    OptimizerStateError,
    flat_state_pieces,
    optimizer_state,
    range_to_boxes,
)

__all__ += [
    "FlatBufferSpec",
    "FlatParam",
    "OptimizerState",
    "OptimizerStateError",
    "flat_state_pieces",
    "optimizer_state",
    "range_to_boxes",
]
from .errors import StagingBudgetError, StagingError, StagingPoolBusyError  # noqa: E402
from .staging import PooledStager, async_save  # noqa: E402

__all__ += ["PooledStager", "StagingBudgetError", "StagingError", "StagingPoolBusyError", "async_save"]

from .errors import CheckpointMismatchError, PeerLostError, PersistError  # noqa: E402
from .tiered import (  # noqa: E402
    PersistHandle,
    PersistResult,
    ResumeOutcome,
    TieredStorageReader,
    TieredStorageWriter,
    TierStatus,
    newest_loadable,
    pending_persists,
    resume_persists,
    tier_status,
    wait_persisted,
)

__all__ += ["CheckpointMismatchError", "PeerLostError", "PersistError", "PersistHandle", "PersistResult",
            "ResumeOutcome", "TieredStorageReader", "TieredStorageWriter", "TierStatus", "newest_loadable",
            "pending_persists", "resume_persists", "tier_status", "wait_persisted"]

from .manager import CheckpointManager, StepInfo  # noqa: E402  (issue 16: checkpoint manager)

__all__ += ["CheckpointManager", "StepInfo"]
from .convert import ConvertReport, DiffReport, diff_checkpoints, export_checkpoint, import_checkpoint  # noqa: E402
from .errors import CheckpointKeyError, ConvertError  # noqa: E402

__all__ += ["CheckpointKeyError", "ConvertError", "ConvertReport", "DiffReport", "diff_checkpoints", "export_checkpoint",
            "import_checkpoint"]


def __getattr__(name: str) -> object:
    if name == "ZeroAdam":  # moved out of the package (examples/zero_adam.py): say so
        from .optim import ZEROADAM_MOVED

        raise AttributeError(ZEROADAM_MOVED)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
