"""Every router, behind one protocol (`base.Router`), in a registry keyed by `moe.router`.

| name | module | router |
|---|---|---|
| "top_k" | `top_k.py` | learned softmax top-k with capacity: vanilla, Fill-in Rectification, expert-bias balancing |
| "stablemoe" | `stablemoe.py` | StableMoE: greedy top-1 by centroids, distilled token-id router frozen in stage 2 |
| "hash" | `hash_layers.py` | Hash Layers: a fixed token-id -> expert table |
| "expert_choice" | `expert_choice.py` | Expert Choice: each expert takes its top-C tokens of the group (not causal) |
| "base_layer" | `base_layer.py` | BASE layers: balanced assignment (auction) in training, greedy top-1 in evaluation |

Adding a router: write a module here with a `base.Router` subclass, add it to `REGISTRY`, and declare its config
fields in the `moe` section of `rectify_moe/config/schema.py`. The block, the model, the trainer and the evaluator
need no change: they reach routers only through `rectify_moe/moe.py`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from rectify_moe.config.fields import ConfigError, closest
from rectify_moe.routers import base, base_layer, expert_choice, hash_layers, stablemoe, top_k

if TYPE_CHECKING:
  from rectify_moe.config.schema import MoEConfig

REGISTRY: dict[str, type[base.Router]] = {
    "top_k": top_k.TopKRouter,
    "stablemoe": stablemoe.StableMoERouter,
    "hash": hash_layers.HashRouter,
    "expert_choice": expert_choice.ExpertChoiceRouter,
    "base_layer": base_layer.BaseLayerRouter,
}


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def get(name: str) -> type[base.Router]:
  """The router class registered as `name` (ConfigError naming the known ones otherwise)."""
  if name not in REGISTRY:
    raise ConfigError(f"moe.router={name!r} is not a router.{closest(name, REGISTRY)} Use one of "
                      f"{list(REGISTRY)}.")
  return REGISTRY[name]


# Block options that need a router ranking all experts by a softmax (`base.Router.rectifiable`), at their "off" values.
RECTIFIABLE_ONLY = dict(top_k=1, fill_in=False, ir_mode=None, straight_through=False, gating_dropout=0.0,
                        expert_bias_update_rate=0.0)


def applicable(cfg: "MoEConfig") -> tuple["MoEConfig", list[str]]:
  """`cfg` without the options its router does not use, and a 'field=value' list of what was turned off.

  A greedy router (StableMoE, hash) routes every token to one expert: top-k, rectification, Gating Dropout and the
  expert bias do not apply to it. Entry points call this before validating, so switching the router of a config
  that rectifies (`--config.moe.router=hash` on configs/default.py) runs, saying what it turned off.
  """
  if get(cfg.router).rectifiable:
    return cfg, []
  changed = {k: v for k, v in RECTIFIABLE_ONLY.items() if getattr(cfg, k) != v}
  return dataclasses.replace(cfg, **changed), [f"moe.{k}={getattr(cfg, k)!r}" for k in changed]


def validate(cfg: "MoEConfig") -> None:
  """The router's capabilities against the block's options, then the router's own rules."""
  router = get(cfg.router)
  _, unused = applicable(cfg)
  if unused:
    raise ConfigError(f"moe.router={cfg.router!r} routes greedily to one expert and cannot use {', '.join(unused)}: "
                      f"set {', '.join(f'moe.{k}={v!r}' for k, v in RECTIFIABLE_ONLY.items())} (top-k, rectification, "
                      "Gating Dropout and the expert bias need a router that ranks all experts, e.g. 'top_k').")
  router.validate(cfg)
