"""One typed configuration for every dcp-ext backend.

Sources, highest precedence first:

1. explicit keyword options (``storage_writer(url, io_threads=4, s3={"part_size": ...})``),
2. ``DCP_EXT_*`` environment variables (``DCP_EXT_IO_THREADS=4``,
   ``DCP_EXT_S3_PART_SIZE=16MiB``: section name, then key),
3. a TOML or YAML file (``config="ckpt.toml"``, or the ``DCP_EXT_CONFIG`` variable),
   or a ``dict`` passed as ``config=``,
4. the defaults.

The top-level options and the ``[tier]`` and ``[manager]`` sections are defined here. Every other section belongs
to a storage backend: a :class:`~dcp_ext.storage.Backend` declares its options dataclass
(``Backend(..., options=S3Options)``) and its name becomes the section (``[s3]``,
``DCP_EXT_S3_*``, ``s3={...}``, ``cfg.s3``), so a backend registered by a third party (with
``register_backend`` or the ``dcp_ext.backends`` entry-point group) gets the same sources and
the same errors as the built-in ones. An options class checks its own values in
``validate(section)``; :mod:`dcp_ext.options` says what a field may be and parses values.

Unknown keys and values of the wrong type are :class:`~dcp_ext.errors.ConfigError`\\ s that
name the key and list the valid ones. Byte sizes accept ints or strings such as
``"16MiB"``/``"1GB"``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import re
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import ConfigError
from .options import ByteSize, Options, coerce, field_types, parse_size, supported_type

if TYPE_CHECKING:
    from .storage.fs import FsOptions
    from .storage.fsspec import FsspecOptions
    from .storage.gcs import GCSOptions
    from .storage.s3 import S3Options

__all__ = [
    "ByteSize",
    "Config",
    "FsOptions",
    "FsspecOptions",
    "GCSOptions",
    "ManagerOptions",
    "Options",
    "S3Options",
    "TensorStoreOptions",
    "TierOptions",
    "check_options",
    "load_config",
    "parse_size",
    "section_types",
]

ENV_PREFIX = "DCP_EXT_"

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
        if self.keep_last < 1:
            raise ConfigError(f"{section}.keep_last: must be >= 1, got {self.keep_last}")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ConfigError(f"{section}.ranks_per_node: must be >= 1, got {self.ranks_per_node}")
        if self.chunk_size < 4096:
            raise ConfigError(f"{section}.chunk_size: must be >= 4096 bytes, got {self.chunk_size}")
        if self.persist_timeout <= 0 or self.exchange_timeout <= 0:
            raise ConfigError(f"{section}.persist_timeout and {section}.exchange_timeout must be > 0 seconds")
        if self.durable_check_timeout < 0:
            raise ConfigError(f"{section}.durable_check_timeout: must be >= 0 seconds, got "
                              f"{self.durable_check_timeout}")


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
        for name in ("interval", "keep_last", "keep_every", "keep_best"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{section}.{name}: must be >= 1, got {v}")
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
        for k in ("concurrency", "copy_concurrency"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"{section}.{k}: must be >= 1, got {v}")
        if self.inflight_bytes < 1024 * 1024:
            raise ConfigError(f"{section}.inflight_bytes: must be >= 1MiB, got {self.inflight_bytes}")
        if self.layout not in ("auto", "global", "per_box"):
            raise ConfigError(f"{section}.layout: must be 'auto', 'global' or 'per_box', got {self.layout!r}")


#: Sections that belong to no backend (tiering wraps any byte-store backend; the manager drives any).
_CORE_SECTIONS: dict[str, type] = {"tier": TierOptions, "manager": ManagerOptions}
#: Options classes that moved into their backend's module, importable from here as before.
_MOVED = {"FsOptions": "dcp_ext.storage.fs", "FsspecOptions": "dcp_ext.storage.fsspec",
          "S3Options": "dcp_ext.storage.s3", "GCSOptions": "dcp_ext.storage.gcs"}
#: Keyword names ``storage_writer``/``load_config`` take for themselves, and the variable prefix
#: the test suite reserves: no section may be called so.
_RESERVED_NAMES = frozenset({"config", "cache", "sections", "environ", "test"})


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    if name == "_SECTIONS":  # the section names and classes (kept for code that read the old table)
        return section_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def section_types() -> dict[str, type]:
    """Every config section by name: ``tier``, then each registered backend's options class."""
    # Imported here: the backend registry imports this module (for Config and load_config).
    from .storage import backends

    out = dict(_CORE_SECTIONS)
    for name, b in backends().items():
        if b.options is not None and name not in _CORE_SECTIONS:
            out[name] = b.options
    return out


