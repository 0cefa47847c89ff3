"""Balanced assignment of S tokens to E experts, each expert exactly C = S / E tokens, maximising the summed scores:
an auction algorithm (Bertsekas 1988) in JAX, for BASE layers (Lewis et al. 2021).

The problem is a linear assignment of the S tokens to S slots (slot j belongs to expert j // C, all slots of an
expert score alike). The auction keeps a price per slot; every unassigned token bids for the cheapest slot of the
expert with the best net value `score - price`, raising its price by the gap to its second-best net value plus
eps; a slot goes to its highest bidder and its previous owner is unassigned again. All unassigned tokens bid at
once (the Jacobi auction) and the slots of one expert are interchangeable, so one round costs O(S * E) (net values
of the bidders over the experts' cheapest slots) plus O(S) (the experts' two cheapest prices), and the state is
O(S) (prices, owners) per group: no S x S matrix.

Optimality: at the end every token is within eps of its best net value (eps-complementary slackness), so the
summed score is within S * eps of the optimum (tests/test_base_layer.py checks it against
`scipy.optimize.linear_sum_assignment`). Epsilon scaling: `phases` auctions with eps shrinking by `scale_factor`
down to `eps`, each starting from the previous prices, cut the number of rounds on near-ties. Rounds are capped
(`max_rounds` per phase); should the cap ever be reached, the tokens still unassigned take the free slots in index
order, so the result is always balanced (the bound then no longer holds; `balanced_assignment` reports the rounds).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _two_cheapest(prices: Array) -> tuple[Array, Array, Array]:
  """prices [E, C] -> (cheapest price [E], its slot [E], second cheapest price [E]; +inf when C = 1)."""
  slot = jnp.argmin(prices, axis=-1)
  cheapest = jnp.min(prices, axis=-1)
  if prices.shape[-1] == 1:
    return cheapest, slot, jnp.full_like(cheapest, jnp.inf)
  others = prices.at[jnp.arange(prices.shape[0]), slot].set(jnp.inf)
  return cheapest, slot, jnp.min(others, axis=-1)


def _auction_phase(scores: Array, prices: Array, eps: Array, max_rounds: int) -> tuple[Array, Array, Array]:
  """One eps-auction from `prices` with every token unassigned.

  Returns:
    (owner int32[E*C] token of each slot or -1, slot_of int32[S] slot of each token or -1, prices float32[E, C],
    rounds int32).
  """
  tokens, num_experts = scores.shape
  capacity = prices.shape[1]
  token_ids = jnp.arange(tokens, dtype=jnp.int32)

  def round_(state):
    owner, slot_of, prices, rounds = state
    cheapest, cheapest_slot, second = _two_cheapest(prices)
    # Shape: [S, E]: net value of each expert's cheapest slot.
    value = scores - cheapest[None, :]
    best = jnp.argmax(value, axis=-1)
    best_value = jnp.max(value, axis=-1)
    other_experts = jnp.max(jnp.where(jax.nn.one_hot(best, num_experts, dtype=bool), -jnp.inf, value), axis=-1)
    same_expert = scores[token_ids, best] - second[best]
    runner_up = jnp.maximum(other_experts, same_expert)
    increment = jnp.where(jnp.isfinite(runner_up), best_value - runner_up, 0.0) + eps
    bidding = slot_of < 0
    target = (best * capacity + cheapest_slot[best]).astype(jnp.int32)
    bid = jnp.where(bidding, cheapest[best] + increment, -jnp.inf)
    flat_prices = prices.reshape(-1)
    # The highest bid on each slot wins (ties: the lowest token index).
    top_bid = jax.ops.segment_max(bid, target, num_segments=tokens)
    is_top = bidding & (bid >= top_bid[target])
    winner = jax.ops.segment_min(jnp.where(is_top, token_ids, tokens), target, num_segments=tokens)
    won = winner < tokens  # slots that received a bid
    # The previous owners of won slots are unassigned; the winners take the slots.
    displaced = jnp.where(won & (owner >= 0), owner, tokens)
    slot_of = slot_of.at[displaced].set(-1, mode="drop")
    slot_ids = jnp.arange(tokens, dtype=jnp.int32)
    slot_of = slot_of.at[jnp.where(won, winner, tokens)].set(slot_ids, mode="drop")
    owner = jnp.where(won, winner, owner)
    prices = jnp.where(won, top_bid, flat_prices).reshape(prices.shape)
    return owner, slot_of, prices, rounds + 1

  def unfinished(state):
    _, slot_of, _, rounds = state
    return jnp.any(slot_of < 0) & (rounds < max_rounds)

  # Start values that vary over a mesh like the scores (inside shard_map the loop carry must keep its type).
  unassigned = jnp.full((tokens,), -1, jnp.int32) + (jnp.sum(scores) * 0).astype(jnp.int32)
  start = (unassigned, unassigned, prices + jnp.sum(scores) * 0, jnp.zeros((), jnp.int32))
  owner, slot_of, prices, rounds = jax.lax.while_loop(unfinished, round_, start)
  return owner, slot_of, prices, rounds


def _complete(owner: Array, slot_of: Array) -> Array:
  """Unassigned tokens take the free slots in index order (only after a capped auction); returns slot_of."""
  tokens = slot_of.shape[0]
  free = owner < 0
  waiting = slot_of < 0
  # The r-th waiting token takes the r-th free slot.
  free_slots = jnp.argsort(~free, stable=True).astype(jnp.int32)
  rank = jnp.cumsum(waiting) - 1
  return jnp.where(waiting, free_slots[jnp.clip(rank, 0, tokens - 1)], slot_of)


def balanced_assignment(scores: Array, *, eps: float | Array, phases: int = 3, scale_factor: float = 8.0,
                        max_rounds: int = 2000) -> tuple[Array, Array]:
  """Each expert exactly S / E tokens, maximising the summed scores within S * eps (one group).

  Args:
    scores: float32[S, E] (S divisible by E); no gradient flows through the assignment.
    eps: the final bid increment (> 0).
    phases: eps-scaling phases (eps * scale_factor^(phases - 1), ..., eps).
    scale_factor: eps ratio between phases.
    max_rounds: bidding rounds per phase at most.

  Returns:
    (expert int32[S] of each token, rounds int32 summed over the phases).
  """
  tokens, num_experts = scores.shape
  if tokens % num_experts:
    raise ValueError(f"A balanced assignment needs S={tokens} tokens divisible by E={num_experts} experts; change "
                     "moe.group_size or moe.num_experts.")
  capacity = tokens // num_experts
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  prices = jnp.zeros((num_experts, capacity), jnp.float32)
  total_rounds = jnp.zeros((), jnp.int32)
  owner = slot_of = None
  for phase in range(phases):
    phase_eps = jnp.asarray(eps, jnp.float32) * scale_factor ** (phases - 1 - phase)
    owner, slot_of, prices, rounds = _auction_phase(scores, prices, phase_eps, max_rounds)
    total_rounds = total_rounds + rounds
  slot_of = _complete(owner, slot_of)
  return (slot_of // capacity).astype(jnp.int32), total_rounds


def batched_balanced_assignment(scores: Array, **kwargs) -> tuple[Array, Array]:
  """`balanced_assignment` of every group: scores float32[G, S, E] -> (int32[G, S], rounds int32[G])."""
  return jax.vmap(lambda s: balanced_assignment(s, **kwargs))(scores)
