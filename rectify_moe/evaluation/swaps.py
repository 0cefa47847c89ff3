"""Test-time router swaps: the routers to evaluate one checkpoint under (same parameters, other routing).

A swap is a preset (`variants.PRESETS`: vanilla, ir, fr, ir_fr for the checkpoint's k), `key=value` routing fields
of `moe` (the schema's fields of kind ROUTING), or a preset followed by fields (`ir,ir_capacity_factor=None`).
`--eval_capacity_factors` sweeps every router (the checkpoint's and each swap) over capacity factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

from rectify_moe import moe as moe_lib
from rectify_moe import log, routers, variants
from rectify_moe.config import fields
from rectify_moe.config.schema import ModelConfig, MoEConfig

ALL_PRESETS = "presets"  # --swap=presets expands to the four presets
# Routing fields a test-time swap may change, and the fields that define the parameters (a checkpoint fixes them).
ROUTING_FIELDS = fields.names_of_kind(MoEConfig, fields.ROUTING)
ARCHITECTURE_FIELDS = {"model": fields.names_of_kind(ModelConfig, fields.ARCHITECTURE),
                       "moe": fields.names_of_kind(MoEConfig, fields.ARCHITECTURE)}


class EvalError(Exception):
  """A problem the user can fix; the message is one line and says what to do."""


@dataclasses.dataclass
class RouterSpec:
  """One row of the comparison: a label, the overrides relative to the checkpoint's router, the config."""
  label: str
  overrides: dict[str, Any]
  moe: Optional[MoEConfig]


def eval_capacity_factor(cfg: MoEConfig) -> float:
  return cfg.capacity_factor if cfg.eval_capacity_factor is None else cfg.eval_capacity_factor


def _parse_value(text: str) -> Any:
  text = text.strip()
  low = text.lower()
  if low in ("none", "null"):
    return None
  if low in ("true", "false"):
    return low == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
    return text[1:-1]
  return text


def preset_overrides(name: str, base: MoEConfig) -> dict[str, Any]:
  """The paper's rectification `name` for the checkpoint's k (capacity, priority and combine are kept)."""
  if name not in variants.PRESETS:
    raise EvalError(f"Unknown router preset {name!r}; use one of {list(variants.PRESETS)} (or {ALL_PRESETS!r} for "
                    "all four), or key=value swaps.")
  return variants.rectification(base.top_k, name)


def parse_swap(spec: str, base: MoEConfig) -> dict[str, Any]:
  """`"ir"`, `"top_k=2,fill_in=true"` or `"ir,eval_capacity_factor=0.5"` -> MoE field overrides.

  At most one preset name (applied first), then `key=value` routing fields. In a swap `capacity_factor`
  sets the evaluation capacity (it also sets `eval_capacity_factor`). Fields that define the parameters
  (num_experts, expert_dim, activation, ...) are rejected.
  """
  hints = fields.type_hints(MoEConfig)
  explicit: dict[str, Any] = {}
  presets = []
  for token in (t.strip() for t in spec.split(",")):
    if not token:
      continue
    if "=" not in token:
      presets.append(token)
      continue
    key, value = (s.strip() for s in token.split("=", 1))
    key = key[len("moe."):] if key.startswith("moe.") else key
    if key == "router":
      explicit["router"] = _router_swap(spec, _parse_value(value), base)
      continue
    if key not in ROUTING_FIELDS:
      for section, names in ARCHITECTURE_FIELDS.items():
        if key in names:
          raise EvalError(f"Swap {spec!r} changes {section}.{key}, which defines the model's parameters; a router "
                          f"swap may only change routing fields: {', '.join(ROUTING_FIELDS)}.")
      if key in hints:
        raise EvalError(f"Swap {spec!r}: moe.{key} is not a routing field; a router swap may only change: "
                        f"{', '.join(ROUTING_FIELDS)}.")
      raise EvalError(f"Swap {spec!r}: unknown field {key!r}; a router swap may change: "
                      f"{', '.join(ROUTING_FIELDS)} (or name a preset: {', '.join(variants.PRESETS)}).")
    try:
      explicit[key] = fields.coerce(f"moe.{key}", hints[key], _parse_value(value))
    except fields.ConfigError as e:
      raise EvalError(f"Swap value {e}") from None
  if len(presets) > 1:
    raise EvalError(f"Swap {spec!r} names {len(presets)} presets ({', '.join(presets)}); use one per swap, "
                    f"e.g. 'ir_fr' for IR + FR.")
  overrides: dict[str, Any] = preset_overrides(presets[0], base) if presets else {}
  if "capacity_factor" in explicit and "eval_capacity_factor" not in explicit:
    explicit["eval_capacity_factor"] = explicit["capacity_factor"]
  overrides.update(explicit)
  if "router" in overrides:  # a greedy / expert-choice router takes no top-k or rectification: turn them off
    swapped, _ = routers.applicable(dataclasses.replace(base, **overrides))
    overrides.update({k: getattr(swapped, k) for k in routers.RECTIFIABLE_ONLY if getattr(swapped, k) !=
                      overrides.get(k, getattr(base, k))})
  # K > 1 cannot use the top-1 straight-through combine: fall back to normalized unless asked explicitly.
  k = overrides.get("top_k", base.top_k) + int(overrides.get("fill_in", base.fill_in))
  if k != 1 and overrides.get("straight_through", base.straight_through) and "straight_through" not in explicit:
    overrides["straight_through"] = False
  return overrides


