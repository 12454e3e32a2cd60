"""Typed option values: what a config section's fields may be, and how a value becomes one.

A section is a dataclass of options (:class:`Options`); each field is a ``str``, ``int``,
``float``, ``bool``, :class:`ByteSize`, ``dict``, or one of them ``| None`` (the built-in
``[manager]`` section also has ``list`` fields: from the environment, comma-separated). :func:`coerce`
checks a value from a file, a keyword or (``from_env``) an environment string against such a
type and names the key in the :class:`~dcp_ext.errors.ConfigError` it raises.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["ByteSize", "Options", "coerce", "field_types", "parse_size", "supported_type"]

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
class Options:
    """Base of a config section: a dataclass of options, every one with a default.

    Field types may be ``str``, ``int``, ``float``, ``bool``, :class:`ByteSize`, ``dict``, or
    any of them ``| None``. A field declared with ``field(repr=False)`` is a secret: hidden from
    ``repr`` and replaced by ``"***"`` in :meth:`~dcp_ext.config.Config.redacted`. Subclassing is optional (any
    dataclass of such fields is a section); ``validate`` is the hook for value checks.
    """

    def validate(self, section: str) -> None:
        """Raise :class:`~dcp_ext.errors.ConfigError` naming ``section.key`` for a bad value."""

    def require_at_least(self, section: str, names: str, minimum: float, unit: str = "") -> None:
        """ConfigError ``section.key: must be >= minimum [unit], got value`` for the first of the
        space-separated field ``names`` that is set (not None) and below ``minimum``."""
        for name in names.split():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ConfigError(f"{section}.{name}: must be >= {minimum}{' ' + unit if unit else ''}, got {value}")


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's field names and their resolved annotations."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_SCALARS = (ByteSize, bool, int, float, str, dict)


def supported_type(tp: Any) -> bool:
    """Whether :func:`coerce` handles the annotation ``tp``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return all(a is type(None) or supported_type(a) for a in typing.get_args(tp))
    return tp in _SCALARS or typing.get_origin(tp) is dict


def coerce(key: str, value: Any, tp: Any, from_env: bool) -> Any:
    """Check/convert ``value`` against the annotation ``tp``; ConfigError on mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_env and isinstance(value, str) and value.lower() in ("", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(key, value, a, from_env)
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
