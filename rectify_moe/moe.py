"""The sharded MoE block: router + stacked experts under one `jax.shard_map` over (data, expert).

Each device:
  1. groups its own tokens `[G_l, S, D]`, computes float32 router probabilities and its routing table;
  2. dispatches into `[E, G_l, C, D]` capacity buffers (einsum masks or index scatter);
  3. `all_to_all` over `expert` -> `[L, n_exp * G_l, C, D]`, runs its L experts, `all_to_all` back;
  4. combines `[G_l, S, D]`;
  5. Intra-device Rectification: under-served tokens go through the device's own experts in a static IR
     buffer (no collective) and are blended in;
  6. returns y and the global routing metrics (psum-reduced over the mesh).

Call the block under `jax.set_mesh(mesh)`; the mesh is read at call time, so one model runs on any
(data, expert) mesh whose expert axis divides E.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from rectify_moe import routing, sharding

Array = jax.Array

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
    ir_capacity_factor: IR buffer size (None = exact, S slots per local expert per group).
    combine: "normalized" | "probs".
    straight_through: top-1 straight-through combine (forward weight 1); needs K == 1.
    group_size: S, tokens per routing group (must divide the tokens of each device).
    activation: "swiglu" (w_gate, w_up, w_down) | "gelu" (w_up, w_down).
    dispatch: "einsum" (one-hot masks) | "index" (scatter/gather into the same buffers).
    dtype: expert compute and all-to-all payload dtype, "float32" | "bfloat16"; the router is float32.
    load_balance_all_k: count all k choices in the load-balance loss (default: first choice).
    router_init_std: std of the normal init of the router kernel.
    eps: floor of normalizers.
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
                          ("dispatch", DISPATCH_IMPLS), ("dtype", tuple(DTYPES))):
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
    self.capacity(True), self.capacity(False)  # raises if C < 1

  @classmethod
  def from_dict(cls, values: Any) -> "MoEConfig":
    """From a mapping (e.g. an ml_collections ConfigDict); unknown keys are an error naming the key."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"Unknown MoE config field(s) {unknown}; valid fields: {sorted(known)}.")
    return cls(**values)


# ---------------------------------------------------------------------------------------------------------
# Dispatch / experts / combine on capacity buffers: shared by the main path and the IR path.
# ---------------------------------------------------------------------------------------------------------
def _buffer_masks(buffer_index: Array, slot: Array, num_buffers: int, capacity: int) -> tuple[Array, Array]:
  """One-hot factors [G, S, K, B] and [G, S, K, C] of an assignment (slot -1 -> all-zero row)."""
  return (jax.nn.one_hot(buffer_index, num_buffers, dtype=jnp.float32),
          jax.nn.one_hot(slot, capacity, dtype=jnp.float32))


