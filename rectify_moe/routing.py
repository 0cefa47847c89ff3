"""Per-shard routing tables: top-k with capacity, Fill-in and Intra-device rectification.

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
- FR = a top-(k+1) router whose (k+1)-th choices only take the slots left after the whole top-k demand;
- IR = tokens left under-served go to the best expert on their own device, blended with
  `y = (y_loc * p * lam + T * y) / max(T + sg(lam * p), eps)`.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

PRIORITIES = ("position", "bpr", "token_major")
FILL_IN_PRIORITIES = ("same", "score")
COMBINE_MODES = ("normalized", "probs")
IR_MODES = ("all", "any", "ignore_kth")


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


def ir_capacity_from_factor(tokens_per_group: int, num_local: int,
                            factor: Optional[float]) -> Optional[int]:
  """Slots per local expert per group in the static IR buffer.

  Args:
    tokens_per_group: S.
    num_local: L, experts on one device.
    factor: `None` for the exact buffer (S slots: no token can overflow it); otherwise the buffer holds
      `min(S, max(1, ceil(factor * S / L)))` slots, e.g. 0.25 lets a quarter of a group's tokens be
      rectified when they spread evenly over the device's experts.

  Returns:
    `None` (exact) or the Python int number of slots.
  """
  if factor is None:
    return None
  if not factor > 0:
    raise ValueError(f"ir_capacity_factor must be > 0 or None (exact), got {factor}.")
  return int(min(tokens_per_group, max(1, math.ceil(round(factor * tokens_per_group / num_local, 9)))))


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


@flax.struct.dataclass
class IRTable:
  """Intra-device rectification decisions of one shard.

  Attributes:
    selected: bool[G, S] valid tokens chosen for rectification by the IR mode.
    local_expert: int32[G, S] index in [0, L) of the device's expert with the highest global probability.
    slot: int32[G, S] slot in that local expert's IR buffer; -1 where not given one.
    reuse_choice: int32[G, S] for a selected token whose local expert already holds one of its accepted
      choices, that choice's index in [0, K) (the block reuses that output: the same expert on the same
      token; no IR slot); -1 elsewhere.
    dispatch: bool[G, S, L, C_ir] one-hot IR dispatch mask.
    p: float32[G, S] global router probability of the chosen local expert (carries the gradient).
    lam: float32[G, S] stop_gradient(K - num_accepted): the number of "missing" choices.
    total: float32[G, S] stop_gradient(sum of gate over the token's accepted choices).
    overflow: int32[G] selected tokens that did not fit in the IR buffer.
    num_rectified: int32[G] rectified tokens (`placed`: an IR slot or a reused choice).
    ir_capacity: static C_ir.
  """
  selected: Array
  local_expert: Array
  slot: Array
  reuse_choice: Array
  dispatch: Array
  p: Array
  lam: Array
  total: Array
  overflow: Array
  num_rectified: Array
  ir_capacity: int = flax.struct.field(pytree_node=False)

  @property
  def placed(self) -> Array:
    """bool[G, S]: the token is rectified (an IR slot, or the output of a choice it already has)."""
    return (self.slot >= 0) | (self.reuse_choice >= 0)


# ---------------------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------------------
def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"Unknown {name}={value!r}; use one of {', '.join(repr(a) for a in allowed)}.")


def _token_mask_or_default(router_probs: Array, token_mask: Optional[Array]) -> Array:
  if token_mask is None:
    return jnp.ones(router_probs.shape[:2], dtype=bool)
  if tuple(token_mask.shape) != tuple(router_probs.shape[:2]):
    raise ValueError(
        f"token_mask has shape {tuple(token_mask.shape)} but router_probs is {tuple(router_probs.shape)}; "
        "token_mask must be bool[G, S] matching the first two axes of router_probs.")
  return token_mask.astype(bool)


def _token_order(first_gate: Array, by_probability: bool) -> Array:
  """int32[G, S]: token indices in priority order (sequence order, or top-1 probability descending)."""
  groups, tokens = first_gate.shape
  if not by_probability:
    return jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (groups, tokens))
  return jnp.argsort(-first_gate, axis=-1, stable=True).astype(jnp.int32)


def _positions_in_order(onehot: Array, order: Array, offset: Optional[Array] = None) -> Array:
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


def _select(values: Array, index: Array) -> Array:
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
  order = _token_order(gate[..., 0], by_probability=(priority == "bpr"))

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
      per_rank.append(_positions_in_order(onehot[:, :, rank, :], order, offset))
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
    ranks.append(_positions_in_order(onehot[:, :, top_k, :], order, top_demand)[:, :, None, :])

  # Shape: [G, S, K, E] -> position at the chosen expert -> [G, S, K].
  positions = jnp.concatenate(ranks, axis=2)
  return jnp.sum(positions * onehot, axis=-1)


def route_top_k(router_probs: Array, *, top_k: int, capacity: int, priority: str = "position",
                fill_in: bool = False, fill_in_priority: str = "same", combine: str = "normalized",
                straight_through: bool = False, token_mask: Optional[Array] = None,
                eps: float = 1e-9) -> RoutingTable:
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

  Returns:
    A `RoutingTable` with K = k + fill_in ranked choices.
  """
  if router_probs.ndim != 3:
    raise ValueError(f"router_probs must be float[G, S, E], got shape {tuple(router_probs.shape)}.")
  _check_choice("priority", priority, PRIORITIES)
  _check_choice("fill_in_priority", fill_in_priority, FILL_IN_PRIORITIES)
  _check_choice("combine", combine, COMBINE_MODES)
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
  valid = _token_mask_or_default(router_probs, token_mask)
  _, expert_index = jax.lax.top_k(jax.lax.stop_gradient(router_probs), num_choices)
  gate = _select(router_probs, expert_index)
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


# ---------------------------------------------------------------------------------------------------------
# Intra-device rectification (IR).
# ---------------------------------------------------------------------------------------------------------
def intra_device_choice(router_probs: Array, table: RoutingTable, *, first_expert, num_local: int,
                        mode: str, ir_capacity: Optional[int] = None,
                        priority: Optional[str] = None) -> IRTable:
  """Chooses, for under-served tokens, the best expert on their own device, and places them in an IR buffer.

  Args:
    router_probs: float32[G, S, E] the same probabilities the table was built from (global softmax).
    table: the shard's `RoutingTable`.
    first_expert: global index of the device's first expert (Python or traced int).
    num_local: L, experts on the device (static).
    mode: which tokens are rectified: "all" (no accepted choice), "any" (fewer than K accepted: any
      failed choice, a failed fill-in included) or "ignore_kth" (fewer than K - 1 accepted; used with fill-in).
    ir_capacity: slots per local expert per group, or None for S (exact: nothing overflows).
    priority: token order for the IR buffer; defaults to the table's priority ("bpr": top-1 probability
      order, otherwise sequence order).

  Returns:
    An `IRTable`.
  """
  _check_choice("IR mode", mode, IR_MODES)
  groups, tokens, num_experts = router_probs.shape
  if not 1 <= num_local <= num_experts:
    raise ValueError(f"num_local={num_local} must be in [1, num_experts={num_experts}].")
  if isinstance(first_expert, int) and not 0 <= first_expert <= num_experts - num_local:
    raise ValueError(f"first_expert={first_expert} with num_local={num_local} leaves the {num_experts} experts; "
                     f"use 0 <= first_expert <= {num_experts - num_local}.")
  capacity = tokens if ir_capacity is None else int(ir_capacity)
  if capacity < 1:
    raise ValueError(f"ir_capacity must be >= 1 or None (exact), got {ir_capacity}.")
  priority = table.priority if priority is None else priority
  _check_choice("priority", priority, PRIORITIES)

  num_accepted = table.num_accepted
  # The official code compares with the gate's k, which is K (= k + 1) under fill-in.
  threshold = {"all": 1, "any": table.num_choices, "ignore_kth": table.num_choices - 1}[mode]
  selected = table.token_mask & (num_accepted < threshold)
  local_expert, p = best_local_expert(router_probs, first_expert=first_expert, num_local=num_local)
  # The official code runs the local expert on the token even when that expert already accepted one of the
  # token's choices (spec: IR does not exclude experts the token used); the output is the one the routed
  # choice already has, so such a token reuses it and needs no IR slot.
  same = table.accepted & (table.expert_index == first_expert + local_expert[..., None])  # [G, S, K]
  reuse = selected & jnp.any(same, axis=-1)
  reuse_choice = jnp.where(reuse, jnp.argmax(same, axis=-1), -1).astype(jnp.int32)
  slot, dispatch = place_local(local_expert, selected & ~reuse, num_local=num_local, capacity=capacity,
                               order_gate=table.gate[..., 0], by_probability=(priority == "bpr"))
  placed = (slot >= 0) | reuse
  total = jax.lax.stop_gradient(jnp.sum(table.gate * table.accepted, axis=-1))
  lam = jax.lax.stop_gradient((table.num_choices - num_accepted).astype(jnp.float32))
  return IRTable(selected=selected, local_expert=local_expert, slot=slot, reuse_choice=reuse_choice,
                 dispatch=dispatch, p=p, lam=lam, total=total,
                 overflow=jnp.sum(selected & ~placed, axis=1, dtype=jnp.int32),
                 num_rectified=jnp.sum(placed, axis=1, dtype=jnp.int32), ir_capacity=capacity)


def route_local(router_probs: Array, selected: Array, *, first_expert, num_local: int, capacity: int,
                order_gate: Array, by_probability: bool) -> tuple[Array, Array, Array, Array]:
  """Sends selected tokens to the best of the device's own experts, into a static buffer (no collective).

  Gating Dropout's local step (Intra-device Rectification uses its two parts, `best_local_expert` and
  `place_local`, with the tokens that reuse a routed output left out of the placement).

  Args:
    router_probs: float32[G, S, E] global router probabilities.
    selected: bool[G, S] tokens to place.
    first_expert: global index of the device's first expert (Python or traced int).
    num_local: L.
    capacity: slots per local expert per group.
    order_gate: float32[G, S] top-1 probability, the token order when `by_probability`.
    by_probability: visit tokens by order_gate descending (else sequence order).

  Returns:
    local_expert int32[G, S] in [0, L) (argmax of the global probabilities of the local experts; ties:
    lower index), p float32[G, S] its probability, slot int32[G, S] (-1 = not placed), dispatch
    bool[G, S, L, C].
  """
  local_expert, p = best_local_expert(router_probs, first_expert=first_expert, num_local=num_local)
  slot, dispatch = place_local(local_expert, selected, num_local=num_local, capacity=capacity,
                               order_gate=order_gate, by_probability=by_probability)
  return local_expert, p, slot, dispatch


def best_local_expert(router_probs: Array, *, first_expert, num_local: int) -> tuple[Array, Array]:
  """int32[G, S] index in [0, L) of the device's expert with the highest global probability (ties: lower
  index) and float32[G, S] that probability (differentiable)."""
  router_probs = router_probs.astype(jnp.float32)
  # Shape: [G, S, L] global probabilities of the device's own experts.
  local_probs = jax.lax.dynamic_slice_in_dim(router_probs, first_expert, num_local, axis=-1)
  local_expert = jnp.argmax(local_probs, axis=-1).astype(jnp.int32)
  return local_expert, _select(local_probs, local_expert[..., None])[..., 0]


def place_local(local_expert: Array, selected: Array, *, num_local: int, capacity: int, order_gate: Array,
                by_probability: bool) -> tuple[Array, Array]:
  """Slots of the selected tokens in their local expert's buffer; -1 = not placed (or beyond capacity).

  Args:
    local_expert: int32[G, S] each token's expert in [0, L).
    selected: bool[G, S] tokens to place.
    num_local: L.
    capacity: slots per local expert per group.
    order_gate: float32[G, S] top-1 probability, the visiting order when `by_probability`.
    by_probability: visit tokens by order_gate descending (else sequence order); earlier tokens get lower slots.

  Returns:
    slot int32[G, S] and the one-hot dispatch mask bool[G, S, L, C].
  """
  # Shape: [G, S, L]
  onehot = jax.nn.one_hot(local_expert, num_local, dtype=jnp.int32) * selected[..., None].astype(jnp.int32)
  order = _token_order(order_gate, by_probability=by_probability)
  position = jnp.sum(_positions_in_order(onehot, order) * onehot, axis=-1)
  slot = jnp.where(selected & (position < capacity), position, -1).astype(jnp.int32)
  # Shape: [G, S, L, C] = einsum("gsl,gsc->gslc")
  dispatch = jnp.einsum("gsl,gsc->gslc", jax.nn.one_hot(local_expert, num_local, dtype=jnp.float32),
                        jax.nn.one_hot(slot, capacity, dtype=jnp.float32)) > 0
  return slot, dispatch


def ir_blend(y: Array, y_local: Array, p: Array, lam: Array, total: Array, placed: Array,
             eps: float = 1e-9) -> Array:
  """The official IR blend: `(y_local * p * lam + total * y) / max(total + sg(lam * p), eps)` where placed.

  Args:
    y: [..., D] combine output of the vanilla (or fill-in) path.
    y_local: [..., D] output of the chosen local expert.
    p: float32[...] probability of the local expert (differentiable).
    lam: float32[...] stop-gradient number of missing choices (K - num_accepted).
    total: float32[...] stop-gradient sum of gate over accepted choices.
    placed: bool[...] tokens that were rectified; others keep y.
    eps: floor of the denominator.

  Returns:
    [..., D] in the dtype of y. The arithmetic is float32.
  """
  keep, local = ir_blend_weights(p, lam, total, placed, eps=eps)
  y32 = y.astype(jnp.float32)
  blended = keep[..., None] * y32 + local[..., None] * y_local.astype(jnp.float32)
  return jnp.where(placed[..., None], blended, y32).astype(y.dtype)


def ir_blend_weights(p: Array, lam: Array, total: Array, placed: Array, eps: float = 1e-9) -> tuple[Array, Array]:
  """`ir_blend` as two per-token weights: `ir_blend(y, y_local, ...) == keep * y + local * y_local`.

  The block folds them into its combine weights (`moe.ir_combine_weights`): one weighted sum over the routed
  choices and the IR row, or the reused routed row.

  Args:
    p, lam, total, placed, eps: as `ir_blend` ([...] each).

  Returns:
    (keep, local) float32[...]: total / denom and p * lam / denom where placed, else 1 and 0.
  """
  p, lam, total = (v.astype(jnp.float32) for v in (p, lam, total))
  denom = jnp.maximum(total + jax.lax.stop_gradient(lam * p), eps)
  keep = jnp.where(placed, total / denom, 1.0)
  local = jnp.where(placed, p * lam / denom, 0.0)
  return keep, local


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
  validf = _token_mask_or_default(router_probs, token_mask).astype(jnp.float32)
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
  _check_choice("reduction", reduction, ("mean", "sum"))
  router_logits = router_logits.astype(jnp.float32)
  validf = _token_mask_or_default(router_logits, token_mask).astype(jnp.float32)
  total = jnp.sum(jax.nn.logsumexp(router_logits, axis=-1) ** 2 * validf)
  return total if reduction == "sum" else total / jnp.maximum(jnp.sum(validf), 1.0)
