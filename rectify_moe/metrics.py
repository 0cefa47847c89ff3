"""Routing counts -> rates: the one definition used by the block's users, the trainer and the evaluator.

The MoE block returns global counts (`moe.MoEBlock.__call__`, "counts"); counts add up over batches and steps, and
rates are ratios of counts, so every consumer sums counts and divides once:

| rate | definition |
|---|---|
| `drop_rate` | dropped top-k choices / valid top-k choices (before capacity: the demand) |
| `unrouted_rate` | valid tokens with no accepted choice / valid tokens |
| `padding_rate` | 1 - filled slots / capacity slots |
| `fill_in_rate` | slots filled by Fill-in Rectification / capacity slots |
| `ir_rate` | tokens rectified by Intra-device Rectification (a slot, or reuse of an accepted output) / valid tokens |
| `ir_reuse_rate` | rectified tokens whose local expert already held one of their choices / valid tokens |
| `ir_overflow_rate` | tokens selected for IR that did not fit its buffer / valid tokens |
| `a2a_rows_per_token` | rows the all-to-all carries (all capacity slots) / tokens |
| `gating_dropped` | devices whose step skipped the all-to-all (Gating Dropout) / devices |

Everything works on numpy or jax arrays with any leading axes (e.g. [num_moe_layers]); per-expert counts carry a
trailing [E] axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# Per-layer rates averaged over the MoE layers in the training log (and its progress line).
TRAIN_RATE_KEYS = ("drop_rate", "unrouted_rate", "padding_rate", "fill_in_rate", "ir_rate", "ir_overflow_rate",
                   "gating_dropped")
RATE_KEYS = ("drop_rate", "unrouted_rate", "padding_rate", "fill_in_rate", "ir_rate", "ir_reuse_rate",
             "ir_overflow_rate", "a2a_rows_per_token", "gating_dropped")


def _xp(value: Any):
  """numpy for numpy inputs, jax.numpy for jax arrays (traced values included)."""
  if isinstance(value, (np.ndarray, np.generic, float, int)):
    return np
  import jax.numpy as jnp
  return jnp


def rates(counts: Mapping[str, Any]) -> dict[str, Any]:
  """The rates of the module table from global counts (one MoE layer, or stacked layers)."""
  xp = _xp(counts["tokens"])
  tokens = xp.maximum(counts["tokens"], 1.0)
  top_k_choices = xp.maximum(xp.sum(counts["expert_demand"], axis=-1), 1.0)
  slots = xp.maximum(counts["slots"], 1.0)
  return {
      "drop_rate": counts["dropped_choices"] / top_k_choices,
      "unrouted_rate": counts["unrouted_tokens"] / tokens,
      "padding_rate": 1.0 - counts["filled_slots"] / slots,
      "fill_in_rate": counts["fill_in_slots"] / slots,
      "ir_rate": counts["ir_rectified"] / tokens,
      "ir_reuse_rate": counts["ir_reused"] / tokens,
      "ir_overflow_rate": counts["ir_overflow"] / tokens,
      "a2a_rows_per_token": counts["a2a_rows"] / xp.maximum(counts["group_tokens"], 1.0),
      "gating_dropped": counts["gating_dropped_devices"] / xp.maximum(counts["devices"], 1.0),
  }


def block_summary(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """One flat dict of a block's metrics: its losses, its counts and their rates."""
  return {**metrics["losses"], **metrics["counts"], **rates(metrics["counts"])}


def imbalance(counts: Any, name: str = "load") -> dict[str, float]:
  """`{name}_max_over_mean` and `{name}_cv` (std / mean) of per-expert counts (1.0 and 0.0 when balanced)."""
  counts = np.asarray(counts, np.float64)
  mean = counts.mean() if counts.size else 0.0
  if mean <= 0:
    return {f"{name}_max_over_mean": 0.0, f"{name}_cv": 0.0}
  return {f"{name}_max_over_mean": float(counts.max() / mean), f"{name}_cv": float(counts.std() / mean)}
