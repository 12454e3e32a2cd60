"""dcp-ext: storage, staging and resharding plugins for ``torch.distributed.checkpoint``.

Hand our objects to stock DCP::

    import torch.distributed.checkpoint as dcp
    import dcp_ext

    dcp.save(state, storage_writer=dcp_ext.storage_writer("/ckpt/step_100"))
    dcp.load(state, storage_reader=dcp_ext.storage_reader("/ckpt/step_100"))
"""

from __future__ import annotations

from .config import Config, load_config
from .errors import (
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
)
from .storage import Backend, backends, register_backend, storage_reader, storage_writer

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
    "backends",
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
    ZeroAdam,
    flat_state_pieces,
    optimizer_state,
    range_to_boxes,
)

__all__ += [
    "FlatBufferSpec",
    "FlatParam",
    "OptimizerState",
    "OptimizerStateError",
    "ZeroAdam",
    "flat_state_pieces",
    "optimizer_state",
    "range_to_boxes",
]
from .errors import StagingBudgetError, StagingError, StagingPoolBusyError  # noqa: E402
from .staging import PooledStager, async_save  # noqa: E402

__all__ += ["PooledStager", "StagingBudgetError", "StagingError", "StagingPoolBusyError", "async_save"]

from .errors import PersistError  # noqa: E402
from .storage.tiered import (  # noqa: E402
    PersistHandle,
    PersistResult,
    TieredStorageReader,
    TieredStorageWriter,
    TierStatus,
    pending_persists,
    tier_status,
    wait_persisted,
)

__all__ += ["PersistError", "PersistHandle", "PersistResult", "TieredStorageReader", "TieredStorageWriter",
            "TierStatus", "pending_persists", "tier_status", "wait_persisted"]

from .manager import CheckpointManager, StepInfo  # noqa: E402  (issue 16: checkpoint manager)

__all__ += ["CheckpointManager", "StepInfo"]
from .convert import ConvertReport, DiffReport, diff_checkpoints, export_checkpoint, import_checkpoint  # noqa: E402
from .errors import CheckpointKeyError, ConvertError  # noqa: E402

__all__ += ["CheckpointKeyError", "ConvertError", "ConvertReport", "DiffReport", "diff_checkpoints", "export_checkpoint",
            "import_checkpoint"]
