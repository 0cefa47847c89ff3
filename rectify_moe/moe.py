"""The sharded MoE block: an injected router + stacked experts under one `jax.shard_map` over (data, expert).

Each device:
  1. groups its own tokens `[G_l, S, D]` and asks the router (`MoEBlock.router`, any `routers.base.Router`) for
     its `RouterOutput`: probabilities, routing table, losses, counts;
  2. dispatches into `[E, G_l, C, D]` capacity buffers (einsum masks, or gathers: `dispatch.py`);
  3. `all_to_all` over `expert` -> `[L, n_exp * G_l, C, D]`, runs its L experts (with the IR buffers of
     step 5 in the same matmuls), `all_to_all` back;
  4. combines `[G_l, S, D]`;
  5. Intra-device Rectification (`intra_device.py`, routers that rank all experts by a softmax): under-served
     tokens go through the device's own experts in a static IR buffer (no collective) and are blended in; with
     index dispatch, a device that holds every expert (expert axis 1) puts the IR slots behind the routed slots of
     each expert's buffer and combines both in one weighted sum;
  Under `moe.dispatch="dropless"` steps 2-4 are `dropless.dropless_experts` (rows sorted by expert, grouped matmuls,
  a ragged all-to-all across expert shards; no capacity buffers);
  6. returns y and the global metrics: {"losses": global losses, "counts": psum-ed counts} (rates from counts:
     `metrics.rates`).

Call the block under `jax.set_mesh(mesh)`; the mesh is read at call time, so one model runs on any
(data, expert) mesh whose expert axis divides E. This module is the only one that reaches the routers: the model,
the trainer and the evaluator use `build_router`, `prepare_router`, `optimizer_transforms` and `describe`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from rectify_moe import dropless, intra_device, routers, routing, sharding
from rectify_moe.config.schema import MoEConfig
from rectify_moe.dispatch import combine_outputs, dispatch_tokens, expert_ffn, expert_ffn_joint
from rectify_moe.routers.base import RouteContext, Router

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------------------------------------
# The router, through the registry.
# ---------------------------------------------------------------------------------------------------------
def build_router(cfg: MoEConfig, *, d_model: int, vocab_size: int, rngs: nnx.Rngs, **prepared: Any) -> Router:
  """The router of `moe.router`, owning its parameters (`prepared`: the result of `prepare_router`)."""
  return routers.get(cfg.router)(cfg, d_model=d_model, vocab_size=vocab_size, rngs=rngs, **prepared)


def router_from_arrays(cfg: MoEConfig, arrays: dict[str, Any], *, d_model: int, vocab_size: int = 259) -> Router:
  """The router of cfg holding `arrays` (its pure state dict, e.g. {"kernel": [D, E]}; traced values welcome): to
  call `route` or `moe_shard_body` outside an MoEBlock (tests, benchmarks)."""
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(build_router(cfg, d_model=d_model, vocab_size=vocab_size, rngs=nnx.Rngs(0),
                                             **prepare_router(cfg, vocab_size=vocab_size)))
  nnx.replace_by_pure_dict(state, arrays)
  return nnx.merge(graphdef, state)


def prepare_router(cfg: MoEConfig, *, vocab_size: int,
                   token_counts: Optional[Callable[[], np.ndarray]] = None) -> dict[str, Any]:
  """Data-dependent initialisation of the router (token_counts: int64[V] training-data frequencies, lazily; None
  for an abstract model that a checkpoint restore fills)."""
  return routers.get(cfg.router).prepare(cfg, vocab_size=vocab_size, token_counts=token_counts)


def optimizer_transforms(cfg: MoEConfig) -> list[optax.GradientTransformation]:
  """Transformations the router appends to the optimizer chain (e.g. StableMoE's freeze)."""
  transform = routers.get(cfg.router).optimizer_transform(cfg)
  return [] if transform is None else [transform]


def applicable_config(cfg: MoEConfig) -> tuple[MoEConfig, list[str]]:
  """`cfg` without the block options its router cannot use, and what was turned off (see `routers.applicable`)."""
  return routers.applicable(cfg)


def describe(cfg: MoEConfig) -> str:
  """'Top-1+IR(all)+FR' style name of a router config ('Top-2 dropless' under `moe.dispatch="dropless"`)."""
  return routers.get(cfg.router).describe(cfg) + (" dropless" if cfg.dispatch == "dropless" else "")


# ---------------------------------------------------------------------------------------------------------
# Intra-device Rectification applied to any rectifiable router's table.
# ---------------------------------------------------------------------------------------------------------
def _routed_all_to_all(payload: Array, table: routing.RoutingTable, ir: Optional[intra_device.IRTable],
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


def _routed_one_device(payload: Array, table: routing.RoutingTable, ir: intra_device.IRTable,
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
             num_local: int) -> intra_device.IRTable:
  """IR decisions of one device: under-served tokens' best local expert and their IR slots.

  Args:
    probs: float32[G, S, E] router probabilities.
    table: the device's routing table.
    cfg: block config (ir_mode, ir_capacity_factor).
    first_expert: global index of the device's first expert.
    num_local: L.

  Returns:
    The `intra_device.IRTable` (IR buffers of C_ir = `ir_capacity_from_factor(S, L, ir_capacity_factor)` slots).
  """
  ir_capacity = intra_device.ir_capacity_from_factor(probs.shape[1], num_local, cfg.ir_capacity_factor)
  return intra_device.intra_device_choice(probs, table, first_expert=first_expert, num_local=num_local,
                                     mode=cfg.ir_mode, ir_capacity=ir_capacity)


def ir_dispatch(payload: Array, ir: intra_device.IRTable, *, num_local: int, impl: str) -> Array:
  """IR buffers [L, G, C_ir, D] of the device's own experts, from [G, S, D] tokens (payload dtype)."""
  return dispatch_tokens(payload, ir.local_expert[..., None], ir.slot[..., None], num_buffers=num_local,
                         capacity=ir.ir_capacity, impl=impl)


def ir_combine(out: Array, ir: intra_device.IRTable, weight: Array, *, impl: str) -> Array:
  """float32[G, S, D]: weight float32[G, S] times the IR buffer row of each token with an IR slot, from the
  IR buffers' expert outputs out [L, G, C_ir, D] (0 for tokens without a slot)."""
  return combine_outputs(out, ir.local_expert[..., None], ir.slot[..., None], weight[..., None], impl=impl)


def ir_combine_weights(table: routing.RoutingTable, ir: intra_device.IRTable, *, eps: float) -> tuple[Array, Array]:
  """The IR blend (`intra_device.ir_blend`) as combine weights.

  y = sum_k routed[k] * out(choice k) + own * out(IR slot) is the blend `keep * y_routed + local * y_local`:
  the routed weights are scaled by keep, and the local expert's output weighs in with local, through the IR
  slot, or, for a token that reuses a routed choice (`IRTable.reuse_choice`), added to that choice's weight.

  Returns:
    routed float32[G, S, K] and own float32[G, S] (0 where the token has no IR slot).
  """
  keep, local = intra_device.ir_blend_weights(ir.p, ir.lam, ir.total, ir.placed, eps=eps)
  reused = jax.nn.one_hot(ir.reuse_choice, table.num_choices, dtype=jnp.float32)  # zero row where -1
  routed = table.combine_weight * keep[..., None] + local[..., None] * reused
  return routed, jnp.where(ir.slot >= 0, local, 0.0)


# ---------------------------------------------------------------------------------------------------------
# The per-device body.
# ---------------------------------------------------------------------------------------------------------
def _ir_counts(ir: Optional[intra_device.IRTable]) -> dict[str, Array]:
  zero = jnp.zeros((), jnp.float32)
  if ir is None:
    return {"ir_rectified": zero, "ir_reused": zero, "ir_overflow": zero}
  return {"ir_rectified": jnp.sum(ir.num_rectified).astype(jnp.float32),
          "ir_reused": jnp.sum(ir.reuse_choice >= 0, dtype=jnp.float32),
          "ir_overflow": jnp.sum(ir.overflow).astype(jnp.float32)}


def moe_shard_body(x: Array, token_mask: Array, router: Router, expert_weights: dict[str, Array], *,
                   cfg: MoEConfig, train: bool, expert_axis_size: int,
                   expert_axis: Optional[str] = sharding.EXPERT, token_ids: Optional[Array] = None,
                   step: Optional[Array] = None, drop: Optional[Array] = None,
                   reduce_axes: tuple[str, ...] = ()) -> tuple[Array, dict[str, dict[str, Array]]]:
  """The MoE computation of one device (call inside shard_map, or directly with expert_axis=None).

  Args:
    x: [B_l, T, D] this device's tokens.
    token_mask: bool[B_l, T].
    router: the block's router (its state as seen by this device: replicated).
    expert_weights: this device's experts, each [L, ...].
    cfg: the block config.
    train: use the training capacity factor (else the eval one); Gating Dropout only when training.
    expert_axis_size: n_exp; L = E / n_exp.
    expert_axis: mesh axis name for all_to_all and axis_index; None when running unsharded (n_exp = 1).
    token_ids: int32[B_l, T] input token ids (routers that route by token id).
    step: int32 scalar training step.
    drop: bool scalar, the shared Gating Dropout decision of this step and layer.
    reduce_axes: mesh axes spanning the batch (for batch-global router statistics); () unsharded.

  Returns:
    (y [B_l, T, D] in x.dtype, this device's {"losses", "token_loss_sums", "counts"}: reduce them over the mesh
    with `reduce_metrics`).
  """
  batch, seq, width = x.shape
  num_experts, group_size = cfg.num_experts, cfg.group_size
  num_local = num_experts // expert_axis_size
  groups = batch * seq // group_size
  payload_dtype = DTYPES[cfg.dtype]
  # Dropless: the router places choices in a whole-group capacity (nothing refused); no buffers are built.
  capacity = group_size if cfg.dispatch == "dropless" else cfg.capacity(train)
  sharded = expert_axis is not None and expert_axis_size > 1
  first_expert = jax.lax.axis_index(expert_axis) * num_local if sharded else 0

  xg = x.reshape(groups, group_size, width)
  mask = token_mask.reshape(groups, group_size)
  ids = jnp.zeros_like(mask, jnp.int32) if token_ids is None else token_ids.reshape(groups, group_size)
  ctx = RouteContext(token_mask=mask, token_ids=ids, step=jnp.zeros((), jnp.int32) if step is None else step,
                     train=train, capacity=capacity, reduce_axes=tuple(reduce_axes or ()))

  with jax.named_scope("router"):
    routed_out = router.route(xg, ctx)
  probs, table = routed_out.probs, routed_out.table
  payload = xg.astype(payload_dtype)
  # A zero that varies over the mesh like the tokens: added to every count so both branches of the Gating
  # Dropout cond return values of the same (varying) type, constants included.
  varying_zero = jnp.sum(mask, dtype=jnp.float32) * 0.0
  buffer_counts = lambda slots, a2a: {"slots": jnp.asarray(slots, jnp.float32),
                                      "a2a_rows": jnp.asarray(a2a, jnp.float32)}

  def routed(payload):
    """Dispatch, all_to_all, experts, all_to_all back, combine; IR on the device's own experts (no collective),
    its rows run through the experts in the same pass as the main ones."""
    if cfg.dispatch == "dropless":
      with jax.named_scope("dropless"):
        y = dropless.dropless_experts(payload, table, expert_weights, activation=cfg.activation,
                                      num_experts=num_experts, expert_axis=expert_axis if sharded else None,
                                      expert_axis_size=expert_axis_size)
      # Every accepted choice is one row through the experts (and, sharded, through the ragged exchange).
      rows = jnp.sum(table.slot >= 0, dtype=jnp.float32)
      counts = {**routed_out.counts, **_ir_counts(None), **buffer_counts(rows, rows)}
      return y, jax.tree.map(lambda v: v + varying_zero, counts)
    ir = None
    if cfg.ir_mode is not None:
      with jax.named_scope("rectify"):
        ir = ir_table(probs, table, cfg=cfg, first_expert=first_expert, num_local=num_local)
    if ir is not None and not sharded and cfg.dispatch == "index":
      y = _routed_one_device(payload, table, ir, expert_weights, cfg=cfg, capacity=capacity)
    else:
      y = _routed_all_to_all(payload, table, ir, expert_weights, cfg=cfg, capacity=capacity,
                             expert_axis=expert_axis if sharded else None)
    # The all-to-all carries the capacity buffers, filled or not.
    counts = {**routed_out.counts, **_ir_counts(ir), **buffer_counts(groups * num_experts * capacity,
                                                                      groups * num_experts * capacity)}
    return y, jax.tree.map(lambda v: v + varying_zero, counts)

  def local_only(payload):
    """Gating Dropout's dropped step: every token to the best expert on its own device; no collective.

    Its counts describe this local step: demand = each token's local expert, accepted = tokens that fit the
    local buffer (none under Gate-Expert-Drop), no all-to-all rows.
    """
    with jax.named_scope("gating_dropout_local"):
      skip_expert = cfg.gating_dropout_mode == "gate_expert_drop"
      local_capacity = intra_device.ir_capacity_from_factor(group_size, num_local, cfg.capacity_factor)
      local_expert, p, slot, _ = intra_device.route_local(
          probs, mask, first_expert=first_expert, num_local=num_local, capacity=local_capacity,
          order_gate=table.gate[..., 0], by_probability=(cfg.priority == "bpr"))
      placed = (slot >= 0) & (not skip_expert)
      validf = mask.astype(jnp.float32)
      chosen = jax.nn.one_hot(first_expert + local_expert, num_experts, dtype=jnp.float32) * validf[..., None]
      counts = {"tokens": jnp.sum(validf), "dropped_choices": jnp.sum(validf) - jnp.sum(placed, dtype=jnp.float32),
                "unrouted_tokens": jnp.sum(validf) - jnp.sum(placed, dtype=jnp.float32),
                "filled_slots": jnp.sum(placed, dtype=jnp.float32), "fill_in_slots": jnp.zeros((), jnp.float32),
                "expert_demand": jnp.sum(chosen, axis=(0, 1)),
                "expert_load": jnp.sum(chosen * placed[..., None], axis=(0, 1)), **_ir_counts(None),
                **buffer_counts(0 if skip_expert else groups * num_local * local_capacity, 0)}
      counts = jax.tree.map(lambda v: v + varying_zero, counts)
      if skip_expert:
        return jnp.zeros_like(payload, dtype=jnp.float32), counts
      weight = (jnp.ones_like(p) if cfg.gating_dropout_weight == "one" else p) * placed
      buffers = dispatch_tokens(payload, local_expert[..., None], slot[..., None], num_buffers=num_local,
                                capacity=local_capacity, impl=cfg.dispatch)
      out = expert_ffn(buffers, expert_weights, cfg.activation)
      y = combine_outputs(out, local_expert[..., None], slot[..., None], weight[..., None], impl=cfg.dispatch)
      return y, counts

  losses, token_loss_sums = dict(routed_out.losses), dict(routed_out.token_loss_sums)
  dropout_active = train and cfg.gating_dropout > 0 and drop is not None
  if dropout_active:
    y, counts = jax.lax.cond(drop, local_only, routed, payload)
    kept = 1.0 - drop.astype(jnp.float32)
    losses = {k: kept * v for k, v in losses.items()}  # no gate ran on a dropped step
    token_loss_sums = {k: kept * v for k, v in token_loss_sums.items()}
    dropped = drop.astype(jnp.float32)
  else:
    y, counts = routed(payload)
    dropped = jnp.zeros((), jnp.float32)
  counts["group_tokens"] = jnp.asarray(groups * group_size, jnp.float32)
  counts["devices"] = jnp.ones((), jnp.float32)
  counts["gating_dropped_devices"] = dropped
  local = {"losses": losses, "token_loss_sums": token_loss_sums, "counts": counts}
  return y.reshape(batch, seq, width).astype(x.dtype), local


def reduce_metrics(local: dict[str, dict[str, Array]], axes: tuple[str, ...] = ()) -> dict[str, dict[str, Array]]:
  """The block's global metrics from each device's `moe_shard_body` metrics (axes: the mesh axes; () = one device).

  Returns:
    {"losses": {name: global value}: device losses averaged over the mesh, token losses summed and divided by the
    mesh's valid tokens; "counts": {name: global sum}} (see `metrics.rates` for the rates).
  """
  psum = (lambda v: jax.lax.psum(v, axes)) if axes else (lambda v: v)
  pmean = (lambda v: jax.lax.pmean(v, axes)) if axes else (lambda v: v)
  counts = {k: psum(v) for k, v in local["counts"].items()}
  tokens = jnp.maximum(counts["tokens"], 1.0)
  losses = {k: pmean(v) for k, v in local["losses"].items()}
  # Token losses (the z-loss) are means over all valid tokens of the mesh, whatever the padding on each device.
  losses.update({k: psum(v) / tokens for k, v in local["token_loss_sums"].items()})
  return {"losses": losses, "counts": counts}


def dropless_distance(y: Array, x: Array, token_mask: Array, token_ids: Array, router: Router,
                      expert_weights: dict[str, Array], *, cfg: MoEConfig, train: bool, expert_axis_size: int,
                      step: Array, d_model: int, vocab_size: int) -> dict[str, Array]:
  """This device's squared distance of the block output y to the dropless output of the same input x (the
  dropless reference, `dropless.reference_config`), over its valid tokens: {"dropless_sq_dist": sum ||y - y_ref||^2,
  "dropless_sq_norm": sum ||y_ref||^2} (float32 scalars; psum-ed with the counts; their ratio's root is the
  relative L2 distance)."""
  ref_cfg = dropless.reference_config(cfg)
  ref_router = router
  if ref_cfg.router != cfg.router:  # Expert Choice: the token-choice router on the same kernel
    ref_router = router_from_arrays(ref_cfg, {"kernel": router.kernel[...]}, d_model=d_model, vocab_size=vocab_size)
  with jax.named_scope("dropless_reference"):
    y_ref, _ = moe_shard_body(x, token_mask, ref_router, expert_weights, cfg=ref_cfg, train=train,
                              expert_axis_size=expert_axis_size, token_ids=token_ids, step=step,
                              reduce_axes=sharding.AXES)
  valid = token_mask.astype(jnp.float32)[..., None]
  y_ref = y_ref.astype(jnp.float32) * valid
  diff = y.astype(jnp.float32) * valid - y_ref
  return {"dropless_sq_dist": jnp.sum(diff * diff), "dropless_sq_norm": jnp.sum(y_ref * y_ref)}


# ---------------------------------------------------------------------------------------------------------
# The NNX module.
# ---------------------------------------------------------------------------------------------------------
def gating_dropout_decision(rng: Array, rate: float) -> Array:
  """bool scalar: drop the gate this step (one draw from a replicated key, so every device agrees)."""
  return jax.random.uniform(rng, ()) < rate


class MoEBlock(nnx.Module):
  """An injected router + stacked experts; the forward pass is one `jax.shard_map` over the context mesh.

  Attributes: `router` (the `routers.base.Router` of `cfg.router`, with its own parameters and state, replicated);
  `w_gate`, `w_up` float32[E, D, F] and `w_down` float32[E, F, D] sharded `P("expert", None, None)` (no w_gate for
  GELU). Compute casts expert weights to cfg.dtype.
  """

  def __init__(self, cfg: MoEConfig, *, d_model: int, rngs: nnx.Rngs, vocab_size: int = 259,
               prepared: Optional[dict[str, Any]] = None):
    """prepared: the router's data-dependent initialisation (`prepare_router`); None = its defaults."""
    cfg.validate()
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and sharding.EXPERT in mesh.axis_names and cfg.num_experts % mesh.shape[sharding.EXPERT]:
      raise ValueError(
          f"num_experts={cfg.num_experts} is not divisible by the mesh's expert axis "
          f"({mesh.shape[sharding.EXPERT]}); every device must hold the same number of experts. Use an expert "
          f"axis that divides {cfg.num_experts}.")
    self.cfg = cfg
    self.d_model = d_model
    self.vocab_size = vocab_size
    # eval.py --dropless_reference: also compute the dropless output of the same input (`dropless_distance`).
    self.dropless_reference = False
    self.router = build_router(cfg, d_model=d_model, vocab_size=vocab_size, rngs=rngs, **(prepared or {}))
    e, d, f = cfg.num_experts, d_model, cfg.expert_dim
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

  def after_step(self, metrics: dict[str, Any]) -> None:
    """The router's state update after an optimizer step, from this block's global metrics of the step."""
    self.router.after_step(metrics)

  def __call__(self, x: Array, token_mask: Optional[Array] = None, *, train: bool = True,
               token_ids: Optional[Array] = None, step: Optional[Array] = None, rng: Optional[Array] = None
               ) -> tuple[Array, dict[str, dict[str, Array]]]:
    """Applies the block.

    Args:
      x: [B, T, D] tokens, batch sharded over ("data", "expert").
      token_mask: bool[B, T] (False = padding; never dispatched, excluded from losses and metrics).
      train: training capacity factor and Gating Dropout (True) or evaluation capacity factor (False).
      token_ids: int32[B, T] input token ids (needed by routers that route by token id).
      step: int32 scalar training step.
      rng: a replicated PRNG key for this step and layer (Gating Dropout).

    Returns:
      y [B, T, D] (x.dtype) and the global metrics (replicated float32): "losses" {name: value} (the router's,
      e.g. "aux_loss", "z_loss") and "counts" {name: sum}: "tokens", "dropped_choices", "unrouted_tokens",
      "filled_slots", "fill_in_slots", "slots", "ir_rectified", "ir_reused", "ir_overflow", "a2a_rows",
      "group_tokens", "devices", "gating_dropped_devices", "expert_demand" [E], "expert_load" [E]; with
      `dropless_reference` set also "dropless_sq_dist" and "dropless_sq_norm" (`dropless_distance`).
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
      if type(self.router).needs_token_ids:
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
    router_graph, router_state = nnx.split(self.router)

    def body(x_l, mask_l, ids_l, router_state_l, weights_l, step_l, drop_l):
      router = nnx.merge(router_graph, router_state_l)
      y_l, local = moe_shard_body(x_l, mask_l, router, weights_l, cfg=cfg, train=train, expert_axis_size=n_exp,
                                  token_ids=ids_l, step=step_l, drop=drop_l, reduce_axes=sharding.AXES)
      if self.dropless_reference:
        local["counts"].update(dropless_distance(y_l, x_l, mask_l, ids_l, router, weights_l, cfg=cfg, train=train,
                                                 expert_axis_size=n_exp, step=step_l, d_model=self.d_model,
                                                 vocab_size=self.vocab_size))
      return y_l, reduce_metrics(local, sharding.AXES)

    weight_specs = {name: sharding.expert_spec(3) for name in weights}
    y, metrics = jax.shard_map(
        body, mesh=mesh,
        in_specs=(sharding.token_spec(3), sharding.token_spec(2), sharding.token_spec(2), P(),
                  weight_specs, P(), P()),
        out_specs=(sharding.token_spec(3), P()), check_vma=True,
    )(x, token_mask.astype(bool), token_ids.astype(jnp.int32), router_state, weights, step, drop)
    return y, metrics
