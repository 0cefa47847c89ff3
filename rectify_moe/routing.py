"""Per-shard routing tables: top-k with capacity and Fill-in Rectification; capacity arithmetic; router losses.

Every function here is pure and jit-able and works on the tokens of ONE shard (one device), grouped as
`[G, S, ...]`. The sharded MoE block (`moe.py`) calls these inside `jax.shard_map`, so each device routes
its own tokens, exactly as DeepSpeed-MoE gates each GPU's tokens independently.

Notation: `G` groups, `S` tokens per group, `E` experts, `k` the router's k, `K` ranked choices per token
(`k`, or `k + 1` under Fill-in Rectification), `C` slots per expert per group, `L` experts on one device.

The semantics follow the official Rectify-Router code (ZhiYuanZeng/gpt-moe, HEAD) as written down in
`docs/routing_contract.md`:
- capacity `C = max(ceil(S / E * capacity_factor * k), min_capacity)`, held at the top-k value under FR;
- k-major priority (every first choice before any second choice); overflowing candidates still advance
  their expert's position counter (DeepSpeed/GShard cumsum semantics);
- FR = a top-(k+1) router whose (k+1)-th choices only take the slots left after the whole top-k demand.
Intra-device Rectification, applied by the block after any router, is in `intra_device.py`.
"""

from __future__ import annotations

import math
import typing
from typing import Literal, Optional

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

# The choice fields of routing, as types (the config schema uses them) and as tuples (for argument checks).
Priority = Literal["position", "bpr", "token_major"]
FillInPriority = Literal["same", "score"]
CombineMode = Literal["normalized", "probs"]
IRMode = Literal["all", "any", "ignore_kth"]
PRIORITIES = typing.get_args(Priority)
FILL_IN_PRIORITIES = typing.get_args(FillInPriority)
COMBINE_MODES = typing.get_args(CombineMode)
IR_MODES = typing.get_args(IRMode)


# ---------------------------------------------------------------------------------------------------------
# Capacity arithmetic.
# ---------------------------------------------------------------------------------------------------------
def expert_capacity(tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int = 0) -> int:
  """Slots per expert per group: `max(ceil(S / E * capacity_factor * k), min_capacity)`.

  This is the paper's (and DeepSpeed's) convention: k is inside, so `capacity_factor = 1` gives exactly
  enough slots for perfectly balanced top-k routing. Under Fill-in Rectification pass the base router's
  k (not k + 1): FR keeps the top-k buffer size.

  Args:
    tokens_per_group: S, tokens per routing group (> 0).
    num_experts: E (> 0).
    top_k: k (> 0).
    capacity_factor: multiplier on the balanced load (>= 0; 0 with min_capacity=1 is the paper's lower bound).
    min_capacity: lower bound on the result.

  Returns:
    Python int C >= 1.
  """
  if tokens_per_group < 1 or num_experts < 1 or top_k < 1:
    raise ValueError(
        f"expert_capacity needs positive sizes, got tokens_per_group={tokens_per_group}, "
        f"num_experts={num_experts}, top_k={top_k}.")
  if not capacity_factor >= 0:
    raise ValueError(f"capacity_factor must be >= 0, got {capacity_factor}. Use e.g. 1.0 (balanced) or 1.25.")
  # Round before ceil so that 0.5 * 2 * 1024 / 8 does not become 128.00000000001 -> 129.
  raw = round(tokens_per_group / num_experts * capacity_factor * top_k, 9)
  capacity = max(int(math.ceil(raw)), int(min_capacity))
  if capacity < 1:
    raise ValueError(
        f"Expert capacity is {capacity} (tokens_per_group={tokens_per_group}, num_experts={num_experts}, "
        f"top_k={top_k}, capacity_factor={capacity_factor}). Raise capacity_factor or set min_capacity >= 1.")
  return capacity


# ---------------------------------------------------------------------------------------------------------
# Containers.
# ---------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class RoutingStats:
  """Per-group routing statistics (all float32; rates are 0 for a group without valid tokens).

  Attributes:
    drop_rate: [G] fraction of the valid tokens' top-k choices (ranks < k) that were not accepted.
    unrouted_rate: [G] fraction of valid tokens with no accepted choice at all (over all K ranks).
    padding_rate: [G] `1 - filled slots / (E * C)`.
    fill_in_slots: [G] accepted rank-k (fill-in) choices; 0 without fill-in.
    expert_demand: [G, E] valid top-k choices per expert before capacity.
    expert_load: [G, E] accepted slots per expert (all K ranks).
    num_tokens: [G] valid tokens.
  """
  drop_rate: Array
  unrouted_rate: Array
  padding_rate: Array
  fill_in_slots: Array
  expert_demand: Array
  expert_load: Array
  num_tokens: Array


