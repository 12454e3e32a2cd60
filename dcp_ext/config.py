"""One typed configuration for every dcp-ext backend.

Sources, highest precedence first:

1. explicit keyword options (``storage_writer(url, io_threads=4, s3={"part_size": ...})``),
2. ``DCP_EXT_*`` environment variables (``DCP_EXT_IO_THREADS=4``,
   ``DCP_EXT_S3_PART_SIZE=16MiB``: section name, then key),
3. a TOML or YAML file (``config="ckpt.toml"``, or the ``DCP_EXT_CONFIG`` variable),
   or a ``dict`` passed as ``config=``,
4. the defaults below.

Unknown keys and values of the wrong type are :class:`~dcp_ext.errors.ConfigError`\\ s that
name the key and list the valid ones. Byte sizes accept ints or strings such as
``"16MiB"``/``"1GB"``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

__all__ = [
    "Config",
    "FsOptions",
    "FsspecOptions",
    "S3Options",
    "GCSOptions",
    "TierOptions",
    "TensorStoreOptions",
    "ManagerOptions",
    "load_config",
    "parse_size",
]

ENV_PREFIX = "DCP_EXT_"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
          "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
          "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4}


class ByteSize(int):
    """Marker type for fields that accept ``"16MiB"``-style strings."""


def parse_size(value: Any, key: str = "size") -> int:
    """Parse ``123``, ``"64KiB"``, ``"1.5GB"`` into bytes; ConfigError otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a byte size (int or '16MiB'), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and (m.group(2) or "").lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    raise ConfigError(f"{key}: expected a byte size (int or e.g. '16MiB'), got {value!r}")


@dataclass
class FsOptions:
    """Local / NFS backend."""

    #: call fsync on data files, the metadata and the directory (turn off only for scratch)
    fsync: bool = True
    #: use O_DIRECT-free buffered writes of this size when streaming records
    write_buffer: ByteSize = ByteSize(8 * 1024 * 1024)


@dataclass
class FsspecOptions:
    """Generic fsspec backend (``memory://``, ``hdfs://``, ...)."""

    #: passed to ``fsspec.filesystem(protocol, **storage_options)``
    storage_options: dict = field(default_factory=dict)


@dataclass
class S3Options:
    """S3 backend (botocore). Credentials, endpoint and region follow the AWS conventions
    (``AWS_*`` environment variables, ``~/.aws`` files, instance roles) unless given here."""

    #: e.g. ``http://127.0.0.1:9000`` for MinIO; default: ``AWS_ENDPOINT_URL(_S3)`` or AWS
    endpoint_url: str | None = None
    #: default: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's region, ``us-east-1``
    region: str | None = None
    #: a named profile of ``~/.aws/config`` / ``~/.aws/credentials`` (default: ``AWS_PROFILE``)
    profile: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    #: ``"path"`` or ``"virtual"`` bucket addressing (default: botocore's choice)
    addressing_style: str | None = None
    #: multipart part size; every part but the last has exactly this size
    part_size: ByteSize = ByteSize(16 * 1024 * 1024)
    #: parts uploaded concurrently per process (bounds memory: about part_size x (this + files))
    max_concurrency: int = 8
    #: retries per request on throttling (503 SlowDown), 5xx and dropped connections (the
    #: default rides out a minute or two of outage: 24 retries, backoff capped at 10 s)
    max_retries: int = 24
    #: first backoff delay in seconds (doubles per retry, with full jitter)
    retry_base_delay: float = 0.2
    #: longest backoff delay in seconds
    retry_max_delay: float = 10.0
    #: extra ``botocore.config.Config`` keyword arguments (e.g. ``{"read_timeout": 120}``)
    client_config: dict = field(default_factory=dict)


@dataclass
class GCSOptions:
    """GCS backend (JSON API). Application-default credentials unless a token is given."""

    project: str | None = None
    #: None (application-default credentials; anonymous for an emulator), "anon", the path
    #: of a service-account JSON key, or "google_default"
    token: str | None = field(default=None, repr=False)
    #: emulator / custom endpoint; default: ``STORAGE_EMULATOR_HOST`` when set, else Google's
    endpoint_url: str | None = None
    #: chunk size of resumable uploads (a multiple of 256 KiB), or part size with composite uploads
    part_size: ByteSize = ByteSize(16 * 1024 * 1024)
    #: upload a large file as parallel part objects composed at the end (like gcloud's parallel
    #: composite uploads) instead of one resumable upload: faster for one huge file on real GCS,
    #: but costs extra operations, and emulators copy the data again to compose it
    composite_uploads: bool = False
    max_concurrency: int = 8
    max_retries: int = 24
    retry_base_delay: float = 0.2
    retry_max_delay: float = 10.0
    #: seconds to wait for a connection / for data before a request counts as dropped
    timeout: float = 60.0


@dataclass
class TierOptions:
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


