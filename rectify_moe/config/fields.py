"""Typed config sections: fields with a default and a one-line meaning, checked types, ConfigDict round trips.

A section is a frozen dataclass whose fields are declared with `field(default, doc, ...)`. From it:
- `to_config_dict(section)`: the ml_collections ConfigDict a `configs/*.py` file starts from (optional fields that
  default to None become typed placeholders, so `--config.x=0.5` still parses);
- `from_mapping(cls, values, path)`: the typed section from a ConfigDict / dict; unknown keys, wrong types, values
  outside a choice (`Literal`) or a range fail with one line naming the field, the value and the fix.

The checks here are the generic ones (type, choice, range); cross-field rules live in each section's `validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Optional, TypeVar, Union

import ml_collections
from ml_collections import config_dict

T = TypeVar("T")


class ConfigError(ValueError):
  """A config value a user can fix; the message is one line that names the field and the fix."""


# Field kinds that other modules read (metadata["kind"]):
ARCHITECTURE = "architecture"  # defines the parameters or the function they compute (a checkpoint fixes it)
ROUTING = "routing"            # a test-time router swap may change it (same parameters)


def field(default: Any, doc: str, *, kind: str = "", min: Optional[float] = None, max: Optional[float] = None,
          min_exclusive: bool = False, max_exclusive: bool = False) -> Any:
  """A section field: its default, a one-line meaning, and optional kind and numeric range.

  Args:
    default: the default (immutable values only).
    doc: one line; it is the field's entry in docs/config_reference.md.
    kind: `ARCHITECTURE`, `ROUTING` or "" (see above).
    min, max: inclusive numeric bounds (`min_exclusive`: value must be > min; `max_exclusive`: < max).
  """
  return dataclasses.field(default=default, metadata={"doc": doc, "kind": kind, "min": min, "max": max,
                                                       "min_exclusive": min_exclusive, "max_exclusive": max_exclusive})


def fields_of(cls_or_instance: Any) -> tuple[dataclasses.Field, ...]:
  return dataclasses.fields(cls_or_instance)


def names_of_kind(cls: type, kind: str) -> tuple[str, ...]:
  return tuple(f.name for f in fields_of(cls) if f.metadata.get("kind") == kind)


def type_hints(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def split_optional(hint: Any) -> tuple[Any, bool]:
  """(inner type, None allowed) of `Optional[X]` / `X | None`; (hint, False) otherwise."""
  if typing.get_origin(hint) in (Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(hint)) == 2:
      return args[0], True
  return hint, False


def is_optional(cls: type, name: str) -> bool:
  return split_optional(type_hints(cls)[name])[1]


def choices(hint: Any) -> Optional[tuple[Any, ...]]:
  """The allowed values of a `Literal[...]` hint (inside Optional too), else None."""
  inner, _ = split_optional(hint)
  return typing.get_args(inner) if typing.get_origin(inner) is Literal else None


def closest(name: str, candidates: typing.Iterable[str], section: str = "") -> str:
  """' Did you mean section.X?' for the closest candidate X, or ''."""
  match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
  return f" Did you mean {join(section, match[0])!r}?" if match else ""


def coerce(path: str, hint: Any, value: Any) -> Any:
  """`value` as the field's type, or ConfigError."""
  inner, nullable = split_optional(hint)
  if isinstance(value, config_dict.FieldReference):
    value = value.get()
  if value is None or (nullable and isinstance(value, str) and value.strip().lower() in ("none", "null")):
    if nullable:
      return None
    raise ConfigError(f"{path}=None is not allowed; give a value of type {_type_name(inner)}.")
  allowed = choices(inner)
  if allowed is not None:
    if value in allowed and not isinstance(value, bool):
      return value
    raise ConfigError(f"{path}={value!r}; use one of {list(allowed)}{' or None' if nullable else ''}.")
  if inner is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
      return value.strip().lower() == "true"
  elif inner is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
  elif inner is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif inner is str:
    if isinstance(value, str):
      return value
  elif inner is Any:
    return value
  else:
    raise TypeError(f"unsupported config field type {inner!r} for {path}")
  raise ConfigError(f"{path}={value!r} is not of type {_type_name(inner)}.")


def _type_name(hint: Any) -> str:
  return getattr(hint, "__name__", str(hint))


def check_range(path: str, value: Any, meta: Mapping[str, Any]) -> None:
  if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
    return
  lo, hi = meta.get("min"), meta.get("max")
  if lo is not None:
    if meta.get("min_exclusive") and not value > lo:
      raise ConfigError(f"{path}={value} must be > {lo}.")
    if not meta.get("min_exclusive") and not value >= lo:
      raise ConfigError(f"{path}={value} must be >= {lo}.")
  if hi is not None:
    if meta.get("max_exclusive") and not value < hi:
      raise ConfigError(f"{path}={value} must be < {hi}.")
    if not meta.get("max_exclusive") and not value <= hi:
      raise ConfigError(f"{path}={value} must be <= {hi}.")


def join(path: str, name: str) -> str:
  return f"{path}.{name}" if path else name


def from_mapping(cls: type[T], values: Any, path: str = "") -> T:
  """The typed section `cls` from a mapping (ConfigDict or dict); missing keys take their defaults.

  A class attribute `ALIASES = {field: {old value: new value}}` maps older spellings of a value.

  Raises:
    ConfigError: an unknown key (with the closest valid name), a value of the wrong type, outside its choices
      or outside its range.
  """
  if isinstance(values, cls):
    return values
  values = dict(values.items()) if values is not None else {}
  hints = type_hints(cls)
  names = [f.name for f in fields_of(cls)]
  unknown = sorted(set(values) - set(names))
  if unknown:
    where = f" of {path}" if path else ""
    raise ConfigError(f"Unknown config field {join(path, unknown[0])}.{closest(unknown[0], names, path)} Valid fields"
                      f"{where}: {', '.join(sorted(names))}.")
  aliases = getattr(cls, "ALIASES", {})
  kwargs = {}
  for f in fields_of(cls):
    if f.name not in values:
      continue
    sub = join(path, f.name)
    hint = hints[f.name]
    value = values[f.name]
    if dataclasses.is_dataclass(hint):
      kwargs[f.name] = from_mapping(hint, value, sub)
      continue
    if isinstance(value, config_dict.FieldReference):
      value = value.get()
    if f.name in aliases and isinstance(value, (str, bool)) and value in aliases[f.name]:
      value = aliases[f.name][value]
    kwargs[f.name] = coerce(sub, hint, value)
    check_range(sub, kwargs[f.name], f.metadata)
  return cls(**kwargs)


def to_config_dict(section: Any) -> ml_collections.ConfigDict:
  """The ConfigDict of a section instance (nested sections become nested ConfigDicts)."""
  hints = type_hints(type(section))
  out = ml_collections.ConfigDict()
  for f in fields_of(section):
    value = getattr(section, f.name)
    if dataclasses.is_dataclass(value):
      out[f.name] = to_config_dict(value)
      continue
    inner, nullable = split_optional(hints[f.name])
    if value is None and nullable:
      base = inner if choices(inner) is None else type(choices(inner)[0])
      out[f.name] = config_dict.placeholder(base)
    else:
      out[f.name] = value
  return out


def as_dict(section: Any) -> dict[str, Any]:
  return dataclasses.asdict(section)
