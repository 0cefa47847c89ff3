"""A run's saved config (`WORKDIR/config.json`): checked before a resume, written only once the run is set up.

The architecture fields (those of kind `ARCHITECTURE` in the schema: they fix the parameters) of a workdir that holds
checkpoints cannot change; the first differing one is named in one line with both values. `write` replaces the file
atomically, so a run that fails before it (a bad data config, a busy workdir) leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from rectify_moe.config import fields, schema
from rectify_moe.config.fields import ConfigError


def load(path: str, fix: str = "restore it or use a new --workdir") -> Optional[schema.RunConfig]:
  """The resolved config saved at `path` (None when there is none; ConfigError ending in `fix` when it cannot be
  read)."""
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      values = json.load(f)
    return schema.resolve(values)[0]
  except (OSError, ValueError) as e:
    raise ConfigError(f"Cannot read the saved config {path} ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                      f"{fix}.") from None


def architecture_fields(cfg: schema.RunConfig, with_moe: bool = False) -> dict[str, Any]:
  """{'model.d_model': 128, ...}: the fields that fix the parameters (MoE ones for a model with MoE layers, or
  always with `with_moe`)."""
  out = {f"model.{n}": getattr(cfg.model, n) for n in fields.names_of_kind(schema.ModelConfig, fields.ARCHITECTURE)}
  if cfg.model.num_moe_layers or with_moe:
    out.update({f"moe.{n}": getattr(cfg.moe, n) for n in fields.names_of_kind(schema.MoEConfig, fields.ARCHITECTURE)})
  return out


def resume_fields(cfg: schema.RunConfig) -> dict[str, Any]:
  """The architecture fields, and those that are not parameter shapes but that a resume under another value would
  read the checkpoints wrongly with: the stored dtype, and the token ids the data iterator's state and the
  embeddings refer to."""
  return {**architecture_fields(cfg), "model.param_dtype": cfg.model.param_dtype,
          "data.tokenizer": cfg.data.tokenizer}


def first_difference(now: dict[str, Any], before: dict[str, Any]) -> Optional[str]:
  """The first field (in `now`'s order, then `before`'s) whose values differ, or None."""
  return next((n for n in [*now, *(n for n in before if n not in now)] if now.get(n) != before.get(n)), None)


def check_unchanged(cfg: schema.RunConfig, path: str) -> None:
  """Raises ConfigError at the first resume field (`resume_fields`) that differs from the config saved at `path`."""
  saved = load(path)
  if saved is None:
    return
  now, before = resume_fields(cfg), resume_fields(saved)
  name = first_difference(now, before)
  if name is not None:
    raise ConfigError(f"{name}={now.get(name)!r} but this workdir's checkpoints have {name}="
                      f"{before.get(name)!r} ({path}); use a new --workdir for another architecture, or "
                      f"{name}={before.get(name)!r} to resume.")


def write(cfg: schema.RunConfig, mesh_shape: tuple[int, int], path: str) -> None:
  """Writes the run's full config (the mesh actually used) to `path`, atomically."""
  saved = fields.to_config_dict(cfg)
  saved.mesh.data, saved.mesh.expert = mesh_shape
  # How this run was launched is not part of it: eval.py or a resume may use another process count.
  saved.train.num_processes, saved.train.process_id = 0, -1
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(saved.to_json_best_effort(indent=2))
  os.replace(tmp, path)