@dataclass
class TensorStoreOptions:
    """TensorStore (zarr3) backend: each global tensor one zarr3 array (``docs/backends.md``)."""

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
    #: ``"auto"`` (one array per tensor unless its shard boundaries admit no sensible chunk
    #: grid, then one array per saved box), ``"global"`` or ``"per_box"``
    layout: str = "auto"
    #: extra kvstore spec entries (e.g. ``{"requester_pays": true}``); driver, bucket and path
    #: come from the URL
    kvstore: dict = field(default_factory=dict)

    def validate(self) -> None:
        """ConfigError naming the key for any out-of-range value."""
        if self.chunk_size < 1024:
            raise ConfigError(f"tensorstore.chunk_size: must be >= 1KiB, got {self.chunk_size}")
        if self.shard_size and self.shard_size < self.chunk_size:
            raise ConfigError(f"tensorstore.shard_size: must be >= tensorstore.chunk_size ({self.chunk_size}) "
                              f"or None/0 for no shards, got {self.shard_size}")
        if self.compression not in (None, "none", "zstd"):
            raise ConfigError(f"tensorstore.compression: must be 'zstd' or None, got {self.compression!r}")
        if not -131072 <= self.compression_level <= 22:
            raise ConfigError(f"tensorstore.compression_level: must be in -131072..22 (zstd), got "
                              f"{self.compression_level}")
        for k in ("concurrency", "copy_concurrency"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"tensorstore.{k}: must be >= 1, got {v}")
        if self.inflight_bytes < 1024 * 1024:
            raise ConfigError(f"tensorstore.inflight_bytes: must be >= 1MiB, got {self.inflight_bytes}")
        if self.layout not in ("auto", "global", "per_box"):
            raise ConfigError(f"tensorstore.layout: must be 'auto', 'global' or 'per_box', got {self.layout!r}")


@dataclass
class ManagerOptions:
    """:class:`dcp_ext.CheckpointManager` (``[manager]``): when to save, what to keep, how."""

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

    def validate(self) -> None:
        """ConfigError naming the key for any out-of-range value."""
        m = self
        for name in ("interval", "keep_last", "keep_every", "keep_best"):
            v = getattr(m, name)
            if v is not None and v < 1:
                raise ConfigError(f"manager.{name}: must be >= 1, got {v}")
        if m.best_mode not in ("min", "max"):
            raise ConfigError(f"manager.best_mode: must be 'min' or 'max', got {m.best_mode!r}")
        if m.keep_best is not None and not m.best_metric:
            raise ConfigError("manager.keep_best needs manager.best_metric: the metrics= key that ranks checkpoints")
        if m.step_digits < 0 or m.step_digits > 20:
            raise ConfigError(f"manager.step_digits: must be 0..20, got {m.step_digits}")
        if not m.step_prefix or "/" in m.step_prefix or m.step_prefix.strip() != m.step_prefix:
            raise ConfigError(f"manager.step_prefix: must be a non-empty name without '/' or surrounding spaces, "
                              f"got {m.step_prefix!r}")
        if m.timeout <= 0:
            raise ConfigError(f"manager.timeout: must be > 0 seconds, got {m.timeout}")
        import signal

        for name in m.save_on_signal:
            if not isinstance(name, str) or not isinstance(getattr(signal, name.upper(), None), signal.Signals):
                raise ConfigError(f"manager.save_on_signal: {name!r} is not a signal name of this platform "
                                  f"(e.g. 'SIGTERM', 'SIGUSR1')")
        for k in m.exclude:
            if not isinstance(k, str) or not k:
                raise ConfigError(f"manager.exclude: expected state keys (strings), got {k!r}")