@flax.struct.dataclass
class RoutingTable:
  """The routing decision of one shard.

  Attributes:
    expert_index: int32[G, S, K] ranked choices, by decreasing probability (ties: lower expert index).
    gate: float32[G, S, K] router probability of each ranked choice.
    slot: int32[G, S, K] slot in the chosen expert's buffer, -1 where the choice was not accepted.
    combine_weight: float32[G, S, K] weight of each choice in the combine (0 where not accepted).
    dispatch: bool[G, S, E, C] one-hot dispatch mask.
    combine: float32[G, S, E, C] combine array (`dispatch * combine_weight`).
    token_mask: bool[G, S] False for padding tokens.
    stats: per-group `RoutingStats`.
    num_experts, capacity, top_k, num_choices, priority: static Python values (E, C, k, K, priority name).
  """
  expert_index: Array
  gate: Array
  slot: Array
  combine_weight: Array
  dispatch: Array
  combine: Array
  token_mask: Array
  stats: RoutingStats
  num_experts: int = flax.struct.field(pytree_node=False)
  capacity: int = flax.struct.field(pytree_node=False)
  top_k: int = flax.struct.field(pytree_node=False)
  num_choices: int = flax.struct.field(pytree_node=False)
  priority: str = flax.struct.field(pytree_node=False)

  @property
  def accepted(self) -> Array:
    """bool[G, S, K]: the choice got a slot."""
    return self.slot >= 0

  @property
  def num_accepted(self) -> Array:
    """int32[G, S]: accepted choices per token (0..K)."""
    return jnp.sum(self.accepted, axis=-1, dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------------------
def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"Unknown {name}={value!r}; use one of {', '.join(repr(a) for a in allowed)}.")


def token_mask_or_default(router_probs: Array, token_mask: Optional[Array]) -> Array:
  if token_mask is None:
    return jnp.ones(router_probs.shape[:2], dtype=bool)
  if tuple(token_mask.shape) != tuple(router_probs.shape[:2]):
    raise ValueError(
        f"token_mask has shape {tuple(token_mask.shape)} but router_probs is {tuple(router_probs.shape)}; "
        "token_mask must be bool[G, S] matching the first two axes of router_probs.")
  return token_mask.astype(bool)


def token_order(first_gate: Array, by_probability: bool) -> Array:
  """int32[G, S]: token indices in priority order (sequence order, or top-1 probability descending)."""
  groups, tokens = first_gate.shape
  if not by_probability:
    return jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (groups, tokens))
  return jnp.argsort(-first_gate, axis=-1, stable=True).astype(jnp.int32)


def positions_in_order(onehot: Array, order: Array, offset: Optional[Array] = None) -> Array:
  """Position counters of candidates visited in `order`.

  Args:
    onehot: int32[G, S, X] one-hot candidate of each token (all-zero row = no candidate).
    order: int32[G, S] token indices in visiting order.
    offset: int32[G, X] counters already used before this pass (or None).

  Returns:
    int32[G, S, X]: for each token the number of earlier candidates of the same column, plus offset,
    at its one-hot column (garbage elsewhere; callers read only the one-hot column).
  """
  permuted = jnp.take_along_axis(onehot, order[:, :, None], axis=1)
  positions = jnp.cumsum(permuted, axis=1) - 1
  if offset is not None:
    positions = positions + offset[:, None, :]
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(positions, inverse[:, :, None], axis=1)


def select(values: Array, index: Array) -> Array:
  """float32 values[G, S, X] at index[G, S, K] along X -> [G, S, K], exactly for finite values.

  A one-hot masked sum rather than a gather: its gradient is a multiply that fuses, where the gather's
  (and top_k's own value's) is a scatter-add, a slow separate kernel on GPU.
  """
  onehot = jax.nn.one_hot(index, values.shape[-1], dtype=values.dtype)
  return jnp.sum(values[..., None, :] * onehot, axis=-1)


