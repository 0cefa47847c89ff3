"""BASE layers (Lewis et al., ICML 2021): a balanced assignment of tokens to experts in training, greedy top-1 in
evaluation.

- Scores `x W` (float32, W: `kernel` [D, E], the experts' embeddings).
- Training: every expert takes exactly C = S / E tokens of each group, the assignment maximising the summed scores
  (`balanced_assignment`: an auction algorithm, optimal within S * eps; O(S * E) per bidding round). No gradient
  flows through the assignment; nothing is dropped and no balancing loss is needed.
- Evaluation: each token to its best-scoring expert (greedy, as the paper's test time), placed by the evaluation
  capacity like any top-1 router (so an eval capacity sweep applies; `moe.dispatch='dropless'` drops nothing).
  A training capacity below S / E (capacity_factor < 1) cuts each expert's balanced share like any capacity: the
  later tokens of the group are dropped.
- Combine weight: sigmoid of the token's score for its expert, the paper's `h + sigmoid(h . w_e) f_e(h)`; the router
  learns through it.

Departures from the paper: groups of S tokens per device instead of the whole batch over all workers (the
assignment stays per shard, like every router here); the auction replaces the paper's (also auction-based)
assignment; padding tokens score 0 for every expert and take slots like any token (they are never dispatched).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from rectify_moe import balanced_assignment, routing
from rectify_moe.config.fields import ConfigError
from rectify_moe.routers import base

if TYPE_CHECKING:
  from rectify_moe.config.schema import MoEConfig

Array = jax.Array

# Final auction increment, relative to each group's score range (the summed score is within S * eps of optimal).
AUCTION_EPS = 1e-3


def assign(scores: Array, token_mask: Array) -> Array:
  """int32[G, S]: the balanced assignment of each group (padding scores 0 everywhere)."""
  scores = jnp.where(token_mask[..., None], jax.lax.stop_gradient(scores).astype(jnp.float32), 0.0)
  spread = jnp.max(scores, axis=(1, 2)) - jnp.min(scores, axis=(1, 2))
  eps = AUCTION_EPS * jnp.maximum(spread, 1e-6)
  return jax.vmap(lambda s, e: balanced_assignment.balanced_assignment(s, eps=e)[0])(scores, eps)


class BaseLayerRouter(base.Router):
  """Balanced assignment in training, greedy top-1 in evaluation, sigmoid gate; parameters: `kernel` [D, E]."""

  def __init__(self, cfg: "MoEConfig", *, d_model: int, vocab_size: int, rngs: nnx.Rngs):
    super().__init__(cfg, d_model=d_model, vocab_size=vocab_size, rngs=rngs)
    self.kernel = base.softmax_router_kernel(cfg, d_model, rngs)

  def route(self, x: Array, ctx: base.RouteContext) -> base.RouterOutput:
    num_experts = self.cfg.num_experts
    scores = base.router_logits(x, self.kernel[...])
    choice = assign(scores, ctx.token_mask) if ctx.train else jnp.argmax(jax.lax.stop_gradient(scores), axis=-1)
    onehot = jax.nn.one_hot(choice, num_experts, dtype=jnp.float32)
    table = routing.route_top_k(onehot, top_k=1, capacity=ctx.capacity, priority="position", combine="probs",
                                token_mask=ctx.token_mask)
    gate = jax.nn.sigmoid(jnp.take_along_axis(scores, choice[..., None], axis=-1))  # [G, S, 1]
    weight = gate * table.accepted
    table = table.replace(gate=gate, combine_weight=weight, combine=table.dispatch * weight[..., None])
    return base.output(jax.nn.softmax(scores, axis=-1), table, losses={"aux_loss": jnp.zeros((), jnp.float32)},
                       token_loss_sums={"z_loss": routing.router_z_loss(scores, ctx.token_mask, reduction="sum")})

  @classmethod
  def validate(cls, cfg: "MoEConfig") -> None:
    if cfg.group_size % cfg.num_experts:
      raise ConfigError(f"moe.router='base_layer' gives every expert exactly S/E tokens: moe.group_size="
                        f"{cfg.group_size} must be divisible by moe.num_experts={cfg.num_experts}.")

  @classmethod
  def describe(cls, cfg: "MoEConfig") -> str:
    return "BASE"