@dataclass
class Config:
    """Everything a dcp-ext writer or reader can be told."""

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
    fs: FsOptions = field(default_factory=FsOptions)
    fsspec: FsspecOptions = field(default_factory=FsspecOptions)
    s3: S3Options = field(default_factory=S3Options)
    gcs: GCSOptions = field(default_factory=GCSOptions)
    tier: TierOptions = field(default_factory=TierOptions)
    tensorstore: TensorStoreOptions = field(default_factory=TensorStoreOptions)
    manager: ManagerOptions = field(default_factory=ManagerOptions)

    def validate(self) -> "Config":
        if self.io_threads < 1:
            raise ConfigError(f"io_threads: must be >= 1, got {self.io_threads}")
        if self.files_per_rank is not None and self.files_per_rank < 1:
            raise ConfigError(f"files_per_rank: must be >= 1, got {self.files_per_rank}")
        if self.checksum_block_size < 4096:
            raise ConfigError(
                f"checksum_block_size: must be >= 4096 bytes, got {self.checksum_block_size}")
        for name, sec in (("s3", self.s3), ("gcs", self.gcs)):
            if sec.part_size < 5 * 1024 * 1024:
                raise ConfigError(f"{name}.part_size: must be >= 5MiB (S3 minimum), got {sec.part_size}")
            if sec.max_concurrency < 1:
                raise ConfigError(f"{name}.max_concurrency: must be >= 1, got {sec.max_concurrency}")
            if sec.max_retries < 0:
                raise ConfigError(f"{name}.max_retries: must be >= 0, got {sec.max_retries}")
            if sec.retry_base_delay < 0:
                raise ConfigError(f"{name}.retry_base_delay: must be >= 0 seconds, got {sec.retry_base_delay}")
            if sec.retry_max_delay < sec.retry_base_delay:
                raise ConfigError(f"{name}.retry_max_delay: must be >= retry_base_delay ({sec.retry_base_delay}), "
                                  f"got {sec.retry_max_delay}")
        if self.s3.addressing_style not in (None, "path", "virtual", "auto"):
            raise ConfigError(f"s3.addressing_style: must be 'path', 'virtual' or 'auto', got "
                              f"{self.s3.addressing_style!r}")
        if self.gcs.part_size % (256 * 1024):
            raise ConfigError(f"gcs.part_size: must be a multiple of 256 KiB (GCS resumable uploads), got "
                              f"{self.gcs.part_size}")
        if self.gcs.timeout <= 0:
            raise ConfigError(f"gcs.timeout: must be > 0 seconds, got {self.gcs.timeout}")
        t = self.tier
        if t.keep_last < 1:
            raise ConfigError(f"tier.keep_last: must be >= 1, got {t.keep_last}")
        if t.ranks_per_node is not None and t.ranks_per_node < 1:
            raise ConfigError(f"tier.ranks_per_node: must be >= 1, got {t.ranks_per_node}")
        if t.chunk_size < 4096:
            raise ConfigError(f"tier.chunk_size: must be >= 4096 bytes, got {t.chunk_size}")
        if t.persist_timeout <= 0 or t.exchange_timeout <= 0:
            raise ConfigError("tier.persist_timeout and tier.exchange_timeout must be > 0 seconds")
        self.tensorstore.validate()
        self.manager.validate()
        return self

    def redacted(self) -> dict:
        """A dict view safe to log: secrets replaced by ``"***"``."""
        d = dataclasses.asdict(self)
        for sec in ("s3", "gcs"):
            for k in ("secret_access_key", "session_token", "access_key_id", "token"):
                if d[sec].get(k):
                    d[sec][k] = "***"
        return d


_SECTIONS = {f.name: f for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)
             if f.default_factory is not dataclasses.MISSING}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, tp: Any, from_env: bool) -> Any:
    """Check/convert ``value`` against the annotation ``tp``; ConfigError on mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (from_env and isinstance(value, str) and value.lower() in ("", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(key, value, a, from_env)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is ByteSize:
        return ByteSize(parse_size(value, key))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_env and isinstance(value, str):
            v = value.strip().lower()
            if v in ("1", "true", "yes", "on"):
                return True
            if v in ("0", "false", "no", "off"):
                return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_env and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if from_env and isinstance(value, str):  # DCP_EXT_MANAGER_EXCLUDE=data_loader,lr
            return [v.strip() for v in value.split(",") if v.strip()]
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        if from_env and isinstance(value, str):
            import json

            try:
                parsed = json.loads(value)
            except ValueError as e:
                raise ConfigError(f"{key}: expected a JSON object, got {value!r}") from e
            if isinstance(parsed, dict):
                return parsed
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    raise ConfigError(f"{key}: unsupported option type {tp}")  # pragma: no cover


def _apply(cfg: Config, data: Mapping[str, Any], source: str, from_env: bool = False) -> None:
    top = _field_types(Config)
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: section '{key}' must be a mapping, got {value!r}")
            section = getattr(cfg, key)
            types = _field_types(type(section))
            for k, v in value.items():
                if k not in types:
                    raise ConfigError(
                        f"{source}: unknown option '{key}.{k}'; valid options in [{key}]: "
                        f"{', '.join(sorted(types))}")
                setattr(section, k, _coerce(f"{key}.{k}", v, types[k], from_env))
        elif key in top:
            setattr(cfg, key, _coerce(key, value, top[key], from_env))
        else:
            valid = sorted([k for k in top if k not in _SECTIONS] + [f"{s}.*" for s in _SECTIONS])
            raise ConfigError(f"{source}: unknown option '{key}'; valid options: {', '.join(valid)}")


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
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        if name.startswith(ENV_PREFIX + "TEST_"):  # reserved for the test suite
            continue
        rest = name[len(ENV_PREFIX):].lower()
        for sec in sorted(_SECTIONS, key=len, reverse=True):
            if rest.startswith(sec + "_"):
                out.setdefault(sec, {})[rest[len(sec) + 1:]] = value
                break
        else:
            out[rest] = value
    return out


def load_config(config: "Config | Mapping[str, Any] | str | os.PathLike | None" = None,
                environ: Mapping[str, str] | None = None, **options: Any) -> Config:
    """Build a :class:`Config` from (lowest first) defaults, file/dict, env, explicit options.

    ``config`` may be a :class:`Config` (used as the base), a mapping, or a TOML/YAML path.
    With ``config=None`` the file named by ``DCP_EXT_CONFIG`` is used, if set.
    """
    environ = os.environ if environ is None else environ
    if isinstance(config, Config):
        cfg = dataclasses.replace(config)
        for sec in _SECTIONS:  # copy sections so callers' objects are not mutated
            setattr(cfg, sec, dataclasses.replace(getattr(config, sec)))
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