# ---------------------------------------------------------------------------------------------------------
# Top-k routing with capacity and Fill-in Rectification.
# ---------------------------------------------------------------------------------------------------------
def _candidate_positions(expert_index: Array, gate: Array, valid: Array, *, top_k: int, num_experts: int,
                         priority: str, fill_in: bool, fill_in_priority: str) -> Array:
  """int32[G, S, K]: each choice's position in its expert's queue (before the capacity cut)."""
  groups, tokens, _ = expert_index.shape
  # Shape: [G, S, K, E]; padding tokens have no candidates.
  onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32) * valid[:, :, None, None].astype(jnp.int32)
  order = token_order(gate[..., 0], by_probability=(priority == "bpr"))

  if priority == "token_major":
    # Visit (token, rank) pairs token by token: a [G, S*k, E] queue in sequence order.
    flat = onehot[:, :, :top_k, :].reshape(groups, tokens * top_k, num_experts)
    flat_positions = jnp.cumsum(flat, axis=1) - 1
    top_positions = flat_positions.reshape(groups, tokens, top_k, num_experts)
  else:
    # k-major: rank 0 of every token (in token order), then rank 1, ...; overflow advances the counters.
    per_rank = []
    offset = jnp.zeros((groups, num_experts), jnp.int32)
    for rank in range(top_k):
      per_rank.append(positions_in_order(onehot[:, :, rank, :], order, offset))
      offset = offset + jnp.sum(onehot[:, :, rank, :], axis=1)
    top_positions = jnp.stack(per_rank, axis=2)
  ranks = [top_positions]

  if fill_in:
    # Fill-in candidates start after the WHOLE top-k demand of their expert, so they only take leftovers.
    top_demand = jnp.sum(onehot[:, :, :top_k, :], axis=(1, 2))
    if fill_in_priority == "score":
      # Visit fill-in candidates by their probability for the expert; ties keep the token order.
      score_in_order = jnp.take_along_axis(gate[..., top_k], order, axis=1)
      order = jnp.take_along_axis(order, jnp.argsort(-score_in_order, axis=1, stable=True), axis=1)
    ranks.append(positions_in_order(onehot[:, :, top_k, :], order, top_demand)[:, :, None, :])

  # Shape: [G, S, K, E] -> position at the chosen expert -> [G, S, K].
  positions = jnp.concatenate(ranks, axis=2)
  return jnp.sum(positions * onehot, axis=-1)


def route_top_k(router_probs: Array, *, top_k: int, capacity: int, priority: str = "position",
                fill_in: bool = False, fill_in_priority: str = "same", combine: str = "normalized",
                straight_through: bool = False, token_mask: Optional[Array] = None,
                eps: float = 1e-9, selection_bias: Optional[Array] = None) -> RoutingTable:
  """Top-k routing with per-expert capacity, optionally with Fill-in Rectification (FR).

  Args:
    router_probs: float32[G, S, E] softmax over all experts.
    top_k: k, choices per token of the base router.
    capacity: C, slots per expert per group (see `expert_capacity`; under FR the top-k value).
    priority: "position" (k-major, sequence order inside a rank; DeepSpeed/GShard), "bpr" (k-major,
      tokens by top-1 probability descending; batch-prioritized routing) or "token_major" (token by
      token in sequence order; causal).
    fill_in: FR: also rank the (k+1)-th choice, which only takes slots the top-k demand left empty.
    fill_in_priority: order of competing fill-in candidates: "same" (the priority's token order, as the
      official code) or "score" (their probability for that expert, descending).
    combine: "normalized" (g / stop_gradient(sum of accepted g)) or "probs" (raw g).
    straight_through: top-1 only (K == 1): forward weight 1, gradient through g (`g - sg(g) + 1`).
    token_mask: bool[G, S], False for padding (never dispatched, not counted anywhere). None = all valid.
    eps: floor of the normalizer.
    selection_bias: float32[E] added to the probabilities for choosing the K experts only; gates and combine
      weights stay the unbiased probabilities (auxiliary-loss-free balancing, DeepSeek-V3). None = no bias.

  Returns:
    A `RoutingTable` with K = k + fill_in ranked choices.
  """
  if router_probs.ndim != 3:
    raise ValueError(f"router_probs must be float[G, S, E], got shape {tuple(router_probs.shape)}.")
  check_choice("priority", priority, PRIORITIES)
  check_choice("fill_in_priority", fill_in_priority, FILL_IN_PRIORITIES)
  check_choice("combine", combine, COMBINE_MODES)
  groups, tokens, num_experts = router_probs.shape
  num_choices = top_k + int(fill_in)
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]; lower top_k or add experts.")
  if num_choices > num_experts:
    raise ValueError(
        f"fill_in needs top_k + 1 <= num_experts, got top_k={top_k} with {num_experts} experts; "
        "lower top_k or disable fill_in.")
  if not isinstance(capacity, int) or capacity < 1:
    raise ValueError(f"capacity must be a Python int >= 1, got {capacity!r}; raise the capacity factor.")
  if straight_through and num_choices != 1:
    raise ValueError(
        f"straight_through applies to top-1 without fill-in (K = 1), got K={num_choices}; set "
        "straight_through=False (use combine='normalized' for k >= 2 or fill-in).")

  router_probs = router_probs.astype(jnp.float32)
  valid = token_mask_or_default(router_probs, token_mask)
  scores = jax.lax.stop_gradient(router_probs)
  if selection_bias is not None:
    scores = scores + jax.lax.stop_gradient(selection_bias).astype(jnp.float32)
  _, expert_index = jax.lax.top_k(scores, num_choices)
  gate = select(router_probs, expert_index)
  expert_index = expert_index.astype(jnp.int32)

  position = _candidate_positions(expert_index, gate, valid, top_k=top_k, num_experts=num_experts,
                                  priority=priority, fill_in=fill_in, fill_in_priority=fill_in_priority)
  accepted = valid[:, :, None] & (position < capacity)
  slot = jnp.where(accepted, position, -1).astype(jnp.int32)

  accepted_gate = gate * accepted
  if straight_through:
    combine_weight = accepted * (gate - jax.lax.stop_gradient(gate) + 1.0)
  elif combine == "normalized":
    denom = jax.lax.stop_gradient(jnp.maximum(jnp.sum(accepted_gate, axis=-1, keepdims=True), eps))
    combine_weight = accepted_gate / denom
  else:
    combine_weight = accepted_gate

  return table_from_slots(expert_index, gate, slot, combine_weight, valid, num_experts=num_experts,
                          capacity=capacity, top_k=top_k, num_choices=num_choices, priority=priority, fill_in=fill_in)


