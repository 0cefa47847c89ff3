"""docs/config_reference.md, generated from the schema (a test fails when the file and the schema drift apart).

  python -m rectify_moe.config.reference            # rewrite docs/config_reference.md
  python -m rectify_moe.config.reference --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing
from typing import Any

from rectify_moe.config import fields, schema

DOC_PATH = os.path.join("docs", "config_reference.md")

HEADER = """# Config reference

Generated from `rectify_moe/config/schema.py` by `python -m rectify_moe.config.reference`; do not edit by hand.

Every `configs/*.py` starts from the schema's defaults (`schema.default_config()`), so every field below exists in
every config and can be overridden on the command line, for example
`python train.py --config=configs/default.py --config.moe.top_k=2 --workdir=runs/x`. Optional fields take
`--config.moe.ir_mode=None`. An unknown field, or a bad value, fails in one line before anything compiles.
The column `configs/default.py` shows where the default experiment differs from the schema.
"""


def _type(hint: Any) -> str:
  allowed = fields.choices(hint)
  inner, nullable = fields.split_optional(hint)
  text = " \\| ".join(repr(c) for c in allowed) if allowed is not None else getattr(inner, "__name__", str(inner))
  return text + (" \\| None" if nullable else "")


def _value(value: Any) -> str:
  return "" if value is _SAME else f"`{value!r}`"


_SAME = object()


def rows(section_cls: type, path: str, default_values: dict[str, Any]) -> list[str]:
  hints = typing.get_type_hints(section_cls)
  out = []
  for f in fields.fields_of(section_cls):
    hint = hints[f.name]
    if dataclasses.is_dataclass(hint):
      continue
    default = f.default
    given = default_values.get(f.name, default)
    marks = {fields.ARCHITECTURE: " (architecture)", fields.ROUTING: " (router swap)"}.get(f.metadata["kind"], "")
    out.append(f"| `{fields.join(path, f.name)}` | {_type(hint)} | `{default!r}` | "
               f"{_value(_SAME if given == default else given)} | {f.metadata['doc']}{marks} |")
  return out


def markdown() -> str:
  try:
    example = importlib.import_module("configs.default").get_config().to_dict()
  except ImportError:  # outside the repository root
    example = {}
  lines = [HEADER]
  lines.append("(architecture): defines the parameters; a checkpoint fixes it. (router swap): `eval.py --swap` may "
               "change it.\n")
  lines += ["| field | type | default | configs/default.py | meaning |", "|---|---|---|---|---|"]
  lines += rows(schema.RunConfig, "", example)
  for name, cls in schema.SECTIONS.items():
    lines.append(f"| **{name}** | | | | {cls.__doc__.strip().splitlines()[0]} |")
    lines += rows(cls, name, example.get(name, {}))
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
  parser.add_argument("--path", default=DOC_PATH)
  args = parser.parse_args(argv)
  text = markdown()
  if args.check:
    with open(args.path) as f:
      current = f.read()
    if current != text:
      print(f"{args.path} is out of date; run: python -m rectify_moe.config.reference", file=sys.stderr)
      return 1
    return 0
  with open(args.path, "w") as f:
    f.write(text)
  print(f"Wrote {args.path}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
