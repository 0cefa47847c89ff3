"""Expert Choice routing (Zhou et al., NeurIPS 2022): every expert takes its top-C tokens of the group.

- Scores `softmax(x W)` over the E experts of each token (float32), as the paper's S = Softmax(X W_g).
- Each expert picks the C tokens of the group with the highest score for it (C = the block's capacity,
  `ceil(S / E * capacity_factor * k)` with k = 1: the paper's k = n c / e with c = capacity_factor). A token may be
  picked by 0..E experts; its output is the sum of the picked experts' outputs weighted by their scores (the
  paper's gating matrix G, no renormalisation). Every expert is exactly full (padding tokens are never picked;
  an expert's slots beyond the group's valid tokens stay empty), so there is no load-balance loss.
- The table lists each token's E experts by decreasing score (its "choices"), the accepted ones with their slot;
  "dropped_choices" counts tokens whose favourite expert did not pick them, "unrouted_tokens" tokens no expert
  picked.

Not causal: an expert's choice of a token depends on the later tokens of the group, so a decoder trained with
Expert Choice sees the future through routing (the paper evaluates encoder-decoder and fine-tuning tasks). Offered
for evaluation swaps (as the official Rectify-Router code does) and for training with that caveat, printed at
start-up (`training_caveat`). Departures: no capacity-factor schedule, groups of S tokens instead of the whole batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from rectify_moe import routing
from rectify_moe.config.fields import ConfigError
from rectify_moe.routers import base

if TYPE_CHECKING:
  from rectify_moe.config.schema import MoEConfig

Array = jax.Array


def expert_choice_slots(scores: Array, token_mask: Array, capacity: int) -> Array:
  """int32[G, S, E]: each token's slot in each expert's buffer (its rank among the expert's top-C tokens), -1 where
  the expert did not pick it.

  Args:
    scores: float32[G, S, E] (non-negative: probabilities).
    token_mask: bool[G, S]; padding is never picked.
    capacity: C <= S.
  """
  groups, tokens, num_experts = scores.shape
  if capacity > tokens:
    raise ValueError(f"Expert Choice capacity C={capacity} exceeds the group of S={tokens} tokens; lower "
                     "moe.capacity_factor (C = ceil(S / E * capacity_factor)).")
  masked = jnp.where(token_mask[..., None], jax.lax.stop_gradient(scores), -1.0)
  # Shape: [G, E, C]: the picked tokens of each expert, best first (ties: lower token index).
  picked_score, picked = jax.lax.top_k(jnp.swapaxes(masked, 1, 2), capacity)
  rank = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), picked.shape)
  rank = jnp.where(picked_score >= 0, rank, -1)  # fewer valid tokens than C: the rest stay empty
  group = jnp.arange(groups)[:, None, None]
  expert = jnp.arange(num_experts)[None, :, None]
  slots = jnp.full((groups, tokens, num_experts), -1, jnp.int32)
  return slots.at[group, picked, expert].set(rank)


def expert_choice_table(probs: Array, token_mask: Array, capacity: int, top_k: int = 1) -> routing.RoutingTable:
  """The `routing.RoutingTable` of Expert Choice: K = E choices per token, by decreasing probability."""
  num_experts = probs.shape[-1]
  probs = probs.astype(jnp.float32)
  valid = token_mask.astype(bool)
  slots = expert_choice_slots(probs, valid, capacity)
  _, expert_index = jax.lax.top_k(jax.lax.stop_gradient(probs), num_experts)
  expert_index = expert_index.astype(jnp.int32)
  slot = jnp.take_along_axis(slots, expert_index, axis=-1)
  gate = routing.select(probs, expert_index)
  return routing.table_from_slots(expert_index, gate, slot, gate * (slot >= 0), valid, num_experts=num_experts,
                                  capacity=capacity, top_k=top_k, num_choices=num_experts,
                                  priority="expert_choice")


class ExpertChoiceRouter(base.Router):
  """Each expert picks its top-C tokens of the group by softmax score; parameters: `kernel` float32[D, E]."""

  training_caveat = ("moe.router='expert_choice' is not causal: each expert picks its tokens by looking at the whole "
                     "group, later tokens included, so a decoder's training loss sees the future through routing "
                     "(evaluate it as a swap on a causally trained router, or read its training losses with care).")

  def __init__(self, cfg: "MoEConfig", *, d_model: int, vocab_size: int, rngs: nnx.Rngs):
    super().__init__(cfg, d_model=d_model, vocab_size=vocab_size, rngs=rngs)
    self.kernel = base.softmax_router_kernel(cfg, d_model, rngs)

  def route(self, x: Array, ctx: base.RouteContext) -> base.RouterOutput:
    logits = base.router_logits(x, self.kernel[...])
    probs = jax.nn.softmax(logits, axis=-1)
    table = expert_choice_table(probs, ctx.token_mask, ctx.capacity, top_k=1)
    return base.output(probs, table, losses={"aux_loss": jnp.zeros((), jnp.float32)},
                       token_loss_sums={"z_loss": routing.router_z_loss(logits, ctx.token_mask, reduction="sum")})

  @classmethod
  def validate(cls, cfg: "MoEConfig") -> None:
    for name, train in (("capacity_factor", True), ("eval_capacity_factor", False)):
      try:
        capacity = cfg.capacity(train)
      except ValueError:
        continue  # MoEConfig.validate reports it
      if capacity > cfg.group_size:
        raise ConfigError(f"moe.router='expert_choice': moe.{name}={getattr(cfg, name)} gives C={capacity} slots per "
                          f"expert, more than the group of moe.group_size={cfg.group_size} tokens; lower moe.{name} "
                          f"to at most num_experts={cfg.num_experts}.")

  @classmethod
  def describe(cls, cfg: "MoEConfig") -> str:
    return "ExpertChoice"