@dataclass(eq=False, repr=False)
class Config:
    """Everything a dcp-ext writer or reader can be told.

    The fields below are the top-level options and ``tier``; each backend's section is an
    attribute named after the backend (``cfg.s3.part_size``, ``cfg.fs.fsync``, ...), created
    with its defaults on first access. ``Config(sections={"s3": S3Options(region="x")})`` sets
    sections at construction; ``dataclasses.replace(cfg, ...)`` carries them over.
    """

    #: force a backend by name instead of picking it from the URL scheme
    backend: str | None = None
    #: parallel I/O threads per rank (writes and reads)
    io_threads: int = 8
    #: data files per rank (None: one per I/O thread)
    files_per_rank: int | None = None
    #: compute block checksums when saving
    checksum: bool = True
    #: verify checksums when loading (only the blocks a rank reads)
    verify: bool = True
    #: checksum granularity: a ranged read verifies the blocks it touches
    checksum_block_size: ByteSize = ByteSize(1024 * 1024)
    #: allow saving over an existing *complete* checkpoint
    overwrite: bool = False
    #: show progress bars for long work (None: only when stderr is a terminal)
    progress: bool | None = None
    #: loading only: refuse a checkpoint saved by a different number of ranks (for state
    #: that is per rank and cannot be resharded, e.g. RNG or data-loader positions)
    expect_world_size: int | None = None
    #: loading only: unpickle non-tensor values and stock ``.metadata`` fully (can run code: only
    #: for checkpoints you trust); off, they load with weights-only semantics plus a documented
    #: allowlist (docs/config.md)
    allow_pickle: bool = False
    #: saving only: ``"zstd"`` compresses each checksum block of a tensor as its own zstd frame
    #: (ranged loads still read only the blocks they need; stock readers load it as stock's
    #: ``ZStandard``); None: no compression
    compression: str | None = None
    #: zstd level (-131072..22; higher: smaller and slower; negative: faster than 1)
    compression_level: int = 3
    #: store a tensor (by a sample of it) or a block compressed only if it shrinks by at least
    #: this factor; otherwise it is stored raw, and no CPU is spent on what does not compress
    compression_min_ratio: float = 1.1
    #: byte-shuffle each block by element size before compressing it (float exponents group:
    #: about 1.1x smaller on trained weights and Adam moments); stock ``FileSystemReader`` then
    #: needs ``_extension_registry=dcp_ext.extension_registry()``
    compression_shuffle: bool = False
    tier: TierOptions = field(default_factory=TierOptions)
    manager: ManagerOptions = field(default_factory=ManagerOptions)
    #: backend sections to start from, by name (not a field: read back through ``.sections``)
    sections: InitVar[Mapping[str, Any] | None] = None

    if TYPE_CHECKING:  # the built-in backends' sections, for type checkers
        fs: FsOptions
        fsspec: FsspecOptions
        s3: S3Options
        gcs: GCSOptions
        tensorstore: TensorStoreOptions

    def __post_init__(self, sections: Mapping[str, Any] | None) -> None:
        for name, value in (sections or {}).items():
            if name in _FIELD_NAMES:
                raise ConfigError(f"sections: {name!r} is not a backend section (pass it as {name}=...)")
            setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not set: a backend section not touched yet.
        if not name.startswith("_"):
            cls = section_types().get(name)
            if cls is not None:
                section = self.__dict__[name] = cls()
                return section
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIELD_NAMES or name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        cls = section_types().get(name)
        if cls is None:
            raise AttributeError(f"Config has no option or section {name!r}; options: "
                                 f"{', '.join(_valid_keys())}")
        if not isinstance(value, cls):
            raise ConfigError(f"section '{name}' must be an instance of {cls.__name__}, got {type(value).__name__}")
        self.__dict__[name] = value

    def _backend_sections(self) -> dict[str, Any]:
        """Every backend section (created with its defaults if untouched), by name."""
        return {name: getattr(self, name) for name in section_types() if name not in _FIELD_NAMES}

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (all(getattr(self, n) == getattr(other, n) for n in _FIELD_NAMES)
                and self._backend_sections() == other._backend_sections())

    __hash__ = None  # type: ignore[assignment]  # mutable, like any non-frozen dataclass

    def __repr__(self) -> str:
        parts = [f"{n}={getattr(self, n)!r}" for n in _FIELD_NAMES]
        parts += [f"{n}={v!r}" for n, v in self.__dict__.items() if n not in _FIELD_NAMES and not n.startswith("_")]
        return f"{type(self).__name__}({', '.join(parts)})"

    def validate(self) -> "Config":
        """Check every value (the top level here, each section in its ``validate``); returns self."""
        if self.io_threads < 1:
            raise ConfigError(f"io_threads: must be >= 1, got {self.io_threads}")
        if self.files_per_rank is not None and self.files_per_rank < 1:
            raise ConfigError(f"files_per_rank: must be >= 1, got {self.files_per_rank}")
        if self.checksum_block_size < 4096:
            raise ConfigError(
                f"checksum_block_size: must be >= 4096 bytes, got {self.checksum_block_size}")
        if self.compression == "none":
            self.compression = None
        if self.compression is not None:
            from .storage.compression import CODECS, MAX_BLOCK_BYTES

            if self.compression not in CODECS:
                raise ConfigError(f"compression: must be one of {', '.join(repr(c) for c in CODECS)} or None, got "
                                  f"{self.compression!r}")
            if self.checksum_block_size > MAX_BLOCK_BYTES:
                raise ConfigError(f"checksum_block_size: must be <= {MAX_BLOCK_BYTES // 2**20}MiB with compression "
                                  f"(each block is one zstd frame), got {self.checksum_block_size}")
        if not -131072 <= self.compression_level <= 22:
            raise ConfigError(f"compression_level: must be in -131072..22 (zstd), got {self.compression_level}")
        if not self.compression_min_ratio >= 1.0:
            raise ConfigError(f"compression_min_ratio: must be >= 1.0, got {self.compression_min_ratio}")
        self.tier.validate("tier")
        self.manager.validate("manager")
        # sections left untouched hold their defaults; only the ones set are checked
        for name, section in list(self.__dict__.items()):
            if name not in _FIELD_NAMES and not name.startswith("_") and hasattr(section, "validate"):
                section.validate(name)
        return self

    def redacted(self) -> dict:
        """A dict view safe to log: secrets (fields declared with ``repr=False``) replaced by ``"***"``."""
        d: dict[str, Any] = {}
        for name in _FIELD_NAMES:
            value = getattr(self, name)
            d[name] = _redacted(value) if dataclasses.is_dataclass(value) else value
        for name, section in self._backend_sections().items():
            d[name] = _redacted(section)
        return d


