"""One typed configuration for every dcp-ext backend.

Sources, highest precedence first:

1. explicit keyword options (``storage_writer(url, io_threads=4, s3={"part_size": ...})``),
2. ``DCP_EXT_*`` environment variables (``DCP_EXT_IO_THREADS=4``,
   ``DCP_EXT_S3_PART_SIZE=16MiB``: section name, then key),
3. a TOML or YAML file (``config="ckpt.toml"``, or the ``DCP_EXT_CONFIG`` variable),
   or a ``dict`` passed as ``config=``,
4. the defaults.

The top-level options are defined here, the ``[tier]`` and ``[manager]`` sections in
:mod:`dcp_ext.sections` (re-exported). Every other section belongs
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
from .integrity import ALGORITHMS, DEFAULT_ALGORITHM
from .options import ByteSize, Options, coerce, field_types, parse_size, supported_type
from .sections import ManagerOptions, TensorStoreOptions, TierOptions

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
    #: saving only: the block checksum algorithm, ``"xxh3_64"`` (about 2x faster) or ``"crc32c"``
    #: (readable by dcp-ext releases before xxh3); loads use whatever the checkpoint records. Not
    #: the TensorStore backend's: zarr3 chunks carry crc32c by format
    checksum_algorithm: str = DEFAULT_ALGORITHM
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
        if self.checksum_algorithm not in ALGORITHMS:
            raise ConfigError(f"checksum_algorithm: must be one of {', '.join(repr(a) for a in ALGORITHMS)}, got "
                              f"{self.checksum_algorithm!r}")
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