def dispatch_tokens(x: Array, buffer_index: Array, slot: Array, *, num_buffers: int, capacity: int,
                    impl: str) -> Array:
  """Scatters tokens into capacity buffers.

  Args:
    x: [G, S, D] tokens (payload dtype).
    buffer_index: int32[G, S, K] target buffer (expert) of each choice.
    slot: int32[G, S, K] slot in that buffer, -1 = not dispatched.
    num_buffers: B (experts).
    capacity: C.
    impl: "einsum" (one-hot dispatch mask) or "index" (scatter-add; each slot holds one token).

  Returns:
    [B, G, C, D] in x.dtype; unfilled slots are zero rows (padding).
  """
  groups, tokens, choices = slot.shape
  if impl == "einsum":
    expert_onehot, slot_onehot = _buffer_masks(buffer_index, slot, num_buffers, capacity)
    # Shape: [G, S, B, C] = einsum("gskb,gskc->gsbc")
    mask = jnp.einsum("gskb,gskc->gsbc", expert_onehot, slot_onehot).astype(x.dtype)
    # Shape: [B, G, C, D] = einsum("gsbc,gsd->bgcd")
    return jnp.einsum("gsbc,gsd->bgcd", mask, x)
  group_index = jnp.broadcast_to(jnp.arange(groups)[:, None, None], slot.shape)
  safe_slot = jnp.where(slot >= 0, slot, capacity)  # out of bounds -> dropped by mode="drop"
  updates = jnp.broadcast_to(x[:, :, None, :], (groups, tokens, choices, x.shape[-1]))
  buffers = jnp.zeros((num_buffers, groups, capacity, x.shape[-1]), x.dtype)
  return buffers.at[buffer_index, group_index, safe_slot].add(updates, mode="drop")


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
  num_buffers, groups, capacity, _ = out.shape
  if impl == "einsum":
    expert_onehot, slot_onehot = _buffer_masks(buffer_index, slot, num_buffers, capacity)
    # Shape: [G, S, B, C] = einsum("gsk,gskb,gskc->gsbc")
    combine = jnp.einsum("gsk,gskb,gskc->gsbc", weight, expert_onehot, slot_onehot).astype(out.dtype)
    # Shape: [G, S, D] = einsum("gsbc,bgcd->gsd")
    return jnp.einsum("gsbc,bgcd->gsd", combine, out, preferred_element_type=jnp.float32)
  group_index = jnp.broadcast_to(jnp.arange(groups)[:, None, None], slot.shape)
  # Shape: [G, S, K, D]
  picked = out[buffer_index, group_index, jnp.maximum(slot, 0)].astype(jnp.float32)
  picked = jnp.where((slot >= 0)[..., None], picked, 0.0)
  # Shape: [G, S, D] = einsum("gsk,gskd->gsd")
  return jnp.einsum("gsk,gskd->gsd", weight, picked)


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


# ---------------------------------------------------------------------------------------------------------
# The per-device body.
# ---------------------------------------------------------------------------------------------------------
def _metric_sums(table: routing.RoutingTable, ir: Optional[routing.IRTable]) -> dict[str, Array]:
  """Per-device counts that are psum-reduced into global rates."""
  stats = table.stats
  sums = {
      "tokens": jnp.sum(stats.num_tokens),
      "dropped_choices": jnp.sum(stats.drop_rate * stats.num_tokens * table.top_k),
      "unrouted_tokens": jnp.sum(stats.unrouted_rate * stats.num_tokens),
      "filled_slots": jnp.sum(stats.expert_load),
      "fill_in_slots": jnp.sum(stats.fill_in_slots),
      "expert_demand": jnp.sum(stats.expert_demand, axis=0),
      "expert_load": jnp.sum(stats.expert_load, axis=0),
      "ir_selected": jnp.zeros((), jnp.float32),
      "ir_rectified": jnp.zeros((), jnp.float32),
      "ir_overflow": jnp.zeros((), jnp.float32),
  }
  if ir is not None:
    sums["ir_selected"] = jnp.sum(ir.selected, dtype=jnp.float32)
    sums["ir_rectified"] = jnp.sum(ir.num_rectified).astype(jnp.float32)
    sums["ir_overflow"] = jnp.sum(ir.overflow).astype(jnp.float32)
  return sums


