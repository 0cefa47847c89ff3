"""StableMoE (Dai et al., ACL 2022): balance and distillation losses, and the true optimizer freeze.

Stage 1 (step < switch_step): route greedily (top-1) by `s = h E^T` (the router kernel), gate with
`sigmoid(s[a])`, train the balance loss and distil the assignment into a small router that reads only the
token id: `s_hat = D[token] E_hat^T` (D: [V, r], E_hat: [E, r], r = 50 in the paper).
Stage 2 (step >= switch_step) and evaluation: route by the distilled router, which is frozen for real:
`freeze_after` zeroes its optimizer updates, so neither momentum nor weight decay moves it. The gate keeps
using the original score `sigmoid(s[a])`, which keeps learning.

Deviations from the official code, on purpose (see docs/methods.md): the MoE layer replaces the FFN of
every `moe_every`-th block (the code inserts one extra block); losses are summed over MoE layers (the code
keeps only the last layer's); padding tokens are masked out of the losses.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

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
