"""StableMoE (Dai et al., ACL 2022): balance and distillation losses, and the true optimizer freeze.

Stage 1 (step < switch_step): route greedily (top-1) by `s = h E^T` (the router kernel), gate with
`sigmoid(s[a])`, train the balance loss and distil the assignment into a small router that reads only the
token id: `s_hat = D[token] E_hat^T` (D: [V, r], E_hat: [E, r], r = 50 in the paper).
Stage 2 (step >= switch_step) and evaluation: route by the distilled router, which is frozen for real:
`freeze_after` zeroes its optimizer updates, so neither momentum nor weight decay moves it. The gate keeps
using the original score `sigmoid(s[a])`, which keeps learning. Losses: the balance loss "aux_loss" (weighted by
train.aux_loss_weight, alpha) and the distillation loss "distill_loss" (weighted by moe.stablemoe_distill_weight),
both only in stage 1; the router z-loss "z_loss" of the scores.

Deviations from the official code, on purpose (see docs/methods.md): the MoE layer replaces the FFN of
every `moe_every`-th block (the code inserts one extra block); losses are summed over MoE layers (the code
keeps only the last layer's); padding tokens are masked out of the losses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rectify_moe import routing
from rectify_moe.routers import base

if TYPE_CHECKING:
  from rectify_moe.config.schema import MoEConfig

Array = jax.Array

# Names of the distilled-router parameters inside an MoEBlock (frozen from switch_step on).
DISTILLED_PARAMS = ("distill_embed", "distill_centroids")


def balance_loss_sum(scores: Array, assignment: Array, token_mask: Array, global_counts: Array,
                     global_tokens: Array) -> Array:
  """Sum over this shard's tokens of `((|A_i| - n_bar) / n_bar) * sigmoid(s[t, i])` for t in A_i.

  The paper's L_bal without alpha: `sum_i (|A_i| - n_bar) / n_bar * sum_{t in A_i} sigmoid(s_{t,i})`, with
  A_i the tokens assigned to expert i before capacity (over the whole routed batch: pass the psum-ed
  counts) and `n_bar = tokens / E`. The count coefficient is a constant (no gradient).

  Args:
    scores: float32[G, S, E] routing scores s = h E^T.
    assignment: int32[G, S] greedy expert a_t = argmax s.
    token_mask: bool[G, S].
    global_counts: float32[E] |A_i| over the whole batch (valid tokens).
    global_tokens: float32 scalar, valid tokens over the whole batch.

  Returns:
    float32 scalar (this shard's part of the sum; psum over shards and divide by tokens for the mean form).
  """
  num_experts = scores.shape[-1]
  n_bar = jnp.maximum(global_tokens, 1.0) / num_experts
  deviation = jax.lax.stop_gradient((global_counts - n_bar) / n_bar)  # [E]
  own = jnp.take_along_axis(scores, assignment[..., None], axis=-1)[..., 0]
  return jnp.sum(deviation[assignment] * jax.nn.sigmoid(own) * token_mask)


def distill_loss_sum(distill_scores: Array, teacher: Array, token_mask: Array) -> Array:
  """Sum over valid tokens of the cross-entropy of the distilled scores to the teacher assignment.

  Args:
    distill_scores: float32[G, S, E] s_hat = D[token] E_hat^T.
    teacher: int32[G, S] argmax of the (detached) main scores.
    token_mask: bool[G, S].

  Returns:
    float32 scalar.
  """
  log_probs = jax.nn.log_softmax(distill_scores, axis=-1)
  picked = jnp.take_along_axis(log_probs, jax.lax.stop_gradient(teacher)[..., None], axis=-1)[..., 0]
  return -jnp.sum(picked * token_mask)


class FreezeState(NamedTuple):
  count: Array


def freeze_after(switch_step: int, is_frozen) -> optax.GradientTransformation:
  """Zeroes the updates of the leaves selected by `is_frozen(path)` from update number `switch_step` on.

  Put it LAST in the optax chain: the final updates of those parameters are then exactly zero, so the
  parameters stay bit-identical (no weight decay, no momentum drift).

  Args:
    switch_step: first optimizer step (0-based count of updates) at which the leaves are frozen.
    is_frozen: predicate on a `jax.tree_util` key path.
  """

  def init(params):
    del params
    return FreezeState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    frozen_now = state.count >= switch_step

    def maybe_zero(path, update):
      if update is None or not is_frozen(path):
        return update
      return jnp.where(frozen_now, jnp.zeros_like(update), update)

    updates = jax.tree_util.tree_map_with_path(maybe_zero, updates)
    return updates, FreezeState(count=state.count + 1)

  return optax.GradientTransformation(init, update)


def is_distilled_param(path) -> bool:
  """True for the key path of a distilled-router parameter."""
  names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
  return bool(names & set(DISTILLED_PARAMS))


class StableMoERouter(base.Router):
  """Greedy top-1 by centroid scores with a sigmoid gate; a distilled token-id router from the switch step on.

  Parameters: `kernel` float32[D, E] (the centroids E^T), `distill_embed` float32[V, r], `distill_centroids`
  float32[E, r].
  """

  needs_token_ids = True

  def __init__(self, cfg: "MoEConfig", *, d_model: int, vocab_size: int, rngs: nnx.Rngs):
    super().__init__(cfg, d_model=d_model, vocab_size=vocab_size, rngs=rngs)
    self.kernel = base.softmax_router_kernel(cfg, d_model, rngs)
    replicated = lambda init: nnx.with_partitioning(init, (None, None))
    r = cfg.stablemoe_routing_dim
    self.distill_embed = nnx.Param(replicated(nnx.initializers.normal(1.0))(rngs.params(), (vocab_size, r)))
    self.distill_centroids = nnx.Param(
        replicated(nnx.initializers.orthogonal(scale=0.1))(rngs.params(), (cfg.num_experts, r)))

  def route(self, x: Array, ctx: base.RouteContext) -> base.RouterOutput:
    cfg = self.cfg
    num_experts = cfg.num_experts
    scores = base.router_logits(x, self.kernel[...])
    # Shape: [G, S, E] = einsum("gsr,er->gse")
    distilled = jnp.einsum("gsr,er->gse", self.distill_embed[...][ctx.token_ids].astype(jnp.float32),
                           self.distill_centroids[...].astype(jnp.float32))
    stage2 = (ctx.step >= cfg.stablemoe_switch_step) if ctx.train else jnp.asarray(True)
    route_scores = jax.lax.stop_gradient(jnp.where(stage2, distilled, scores))
    choice = jnp.argmax(route_scores, axis=-1)
    onehot = jax.nn.one_hot(choice, num_experts, dtype=jnp.float32)
    table = routing.route_top_k(onehot, top_k=1, capacity=ctx.capacity, priority="position", combine="probs",
                                token_mask=ctx.token_mask)
    # The gate is sigmoid of the ORIGINAL score of the chosen expert (it keeps learning in stage 2).
    gate = jax.nn.sigmoid(jnp.take_along_axis(scores, choice[..., None], axis=-1))  # [G, S, 1]
    weight = gate * table.accepted
    table = table.replace(combine_weight=weight, combine=table.dispatch * weight[..., None])

    mask = ctx.token_mask
    teacher = jnp.argmax(jax.lax.stop_gradient(scores), axis=-1)
    validf = mask.astype(jnp.float32)
    counts = ctx.global_sum(jnp.einsum("gse,gs->e", jax.nn.one_hot(teacher, num_experts), validf))
    tokens = ctx.global_sum(jnp.sum(validf))
    devices = ctx.global_sum(jnp.ones((), jnp.float32))
    # Per-device parts scaled so that their mean over the mesh is (global sum) / (global tokens).
    scale = devices / jnp.maximum(tokens, 1.0)
    stage1 = 1.0 - stage2.astype(jnp.float32)
    balance = balance_loss_sum(scores, teacher, mask, counts, tokens) * scale
    distill = distill_loss_sum(distilled, teacher, mask) * scale
    return base.output(jax.nn.softmax(scores, axis=-1), table,
                       losses={"aux_loss": stage1 * balance,
                               "distill_loss": stage1 * cfg.stablemoe_distill_weight * distill},
                       token_loss_sums={"z_loss": routing.router_z_loss(scores, mask, reduction="sum")})

  @classmethod
  def optimizer_transform(cls, cfg: "MoEConfig") -> optax.GradientTransformation:
    return freeze_after(cfg.stablemoe_switch_step, is_distilled_param)

  @classmethod
  def describe(cls, cfg: "MoEConfig") -> str:
    return "StableMoE"