def _sections_of(self: Config) -> dict[str, Any]:
    """A copy of every backend section, by name: what ``dataclasses.replace`` passes on."""
    return {name: copy.copy(section) for name, section in self._backend_sections().items()}


# ``sections`` is an init-only argument, so ``dataclasses.replace(cfg, ...)`` reads it back from
# the instance: this property hands it the sections, which would be lost otherwise.
Config.sections = property(_sections_of)  # type: ignore[assignment,method-assign]
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Config))


def _redacted(section: Any) -> dict:
    d = dataclasses.asdict(section)
    for f in dataclasses.fields(section):
        if not f.repr and d.get(f.name):
            d[f.name] = "***"
    return d


def _valid_keys() -> list[str]:
    sections = section_types()
    return sorted([k for k in _FIELD_NAMES if k not in sections] + [f"{s}.*" for s in sections])


def check_options(name: str, options: Any) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``options`` can be the ``[name]`` section.

    Called by :func:`~dcp_ext.storage.register_backend` for a backend that declares options:
    the name must spell a TOML table and an environment variable, must not clash with a
    top-level option, and every field needs a default of a supported type.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"backend {name!r} declares options, so its name must be lowercase letters, digits and "
                         f"'_' (it names the [{name}] section and the DCP_EXT_<NAME>_* variables)")
    if name in _FIELD_NAMES or name in _CORE_SECTIONS or name in _RESERVED_NAMES:
        raise ValueError(f"backend {name!r} declares options, but {name!r} is already a top-level option or "
                         f"keyword of dcp_ext's config; choose another backend name")
    clash = [k for k in _FIELD_NAMES if k.startswith(name + "_")]
    if clash:
        raise ValueError(f"backend {name!r} declares options, but DCP_EXT_{name.upper()}_* variables would be "
                         f"ambiguous with DCP_EXT_{clash[0].upper()}; choose another backend name")
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise TypeError(f"backend {name!r}: options must be a dataclass type, got {options!r}")
    try:
        hints = field_types(options)
    except Exception as e:  # noqa: BLE001 - an annotation naming something undefined
        raise TypeError(f"backend {name!r}: cannot resolve the annotations of {options.__name__}: {e}") from e
    for f in dataclasses.fields(options):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"backend {name!r}: option {name}.{f.name} needs a default")
        if not supported_type(hints[f.name]):
            raise TypeError(f"backend {name!r}: option {name}.{f.name} has type {hints[f.name]}; supported: "
                            f"str, int, float, bool, ByteSize, dict, or one of them | None")


