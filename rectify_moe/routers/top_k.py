"""The learned softmax top-k router with capacity: vanilla Switch / GShard top-k, Fill-in Rectification, and
auxiliary-loss-free balancing by an expert bias.

- Probabilities `softmax(x W)` in float32 over all E experts; k ranked choices (k + 1 under Fill-in Rectification,
  whose extra choice only takes slots the top-k demand left empty) placed by `routing.route_top_k`.
- Losses: the Switch load-balance loss "aux_loss" (weighted by train.aux_loss_weight) and the router z-loss
  "z_loss" (train.z_loss_weight), both from the probabilities before capacity.
- Expert bias (DeepSeek-V3's auxiliary-loss-free balancing; MaxText `routed_bias_update_rate`, Megatron-Core's
  expert bias), on when `moe.expert_bias_update_rate` > 0: a per-expert bias b, added to the probabilities for
  choosing the experts only (gates and combine weights stay the unbiased probabilities), and updated after every
  step from the step's global demand (top-k choices per expert before capacity):
  `b_e += rate * sign(mean_e(load) - load_e)`. b is `RouterState`: not trained, checkpointed, the same on every
  device (the loads are mesh-global).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from rectify_moe import routing
from rectify_moe.routers import base

if TYPE_CHECKING:
  from rectify_moe.config.schema import MoEConfig

Array = jax.Array


class TopKRouter(base.Router):
  """Softmax top-k with capacity; the router every Rectify-Router variant rectifies."""

  rectifiable = True

  def __init__(self, cfg: "MoEConfig", *, d_model: int, vocab_size: int, rngs: nnx.Rngs):
    super().__init__(cfg, d_model=d_model, vocab_size=vocab_size, rngs=rngs)
    self.kernel = base.softmax_router_kernel(cfg, d_model, rngs)
    if cfg.expert_bias_update_rate > 0:
      self.expert_bias = base.RouterState(jnp.zeros((cfg.num_experts,), jnp.float32))

  def route(self, x: Array, ctx: base.RouteContext) -> base.RouterOutput:
    cfg = self.cfg
    logits = base.router_logits(x, self.kernel[...])
    probs = jax.nn.softmax(logits, axis=-1)
    bias = self.expert_bias[...] if cfg.expert_bias_update_rate > 0 else None
    table = routing.route_top_k(probs, top_k=cfg.top_k, capacity=ctx.capacity, priority=cfg.priority,
                                fill_in=cfg.fill_in, fill_in_priority=cfg.fill_in_priority, combine=cfg.combine,
                                straight_through=cfg.straight_through, token_mask=ctx.token_mask, eps=cfg.eps,
                                selection_bias=bias)
    aux = routing.load_balance_loss(probs, table.expert_index[..., :cfg.top_k], ctx.token_mask,
                                    all_k=cfg.load_balance_all_k)
    return base.output(probs, table, losses={"aux_loss": aux},
                       token_loss_sums={"z_loss": routing.router_z_loss(logits, ctx.token_mask, reduction="sum")})

  def after_step(self, metrics: dict[str, Any]) -> None:
    rate = self.cfg.expert_bias_update_rate
    if rate > 0:
      self.expert_bias[...] = expert_bias_update(self.expert_bias[...], metrics["counts"]["expert_demand"], rate)

  @classmethod
  def describe(cls, cfg: "MoEConfig") -> str:
    name = f"Top-{cfg.top_k}"
    if cfg.ir_mode is not None:
      name += f"+IR({cfg.ir_mode})"
    if cfg.fill_in:
      name += "+FR"
    if cfg.expert_bias_update_rate > 0:
      name += "+bias"
    return name


def expert_bias_update(bias: Array, load: Array, rate: float) -> Array:
  """`bias + rate * sign(mean(load) - load)`: float32[E] from the step's global load [E] (choices per expert)."""
  load = jnp.asarray(load, jnp.float32)
  return (bias + rate * jnp.sign(jnp.mean(load) - load)).astype(jnp.float32)
