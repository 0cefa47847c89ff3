"""Dropless dispatch (`moe.dispatch="dropless"`): every accepted top-k choice is computed, no capacity buffers.

One device (or no expert sharding): the (token, choice) rows are sorted by expert, the experts run as grouped
matmuls over the sorted rows (`jax.lax.ragged_dot`, differentiable, runs on CPU), the rows are unsorted and
combined with the router's weights.

Across expert shards (inside the block's `jax.shard_map`): each device sorts its N = G*S*K choice rows by expert,
so the rows for each expert shard are one contiguous run; the shards first exchange their per-expert row counts
(`all_gather`, the receive offsets of every shard follow from them, as MaxText does), then the rows go to their
expert shard (`exchange`), are sorted by local expert there, run through the local experts, come back the same way
and are combined. `exchange` has the semantics of `jax.lax.ragged_all_to_all`, which it uses on GPU/TPU; XLA:CPU
does not implement that collective, so on CPU the same function is an `all_to_all` of worst-case buffers (every
shard may send all of its N rows to every other shard) followed by a scatter to the ragged offsets: identical
results, more bytes on the wire.

Worst-case buffers per device (N = G*S*K rows of width D, n = expert-axis size, payload dtype):
- one device: the sorted rows [N, D] and the grouped-matmul hidden [N, F];
- ragged_all_to_all (GPU/TPU): send [N, D], receive [n*N, D] (a shard may receive every row of every shard), and
  the hidden [n*N, F] of the local experts over the receive buffer;
- CPU exchange: additionally the padded send and receive blocks [n, N, D] each way.
The receive buffer is sized for the worst case so that nothing is ever dropped; typical fills are N rows.

The router is asked for its table at capacity S (a whole group), so no choice is refused: the routing equals the
capacity path at capacity factor E/k, and so do the values and gradients (tests/test_dropless.py).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp

from rectify_moe import routing
from rectify_moe.config.fields import ConfigError

if TYPE_CHECKING:
  from rectify_moe.config.schema import MoEConfig

Array = jax.Array

# Platforms whose XLA implements ragged-all-to-all; `EXCHANGE` = "ragged" or "emulated" overrides the choice (tests
# lower the ragged program on CPU to check it traces, forward and backward).
RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")
EXCHANGE: Optional[str] = None


# Routers whose routing is defined by their capacity (no dropless form): the dropless reference of such a row is
# the token-choice top-k router on the same gate.
CAPACITY_DEFINED_ROUTERS = ("expert_choice",)


def validate(cfg: "MoEConfig") -> None:
  """One-line ConfigErrors for options that mean nothing without capacity buffers."""
  if cfg.dispatch != "dropless":
    return
  fix = "set them off or use moe.dispatch='einsum' or 'index'"
  for name, off in (("ir_mode", None), ("fill_in", False), ("gating_dropout", 0.0)):
    if getattr(cfg, name) != off:
      raise ConfigError(f"moe.dispatch='dropless' drops nothing, so moe.{name}={getattr(cfg, name)!r} (a rectification "
                        f"of dropped tokens / a capacity-path option) does not apply: set moe.{name}={off!r} or use "
                        "moe.dispatch='einsum' or 'index'.")
  if cfg.router in CAPACITY_DEFINED_ROUTERS:
    raise ConfigError(f"moe.router={cfg.router!r} fills each expert's capacity by construction and has no dropless "
                      f"form: use moe.dispatch='einsum' or 'index' ({fix}).")


def reference_config(cfg: "MoEConfig") -> "MoEConfig":
  """The dropless counterpart of a block config: the same router and k, nothing dropped, no rectification (Expert
  Choice: the token-choice top-k router on the same gate)."""
  router = "top_k" if cfg.router in CAPACITY_DEFINED_ROUTERS else cfg.router
  return dataclasses.replace(cfg, dispatch="dropless", router=router, fill_in=False, ir_mode=None,
                             ir_capacity_factor=None, gating_dropout=0.0)


def use_ragged_all_to_all() -> bool:
  """True where `jax.lax.ragged_all_to_all` lowers (not on XLA:CPU)."""
  if EXCHANGE is not None:
    return EXCHANGE == "ragged"
  return jax.default_backend() in RAGGED_PLATFORMS


def _exclusive_cumsum(x: Array, axis: int = -1) -> Array:
  return jnp.cumsum(x, axis=axis) - x


def grouped_ffn(rows: Array, group_sizes: Array, weights: dict[str, Array], activation: str) -> Array:
  """Experts over rows sorted by expert.

  Args:
    rows: [R, D] rows, those of expert l contiguous and in expert order; rows past sum(group_sizes) are ignored.
    group_sizes: int32[L] rows per expert.
    weights: "w_up" [L, D, F], "w_down" [L, F, D] (and "w_gate" [L, D, F] for SwiGLU), cast to rows.dtype.
    activation: "swiglu" | "gelu".

  Returns:
    [R, D] in rows.dtype (zero rows past sum(group_sizes)).
  """
  dtype = rows.dtype
  up = jax.lax.ragged_dot(rows, weights["w_up"].astype(dtype), group_sizes)
  if activation == "swiglu":
    hidden = jax.nn.silu(jax.lax.ragged_dot(rows, weights["w_gate"].astype(dtype), group_sizes)) * up
  else:
    hidden = jax.nn.gelu(up)
  return jax.lax.ragged_dot(hidden, weights["w_down"].astype(dtype), group_sizes)


def _sorted_by(keys: Array, num_keys: int) -> tuple[Array, Array]:
  """(order, counts): a stable sort of int keys in [0, num_keys] (num_keys = 'not computed', sorted last) and
  the rows per key in [0, num_keys)."""
  order = jnp.argsort(keys, stable=True)
  counts = jnp.bincount(keys, length=num_keys + 1)[:num_keys].astype(jnp.int32)
  return order, counts


def _inverse(order: Array) -> Array:
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def emulated_ragged_all_to_all(operand: Array, output: Array, input_offsets: Array, send_sizes: Array,
                               output_offsets: Array, recv_sizes: Array, *, axis_name: str) -> Array:
  """`jax.lax.ragged_all_to_all` from `all_to_all` of worst-case blocks (XLA:CPU has no ragged-all-to-all).

  Block j of the send buffer [n, M, D] holds operand[input_offsets[j] : + send_sizes[j]] (M = operand rows, the
  most one shard can send); after the all_to_all, block i holds the rows sender i sent here, which are written to
  output[o_i : o_i + recv_sizes[i]] with o_i the offset sender i chose (its output_offsets, sent along).
  """
  del recv_sizes  # sent along with the blocks
  rows = operand.shape[0]
  n = send_sizes.shape[0]
  position = jnp.arange(rows, dtype=jnp.int32)
  # Shape: [n, M]: source row of each block row, and whether it carries data.
  source = input_offsets[:, None] + position[None, :]
  sent = position[None, :] < send_sizes[:, None]
  blocks = jnp.where(sent[..., None], operand[jnp.clip(source, 0, rows - 1)], jnp.zeros((), operand.dtype))
  blocks = jax.lax.all_to_all(blocks, axis_name, split_axis=0, concat_axis=0, tiled=True)
  meta = jnp.stack([send_sizes, output_offsets], axis=-1)  # [n, 2]: what each receiver needs of my blocks
  meta = jax.lax.all_to_all(meta, axis_name, split_axis=0, concat_axis=0, tiled=True)
  got, offset = meta[:, 0], meta[:, 1]
  target = jnp.where(position[None, :] < got[:, None], offset[:, None] + position[None, :], output.shape[0])
  return output.at[target.reshape(n * rows)].set(blocks.reshape(n * rows, -1), mode="drop")


def _vary_like(x: Array, like: Array) -> Array:
  """x marked as varying over the manual mesh axes `like` varies over (shard_map's check_vma types)."""
  varying = getattr(getattr(jax.typeof(like), "manual_axis_type", None), "varying", frozenset())
  mine = getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", frozenset())
  missing = tuple(sorted(set(varying) - set(mine)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def exchange(operand: Array, output: Array, input_offsets: Array, send_sizes: Array, output_offsets: Array,
             recv_sizes: Array, *, axis_name: str) -> Array:
  """Ragged all-to-all over `axis_name`: `jax.lax.ragged_all_to_all` on GPU/TPU, its emulation on CPU."""
  if not use_ragged_all_to_all():
    return emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                      axis_name=axis_name)
  output = _vary_like(output, operand)  # a fresh buffer: make it vary over the mesh axes like the rows
  return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                   axis_name=axis_name)


def dropless_experts(payload: Array, table: routing.RoutingTable, expert_weights: dict[str, Array], *,
                     activation: str, num_experts: int, expert_axis: Optional[str] = None,
                     expert_axis_size: int = 1) -> Array:
  """Every accepted choice of `table` through its expert, combined with the table's weights.

  Args:
    payload: [G, S, D] tokens (payload dtype).
    table: the routing table (choices with slot < 0 are not computed: padding, or a router's own refusal).
    expert_weights: this device's L = E / expert_axis_size experts, each [L, ...].
    activation: "swiglu" | "gelu".
    num_experts: E.
    expert_axis: the mesh axis of the expert shards (None = this device holds every expert).
    expert_axis_size: n.

  Returns:
    float32[G, S, D] = sum_k combine_weight[k] * expert(x)[choice k].
  """
  groups, tokens, width = payload.shape
  choices = table.expert_index.shape[-1]
  rows_total = groups * tokens * choices
  valid = (table.slot >= 0).reshape(rows_total)
  # Sort key: the expert, or E (last, not computed) for choices without a slot.
  key = jnp.where(valid, table.expert_index.reshape(rows_total), num_experts)
  order, counts = _sorted_by(key, num_experts)
  token_of_row = order // choices
  rows = payload.reshape(groups * tokens, width)[token_of_row]  # [N, D] sorted by expert
  sharded = expert_axis is not None and expert_axis_size > 1
  if not sharded:
    out_sorted = grouped_ffn(rows, counts, expert_weights, activation)
  else:
    out_sorted = _sharded_experts(rows, counts, expert_weights, activation=activation, axis=expert_axis,
                                  n=expert_axis_size)
  out = out_sorted[_inverse(order)].reshape(groups, tokens, choices, width)
  weight = jnp.where(table.slot >= 0, table.combine_weight, 0.0)
  # Shape: [G, S, D] = einsum("gsk,gskd->gsd")
  return jnp.einsum("gsk,gskd->gsd", weight, out.astype(jnp.float32))


def _sharded_experts(rows: Array, counts: Array, expert_weights: dict[str, Array], *, activation: str, axis: str,
                     n: int) -> Array:
  """Rows [N, D] sorted by global expert (counts int32[E]) to their expert shards, through the experts, back."""
  total, width = rows.shape
  num_experts = counts.shape[0]
  num_local = num_experts // n
  me = jax.lax.axis_index(axis)
  # Receive offsets first: every shard's per-expert counts, [n senders, E].
  all_counts = jax.lax.all_gather(counts, axis)
  # Shape: [n senders, n receivers, L]
  per_shard = all_counts.reshape(n, n, num_local)
  sizes = jnp.sum(per_shard, axis=-1)  # [sender, receiver] rows
  send_sizes = sizes[me]
  input_offsets = _exclusive_cumsum(send_sizes)
  arrival = _exclusive_cumsum(sizes, axis=0)  # [sender, receiver]: where a sender's rows start at the receiver
  output_offsets = arrival[me]
  recv_sizes = sizes[:, me]
  recv_offsets = arrival[:, me]
  capacity = n * total  # worst case: every shard sends all its rows here
  received = exchange(rows, jnp.zeros((capacity, width), rows.dtype), input_offsets, send_sizes, output_offsets,
                      recv_sizes, axis_name=axis)
  # Local expert of each received row: sender-major runs of per-expert counts; the rest is not computed (L).
  mine = jnp.take(per_shard, me, axis=1)  # [sender, L]
  run_expert = jnp.concatenate([jnp.tile(jnp.arange(num_local, dtype=jnp.int32), n),
                                jnp.array([num_local], jnp.int32)])
  run_length = jnp.concatenate([mine.reshape(-1), (capacity - jnp.sum(mine))[None]]).astype(jnp.int32)
  local_expert = jnp.repeat(run_expert, run_length, total_repeat_length=capacity)
  order, local_counts = _sorted_by(local_expert, num_local)
  out = grouped_ffn(received[order], local_counts, expert_weights, activation)[_inverse(order)]
  # Back to the senders, each into the place its rows left from (its input offset for this shard).
  back_offsets = _exclusive_cumsum(sizes, axis=1)[:, me]
  back = jnp.zeros((total, width), rows.dtype)
  return exchange(out, back, recv_offsets, recv_sizes, back_offsets, send_sizes, axis_name=axis)
