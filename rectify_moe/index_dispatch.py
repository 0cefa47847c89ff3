"""Index dispatch: tokens into capacity buffers and back with gathers only, forward and backward.

A routing table says where each (token, choice) goes: buffer `b = buffer_index[g, s, k]`, slot
`c = slot[g, s, k]` (-1 = not dispatched). A slot holds at most one (token, choice), so the table is a partial
one-to-one map, and inverting it once (a small int32 scatter of [G, S, K] indices) gives each slot's source.
With both directions of the map at hand every data movement is a gather:

  dispatch   x [G, S, D] -> buffers [B, G, C, D]   gather by slot source;  VJP: gather by the token's slots, sum.
  combine    out [B, G, C, D], w [G, S, K] -> y    gather by the token's slots; VJP: gather by slot source.

The D-wide scatter-adds that autodiff of the plain scatter/gather formulation produces (atomics on GPU) never
appear. The einsum-mask path in `moe.py` computes the same function; tests compare the two and a numpy loop.

Both are `jax.custom_vjp` functions: reverse mode (grad, vjp, grad of grad) and vmap work; forward mode (jvp,
jacfwd, hessian) does not. Use `dispatch="einsum"` for forward-mode derivatives of the block.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class SlotMap:
  """Both directions of a routing assignment (all integer/bool, no gradient).

  Attributes:
    buffer_index: int32[G, S, K] buffer of each (token, choice).
    slot: int32[G, S, K] slot in that buffer, clamped into [0, C) (read only where `valid`).
    valid: bool[G, S, K] the choice was dispatched.
    source_token: int32[B, G, C] token filling each slot (0 where not `filled`).
    source_choice: int32[B, G, C] which of that token's choices it is.
    filled: bool[B, G, C] the slot holds a token (False = padding).
  """
  buffer_index: Array
  slot: Array
  valid: Array
  source_token: Array
  source_choice: Array
  filled: Array


def slot_map(buffer_index: Array, slot: Array, *, num_buffers: int, capacity: int) -> SlotMap:
  """Inverts an assignment.

  Args:
    buffer_index: int32[G, S, K] target buffer of each choice, in [0, num_buffers).
    slot: int32[G, S, K] slot in that buffer, -1 = not dispatched; dispatched slots must be distinct.
    num_buffers: B.
    capacity: C.

  Returns:
    The `SlotMap`.
  """
  groups, tokens, choices = slot.shape
  valid = slot >= 0
  group = jnp.arange(groups, dtype=jnp.int32)[:, None, None]
  flat = jnp.broadcast_to(jnp.arange(tokens * choices, dtype=jnp.int32).reshape(tokens, choices), slot.shape)
  target = jnp.where(valid, slot, capacity)  # out of bounds -> not written (mode="drop")
  source = jnp.full((num_buffers, groups, capacity), -1, jnp.int32)
  source = source.at[buffer_index, group, target].set(flat, mode="drop")
  filled = source >= 0
  source = jnp.maximum(source, 0)
  return SlotMap(buffer_index=buffer_index.astype(jnp.int32), slot=jnp.clip(slot, 0, capacity - 1),
                 valid=valid, source_token=source // choices, source_choice=source % choices, filled=filled)


def _rows_of_slots(buffers: Array, m: SlotMap, k: int) -> Array:
  """[G, S, D]: the buffer row of each token's k-th choice (garbage where not valid)."""
  group = jnp.arange(buffers.shape[1], dtype=jnp.int32)[:, None]
  return buffers.at[m.buffer_index[..., k], group, m.slot[..., k]].get(mode="promise_in_bounds")


def _rows_of_sources(x: Array, m: SlotMap) -> Array:
  """[B, G, C, D]: the token row filling each slot (garbage where not filled)."""
  group = jnp.arange(x.shape[0], dtype=jnp.int32)[None, :, None]
  return x.at[group, m.source_token].get(mode="promise_in_bounds")


def _sum_over_choices(buffers: Array, m: SlotMap, weight: Array | None) -> Array:
  """float32[G, S, D] = sum_k weight[k] * buffers[b_k, g, c_k] over valid choices."""
  total = None
  for k in range(m.slot.shape[-1]):
    row = _rows_of_slots(buffers, m, k).astype(jnp.float32)
    if weight is not None:
      row = row * weight[..., k, None]
    row = jnp.where(m.valid[..., k, None], row, 0.0)
    total = row if total is None else total + row
  return total


@jax.custom_vjp
def dispatch(x: Array, m: SlotMap) -> Array:
  """Tokens into buffers.

  Args:
    x: [G, S, D] tokens (any float dtype).
    m: the `SlotMap`.

  Returns:
    [B, G, C, D] in x.dtype; unfilled slots are zero rows.
  """
  return jnp.where(m.filled[..., None], _rows_of_sources(x, m), jnp.zeros((), x.dtype))


def _dispatch_fwd(x, m):
  return dispatch(x, m), m


def _dispatch_bwd(m, d_buffers):
  # Each token receives the gradient of every slot it was copied into.
  return _sum_over_choices(d_buffers, m, None).astype(d_buffers.dtype), None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def combine(out: Array, weight: Array, m: SlotMap) -> Array:
  """Buffers back to tokens, weighted.

  Args:
    out: [B, G, C, D] expert outputs.
    weight: float32[G, S, K] combine weight of each choice.
    m: the `SlotMap`.

  Returns:
    float32[G, S, D] = sum over valid k of weight[..., k] * out[b_k, g, c_k].
  """
  return _sum_over_choices(out, m, weight)


def _combine_fwd(out, weight, m):
  return combine(out, weight, m), (out, weight, m)


def _combine_bwd(residuals, d_y):
  out, weight, m = residuals
  group = jnp.arange(weight.shape[0], dtype=jnp.int32)[None, :, None]
  # Shape: [B, G, C]: the combine weight each slot's row was multiplied by.
  slot_weight = weight.at[group, m.source_token, m.source_choice].get(mode="promise_in_bounds")
  d_out = jnp.where(m.filled[..., None], _rows_of_sources(d_y, m) * slot_weight[..., None], 0.0)
  d_weight = []
  for k in range(m.slot.shape[-1]):
    row = _rows_of_slots(out, m, k).astype(jnp.float32)
    # Shape: [G, S] = einsum("gsd,gsd->gs")
    d_weight.append(jnp.where(m.valid[..., k], jnp.einsum("gsd,gsd->gs", d_y, row), 0.0))
  return d_out.astype(out.dtype), jnp.stack(d_weight, axis=-1).astype(weight.dtype), None


combine.defvjp(_combine_fwd, _combine_bwd)
