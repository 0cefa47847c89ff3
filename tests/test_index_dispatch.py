"""Gather-only dispatch/combine (rectify_moe/index_dispatch.py) against a numpy loop, values and VJPs.

The reference copies token rows into buffer slots one (token, choice) at a time; its VJPs are written out by
hand from the definition (a slot's gradient goes back to the token that filled it; a token's combine gradient
comes from each of its slots). Assignments are random partial one-to-one maps with padding, overflow
(slot -1) and tokens that fill several slots.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rectify_moe import index_dispatch


def random_assignment(rng, groups, tokens, choices, buffers, capacity, fill=0.7):
  """buffer_index, slot [G, S, K]: distinct (buffer, slot) per group, about `fill` of choices dispatched."""
  buffer_index = rng.randint(0, buffers, (groups, tokens, choices)).astype(np.int32)
  slot = np.full((groups, tokens, choices), -1, np.int32)
  for g in range(groups):
    free = {b: list(rng.permutation(capacity)) for b in range(buffers)}
    for s in range(tokens):
      for k in range(choices):
        b = buffer_index[g, s, k]
        if free[b] and rng.rand() < fill:
          slot[g, s, k] = free[b].pop()
  return buffer_index, slot


def ref_dispatch(x, buffer_index, slot, buffers, capacity):
  groups, tokens, choices = slot.shape
  out = np.zeros((buffers, groups, capacity, x.shape[-1]), np.float64)
  for g in range(groups):
    for s in range(tokens):
      for k in range(choices):
        if slot[g, s, k] >= 0:
          out[buffer_index[g, s, k], g, slot[g, s, k]] = x[g, s]
  return out


def ref_combine(out, weight, buffer_index, slot):
  groups, tokens, choices = slot.shape
  y = np.zeros((groups, tokens, out.shape[-1]), np.float64)
  for g in range(groups):
    for s in range(tokens):
      for k in range(choices):
        if slot[g, s, k] >= 0:
          y[g, s] += weight[g, s, k] * out[buffer_index[g, s, k], g, slot[g, s, k]]
  return y


def ref_combine_vjp(out, weight, buffer_index, slot, d_y):
  d_out, d_weight = np.zeros(out.shape), np.zeros(weight.shape)
  groups, tokens, choices = slot.shape
  for g in range(groups):
    for s in range(tokens):
      for k in range(choices):
        if slot[g, s, k] >= 0:
          b, c = buffer_index[g, s, k], slot[g, s, k]
          d_out[b, g, c] += weight[g, s, k] * d_y[g, s]
          d_weight[g, s, k] = np.dot(d_y[g, s], out[b, g, c])
  return d_out, d_weight


CASES = [  # groups, tokens, choices, buffers, capacity
    (1, 8, 1, 4, 2), (3, 16, 2, 4, 5), (2, 10, 3, 8, 2), (2, 6, 2, 3, 6), (1, 5, 1, 1, 5)]


@pytest.mark.parametrize("case", CASES)
def test_slot_map_inverts_the_assignment(case):
  groups, tokens, choices, buffers, capacity = case
  rng = np.random.RandomState(sum(case))
  bi, sl = random_assignment(rng, *case)
  m = jax.tree.map(np.asarray, index_dispatch.slot_map(jnp.asarray(bi), jnp.asarray(sl), num_buffers=buffers,
                                                       capacity=capacity))
  assert m.filled.sum() == (sl >= 0).sum()
  for g in range(groups):
    for s in range(tokens):
      for k in range(choices):
        if sl[g, s, k] >= 0:
          b, c = bi[g, s, k], sl[g, s, k]
          assert m.filled[b, g, c] and (m.source_token[b, g, c], m.source_choice[b, g, c]) == (s, k)


@pytest.mark.parametrize("case", CASES)
def test_dispatch_and_combine_values_and_vjps(case):
  groups, tokens, choices, buffers, capacity = case
  width = 5
  rng = np.random.RandomState(100 + sum(case))
  bi, sl = random_assignment(rng, *case)
  x = rng.randn(groups, tokens, width)
  out = rng.randn(buffers, groups, capacity, width)
  weight = rng.rand(groups, tokens, choices)
  m = index_dispatch.slot_map(jnp.asarray(bi), jnp.asarray(sl), num_buffers=buffers, capacity=capacity)

  got, vjp = jax.vjp(lambda x: index_dispatch.dispatch(x, m), jnp.asarray(x, jnp.float32))
  np.testing.assert_array_equal(np.asarray(got), ref_dispatch(x, bi, sl, buffers, capacity).astype(np.float32))
  d_buf = rng.randn(*got.shape)
  # The VJP of a copy: each token collects the gradients of the slots it filled (= combine with weight 1).
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(d_buf, jnp.float32))[0]),
                             ref_combine(d_buf, np.ones_like(weight), bi, sl), rtol=1e-5, atol=1e-5)

  y, vjp = jax.vjp(lambda o, w: index_dispatch.combine(o, w, m), jnp.asarray(out, jnp.float32),
                   jnp.asarray(weight, jnp.float32))
  np.testing.assert_allclose(np.asarray(y), ref_combine(out, weight, bi, sl), rtol=1e-5, atol=1e-5)
  d_y = rng.randn(*y.shape)
  d_out, d_weight = vjp(jnp.asarray(d_y, jnp.float32))
  ref_d_out, ref_d_weight = ref_combine_vjp(out, weight, bi, sl, d_y)
  np.testing.assert_allclose(np.asarray(d_out), ref_d_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(d_weight), ref_d_weight, rtol=1e-5, atol=1e-5)


def test_padding_is_zero_and_nan_in_unread_rows_does_not_leak():
  rng = np.random.RandomState(0)
  bi, sl = random_assignment(rng, 2, 12, 2, 4, 3, fill=0.5)
  m = index_dispatch.slot_map(jnp.asarray(bi), jnp.asarray(sl), num_buffers=4, capacity=3)
  x = jnp.asarray(rng.randn(2, 12, 3), jnp.float32)
  buf = index_dispatch.dispatch(x, m)
  assert np.all(np.asarray(buf)[~np.asarray(m.filled)] == 0)
  # Unfilled slots poisoned: neither the combine nor its gradients read them.
  poisoned = jnp.where(m.filled[..., None], buf, jnp.nan)
  w = jnp.asarray(rng.rand(2, 12, 2), jnp.float32)
  y, grads = jax.value_and_grad(lambda o, w: jnp.sum(index_dispatch.combine(o, w, m)), argnums=(0, 1))(poisoned, w)
  assert np.isfinite(np.asarray(y)) and all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_bfloat16_payload_keeps_dtype_and_matches_float32():
  rng = np.random.RandomState(1)
  bi, sl = random_assignment(rng, 2, 16, 2, 4, 6)
  m = index_dispatch.slot_map(jnp.asarray(bi), jnp.asarray(sl), num_buffers=4, capacity=6)
  x = jnp.asarray(rng.randn(2, 16, 8), jnp.bfloat16)
  w = jnp.asarray(rng.rand(2, 16, 2), jnp.float32)

  def f(x, w):
    return jnp.sum(index_dispatch.combine(index_dispatch.dispatch(x, m) * 2, w, m) ** 2)

  (gx, gw) = jax.grad(f, argnums=(0, 1))(x, w)
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
  (rx, rw) = jax.grad(f, argnums=(0, 1))(x.astype(jnp.float32), w)
  np.testing.assert_allclose(np.asarray(gx, np.float32), np.asarray(rx), rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=2e-2, atol=2e-2)


def test_lowered_program_has_no_wide_scatter():
  """Forward and backward move D-wide rows with gathers only; the one scatter is the int32 [G,S,K] inverse."""
  rng = np.random.RandomState(2)
  bi, sl = random_assignment(rng, 2, 16, 2, 4, 6)
  x = jnp.asarray(rng.randn(2, 16, 128), jnp.float32)
  w = jnp.asarray(rng.rand(2, 16, 2), jnp.float32)

  def f(x, w, bi, sl):
    m = index_dispatch.slot_map(bi, sl, num_buffers=4, capacity=6)
    return jnp.sum(index_dispatch.combine(jnp.tanh(index_dispatch.dispatch(x, m)), w, m))

  hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w, jnp.asarray(bi), jnp.asarray(sl)).compile().as_text()
  scatters = re.findall(r"= (\S+) scatter\(", hlo)
  gathers = re.findall(r"= (\S+) gather\(", hlo)
  assert scatters == ["s32[4,2,6]{2,1,0}"], scatters
  assert any(",128]" in shape for shape in gathers), gathers
