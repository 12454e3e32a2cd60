"""The options of the built-in sections that no storage backend module holds: ``[tier]``,
``[manager]`` and ``[tensorstore]``.

``[tier]`` and ``[manager]`` belong to the core (tiering wraps any byte-store backend, the manager
drives any); ``[tensorstore]`` is declared by the ``tensorstore`` backend but lives here so that
declaring it imports nothing of that backend's package. Each class checks its own values in
``validate(section)``; :mod:`dcp_ext.config` assembles them with the backends' sections into one
:class:`~dcp_ext.config.Config` (and re-exports them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .options import ByteSize, Options

__all__ = ["ManagerOptions", "TensorStoreOptions", "TierOptions"]


@dataclass
class TierOptions(Options):
    """Tiered checkpoints: a fast local tier committed first, the durable URL after."""

    #: fast-tier root directory (e.g. ``/dev/shm/dcp_ext``); None disables tiering
    cache: str | None = None
    #: keep this many complete checkpoints in the fast tier
    keep_last: int = 2
    #: replicate each rank's fast-tier data to a partner rank (only with more than one node)
    replicate: bool = True
    #: ranks per node, used to pick the partner (default: LOCAL_WORLD_SIZE or world size)
    ranks_per_node: int | None = None
    #: partner of rank r is (r + replica_offset) % world_size (default: ranks_per_node, i.e.
    #: the same local rank on the next node)
    replica_offset: int | None = None
    #: bytes per message when replicating / restoring / persisting files (bounds memory)
    chunk_size: ByteSize = ByteSize(16 * 1024 * 1024)
    #: seconds the background persistence waits for the other ranks' parts / the commit
    persist_timeout: float = 3600.0
    #: seconds a fast-tier exchange between ranks (replication, restore) may take
    exchange_timeout: float = 1800.0
    #: seconds the save may spend asking the durable tier whether it already holds a checkpoint
    #: (to refuse an overwrite early); an unreachable durable tier never stops the fast commit,
    #: the background persistence checks again. 0: do not ask during the save
    durable_check_timeout: float = 5.0

    def validate(self, section: str) -> None:
        self.require_at_least(section, "keep_last ranks_per_node", 1)
        self.require_at_least(section, "chunk_size", 4096, "bytes")
        if self.persist_timeout <= 0 or self.exchange_timeout <= 0:
            raise ConfigError(f"{section}.persist_timeout and {section}.exchange_timeout must be > 0 seconds")
        self.require_at_least(section, "durable_check_timeout", 0, "seconds")


@dataclass
class ManagerOptions(Options):
    """:class:`dcp_ext.CheckpointManager` (``[manager]``): when to save, what to keep, how.
    Read by the manager only; writers and readers ignore it."""

    #: save when ``step % interval == 0`` (``force=True`` and preemption signals save anyway)
    interval: int = 1
    #: keep the newest N complete checkpoints (None: no limit from this rule)
    keep_last: int | None = None
    #: also keep every checkpoint whose step is a multiple of K
    keep_every: int | None = None
    #: also keep the N best checkpoints by ``best_metric`` (needs ``best_metric``)
    keep_best: int | None = None
    #: the ``metrics=`` key that ranks checkpoints for ``keep_best``
    best_metric: str | None = None
    #: ``"min"`` (lower is better, e.g. a loss) or ``"max"`` (e.g. an accuracy)
    best_mode: str = "min"
    #: save with ``dcp.async_save`` + a pooled stager (training blocks only for a host copy)
    async_save: bool = False
    #: top-level state keys that ``load()`` leaves untouched (e.g. ``["data_loader"]``)
    exclude: list = field(default_factory=list)
    #: signal names (``["SIGTERM", "SIGUSR1"]``) after which the next ``save()``/``maybe_save()``
    #: checkpoints on every rank regardless of the interval
    save_on_signal: list = field(default_factory=list)
    #: after a save triggered by a signal, raise ``SystemExit(128 + signal number)``
    exit_on_signal: bool = True
    #: step directory name: this prefix, then the step (zero-padded to ``step_digits``)
    step_prefix: str = "step_"
    step_digits: int = 0
    #: remove incomplete leftovers of crashed saves (only directories the manager created)
    cleanup: bool = True
    #: seconds a collective of the manager's own process groups may take
    timeout: float = 1800.0

    def validate(self, section: str = "manager") -> None:
        self.require_at_least(section, "interval keep_last keep_every keep_best", 1)
        if self.best_mode not in ("min", "max"):
            raise ConfigError(f"{section}.best_mode: must be 'min' or 'max', got {self.best_mode!r}")
        if self.keep_best is not None and not self.best_metric:
            raise ConfigError(f"{section}.keep_best needs {section}.best_metric: the metrics= key that ranks "
                              f"checkpoints")
        if self.step_digits < 0 or self.step_digits > 20:
            raise ConfigError(f"{section}.step_digits: must be 0..20, got {self.step_digits}")
        if not self.step_prefix or "/" in self.step_prefix or self.step_prefix.strip() != self.step_prefix:
            raise ConfigError(f"{section}.step_prefix: must be a non-empty name without '/' or surrounding spaces, "
                              f"got {self.step_prefix!r}")
        if self.timeout <= 0:
            raise ConfigError(f"{section}.timeout: must be > 0 seconds, got {self.timeout}")
        import signal

        for name in self.save_on_signal:
            if not isinstance(name, str) or not isinstance(getattr(signal, name.upper(), None), signal.Signals):
                raise ConfigError(f"{section}.save_on_signal: {name!r} is not a signal name of this platform "
                                  f"(e.g. 'SIGTERM', 'SIGUSR1')")
        for k in self.exclude:
            if not isinstance(k, str) or not k:
                raise ConfigError(f"{section}.exclude: expected state keys (strings), got {k!r}")


@dataclass
class TensorStoreOptions(Options):
    """The ``[tensorstore]`` section: each global tensor one zarr3 array (``docs/backends.md``).

    Declared by the ``tensorstore`` backend (``Backend(..., options=TensorStoreOptions)``); it
    stays in this module so that declaring it imports nothing of the backend's package.
    """

    #: target bytes of one zarr chunk, the unit of checksums, compression and (without
    #: ``shard_size``) of files/objects and of partial reads
    chunk_size: ByteSize = ByteSize(1024 * 1024)
    #: group chunks into zarr3 shards of about this many bytes (one file/object each, read by
    #: ranges); None/0: every chunk is its own file/object
    shard_size: ByteSize | None = ByteSize(64 * 1024 * 1024)
    #: ``"zstd"`` or None (no compression)
    compression: str | None = None
    #: zstd level (-131072..22; higher: smaller and slower)
    compression_level: int = 3
    #: concurrent kvstore requests (files / S3 / GCS) per process; None: TensorStore's default on
    #: files, 4 x ``max_concurrency`` of the S3/GCS section on object stores
    concurrency: int | None = None
    #: CPU threads encoding/decoding/copying chunks per process; None: all cores
    copy_concurrency: int | None = None
    #: tensor bytes a rank keeps in flight while saving or loading (bounds memory beyond the
    #: state itself)
    inflight_bytes: ByteSize = ByteSize(256 * 1024 * 1024)
    #: on local files, write and read uncompressed chunks with dcp-ext's own code (the same
    #: zarr3 bytes, crc32c checked by the CPU's crc32 instructions; TensorStore's wheels compute
    #: it in software); False: every chunk through TensorStore
    native_file_io: bool = True
    #: with ``native_file_io``, read whole chunks straight into the destination tensor's rows and
    #: write them straight from the source rows (no scratch copy; the ``dcp_ext.storage.tensorstore._rowio`` C
    #: extension, used where it was built and the CPU has hardware crc32c); False: through a
    #: scratch buffer (the same bytes)
    native_rowio: bool = True
    #: ``"auto"`` (one array per tensor unless its shard boundaries admit no sensible chunk
    #: grid, then one array per saved box), ``"global"`` or ``"per_box"``
    layout: str = "auto"
    #: extra kvstore spec entries (e.g. ``{"requester_pays": true}``); driver, bucket and path
    #: come from the URL
    kvstore: dict = field(default_factory=dict)

    def validate(self, section: str = "tensorstore") -> None:
        """ConfigError naming the key for any out-of-range value."""
        if self.chunk_size < 1024:
            raise ConfigError(f"{section}.chunk_size: must be >= 1KiB, got {self.chunk_size}")
        if self.shard_size and self.shard_size < self.chunk_size:
            raise ConfigError(f"{section}.shard_size: must be >= {section}.chunk_size ({self.chunk_size}) "
                              f"or None/0 for no shards, got {self.shard_size}")
        if self.compression not in (None, "none", "zstd"):
            raise ConfigError(f"{section}.compression: must be 'zstd' or None, got {self.compression!r}")
        if not -131072 <= self.compression_level <= 22:
            raise ConfigError(f"{section}.compression_level: must be in -131072..22 (zstd), got "
                              f"{self.compression_level}")
        self.require_at_least(section, "concurrency copy_concurrency", 1)
        if self.inflight_bytes < 1024 * 1024:
            raise ConfigError(f"{section}.inflight_bytes: must be >= 1MiB, got {self.inflight_bytes}")
        if self.layout not in ("auto", "global", "per_box"):
            raise ConfigError(f"{section}.layout: must be 'auto', 'global' or 'per_box', got {self.layout!r}")