def _apply(cfg: Config, data: Mapping[str, Any], source: str, from_env: bool = False) -> None:
    top = field_types(Config)
    sections = section_types()
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: section '{key}' must be a mapping, got {value!r}")
            section = getattr(cfg, key)
            types_ = field_types(type(section))
            for k, v in value.items():
                if k not in types_:
                    raise ConfigError(
                        f"{source}: unknown option '{key}.{k}'; valid options in [{key}]: "
                        f"{', '.join(sorted(types_))}")
                setattr(section, k, coerce(f"{key}.{k}", v, types_[k], from_env))
        elif key in top:
            setattr(cfg, key, coerce(key, value, top[key], from_env))
        else:
            raise ConfigError(f"{source}: unknown option '{key}'; valid options: {', '.join(_valid_keys())}")


def _read_file(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    if p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{p}: invalid TOML: {e}") from e
    elif p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError as e:
            from .errors import MissingDependencyError

            raise MissingDependencyError(
                "reading a YAML config needs PyYAML: pip install 'dcp-ext[yaml]'") from e
        try:
            data = yaml.safe_load(text) or {}
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
    else:
        raise ConfigError(f"{p}: config files must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    # Allow the options to live under a [dcp_ext] table of a larger file.
    if set(data) == {"dcp_ext"}:
        data = data["dcp_ext"]
    return data


def _env_options(environ: Mapping[str, str]) -> dict:
    """Map ``DCP_EXT_IO_THREADS`` / ``DCP_EXT_S3_PART_SIZE`` to nested option dicts."""
    out: dict[str, Any] = {}
    sections = sorted(section_types(), key=len, reverse=True)
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        if name.startswith(ENV_PREFIX + "TEST_"):  # reserved for the test suite
            continue
        rest = name[len(ENV_PREFIX):].lower()
        for sec in sections:
            if rest.startswith(sec + "_"):
                out.setdefault(sec, {})[rest[len(sec) + 1:]] = value
                break
        else:
            out[rest] = value
    return out


def load_config(config: "Config | Mapping[str, Any] | str | os.PathLike | None" = None,
                environ: Mapping[str, str] | None = None, **options: Any) -> Config:
    """Build a :class:`Config` from (lowest first) defaults, file/dict, env, explicit options.

    ``config`` may be a :class:`Config` (used as the base, not modified), a mapping, or a
    TOML/YAML path. With ``config=None`` the file named by ``DCP_EXT_CONFIG`` is used, if set.
    """
    environ = os.environ if environ is None else environ
    if isinstance(config, Config):
        cfg = dataclasses.replace(config)  # copies the backend sections (see Config.sections)
        cfg.tier = copy.copy(config.tier)
        cfg.manager = copy.deepcopy(config.manager)
    else:
        cfg = Config()
        if config is None and environ.get(ENV_PREFIX + "CONFIG"):
            config = environ[ENV_PREFIX + "CONFIG"]
        if isinstance(config, (str, os.PathLike)):
            _apply(cfg, _read_file(config), f"config file {os.fspath(config)}")
        elif isinstance(config, Mapping):
            _apply(cfg, config, "config dict")
        elif config is not None:
            raise ConfigError(f"config: expected a Config, dict or file path, got {type(config).__name__}")
    _apply(cfg, _env_options(environ), "environment", from_env=True)
    _apply(cfg, options, "options")
    return cfg.validate()
