"""Expert Choice (rectify_moe/routers/expert_choice.py) against a numpy loop, in the block, and its config errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rectify_moe import moe, sharding
from rectify_moe.config.fields import ConfigError
from rectify_moe.config.schema import MoEConfig
from rectify_moe.routers import expert_choice

G, S, E, C, D, F = 3, 8, 4, 3, 6, 8


def loop_reference(probs, mask, capacity):
  """Each expert, one by one, picks its `capacity` best valid tokens (ties: lower index): slot[g, s, e] or -1."""
  groups, tokens, experts = probs.shape
  slot = -np.ones((groups, tokens, experts), np.int64)
  for g in range(groups):
    for e in range(experts):
      candidates = sorted((-probs[g, s, e], s) for s in range(tokens) if mask[g, s])
      for rank, (_, s) in enumerate(candidates[:capacity]):
        slot[g, s, e] = rank
  return slot


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  probs = np.asarray(jax.nn.softmax(rng.randn(G, S, E).astype(np.float32) * 2, -1))
  mask = rng.rand(G, S) > 0.25
  mask[2, 2:] = False  # a group with fewer valid tokens than C
  return probs, mask


def test_table_matches_loop_reference():
  probs, mask = _inputs()
  table = jax.device_get(expert_choice.expert_choice_table(jnp.asarray(probs), jnp.asarray(mask), C))
  ref = loop_reference(probs, mask, C)
  # The table lists each token's experts by decreasing probability; map slots back to expert order.
  got = -np.ones_like(ref)
  np.put_along_axis(got, np.asarray(table.expert_index), np.asarray(table.slot), axis=-1)
  np.testing.assert_array_equal(got, ref)
  weight = np.zeros_like(probs)
  np.put_along_axis(weight, np.asarray(table.expert_index), np.asarray(table.combine_weight), axis=-1)
  np.testing.assert_allclose(weight, np.where(ref >= 0, probs, 0.0), rtol=1e-6)
  # Every expert is full where the group has enough valid tokens; a token may get 0..E experts.
  load = (ref >= 0).sum(axis=1)
  np.testing.assert_array_equal(load, np.minimum(C, mask.sum(axis=1))[:, None].repeat(E, 1))
  counts = (ref >= 0).sum(-1)[mask]
  assert counts.max() >= 2  # some token got several experts


def test_block_output_equals_loop_over_experts():
  """The MoE block with Expert Choice (index dispatch, mesh (2, 4)) against y = sum_e g * expert_e(x) by loop."""
  cfg = MoEConfig(num_experts=E, expert_dim=F, group_size=S, router="expert_choice", capacity_factor=C * E / S,
                  activation="gelu", dispatch="index")
  assert cfg.capacity(True) == C
  rng = np.random.RandomState(2)
  x = rng.randn(8, S, D).astype(np.float32)
  mesh = sharding.make_mesh(2, 2)
  with jax.set_mesh(mesh):
    block = moe.MoEBlock(cfg, d_model=D, rngs=nnx.Rngs(0))
    y, metrics = jax.jit(lambda b, x: b(x, train=False))(block, x)
  kernel, w_up, w_down = (np.asarray(block.router.kernel[...]), np.asarray(block.w_up[...]),
                          np.asarray(block.w_down[...]))
  xg = x.reshape(-1, S, D)
  probs = np.asarray(jax.nn.softmax(xg @ kernel, -1))
  slot = loop_reference(probs, np.ones(probs.shape[:2], bool), C)
  ref = np.zeros_like(xg)
  for g in range(xg.shape[0]):
    for s in range(S):
      for e in range(E):
        if slot[g, s, e] >= 0:
          ref[g, s] += probs[g, s, e] * (np.asarray(jax.nn.gelu(xg[g, s] @ w_up[e])) @ w_down[e])
  np.testing.assert_allclose(np.asarray(y).reshape(ref.shape), ref, rtol=2e-4, atol=2e-5)
  assert float(metrics["counts"]["filled_slots"]) == xg.shape[0] * E * C


@pytest.mark.parametrize("overrides, pattern", [
    (dict(capacity_factor=5.0), r"moe\.capacity_factor=5\.0 gives C=10 .*group_size=8"),
    (dict(eval_capacity_factor=8.5), r"moe\.eval_capacity_factor=8\.5"),
    (dict(dispatch="dropless"), r"moe\.router='expert_choice' .*moe\.dispatch="),
])
def test_bad_configs_give_one_line_errors(overrides, pattern):
  cfg = MoEConfig(num_experts=E, group_size=S, router="expert_choice", **overrides)
  with pytest.raises(ConfigError, match=pattern) as err:
    cfg.validate()
  assert "\n" not in str(err.value)


def test_training_caveat_is_stated():
  assert "not causal" in expert_choice.ExpertChoiceRouter.training_caveat
