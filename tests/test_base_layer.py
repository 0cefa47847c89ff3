"""BASE layers: the auction's balanced assignment against scipy and a numpy brute force; the router in the block."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.optimize import linear_sum_assignment

from rectify_moe import balanced_assignment, moe, sharding
from rectify_moe.config.fields import ConfigError
from rectify_moe.config.schema import MoEConfig

EPS = 1e-3
_ASSIGN = jax.jit(lambda s: balanced_assignment.batched_balanced_assignment(s, eps=EPS))


def loop_optimum(scores):
  """Brute force over every balanced assignment (tiny S): the best summed score."""
  tokens, experts = scores.shape
  slots = [e for e in range(experts) for _ in range(tokens // experts)]
  return max(sum(scores[s, e] for s, e in enumerate(perm)) for perm in set(itertools.permutations(slots)))


def _check(scores, experts_of):
  tokens, experts = scores.shape
  capacity = tokens // experts
  np.testing.assert_array_equal(np.bincount(experts_of, minlength=experts), capacity)
  benefit = np.repeat(scores.astype(np.float64), capacity, axis=1)  # token x slot
  rows, cols = linear_sum_assignment(benefit, maximize=True)
  optimum = benefit[rows, cols].sum()
  got = scores.astype(np.float64)[np.arange(tokens), experts_of].sum()
  assert got >= optimum - tokens * EPS - 1e-4, (got, optimum)
  return optimum, got


def test_auction_is_optimal_within_its_bound_against_scipy():
  rng = np.random.RandomState(0)
  scores = rng.randn(12, 16, 4).astype(np.float32)
  scores[1] = np.round(scores[1])          # many ties
  scores[2] = 0.0                          # all equal
  scores[3] = rng.randn(16, 1) + 0 * scores[3]  # rows constant per token
  experts, rounds = jax.device_get(_ASSIGN(scores))
  for g in range(len(scores)):
    _check(scores[g], experts[g])
  assert np.all(rounds > 0)


def test_auction_against_numpy_brute_force():
  rng = np.random.RandomState(1)
  scores = rng.randn(4, 6, 3).astype(np.float32)
  experts = np.asarray(jax.jit(lambda s: balanced_assignment.batched_balanced_assignment(s, eps=EPS))(scores)[0])
  for g in range(4):
    got = scores[g][np.arange(6), experts[g]].sum()
    assert got >= loop_optimum(scores[g]) - 6 * EPS - 1e-5


def test_router_balanced_in_training_greedy_in_evaluation():
  E, S, D, F = 4, 8, 6, 8
  cfg = MoEConfig(num_experts=E, expert_dim=F, group_size=S, router="base_layer", capacity_factor=1.0,
                  eval_capacity_factor=float(E), activation="gelu")
  rng = np.random.RandomState(3)
  x = rng.randn(4, S, D).astype(np.float32) + rng.randn(D).astype(np.float32)  # skewed: greedy is unbalanced
  with jax.set_mesh(sharding.make_mesh(1, 1)):
    block = moe.MoEBlock(cfg, d_model=D, rngs=nnx.Rngs(0))
    block.router.kernel[...] = jnp.asarray(rng.randn(D, E).astype(np.float32))
    run = jax.jit(lambda b, x: (b(x, train=True)[1]["counts"], b(x, train=False)[1]["counts"]))
    train_counts, eval_counts = jax.device_get(run(block, x))
  np.testing.assert_array_equal(train_counts["expert_load"], np.full(E, 4 * S // E))
  assert float(train_counts["dropped_choices"]) == 0
  scores = x.reshape(-1, D) @ np.asarray(block.router.kernel[...])
  np.testing.assert_array_equal(eval_counts["expert_demand"], np.bincount(scores.argmax(-1), minlength=E))


@pytest.mark.parametrize("overrides, pattern", [
    (dict(group_size=10), r"moe\.group_size=10 must be divisible by moe\.num_experts=4"),
])
def test_bad_configs_give_one_line_errors(overrides, pattern):
  cfg = MoEConfig(**{**dict(num_experts=4, group_size=8, router="base_layer"), **overrides})
  with pytest.raises(ConfigError, match=pattern) as err:
    cfg.validate()
  assert "\n" not in str(err.value)
