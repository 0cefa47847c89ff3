"""Intra-device Rectification (IR): tokens a router left under-served go to the best expert on their own device.

Pure per-shard functions, applied by the MoE block after any router that ranks experts by a softmax (no
collective: the chosen expert is one of the device's L experts). The blend is the official gpt-moe formula
`y = (y_loc * p * lam + T * y) / max(T + sg(lam * p), eps)`; see `docs/routing_contract.md`. Gating Dropout's local
step uses the same two parts (`best_local_expert`, `place_local`) through `route_local`.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from rectify_moe import routing

Array = jax.Array


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
# Intra-device rectification (IR).
# ---------------------------------------------------------------------------------------------------------
def intra_device_choice(router_probs: Array, table: routing.RoutingTable, *, first_expert, num_local: int,
                        mode: str, ir_capacity: Optional[int] = None,
                        priority: Optional[str] = None) -> IRTable:
  """Chooses, for under-served tokens, the best expert on their own device, and places them in an IR buffer.

  Args:
    router_probs: float32[G, S, E] the same probabilities the table was built from (global softmax).
    table: the shard's `routing.RoutingTable`.
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
  routing.check_choice("IR mode", mode, routing.IR_MODES)
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
  routing.check_choice("priority", priority, routing.PRIORITIES)

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
  return local_expert, routing.select(local_probs, local_expert[..., None])[..., 0]


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
  order = routing.token_order(order_gate, by_probability=by_probability)
  position = jnp.sum(routing.positions_in_order(onehot, order) * onehot, axis=-1)
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