def table_from_slots(expert_index: Array, gate: Array, slot: Array, combine_weight: Array, valid: Array, *,
                     num_experts: int, capacity: int, top_k: int, num_choices: int, priority: str,
                     fill_in: bool = False) -> RoutingTable:
  """The `RoutingTable` of ranked choices placed in slots (slot -1: not accepted): its dispatch and combine masks
  and stats. expert_index, slot: int32[G, S, K]; gate, combine_weight: float32[G, S, K]; valid: bool[G, S]."""
  accepted = slot >= 0
  # Shape: [G, S, K, E] and [G, S, K, C]; one_hot(-1) is an all-zero row, so rejected choices vanish.
  expert_onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)
  slot_onehot = jax.nn.one_hot(slot, capacity, dtype=jnp.float32)
  # Shape: [G, S, E, C] = einsum("gske,gskc->gsec")
  dispatch = jnp.einsum("gske,gskc->gsec", expert_onehot, slot_onehot) > 0
  # Shape: [G, S, E, C] = einsum("gsk,gske,gskc->gsec")
  combine_array = jnp.einsum("gsk,gske,gskc->gsec", combine_weight, expert_onehot, slot_onehot)

  stats = _routing_stats(expert_onehot, accepted, valid, top_k=top_k, capacity=capacity, fill_in=fill_in)
  return RoutingTable(expert_index=expert_index, gate=gate, slot=slot, combine_weight=combine_weight,
                      dispatch=dispatch, combine=combine_array, token_mask=valid, stats=stats,
                      num_experts=num_experts, capacity=capacity, top_k=top_k, num_choices=num_choices,
                      priority=priority)


def _safe_ratio(num: Array, den: Array) -> Array:
  return jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 0.0)


def _routing_stats(expert_onehot: Array, accepted: Array, valid: Array, *, top_k: int, capacity: int,
                   fill_in: bool) -> RoutingStats:
  """Per-group statistics from float32 expert_onehot[G, S, K, E], bool accepted[G, S, K], valid[G, S]."""
  num_experts = expert_onehot.shape[-1]
  validf = valid.astype(jnp.float32)
  acceptedf = accepted.astype(jnp.float32)
  num_tokens = jnp.sum(validf, axis=1)
  accepted_top = jnp.sum(acceptedf[:, :, :top_k], axis=(1, 2))
  drop_rate = _safe_ratio(top_k * num_tokens - accepted_top, top_k * num_tokens)
  unrouted = jnp.sum(validf * (jnp.sum(acceptedf, axis=-1) == 0), axis=1)
  filled = jnp.sum(acceptedf, axis=(1, 2))
  padding_rate = 1.0 - filled / (num_experts * capacity)
  fill_in_slots = jnp.sum(acceptedf[:, :, top_k], axis=1) if fill_in else jnp.zeros_like(num_tokens)
  # Shape: [G, E] = einsum("gske,gs->ge")
  expert_demand = jnp.einsum("gske,gs->ge", expert_onehot[:, :, :top_k], validf)
  # Shape: [G, E] = einsum("gske,gsk->ge")
  expert_load = jnp.einsum("gske,gsk->ge", expert_onehot, acceptedf)
  return RoutingStats(drop_rate=drop_rate, unrouted_rate=_safe_ratio(unrouted, num_tokens),
                      padding_rate=padding_rate, fill_in_slots=fill_in_slots, expert_demand=expert_demand,
                      expert_load=expert_load, num_tokens=num_tokens)


