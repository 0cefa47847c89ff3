"""Counts -> rates (rectify_moe/metrics.py) on a hand-worked example, stacked layers, numpy and jax alike."""

import jax.numpy as jnp
import numpy as np

from rectify_moe import metrics


def _counts():
  # Two MoE layers. Layer 0: 8 tokens, top-2 demand 16 choices, 4 dropped, 1 token unrouted, 20 slots of which 14
  # filled (2 by fill-in), 3 tokens rectified (1 reusing an output, 1 overflowing), 20 all-to-all rows for 8
  # group tokens, 4 devices of which none dropped the gate. Layer 1: nothing happens on 0 tokens (no division by 0).
  return {
      "tokens": np.array([8.0, 0.0]), "dropped_choices": np.array([4.0, 0.0]),
      "unrouted_tokens": np.array([1.0, 0.0]), "filled_slots": np.array([14.0, 0.0]),
      "fill_in_slots": np.array([2.0, 0.0]), "slots": np.array([20.0, 0.0]), "ir_rectified": np.array([3.0, 0.0]),
      "ir_reused": np.array([1.0, 0.0]), "ir_overflow": np.array([1.0, 0.0]), "a2a_rows": np.array([20.0, 0.0]),
      "group_tokens": np.array([8.0, 0.0]), "devices": np.array([4.0, 4.0]),
      "gating_dropped_devices": np.array([0.0, 4.0]),
      "expert_demand": np.array([[6.0, 4.0, 4.0, 2.0], [0.0, 0.0, 0.0, 0.0]]),
      "expert_load": np.array([[5.0, 4.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]]),
  }


def test_rates_by_hand():
  r = metrics.rates(_counts())
  want = {"drop_rate": [4 / 16, 0], "unrouted_rate": [1 / 8, 0], "padding_rate": [1 - 14 / 20, 1.0],
          "fill_in_rate": [2 / 20, 0], "ir_rate": [3 / 8, 0], "ir_reuse_rate": [1 / 8, 0],
          "ir_overflow_rate": [1 / 8, 0], "a2a_rows_per_token": [20 / 8, 0], "gating_dropped": [0.0, 1.0]}
  assert set(r) == set(want) == set(metrics.RATE_KEYS)
  for key, value in want.items():
    np.testing.assert_allclose(r[key], value, err_msg=key)


def test_rates_are_the_same_from_jax_arrays():
  counts = _counts()
  got = metrics.rates({k: jnp.asarray(v, jnp.float32) for k, v in counts.items()})
  for key, value in metrics.rates(counts).items():
    np.testing.assert_allclose(np.asarray(got[key]), value, rtol=1e-6, err_msg=key)


def test_rates_of_summed_counts_are_token_weighted():
  """Two batches: the rate of their summed counts, not the mean of their rates."""
  a, b = _counts(), _counts()
  b = {k: v * (3.0 if k != "devices" else 1.0) for k, v in b.items()}
  b["dropped_choices"] = np.array([0.0, 0.0])
  total = {k: a[k] + b[k] for k in a}
  assert metrics.rates(total)["drop_rate"][0] == 4 / (16 + 48)


def test_imbalance():
  assert metrics.imbalance([2, 2, 2, 2]) == {"load_max_over_mean": 1.0, "load_cv": 0.0}
  got = metrics.imbalance([4, 0, 0, 0], "demand")
  assert got["demand_max_over_mean"] == 4.0 and np.isclose(got["demand_cv"], np.sqrt(3))
