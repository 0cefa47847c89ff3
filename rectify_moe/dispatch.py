"""Dispatch, experts and combine on capacity buffers: the data movement of the MoE block, shared by its routed
path, its Intra-device Rectification buffers and Gating Dropout's local step.

Two implementations with the same semantics, chosen by `moe.dispatch`: "einsum" (one-hot dispatch / combine masks,
GShard style) and "index" (gathers in both directions with custom VJPs, `index_dispatch.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rectify_moe import index_dispatch

Array = jax.Array

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
