"""Command-line overrides of a config (`--config.moe.top_k=2`), checked against the schema before absl parses them.

`ml_collections.config_flags` applies `--config.a.b=v` overrides, but an unknown or misspelled field dies in a long
traceback, and `None` cannot be given for optional fields. `preparse(argv)` runs first, in the entry point:
- every `--config.PATH` must name a schema field (else one line naming it and the closest valid name);
- `--config.PATH=None` (None, none or null) for an optional field is taken out of argv and applied after parsing
  (`apply_none(config, paths)`); for a field that cannot be None it is an error.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

from rectify_moe.config import fields
from rectify_moe.config.fields import ConfigError

NONE_WORDS = ("none", "null")


def _resolve(root: type, path: str) -> tuple[type, str]:
  """(section class, field name) of a dotted path; ConfigError if some part does not exist."""
  cls, parts = root, path.split(".")
  for depth, part in enumerate(parts):
    names = [f.name for f in fields.fields_of(cls)]
    where = ".".join(parts[:depth])
    if part not in names:
      raise ConfigError(f"Unknown config field {path!r}.{fields.closest(part, names, where)} Valid fields"
                        f"{f' of {where}' if where else ''}: {', '.join(sorted(names))}.")
    hint = typing.get_type_hints(cls)[part]
    if depth == len(parts) - 1:
      return cls, part
    if not dataclasses.is_dataclass(hint):
      raise ConfigError(f"Config field {'.'.join(parts[:depth + 1])!r} is a value, not a section; "
                        f"{path!r} does not exist.")
    cls = hint
  raise AssertionError(path)


def preparse(argv: Sequence[str], root: type, flag: str = "config") -> tuple[list[str], list[str]]:
  """Checks the `--{flag}.PATH` overrides in argv against the schema `root`.

  Returns:
    (argv without the None overrides, the dotted paths set to None).

  Raises:
    ConfigError: an unknown field, or None for a field that cannot be None.
  """
  out, none_paths = [], []
  prefixes = (f"--{flag}.", f"--no{flag}.")
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith(prefixes):
      out.append(arg)
      i += 1
      continue
    body = arg[len(prefixes[0]):] if arg.startswith(prefixes[0]) else arg[len(prefixes[1]):]
    path, has_value, value = body.partition("=")
    cls, name = _resolve(root, path)
    if not has_value and arg.startswith(prefixes[0]) and i + 1 < len(args) and not args[i + 1].startswith("--"):
      hint = typing.get_type_hints(cls)[name]
      if fields.split_optional(hint)[0] is not bool:  # `--config.x value` (bools take no separate value)
        value, has_value = args[i + 1], True
        i += 1
        arg = f"{arg}={value}"
    if has_value and value.strip().lower() in NONE_WORDS:
      if not fields.is_optional(cls, name):
        raise ConfigError(f"{flag}.{path}=None is not allowed: the field needs a value (see "
                          "docs/config_reference.md).")
      none_paths.append(path)
    else:
      out.append(arg)
    i += 1
  return out, none_paths


def apply_none(config: Any, paths: Sequence[str]) -> Any:
  """Sets each dotted path of `config` (a ConfigDict) to None."""
  for path in paths:
    *parents, name = path.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[name] = None
  return config
