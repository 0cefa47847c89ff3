"""Every router, behind one protocol (`base.Router`), in a registry keyed by `moe.router`.

| name | module | router |
|---|---|---|
| "top_k" | `top_k.py` | learned softmax top-k with capacity: vanilla, Fill-in Rectification, expert-bias balancing |
| "stablemoe" | `stablemoe.py` | StableMoE: greedy top-1 by centroids, distilled token-id router frozen in stage 2 |
| "hash" | `hash_layers.py` | Hash Layers: a fixed token-id -> expert table |

Adding a router: write a module here with a `base.Router` subclass, add it to `REGISTRY`, and declare its config
fields in the `moe` section of `rectify_moe/config/schema.py`. The block, the model, the trainer and the evaluator
need no change: they reach routers only through `rectify_moe/moe.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rectify_moe.config.fields import ConfigError, closest
from rectify_moe.routers import base, hash_layers, stablemoe, top_k

if TYPE_CHECKING:
  from rectify_moe.config.schema import MoEConfig

REGISTRY: dict[str, type[base.Router]] = {
    "top_k": top_k.TopKRouter,
    "stablemoe": stablemoe.StableMoERouter,
    "hash": hash_layers.HashRouter,
}


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def get(name: str) -> type[base.Router]:
  """The router class registered as `name` (ConfigError naming the known ones otherwise)."""
  if name not in REGISTRY:
    raise ConfigError(f"moe.router={name!r} is not a router.{closest(name, REGISTRY)} Use one of "
                      f"{list(REGISTRY)}.")
  return REGISTRY[name]


def validate(cfg: "MoEConfig") -> None:
  """The router's capabilities against the block's options, then the router's own rules."""
  router = get(cfg.router)
  if not router.rectifiable and (cfg.top_k != 1 or cfg.fill_in or cfg.ir_mode is not None or cfg.gating_dropout > 0):
    raise ConfigError(f"moe.router={cfg.router!r} routes greedily to one expert: set top_k=1, fill_in=False, "
                      "ir_mode=None and gating_dropout=0 (rectification and gating dropout need a router that ranks "
                      "all experts by a softmax, e.g. 'top_k').")
  if not router.rectifiable and cfg.expert_bias_update_rate > 0:
    raise ConfigError(f"moe.expert_bias_update_rate applies to a learned top-k router, not moe.router={cfg.router!r}; "
                      "set it to 0.")
  router.validate(cfg)
