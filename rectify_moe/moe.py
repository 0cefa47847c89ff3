"""The sharded MoE block: router + stacked experts under one `jax.shard_map` over (data, expert).

Each device:
  1. groups its own tokens `[G_l, S, D]`, computes float32 router probabilities and its routing table;
  2. dispatches into `[E, G_l, C, D]` capacity buffers (einsum masks, or gathers: `index_dispatch`);
  3. `all_to_all` over `expert` -> `[L, n_exp * G_l, C, D]`, runs its L experts (with the IR buffers of
     step 5 in the same matmuls), `all_to_all` back;
  4. combines `[G_l, S, D]`;
  5. Intra-device Rectification: under-served tokens go through the device's own experts in a static IR
     buffer (no collective) and are blended in; with index dispatch, a device that holds every expert
     (expert axis 1) puts the IR slots behind the routed slots of each expert's buffer and combines both
     in one weighted sum;
  6. returns y and the global routing metrics (psum-reduced over the mesh).

Call the block under `jax.set_mesh(mesh)`; the mesh is read at call time, so one model runs on any
(data, expert) mesh whose expert axis divides E.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from rectify_moe import config_fields, hash_routing, index_dispatch, routing, sharding, stablemoe

Array = jax.Array

ROUTERS = ("top_k", "stablemoe", "hash")
GATING_DROPOUT_MODES = ("gate_drop", "gate_expert_drop")
GATING_DROPOUT_WEIGHTS = ("one", "prob")
ACTIVATIONS = ("swiglu", "gelu")
DISPATCH_IMPLS = ("einsum", "index")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Configuration of one MoE block (see `configs/` for the paper variants).

  Attributes:
    num_experts: E.
    expert_dim: F, hidden width of each expert.
    top_k: k.
    capacity_factor: training capacity factor (k inside: C = ceil(S / E * cf * k)).
    eval_capacity_factor: capacity factor when `train=False` (None: same as training).
    min_capacity: lower bound on C.
    priority: "position" | "bpr" | "token_major" (see routing.route_top_k).
    fill_in: Fill-in Rectification (a (k+1)-th choice takes slots the top-k demand left empty).
    fill_in_priority: "same" (official) | "score".
    ir_mode: Intra-device Rectification: None (off) | "all" | "any" | "ignore_kth".
    ir_capacity_factor: IR buffer size (None = exact, S slots per local expert per group). A rectified token
      whose local expert already accepted one of its choices reuses that output and takes no slot.
    combine: "normalized" | "probs".
    straight_through: top-1 straight-through combine (forward weight 1); needs K == 1.
    group_size: S, tokens per routing group (must divide the tokens of each device).
    activation: "swiglu" (w_gate, w_up, w_down) | "gelu" (w_up, w_down).
    dispatch: "einsum" (one-hot masks) | "index" (gathers into the same buffers, forward and backward; faster on
      GPU; reverse-mode autodiff only).
    dtype: expert compute and all-to-all payload dtype, "float32" | "bfloat16"; the router is float32.
    load_balance_all_k: count all k choices in the load-balance loss (default: first choice).
    router_init_std: std of the normal init of the router kernel.
    eps: floor of normalizers.
    router: "top_k" (learned softmax router; vanilla and Rectify variants), "stablemoe" (greedy top-1 by
      centroid scores, sigmoid gate, distilled token-id router from `stablemoe_switch_step` on) or "hash"
      (fixed token-id -> expert table, no learned router).
    gating_dropout: Gating Dropout rate p (top_k router, training only): with probability p per step and
      layer, one decision shared by every device, tokens go to the best expert on their own device and
      the all-to-all is skipped.
    gating_dropout_mode: "gate_drop" | "gate_expert_drop" (a dropped step also skips the expert).
    gating_dropout_weight: combine weight of the local expert on a dropped step: "one" | "prob".
    stablemoe_switch_step: first step of StableMoE stage 2 (distilled router, frozen).
    stablemoe_routing_dim: width r of the distilled router's token embedding.
    stablemoe_distill_weight: weight of the distillation loss (0.3 as the official code).
    hash_table: "random" (random balanced) | "balanced" (frequency-balanced on the training data).
  """
  num_experts: int = 8
  expert_dim: int = 256
  top_k: int = 1
  capacity_factor: float = 1.0
  eval_capacity_factor: Optional[float] = None
  min_capacity: int = 0
  priority: str = "position"
  fill_in: bool = False
  fill_in_priority: str = "same"
  ir_mode: Optional[str] = None
  ir_capacity_factor: Optional[float] = None
  combine: str = "normalized"
  straight_through: bool = False
  group_size: int = 256
  activation: str = "swiglu"
  dispatch: str = "einsum"
  dtype: str = "float32"
  load_balance_all_k: bool = False
  router_init_std: float = 0.02
  eps: float = 1e-9
  router: str = "top_k"
  gating_dropout: float = 0.0
  gating_dropout_mode: str = "gate_drop"
  gating_dropout_weight: str = "one"
  stablemoe_switch_step: int = 1000
  stablemoe_routing_dim: int = 50
  stablemoe_distill_weight: float = 0.3
  hash_table: str = "random"

  @property
  def num_choices(self) -> int:
    """K: ranked choices per token."""
    return self.top_k + int(self.fill_in)

  def capacity(self, train: bool) -> int:
    """C for one group (train or eval capacity factor)."""
    cf = self.capacity_factor if train or self.eval_capacity_factor is None else self.eval_capacity_factor
    return routing.expert_capacity(self.group_size, self.num_experts, self.top_k, cf, self.min_capacity)

  def validate(self) -> None:
    """Raises ValueError naming the field and the fix, before anything is compiled."""
    def bad(msg):
      raise ValueError(f"Invalid MoE config: {msg}")
    if self.num_experts < 1:
      bad(f"moe.num_experts={self.num_experts} must be >= 1.")
    if not 1 <= self.top_k <= self.num_experts:
      bad(f"moe.top_k={self.top_k} must be in [1, num_experts={self.num_experts}].")
    if self.fill_in and self.top_k + 1 > self.num_experts:
      bad(f"moe.fill_in needs top_k + 1 <= num_experts (top_k={self.top_k}, num_experts={self.num_experts}).")
    for name, allowed in (("priority", routing.PRIORITIES), ("fill_in_priority", routing.FILL_IN_PRIORITIES),
                          ("combine", routing.COMBINE_MODES), ("activation", ACTIVATIONS),
                          ("dispatch", DISPATCH_IMPLS), ("dtype", tuple(DTYPES)), ("router", ROUTERS),
                          ("gating_dropout_mode", GATING_DROPOUT_MODES),
                          ("gating_dropout_weight", GATING_DROPOUT_WEIGHTS)):
      if getattr(self, name) not in allowed:
        bad(f"moe.{name}={getattr(self, name)!r}; use one of {list(allowed)}.")
    if self.ir_mode is not None and self.ir_mode not in routing.IR_MODES:
      bad(f"moe.ir_mode={self.ir_mode!r}; use None (no IR) or one of {list(routing.IR_MODES)}.")
    if self.ir_mode == "ignore_kth" and not self.fill_in and self.top_k == 1:
      bad("moe.ir_mode='ignore_kth' with top-1 and no fill-in rectifies nothing (n_acc < 0); use 'all'.")
    if self.straight_through and self.num_choices != 1:
      bad(f"moe.straight_through needs top-1 without fill-in (K=1), got K={self.num_choices}; set it False.")
    if self.group_size < 1:
      bad(f"moe.group_size={self.group_size} must be >= 1.")
    if self.expert_dim < 1:
      bad(f"moe.expert_dim={self.expert_dim} must be >= 1.")
    for name in ("capacity_factor", "eval_capacity_factor", "ir_capacity_factor"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        bad(f"moe.{name}={value} must be > 0.")
    if not 0.0 <= self.gating_dropout < 1.0:
      bad(f"moe.gating_dropout={self.gating_dropout} must be in [0, 1).")
    if self.router != "top_k":
      if self.top_k != 1 or self.fill_in or self.ir_mode is not None or self.gating_dropout > 0:
        bad(f"moe.router={self.router!r} routes greedily to one expert: set top_k=1, fill_in=False, "
            "ir_mode=None and gating_dropout=0 (rectification and gating dropout apply to router='top_k').")
    if self.router == "stablemoe" and self.stablemoe_routing_dim < 1:
      bad(f"moe.stablemoe_routing_dim={self.stablemoe_routing_dim} must be >= 1.")
    if self.router == "hash" and self.hash_table not in hash_routing.HASH_TABLES:
      bad(f"moe.hash_table={self.hash_table!r}; use one of {list(hash_routing.HASH_TABLES)}.")
    self.capacity(True), self.capacity(False)  # raises if C < 1

  @classmethod
  def from_dict(cls, values: Any) -> "MoEConfig":
    """From a mapping (e.g. an ml_collections ConfigDict); unknown keys are an error naming the key."""
    return config_fields.dataclass_from_mapping(cls, values, "MoE")


# ---------------------------------------------------------------------------------------------------------
# Dispatch / experts / combine on capacity buffers: shared by the main path and the IR path.
# ---------------------------------------------------------------------------------------------------------
def _buffer_masks(buffer_index: Array, slot: Array, num_buffers: int, capacity: int) -> tuple[Array, Array]:
  """One-hot factors [G, S, K, B] and [G, S, K, C] of an assignment (slot -1 -> all-zero row)."""
  return (jax.nn.one_hot(buffer_index, num_buffers, dtype=jnp.float32),
          jax.nn.one_hot(slot, capacity, dtype=jnp.float32))


def dispatch_tokens(x: Array, buffer_index: Array, slot: Array, *, num_buffers: int, capacity: int,
                    impl: str) -> Array:
  """Copies tokens into capacity buffers.

  Args:
    x: [G, S, D] tokens (payload dtype).
    buffer_index: int32[G, S, K] target buffer (expert) of each choice.
    slot: int32[G, S, K] slot in that buffer, -1 = not dispatched.
    num_buffers: B (experts).
    capacity: C.
    impl: "einsum" (one-hot dispatch mask) or "index" (gathers both ways, see `index_dispatch`).

  Returns:
    [B, G, C, D] in x.dtype; unfilled slots are zero rows (padding).
  """
  if impl == "einsum":
    expert_onehot, slot_onehot = _buffer_masks(buffer_index, slot, num_buffers, capacity)
    # Shape: [G, S, B, C] = einsum("gskb,gskc->gsbc")
    mask = jnp.einsum("gskb,gskc->gsbc", expert_onehot, slot_onehot).astype(x.dtype)
    # Shape: [B, G, C, D] = einsum("gsbc,gsd->bgcd")
    return jnp.einsum("gsbc,gsd->bgcd", mask, x)
  return index_dispatch.dispatch(x, index_dispatch.slot_map(buffer_index, slot, num_buffers=num_buffers,
                                                              capacity=capacity))


def combine_outputs(out: Array, buffer_index: Array, slot: Array, weight: Array, *, impl: str) -> Array:
  """Gathers expert outputs back to tokens and sums them with the combine weights.

  Args:
    out: [B, G, C, D] expert outputs.
    buffer_index: int32[G, S, K].
    slot: int32[G, S, K], -1 = not dispatched (contributes nothing).
    weight: float32[G, S, K] combine weights (0 where not dispatched).
    impl: "einsum" | "index".

  Returns:
    float32[G, S, D].
  """
  num_buffers, _, capacity, _ = out.shape
  if impl == "einsum":
    expert_onehot, slot_onehot = _buffer_masks(buffer_index, slot, num_buffers, capacity)
    # Shape: [G, S, B, C] = einsum("gsk,gskb,gskc->gsbc")
    combine = jnp.einsum("gsk,gskb,gskc->gsbc", weight, expert_onehot, slot_onehot).astype(out.dtype)
    # Shape: [G, S, D] = einsum("gsbc,bgcd->gsd")
    return jnp.einsum("gsbc,bgcd->gsd", combine, out, preferred_element_type=jnp.float32)
  return index_dispatch.combine(out, weight, index_dispatch.slot_map(buffer_index, slot, num_buffers=num_buffers,
                                                                    capacity=capacity))


def expert_ffn(buffers: Array, weights: dict[str, Array], activation: str) -> Array:
  """Runs L stacked experts on their buffers.

  Args:
    buffers: [L, N, C, D] rows of each local expert (payload dtype).
    weights: "w_up" [L, D, F], "w_down" [L, F, D], and for SwiGLU "w_gate" [L, D, F] (cast to buffers.dtype).
    activation: "swiglu" | "gelu".

  Returns:
    [L, N, C, D] in buffers.dtype.
  """
  dtype = buffers.dtype
  # Shape: [L, N, C, F] = einsum("lncd,ldf->lncf")
  up = jnp.einsum("lncd,ldf->lncf", buffers, weights["w_up"].astype(dtype))
  if activation == "swiglu":
    # Shape: [L, N, C, F] = einsum("lncd,ldf->lncf")
    gate = jnp.einsum("lncd,ldf->lncf", buffers, weights["w_gate"].astype(dtype))
    hidden = jax.nn.silu(gate) * up
  else:
    hidden = jax.nn.gelu(up)
  # Shape: [L, N, C, D] = einsum("lncf,lfd->lncd")
  return jnp.einsum("lncf,lfd->lncd", hidden, weights["w_down"].astype(dtype))


def expert_ffn_joint(parts: list[Array], weights: dict[str, Array], activation: str) -> list[Array]:
  """Runs the same L experts over the rows of several buffers in one pass.

  One matmul per weight over all rows, instead of one per buffer: no small matmuls, and no second weight
  gradient to add (the main capacity buffers and the IR buffers share the device's experts).

  Args:
    parts: buffers [L, N_i, C_i, D] (payload dtype), the same L and D.
    weights, activation: as `expert_ffn`.

  Returns:
    The outputs, one per part, of the same shapes.
  """
  if len(parts) == 1:
    return [expert_ffn(parts[0], weights, activation)]
  num_local, width = parts[0].shape[0], parts[0].shape[-1]
  rows = [p.shape[1] * p.shape[2] for p in parts]
  # Shape: [L, 1, sum_i N_i * C_i, D]
  joint = jnp.concatenate([p.reshape(num_local, 1, r, width) for p, r in zip(parts, rows)], axis=2)
  out = expert_ffn(joint, weights, activation)
  bounds = np.cumsum([0] + rows)
  return [out[:, :, a:b].reshape(p.shape) for p, a, b in zip(parts, bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------------------------------------------------
# The per-device body.
# ---------------------------------------------------------------------------------------------------------
def _metric_sums(table: routing.RoutingTable) -> dict[str, Array]:
  """Per-device counts that are psum-reduced into global rates."""
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


def _ir_sums(ir: Optional[routing.IRTable]) -> dict[str, Array]:
  zero = jnp.zeros((), jnp.float32)
  if ir is None:
    return {"ir_rectified": zero, "ir_reused": zero, "ir_overflow": zero}
  return {"ir_rectified": jnp.sum(ir.num_rectified).astype(jnp.float32),
          "ir_reused": jnp.sum(ir.reuse_choice >= 0, dtype=jnp.float32),
          "ir_overflow": jnp.sum(ir.overflow).astype(jnp.float32)}


def _global_sum(value: Array, axes) -> Array:
  return jax.lax.psum(value, axes) if axes else value


def route_shard(xg: Array, mask: Array, router_params: dict[str, Array], *, cfg: MoEConfig, train: bool,
                capacity: int, token_ids: Optional[Array], step: Optional[Array], reduce_axes=None
                ) -> tuple[Array, routing.RoutingTable, dict[str, Array]]:
  """The router of one shard: probabilities, routing table and float32 losses.

  Args:
    xg: [G, S, D] tokens.
    mask: bool[G, S].
    router_params: "kernel" float32[D, E] (top_k, stablemoe); "distill_embed" [V, r] and
      "distill_centroids" [E, r] (stablemoe); "table" int32[V] (hash).
    cfg, train, capacity: block config, mode and C.
    token_ids: int32[G, S] input token ids (stablemoe, hash).
    step: int32 scalar training step (stablemoe stage switch).
    reduce_axes: mesh axes over which batch-global quantities are summed (StableMoE's |A_i|), or None.

  Returns:
    (probs float32[G, S, E] used for local choices, the RoutingTable, losses {"aux_loss", "distill_loss"}:
    per-device values whose pmean over the mesh is the global loss, and "z_loss_sum": this device's sum of
    logsumexp^2 over valid tokens, psum-ed and divided by the valid tokens of the mesh).
  """
  zero = jnp.zeros((), jnp.float32)
  num_experts = cfg.num_experts
  if cfg.router == "top_k":
    # Shape: [G, S, E] = einsum("gsd,de->gse")
    logits = jnp.einsum("gsd,de->gse", xg.astype(jnp.float32), router_params["kernel"].astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    table = routing.route_top_k(probs, top_k=cfg.top_k, capacity=capacity, priority=cfg.priority,
                                fill_in=cfg.fill_in, fill_in_priority=cfg.fill_in_priority,
                                combine=cfg.combine, straight_through=cfg.straight_through,
                                token_mask=mask, eps=cfg.eps)
    losses = {"aux_loss": routing.load_balance_loss(probs, table.expert_index[..., :cfg.top_k], mask,
                                                    all_k=cfg.load_balance_all_k),
              "z_loss_sum": routing.router_z_loss(logits, mask, reduction="sum"), "distill_loss": zero}
    return probs, table, losses

  if cfg.router == "hash":
    choice = router_params["table"][token_ids]
    onehot = jax.nn.one_hot(choice, num_experts, dtype=jnp.float32)
    table = routing.route_top_k(onehot, top_k=1, capacity=capacity, priority="position", combine="probs",
                                token_mask=mask)  # weight 1 for accepted tokens: no gate
    return onehot, table, {"aux_loss": zero, "z_loss_sum": zero, "distill_loss": zero}

  # StableMoE.
  # Shape: [G, S, E] = einsum("gsd,de->gse")
  scores = jnp.einsum("gsd,de->gse", xg.astype(jnp.float32), router_params["kernel"].astype(jnp.float32))
  # Shape: [G, S, E] = einsum("gsr,er->gse")
  distilled = jnp.einsum("gsr,er->gse", router_params["distill_embed"][token_ids].astype(jnp.float32),
                         router_params["distill_centroids"].astype(jnp.float32))
  stage2 = (step >= cfg.stablemoe_switch_step) if train else jnp.asarray(True)
  route_scores = jax.lax.stop_gradient(jnp.where(stage2, distilled, scores))
  choice = jnp.argmax(route_scores, axis=-1)
  onehot = jax.nn.one_hot(choice, num_experts, dtype=jnp.float32)
  table = routing.route_top_k(onehot, top_k=1, capacity=capacity, priority="position", combine="probs",
                              token_mask=mask)
  # The gate is sigmoid of the ORIGINAL score of the chosen expert (it keeps learning in stage 2).
  gate = jax.nn.sigmoid(jnp.take_along_axis(scores, choice[..., None], axis=-1))  # [G, S, 1]
  weight = gate * table.accepted
  table = table.replace(combine_weight=weight, combine=table.dispatch * weight[..., None])

  teacher = jnp.argmax(jax.lax.stop_gradient(scores), axis=-1)
  validf = mask.astype(jnp.float32)
  counts = _global_sum(jnp.einsum("gse,gs->e", jax.nn.one_hot(teacher, num_experts), validf), reduce_axes)
  tokens = _global_sum(jnp.sum(validf), reduce_axes)
  devices = _global_sum(jnp.ones((), jnp.float32), reduce_axes)
  # Per-device parts scaled so that their pmean is (global sum) / (global tokens).
  scale = devices / jnp.maximum(tokens, 1.0)
  stage1 = 1.0 - stage2.astype(jnp.float32)
  balance = stablemoe.balance_loss_sum(scores, teacher, mask, counts, tokens) * scale
  distill = stablemoe.distill_loss_sum(distilled, teacher, mask) * scale
  losses = {"aux_loss": stage1 * balance, "z_loss_sum": routing.router_z_loss(scores, mask, reduction="sum"),
            "distill_loss": stage1 * cfg.stablemoe_distill_weight * distill}
  return jax.nn.softmax(scores, axis=-1), table, losses


def moe_shard_body(x: Array, token_mask: Array, router_kernel: Optional[Array], expert_weights: dict[str, Array], *,
                   cfg: MoEConfig, train: bool, expert_axis_size: int,
                   expert_axis: Optional[str] = sharding.EXPERT, token_ids: Optional[Array] = None,
                   step: Optional[Array] = None, drop: Optional[Array] = None,
                   router_extras: Optional[dict[str, Array]] = None,
                   reduce_axes=None) -> tuple[Array, dict[str, Array]]:
  """The MoE computation of one device (call inside shard_map, or directly with expert_axis=None).

  Args:
    x: [B_l, T, D] this device's tokens.
    token_mask: bool[B_l, T].
    router_kernel: float32[D, E] (None for the hash router).
    expert_weights: this device's experts, each [L, ...].
    cfg: the block config.
    train: use the training capacity factor (else the eval one); Gating Dropout only when training.
    expert_axis_size: n_exp; L = E / n_exp.
    expert_axis: mesh axis name for all_to_all and axis_index; None when running unsharded (n_exp = 1).
    token_ids: int32[B_l, T] input token ids (StableMoE and hash routers).
    step: int32 scalar training step (StableMoE stage).
    drop: bool scalar, the shared Gating Dropout decision of this step and layer.
    router_extras: further router parameters ("distill_embed", "distill_centroids", "table").
    reduce_axes: mesh axes spanning the batch (for batch-global router statistics), or None.

  Returns:
    (y [B_l, T, D] in x.dtype, per-device unreduced metric sums and losses).
  """
  batch, seq, width = x.shape
  num_experts, group_size = cfg.num_experts, cfg.group_size
  num_local = num_experts // expert_axis_size
  groups = batch * seq // group_size
  payload_dtype = DTYPES[cfg.dtype]
  capacity = cfg.capacity(train)
  sharded = expert_axis is not None and expert_axis_size > 1
  first_expert = jax.lax.axis_index(expert_axis) * num_local if sharded else 0

  xg = x.reshape(groups, group_size, width)
  mask = token_mask.reshape(groups, group_size)
  ids = None if token_ids is None else token_ids.reshape(groups, group_size)
  router_params = dict(router_extras or {})
  if router_kernel is not None:
    router_params["kernel"] = router_kernel

  with jax.named_scope("router"):
    probs, table, losses = route_shard(xg, mask, router_params, cfg=cfg, train=train, capacity=capacity,
                                       token_ids=ids, step=step, reduce_axes=reduce_axes)
  payload = xg.astype(payload_dtype)
  # A zero that varies over the mesh like the tokens: added to every metric sum so both branches of the
  # Gating Dropout cond return values of the same (varying) type, constants included.
  varying_zero = jnp.sum(mask, dtype=jnp.float32) * 0.0

  def routed(payload):
    """Dispatch, all_to_all, experts, all_to_all back, combine; IR on the device's own experts (no collective),
    its rows run through the experts in the same pass as the main ones."""
    ir = None
    if cfg.ir_mode is not None:
      with jax.named_scope("rectify"):
        ir = ir_table(probs, table, cfg=cfg, first_expert=first_expert, num_local=num_local)
    if ir is not None and not sharded and cfg.dispatch == "index":
      y = _routed_one_device(payload, table, ir, expert_weights, cfg=cfg, capacity=capacity)
    else:
      y = _routed_all_to_all(payload, table, ir, expert_weights, cfg=cfg, capacity=capacity,
                             expert_axis=expert_axis if sharded else None)
    sums = {**_metric_sums(table), **_ir_sums(ir),
            "slots": jnp.asarray(groups * num_experts * capacity, jnp.float32),
            "a2a_rows": jnp.asarray(groups * num_experts * capacity, jnp.float32)}  # the buffers the all-to-all carries
    return y, jax.tree.map(lambda v: v + varying_zero, sums)

  def local_only(payload):
    """Gating Dropout's dropped step: every token to the best expert on its own device; no collective.

    Its metrics describe this local step: demand = each token's local expert, accepted = tokens that fit the
    local buffer (none under Gate-Expert-Drop), no all-to-all rows.
    """
    with jax.named_scope("gating_dropout_local"):
      skip_expert = cfg.gating_dropout_mode == "gate_expert_drop"
      local_capacity = routing.ir_capacity_from_factor(group_size, num_local, cfg.capacity_factor)
      local_expert, p, slot, _ = routing.route_local(
          probs, mask, first_expert=first_expert, num_local=num_local, capacity=local_capacity,
          order_gate=table.gate[..., 0], by_probability=(cfg.priority == "bpr"))
      placed = (slot >= 0) & (not skip_expert)
      validf = mask.astype(jnp.float32)
      chosen = jax.nn.one_hot(first_expert + local_expert, num_experts, dtype=jnp.float32) * validf[..., None]
      sums = {"tokens": jnp.sum(validf), "dropped_choices": jnp.sum(validf) - jnp.sum(placed, dtype=jnp.float32),
              "unrouted_tokens": jnp.sum(validf) - jnp.sum(placed, dtype=jnp.float32),
              "filled_slots": jnp.sum(placed, dtype=jnp.float32), "fill_in_slots": jnp.zeros((), jnp.float32),
              "expert_demand": jnp.sum(chosen, axis=(0, 1)),
              "expert_load": jnp.sum(chosen * placed[..., None], axis=(0, 1)), **_ir_sums(None),
              "slots": jnp.asarray(0 if skip_expert else groups * num_local * local_capacity, jnp.float32),
              "a2a_rows": jnp.zeros((), jnp.float32)}
      sums = jax.tree.map(lambda v: v + varying_zero, sums)
      if skip_expert:
        return jnp.zeros_like(payload, dtype=jnp.float32), sums
      weight = (jnp.ones_like(p) if cfg.gating_dropout_weight == "one" else p) * placed
      buffers = dispatch_tokens(payload, local_expert[..., None], slot[..., None], num_buffers=num_local,
                                capacity=local_capacity, impl=cfg.dispatch)
      out = expert_ffn(buffers, expert_weights, cfg.activation)
      y = combine_outputs(out, local_expert[..., None], slot[..., None], weight[..., None], impl=cfg.dispatch)
      return y, sums

  dropout_active = train and cfg.gating_dropout > 0 and drop is not None
  if dropout_active:
    y, sums = jax.lax.cond(drop, local_only, routed, payload)
    kept = 1.0 - drop.astype(jnp.float32)
    losses = {k: kept * v for k, v in losses.items()}  # no gate ran on a dropped step
  else:
    y, sums = routed(payload)

  metrics = {**sums, **losses}
  metrics["group_tokens"] = jnp.asarray(groups * group_size, jnp.float32)
  metrics["gating_dropped"] = drop.astype(jnp.float32) if dropout_active else jnp.zeros((), jnp.float32)
  return y.reshape(batch, seq, width).astype(x.dtype), metrics


def _routed_all_to_all(payload: Array, table: routing.RoutingTable, ir: Optional[routing.IRTable],
                       expert_weights: dict[str, Array], *, cfg: MoEConfig, capacity: int,
                       expert_axis: Optional[str]) -> Array:
  """Capacity buffers through all_to_all (when `expert_axis` is set) and the experts, and back; IR rows join
  the device's experts in the same matmuls (`expert_ffn_joint`). Returns float32[G, S, D]."""
  num_experts = cfg.num_experts
  weight, ir_weight = (table.combine_weight, None) if ir is None else ir_combine_weights(table, ir, eps=cfg.eps)
  with jax.named_scope("dispatch"):
    buffers = dispatch_tokens(payload, table.expert_index, table.slot, num_buffers=num_experts,
                              capacity=capacity, impl=cfg.dispatch)  # [E, G, C, D]
    if expert_axis is not None:
      # Shape: [E, G, C, D] -> [L, n_exp * G, C, D]
      buffers = jax.lax.all_to_all(buffers, expert_axis, split_axis=0, concat_axis=1, tiled=True)
  parts = [buffers]
  if ir is not None:
    with jax.named_scope("rectify"):
      parts.append(ir_dispatch(payload, ir, num_local=buffers.shape[0], impl=cfg.dispatch))
  with jax.named_scope("experts"):
    outs = expert_ffn_joint(parts, expert_weights, cfg.activation)
  with jax.named_scope("combine"):
    out = outs[0]
    if expert_axis is not None:
      # Shape: [L, n_exp * G, C, D] -> [E, G, C, D]
      out = jax.lax.all_to_all(out, expert_axis, split_axis=1, concat_axis=0, tiled=True)
    y = combine_outputs(out, table.expert_index, table.slot, weight, impl=cfg.dispatch)
  if ir is None:
    return y
  with jax.named_scope("rectify"):
    return y + ir_combine(outs[1], ir, ir_weight, impl=cfg.dispatch)


def _routed_one_device(payload: Array, table: routing.RoutingTable, ir: routing.IRTable,
                       expert_weights: dict[str, Array], *, cfg: MoEConfig, capacity: int) -> Array:
  """IR when the device holds every expert (no expert sharding), index dispatch: one assignment, one pass.

  Each expert's buffer holds its C routed slots followed by its C_ir IR slots, [E, G, C + C_ir, D]; the IR
  choice is a (K+1)-th choice of the token, and the IR blend becomes combine weights (`ir_combine_weights`).
  The same function as `_routed_all_to_all` without the concatenation of the two buffers into one expert
  input and the split of its output (copies of every row, forward and backward), and with one gather each
  way instead of two. Not used for einsum masks: there the joint one-hot products
  cost (K+1)(C+C_ir) per token and expert instead of K*C + C_ir. Returns float32[G, S, D].
  """
  joint_capacity = capacity + ir.ir_capacity
  routed_weight, ir_weight = ir_combine_weights(table, ir, eps=cfg.eps)
  # Shape: [G, S, K + 1] each: the routed choices, then the IR choice in slots [C, C + C_ir).
  buffer_index = jnp.concatenate([table.expert_index, ir.local_expert[..., None]], axis=-1)
  slot = jnp.concatenate([table.slot, jnp.where(ir.slot >= 0, capacity + ir.slot, -1)[..., None]], axis=-1)
  weight = jnp.concatenate([routed_weight, ir_weight[..., None]], axis=-1)
  with jax.named_scope("dispatch"):
    buffers = dispatch_tokens(payload, buffer_index, slot, num_buffers=cfg.num_experts, capacity=joint_capacity,
                              impl=cfg.dispatch)  # [E, G, C + C_ir, D]
  with jax.named_scope("experts"):
    out = expert_ffn(buffers, expert_weights, cfg.activation)
  with jax.named_scope("combine"):
    return combine_outputs(out, buffer_index, slot, weight, impl=cfg.dispatch)


def ir_table(probs: Array, table: routing.RoutingTable, *, cfg: MoEConfig, first_expert,
             num_local: int) -> routing.IRTable:
  """IR decisions of one device: under-served tokens' best local expert and their IR slots.

  Args:
    probs: float32[G, S, E] router probabilities.
    table: the device's routing table.
    cfg: block config (ir_mode, ir_capacity_factor).
    first_expert: global index of the device's first expert.
    num_local: L.

  Returns:
    The `routing.IRTable` (IR buffers of C_ir = `ir_capacity_from_factor(S, L, ir_capacity_factor)` slots).
  """
  ir_capacity = routing.ir_capacity_from_factor(probs.shape[1], num_local, cfg.ir_capacity_factor)
  return routing.intra_device_choice(probs, table, first_expert=first_expert, num_local=num_local,
                                     mode=cfg.ir_mode, ir_capacity=ir_capacity)


def ir_dispatch(payload: Array, ir: routing.IRTable, *, num_local: int, impl: str) -> Array:
  """IR buffers [L, G, C_ir, D] of the device's own experts, from [G, S, D] tokens (payload dtype)."""
  return dispatch_tokens(payload, ir.local_expert[..., None], ir.slot[..., None], num_buffers=num_local,
                         capacity=ir.ir_capacity, impl=impl)


def ir_combine(out: Array, ir: routing.IRTable, weight: Array, *, impl: str) -> Array:
  """float32[G, S, D]: weight float32[G, S] times the IR buffer row of each token with an IR slot, from the
  IR buffers' expert outputs out [L, G, C_ir, D] (0 for tokens without a slot)."""
  return combine_outputs(out, ir.local_expert[..., None], ir.slot[..., None], weight[..., None], impl=impl)


def ir_combine_weights(table: routing.RoutingTable, ir: routing.IRTable, *, eps: float) -> tuple[Array, Array]:
  """The IR blend (`routing.ir_blend`) as combine weights.

  y = sum_k routed[k] * out(choice k) + own * out(IR slot) is the blend `keep * y_routed + local * y_local`:
  the routed weights are scaled by keep, and the local expert's output weighs in with local, through the IR
  slot, or, for a token that reuses a routed choice (`IRTable.reuse_choice`), added to that choice's weight.

  Returns:
    routed float32[G, S, K] and own float32[G, S] (0 where the token has no IR slot).
  """
  keep, local = routing.ir_blend_weights(ir.p, ir.lam, ir.total, ir.placed, eps=eps)
  reused = jax.nn.one_hot(ir.reuse_choice, table.num_choices, dtype=jnp.float32)  # zero row where -1
  routed = table.combine_weight * keep[..., None] + local[..., None] * reused
  return routed, jnp.where(ir.slot >= 0, local, 0.0)


# Per-device values whose mean over the mesh is the global value (the rest are psum-ed counts).
LOSS_KEYS = ("aux_loss", "distill_loss", "gating_dropped")


def reduce_metrics(sums: dict[str, Array], axes) -> dict[str, Array]:
  """psum/pmean the per-device sums over `axes` and turn them into global rates."""
  losses = {k: jax.lax.pmean(sums[k], axes) for k in LOSS_KEYS}
  totals = {k: jax.lax.psum(v, axes) for k, v in sums.items() if k not in losses}
  return finalize_metrics(totals, losses)


def finalize_metrics(totals: dict[str, Array], losses: dict[str, Array]) -> dict[str, Array]:
  """Global rates from global totals (shared by the sharded block and single-device use)."""
  tokens = jnp.maximum(totals["tokens"], 1.0)
  # The z-loss is a mean over all valid tokens of the mesh, whatever the padding on each device.
  losses = {**losses, "z_loss": totals["z_loss_sum"] / tokens}
  top_k_choices = jnp.maximum(jnp.sum(totals["expert_demand"]), 1.0)
  return {
      **losses,
      "drop_rate": totals["dropped_choices"] / top_k_choices,
      "unrouted_rate": totals["unrouted_tokens"] / tokens,
      "padding_rate": 1.0 - totals["filled_slots"] / jnp.maximum(totals["slots"], 1.0),
      "fill_in_rate": totals["fill_in_slots"] / jnp.maximum(totals["slots"], 1.0),
      "a2a_rows_per_token": totals["a2a_rows"] / jnp.maximum(totals["group_tokens"], 1.0),
      "ir_rate": totals["ir_rectified"] / tokens,
      "ir_overflow_rate": totals["ir_overflow"] / tokens,
      "ir_reuse_rate": totals["ir_reused"] / tokens,
      "tokens": totals["tokens"],
      "expert_demand": totals["expert_demand"],
      "expert_load": totals["expert_load"],
  }


# ---------------------------------------------------------------------------------------------------------
# The NNX module.
# ---------------------------------------------------------------------------------------------------------
class HashTable(nnx.Variable):
  """A fixed (non-trainable) token-id -> expert table; checkpointed with the model, never optimized."""


def gating_dropout_decision(rng: Array, rate: float) -> Array:
  """bool scalar: drop the gate this step (one draw from a replicated key, so every device agrees)."""
  return jax.random.uniform(rng, ()) < rate


class MoEBlock(nnx.Module):
  """Router + stacked experts; the forward pass is one `jax.shard_map` over the context mesh.

  Parameters: `router_kernel` float32[D, E] (replicated; StableMoE's centroids E^T; absent for the hash
  router); `w_gate`, `w_up` float32[E, D, F] and `w_down` float32[E, F, D] sharded `P("expert", None, None)`
  (no w_gate for GELU); StableMoE adds `distill_embed` float32[V, r] and `distill_centroids` float32[E, r];
  the hash router holds a `HashTable` int32[V]. Compute casts expert weights to cfg.dtype.
  """

  def __init__(self, cfg: MoEConfig, *, d_model: int, rngs: nnx.Rngs, vocab_size: int = 259,
               hash_table=None):
    cfg.validate()
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and sharding.EXPERT in mesh.axis_names and cfg.num_experts % mesh.shape[sharding.EXPERT]:
      raise ValueError(
          f"num_experts={cfg.num_experts} is not divisible by the mesh's expert axis "
          f"({mesh.shape[sharding.EXPERT]}); every device must hold the same number of experts. Use an expert "
          f"axis that divides {cfg.num_experts}.")
    self.cfg = cfg
    self.d_model = d_model
    e, d, f = cfg.num_experts, d_model, cfg.expert_dim
    replicated = lambda init: nnx.with_partitioning(init, (None, None))
    if cfg.router != "hash":
      self.router_kernel = nnx.Param(replicated(nnx.initializers.normal(cfg.router_init_std))(rngs.params(), (d, e)))
    if cfg.router == "stablemoe":
      r = cfg.stablemoe_routing_dim
      self.distill_embed = nnx.Param(replicated(nnx.initializers.normal(1.0))(rngs.params(), (vocab_size, r)))
      self.distill_centroids = nnx.Param(
          replicated(nnx.initializers.orthogonal(scale=0.1))(rngs.params(), (e, r)))
    if cfg.router == "hash":
      if hash_table is None:
        hash_table = hash_routing.build_table(cfg.hash_table, vocab_size, e, seed=0)
      self.hash_table = HashTable(jnp.asarray(hash_table, jnp.int32))
    init_in = nnx.with_partitioning(nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                                      in_axis=1, out_axis=2),
                                    (sharding.EXPERT, None, None))
    self.w_up = nnx.Param(init_in(rngs.params(), (e, d, f)))
    self.w_down = nnx.Param(init_in(rngs.params(), (e, f, d)))
    if cfg.activation == "swiglu":
      self.w_gate = nnx.Param(init_in(rngs.params(), (e, d, f)))

  def expert_weights(self) -> dict[str, Array]:
    names = ("w_gate", "w_up", "w_down") if self.cfg.activation == "swiglu" else ("w_up", "w_down")
    return {name: getattr(self, name)[...] for name in names}

  def router_params(self) -> dict[str, Array]:
    """The router's arrays, by the names `route_shard` reads."""
    if self.cfg.router == "hash":
      return {"table": self.hash_table[...]}
    params = {"kernel": self.router_kernel[...]}
    if self.cfg.router == "stablemoe":
      params.update(distill_embed=self.distill_embed[...], distill_centroids=self.distill_centroids[...])
    return params

  def __call__(self, x: Array, token_mask: Optional[Array] = None, *, train: bool = True,
               token_ids: Optional[Array] = None, step: Optional[Array] = None, rng: Optional[Array] = None
               ) -> tuple[Array, dict[str, Array]]:
    """Applies the block.

    Args:
      x: [B, T, D] tokens, batch sharded over ("data", "expert").
      token_mask: bool[B, T] (False = padding; never dispatched, excluded from losses and metrics).
      train: training capacity factor and Gating Dropout (True) or evaluation capacity factor (False).
      token_ids: int32[B, T] input token ids (needed by the StableMoE and hash routers).
      step: int32 scalar training step (StableMoE's stage switch).
      rng: a replicated PRNG key for this step and layer (Gating Dropout).

    Returns:
      y [B, T, D] (x.dtype) and metrics (replicated float32): "aux_loss", "z_loss", "distill_loss",
      "gating_dropped", "drop_rate", "unrouted_rate", "padding_rate", "fill_in_rate", "ir_rate",
      "ir_overflow_rate", "ir_reuse_rate" (rectified tokens whose local expert output is a routed choice's: no
      IR row), "tokens", "expert_demand" [E], "expert_load" [E], "a2a_rows_per_token".
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or set(mesh.axis_names) != set(sharding.AXES):
      raise ValueError("MoEBlock must be called under jax.set_mesh(mesh) with a ('data', 'expert') mesh "
                       "(see rectify_moe.sharding.make_mesh).")
    cfg = self.cfg
    n_exp = mesh.shape[sharding.EXPERT]
    n_dev = mesh.shape[sharding.DATA] * n_exp
    batch, seq, _ = x.shape
    sharding.validate_moe_layout(num_experts=cfg.num_experts, expert_axis=n_exp, global_batch=batch,
                                 seq_len=seq, group_size=cfg.group_size, num_devices=n_dev)
    if token_ids is None:
      if cfg.router in ("stablemoe", "hash"):
        raise ValueError(f"moe.router={cfg.router!r} routes by token id: pass token_ids to the MoE block.")
      token_ids = jnp.zeros((batch, seq), jnp.int32)
    if token_mask is None:
      token_mask = jnp.ones((batch, seq), bool)
    step = jnp.zeros((), jnp.int32) if step is None else jnp.asarray(step, jnp.int32)
    if train and cfg.gating_dropout > 0:
      if rng is None:
        raise ValueError("moe.gating_dropout > 0 needs an rng for the MoE block in training.")
      drop = gating_dropout_decision(rng, cfg.gating_dropout)
    else:
      drop = jnp.zeros((), bool)
    weights = self.expert_weights()
    router = self.router_params()

    def body(x_l, mask_l, ids_l, router_l, weights_l, step_l, drop_l):
      router_l = dict(router_l)
      kernel = router_l.pop("kernel", None)
      y_l, sums = moe_shard_body(x_l, mask_l, kernel, weights_l, cfg=cfg, train=train, expert_axis_size=n_exp,
                                 token_ids=ids_l, step=step_l, drop=drop_l, router_extras=router_l,
                                 reduce_axes=sharding.AXES)
      return y_l, reduce_metrics(sums, sharding.AXES)

    weight_specs = {name: sharding.expert_spec(3) for name in weights}
    router_specs = {name: P() for name in router}
    y, metrics = jax.shard_map(
        body, mesh=mesh,
        in_specs=(sharding.token_spec(3), sharding.token_spec(2), sharding.token_spec(2), router_specs,
                  weight_specs, P(), P()),
        out_specs=(sharding.token_spec(3), P()), check_vma=True,
    )(x, token_mask.astype(bool), token_ids.astype(jnp.int32), router, weights, step, drop)
    return y, metrics