def table_counts(table: RoutingTable) -> dict[str, Array]:
  """The routing counts of one shard's table, summed over its groups (float32; psum them over the mesh).

  Returns:
    "tokens" (valid tokens), "dropped_choices" (valid top-k choices not accepted), "unrouted_tokens" (valid
    tokens with no accepted choice), "filled_slots" (accepted choices, all K ranks), "fill_in_slots" (accepted
    rank-k choices), "expert_demand" [E] (valid top-k choices per expert before capacity), "expert_load" [E]
    (accepted choices per expert).
  """
  stats = table.stats
  tokens = jnp.sum(stats.num_tokens)
  # Counts straight from the table (padding is never accepted), not rates multiplied back.
  return {
      "tokens": tokens,
      "dropped_choices": table.top_k * tokens - jnp.sum(table.accepted[..., :table.top_k], dtype=jnp.float32),
      "unrouted_tokens": jnp.sum(table.token_mask & (table.num_accepted == 0), dtype=jnp.float32),
      "filled_slots": jnp.sum(stats.expert_load),
      "fill_in_slots": jnp.sum(stats.fill_in_slots),
      "expert_demand": jnp.sum(stats.expert_demand, axis=0),
      "expert_load": jnp.sum(stats.expert_load, axis=0),
  }


# ---------------------------------------------------------------------------------------------------------
# Auxiliary losses.
# ---------------------------------------------------------------------------------------------------------
def load_balance_loss(router_probs: Array, expert_index: Array, token_mask: Optional[Array] = None,
                      all_k: bool = False) -> Array:
  """Switch load-balance loss `E * sum_e f_e * P_e`, averaged over groups (float32 scalar).

  Args:
    router_probs: float32[G, S, E].
    expert_index: int32[G, S, K] ranked choices (pass `[..., :k]` to leave fill-in choices out).
    token_mask: bool[G, S] or None.
    all_k: count every rank of expert_index in f_e (the loss is then K at balance), not only the first.

  Returns:
    float32 scalar; 1.0 at perfect balance of first choices with uniform probabilities.
  """
  router_probs = router_probs.astype(jnp.float32)
  num_experts = router_probs.shape[-1]
  validf = token_mask_or_default(router_probs, token_mask).astype(jnp.float32)
  choices = expert_index if all_k else expert_index[..., :1]
  # Shape: [G, E] = einsum("gske,gs->ge")
  counts = jnp.einsum("gske,gs->ge", jax.nn.one_hot(choices, num_experts, dtype=jnp.float32), validf)
  num_tokens = jnp.maximum(jnp.sum(validf, axis=1, keepdims=True), 1.0)
  fraction = counts / num_tokens
  # Shape: [G, E] = einsum("gse,gs->ge")
  mean_probs = jnp.einsum("gse,gs->ge", router_probs, validf) / num_tokens
  return jnp.mean(num_experts * jnp.sum(fraction * mean_probs, axis=-1))


def router_z_loss(router_logits: Array, token_mask: Optional[Array] = None, reduction: str = "mean") -> Array:
  """ST-MoE router z-loss: `logsumexp(logits)^2` over valid tokens, float32 scalar.

  Args:
    router_logits: float[G, S, E].
    token_mask: bool[G, S] or None.
    reduction: "mean" over valid tokens, or "sum" (for a mean over several shards: psum the sums and
      divide by the psum of the valid tokens).
  """
  check_choice("reduction", reduction, ("mean", "sum"))
  router_logits = router_logits.astype(jnp.float32)
  validf = token_mask_or_default(router_logits, token_mask).astype(jnp.float32)
  total = jnp.sum(jax.nn.logsumexp(router_logits, axis=-1) ** 2 * validf)
  return total if reduction == "sum" else total / jnp.maximum(jnp.sum(validf), 1.0)