def moe_shard_body(x: Array, token_mask: Array, router_kernel: Array, expert_weights: dict[str, Array], *,
                   cfg: MoEConfig, train: bool, expert_axis_size: int,
                   expert_axis: Optional[str] = sharding.EXPERT) -> tuple[Array, dict[str, Array]]:
  """The MoE computation of one device (call inside shard_map, or directly with expert_axis=None).

  Args:
    x: [B_l, T, D] this device's tokens.
    token_mask: bool[B_l, T].
    router_kernel: float32[D, E].
    expert_weights: this device's experts, each [L, ...].
    cfg: the block config.
    train: use the training capacity factor (else the eval one).
    expert_axis_size: n_exp; L = E / n_exp.
    expert_axis: mesh axis name for all_to_all and axis_index; None when running unsharded (n_exp = 1).

  Returns:
    (y [B_l, T, D] in x.dtype, per-device unreduced metric sums and losses).
  """
  batch, seq, width = x.shape
  num_experts, group_size = cfg.num_experts, cfg.group_size
  num_local = num_experts // expert_axis_size
  groups = batch * seq // group_size
  payload_dtype = DTYPES[cfg.dtype]
  capacity = cfg.capacity(train)

  xg = x.reshape(groups, group_size, width)
  mask = token_mask.reshape(groups, group_size)

  with jax.named_scope("router"):
    # Shape: [G, S, E] = einsum("gsd,de->gse")
    logits = jnp.einsum("gsd,de->gse", xg.astype(jnp.float32), router_kernel.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    table = routing.route_top_k(probs, top_k=cfg.top_k, capacity=capacity, priority=cfg.priority,
                                fill_in=cfg.fill_in, fill_in_priority=cfg.fill_in_priority,
                                combine=cfg.combine, straight_through=cfg.straight_through,
                                token_mask=mask, eps=cfg.eps)
    aux_loss = routing.load_balance_loss(probs, table.expert_index[..., :cfg.top_k], mask,
                                         all_k=cfg.load_balance_all_k)
    z_loss = routing.router_z_loss(logits, mask)

  payload = xg.astype(payload_dtype)
  with jax.named_scope("dispatch"):
    buffers = dispatch_tokens(payload, table.expert_index, table.slot, num_buffers=num_experts,
                              capacity=capacity, impl=cfg.dispatch)  # [E, G, C, D]
    if expert_axis is not None and expert_axis_size > 1:
      # Shape: [E, G, C, D] -> [L, n_exp * G, C, D]
      buffers = jax.lax.all_to_all(buffers, expert_axis, split_axis=0, concat_axis=1, tiled=True)
  with jax.named_scope("experts"):
    out = expert_ffn(buffers, expert_weights, cfg.activation)
  with jax.named_scope("combine"):
    if expert_axis is not None and expert_axis_size > 1:
      # Shape: [L, n_exp * G, C, D] -> [E, G, C, D]
      out = jax.lax.all_to_all(out, expert_axis, split_axis=1, concat_axis=0, tiled=True)
    y = combine_outputs(out, table.expert_index, table.slot, table.combine_weight, impl=cfg.dispatch)

  ir = None
  if cfg.ir_mode is not None:
    with jax.named_scope("rectify"):
      device = jax.lax.axis_index(expert_axis) if (expert_axis is not None and expert_axis_size > 1) else 0
      ir, y_local = rectify_locally(payload, probs, table, expert_weights, cfg=cfg, first_expert=device * num_local,
                                    num_local=num_local)
      y = routing.ir_blend(y, y_local, ir.p, ir.lam, ir.total, ir.placed, eps=cfg.eps)

  metrics = _metric_sums(table, ir)
  metrics["aux_loss"] = aux_loss
  metrics["z_loss"] = z_loss
  metrics["slots"] = jnp.asarray(groups * num_experts * capacity, jnp.float32)
  return y.reshape(batch, seq, width).astype(x.dtype), metrics


def rectify_locally(payload: Array, probs: Array, table: routing.RoutingTable, expert_weights: dict[str, Array],
                    *, cfg: MoEConfig, first_expert, num_local: int) -> tuple[routing.IRTable, Array]:
  """IR on one device: under-served tokens through the device's own experts, with no collective.

  Args:
    payload: [G, S, D] tokens in the payload dtype.
    probs: float32[G, S, E] router probabilities.
    table: the device's routing table.
    expert_weights: the device's L experts.
    cfg: block config (ir_mode, ir_capacity_factor, dispatch, activation).
    first_expert: global index of the device's first expert.
    num_local: L.

  Returns:
    (the IRTable, y_local float32[G, S, D]: the chosen local expert's output, 0 where not placed).
  """
  groups, group_size, _ = payload.shape
  ir_capacity = routing.ir_capacity_from_factor(group_size, num_local, cfg.ir_capacity_factor)
  ir = routing.intra_device_choice(probs, table, first_expert=first_expert, num_local=num_local,
                                   mode=cfg.ir_mode, ir_capacity=ir_capacity)
  index, slot = ir.local_expert[..., None], ir.slot[..., None]
  buffers = dispatch_tokens(payload, index, slot, num_buffers=num_local, capacity=ir.ir_capacity,
                            impl=cfg.dispatch)  # [L, G, C_ir, D]
  out = expert_ffn(buffers, expert_weights, cfg.activation)
  y_local = combine_outputs(out, index, slot, ir.placed[..., None].astype(jnp.float32), impl=cfg.dispatch)
  return ir, y_local


def reduce_metrics(sums: dict[str, Array], axes) -> dict[str, Array]:
  """psum/pmean the per-device sums over `axes` and turn them into global rates."""
  losses = {k: jax.lax.pmean(sums[k], axes) for k in ("aux_loss", "z_loss")}
  totals = {k: jax.lax.psum(v, axes) for k, v in sums.items() if k not in losses}
  return finalize_metrics(totals, losses)


def finalize_metrics(totals: dict[str, Array], losses: dict[str, Array]) -> dict[str, Array]:
  """Global rates from global totals (shared by the sharded block and single-device use)."""
  tokens = jnp.maximum(totals["tokens"], 1.0)
  top_k_choices = jnp.maximum(jnp.sum(totals["expert_demand"]), 1.0)
  return {
      **losses,
      "drop_rate": totals["dropped_choices"] / top_k_choices,
      "unrouted_rate": totals["unrouted_tokens"] / tokens,
      "padding_rate": 1.0 - totals["filled_slots"] / jnp.maximum(totals["slots"], 1.0),
      "fill_in_rate": totals["fill_in_slots"] / jnp.maximum(totals["slots"], 1.0),
      "ir_rate": totals["ir_rectified"] / tokens,
      "ir_overflow_rate": totals["ir_overflow"] / tokens,
      "tokens": totals["tokens"],
      "expert_demand": totals["expert_demand"],
      "expert_load": totals["expert_load"],
  }


# ---------------------------------------------------------------------------------------------------------
# The NNX module.
# ---------------------------------------------------------------------------------------------------------
class MoEBlock(nnx.Module):
  """Router + stacked experts; the forward pass is one `jax.shard_map` over the context mesh.

  Parameters: `router_kernel` float32[D, E] (replicated); `w_gate`, `w_up` float32[E, D, F] and `w_down`
  float32[E, F, D] sharded `P("expert", None, None)` (no w_gate for GELU). Compute casts them to cfg.dtype.
  """

  def __init__(self, cfg: MoEConfig, *, d_model: int, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.d_model = d_model
    e, d, f = cfg.num_experts, d_model, cfg.expert_dim
    self.router_kernel = nnx.Param(
        nnx.with_partitioning(nnx.initializers.normal(cfg.router_init_std), (None, None))(rngs.params(), (d, e)))
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

  def __call__(self, x: Array, token_mask: Optional[Array] = None, *, train: bool = True
               ) -> tuple[Array, dict[str, Array]]:
    """Applies the block.

    Args:
      x: [B, T, D] tokens, batch sharded over ("data", "expert").
      token_mask: bool[B, T] (False = padding; never dispatched, excluded from losses and metrics).
      train: training capacity factor (True) or evaluation capacity factor (False).

    Returns:
      y [B, T, D] (x.dtype) and metrics (replicated float32): "aux_loss", "z_loss", "drop_rate",
      "unrouted_rate", "padding_rate", "fill_in_rate", "ir_rate", "ir_overflow_rate", "tokens",
      "expert_demand" [E], "expert_load" [E], "a2a_rows_per_token".
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
    if token_mask is None:
      token_mask = jnp.ones((batch, seq), bool)
    weights = self.expert_weights()

    def body(x_l, mask_l, router_l, weights_l):
      y_l, sums = moe_shard_body(x_l, mask_l, router_l, weights_l, cfg=cfg, train=train,
                                 expert_axis_size=n_exp)
      return y_l, reduce_metrics(sums, sharding.AXES)

    weight_specs = {name: sharding.expert_spec(3) for name in weights}
    y, metrics = jax.shard_map(
        body, mesh=mesh,
        in_specs=(sharding.token_spec(3), sharding.token_spec(2), P(), weight_specs),
        out_specs=(sharding.token_spec(3), P()), check_vma=True,
    )(x, token_mask.astype(bool), self.router_kernel[...], weights)
    metrics["a2a_rows_per_token"] = jnp.asarray(cfg.num_experts * cfg.capacity(train) / cfg.group_size,
                                                jnp.float32)
    return y, metrics