# Routers holding exactly the softmax router's parameters (a `kernel` [D, E]): a swap may exchange them.
KERNEL_ROUTERS = ("top_k", "expert_choice", "base_layer")


def _router_swap(spec: str, value: Any, base: MoEConfig) -> str:
  """The router of a `router=NAME` swap, if it holds the checkpoint router's parameters."""
  if value not in KERNEL_ROUTERS or base.router not in KERNEL_ROUTERS or base.expert_bias_update_rate > 0:
    raise EvalError(f"Swap {spec!r}: moe.router={value!r} cannot replace the checkpoint's router {base.router!r} "
                    f"(other parameters); a router swap works between {', '.join(KERNEL_ROUTERS)} without an expert "
                    "bias.")
  return value


def router_specs(base: Optional[MoEConfig], swaps: Sequence[str] = (),
                 eval_capacity_factors: Sequence[float] = (),
                 config_overrides: Optional[dict[str, Any]] = None) -> list[RouterSpec]:
  """The routers to evaluate: the checkpoint's own, each swap, then each of those at each capacity factor.

  Args:
    base: the checkpoint's MoE config (None for a dense model: no swaps possible).
    swaps: swap specs (see `parse_swap`); "presets" expands to vanilla, ir, fr, ir_fr.
    eval_capacity_factors: sweep every router (the checkpoint's and each swap) over these factors.
    config_overrides: routing fields where eval.py's --config differs from the checkpoint's router: a swap row
      "--config (...)" after the checkpoint's own.

  Raises:
    EvalError: a bad swap, or one that gives an invalid MoE config.
  """
  expanded: list[str] = []
  for spec in swaps:
    expanded.extend(variants.PRESETS if spec.strip() == ALL_PRESETS else [spec.strip()])
  if base is None:
    if expanded or eval_capacity_factors:
      raise EvalError("This model has no MoE layers (model.moe_every=0): there is no router to swap.")
    return [RouterSpec("checkpoint (dense)", {}, None)]
  for cf in eval_capacity_factors:
    if not cf > 0:
      raise EvalError(f"--eval_capacity_factors: {cf} must be > 0.")

  def make(label: str, overrides: dict[str, Any]) -> RouterSpec:
    try:
      cfg = dataclasses.replace(base, **overrides)
      cfg.validate()
    except ValueError as e:
      raise EvalError(f"Router {label!r} is not a valid MoE config: {log.one_line(e)}") from None
    return RouterSpec(label, overrides, cfg)

  rows = [make(f"checkpoint ({moe_lib.describe(base)})", {})]
  if config_overrides:
    rows.append(make(f"--config ({moe_lib.describe(dataclasses.replace(base, **config_overrides))})",
                     dict(config_overrides)))
  for spec in expanded:
    overrides = parse_swap(spec, base)
    label = spec
    if spec in variants.PRESETS:
      label = f"{spec} ({moe_lib.describe(dataclasses.replace(base, **overrides))})"
    rows.append(make(label, overrides))
  base_rows = list(rows)
  for cf in eval_capacity_factors:
    for row in base_rows:
      swept = make(f"{row.label} @cf={cf:g}", {**row.overrides, "eval_capacity_factor": float(cf)})
      if swept.moe.capacity(False) != row.moe.capacity(False):  # else the row above says the same
        rows.append(swept)
  return rows
