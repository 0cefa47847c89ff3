"""Typed config sections built from ml_collections / dict mappings, with unknown fields named."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_mapping(cls: type[T], values: Any, section: str) -> T:
  """`cls(**values)`; unknown keys raise one ValueError naming them and listing the valid fields."""
  values = dict(values)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"Unknown {section} config field(s) {unknown}; valid fields: {sorted(known)}.")
  return cls(**values)
