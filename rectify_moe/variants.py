"""Named router variants: the Rectify-Router paper's eight, defined once and used by configs, evaluation presets,
benchmarks and tests.

A variant is a set of `moe` field overrides. The paper's (Zeng et al. 2024, official configs of ZhiYuanZeng/gpt-moe,
see docs/routing_contract.md):
- Top-1 uses the straight-through combine (forward weight 1); K > 1 the normalized one;
- FR = a top-(k+1) ranking with the capacity held at the top-k value;
- IR = 'all' for Top-1+IR, 'any' for Top-2+IR (the authors' 8-expert run), 'ignore_kth' with FR.
"""

from __future__ import annotations

from typing import Any

# The rectifications of a top-k router, by their short names (the evaluation presets).
PRESETS = ("vanilla", "ir", "fr", "ir_fr")


def rectification(top_k: int, preset: str) -> dict[str, Any]:
  """The `moe` overrides that turn a top-k router (k = `top_k`, kept) into `preset` (vanilla, ir, fr or ir_fr), as
  the paper ran it: fill_in, ir_mode and straight_through."""
  if preset not in PRESETS:
    raise ValueError(f"Unknown router preset {preset!r}; use one of {list(PRESETS)}.")
  ir, fr = preset in ("ir", "ir_fr"), preset in ("fr", "ir_fr")
  if not ir:
    ir_mode = None
  elif fr:
    ir_mode = "ignore_kth"
  else:
    ir_mode = "all" if top_k == 1 else "any"
  return dict(fill_in=fr, ir_mode=ir_mode, straight_through=top_k == 1 and not fr)


def paper_name(top_k: int, preset: str) -> str:
  """'top1', 'top2_ir_fr', ... (the config and study name of a paper variant)."""
  return f"top{top_k}" + ("" if preset == "vanilla" else f"_{preset}")


# The paper's eight variants: Top-1 and Top-2, each vanilla, +IR, +FR, +IR+FR.
PAPER_VARIANTS: dict[str, dict[str, Any]] = {
    paper_name(k, preset): dict(top_k=k, **rectification(k, preset)) for k in (1, 2) for preset in PRESETS}

# What the paper configs set besides the rectification: the normalized combine (where straight-through is off)
# and the official IR's exact buffer (no IR capacity: S slots per local expert; cheap with one expert per device).
PAPER_DEFAULTS = dict(combine="normalized", ir_capacity_factor=None)


def paper_overrides(name: str) -> dict[str, Any]:
  """All `moe` overrides of the paper variant `name` (e.g. 'top2_fr')."""
  if name not in PAPER_VARIANTS:
    raise ValueError(f"Unknown router variant {name!r}; use one of {sorted(PAPER_VARIANTS)}.")
  return {**PAPER_VARIANTS[name], **PAPER_DEFAULTS}


# The comparison set (docs/methods.md): dropless top-k (every choice computed), Expert Choice and BASE layers.
_NO_RECTIFICATION = dict(fill_in=False, ir_mode=None, ir_capacity_factor=None, straight_through=False)
BASELINE_VARIANTS: dict[str, dict[str, Any]] = {
    "top1_dropless": {**paper_overrides("top1"), "dispatch": "dropless"},
    "top2_dropless": {**paper_overrides("top2"), "dispatch": "dropless"},
    "expert_choice": dict(router="expert_choice", top_k=1, **_NO_RECTIFICATION),
    "base_layer": dict(router="base_layer", top_k=1, **_NO_RECTIFICATION),
}

# Every named variant a study or a benchmark can run: name -> all its `moe` overrides.
VARIANTS: dict[str, dict[str, Any]] = {**{name: paper_overrides(name) for name in PAPER_VARIANTS},
                                       **BASELINE_VARIANTS}


def overrides(name: str) -> dict[str, Any]:
  """The `moe` overrides of any named variant (`VARIANTS`)."""
  if name not in VARIANTS:
    raise ValueError(f"Unknown router variant {name!r}; use one of {sorted(VARIANTS)}.")
  return dict(VARIANTS[name])
