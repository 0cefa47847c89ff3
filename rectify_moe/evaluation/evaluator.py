"""The held-out evaluator shared by the training loop and `eval.py`: sums on device, one transfer, one division.

Per batch, one jitted step returns sums: cross-entropy, correct predictions, valid tokens, and per MoE layer the
block's counts and its losses weighted by the batch's tokens. The per-batch sums stay on the device until the last
batch, come back in one transfer, are added up (float64, in batch order), and are divided once: loss, perplexity,
accuracy (`lm_loss.lm_metrics`), and per layer the routing rates (`metrics.rates`), imbalance and mean losses.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rectify_moe import lm_loss, metrics, sharding

Array = jax.Array
BATCH_KEYS = ("inputs", "targets", "token_mask")

# The MoE block's counts of the dropless reference (`moe.dropless_distance`).
DROPLESS_COUNTS = ("dropless_sq_dist", "dropless_sq_norm")
# Per-layer values averaged over the MoE layers in a result's "mean".
LAYER_MEAN_KEYS = (*metrics.RATE_KEYS, "load_max_over_mean", "load_cv", "demand_max_over_mean", "demand_cv")


def batch_shardings(mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
  return {k: NamedSharding(mesh, sharding.token_spec(2)) for k in BATCH_KEYS}


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, Array]:
  """Per-process numpy batch -> global arrays sharded over (data, expert)."""
  spec = NamedSharding(mesh, sharding.token_spec(2))
  return {k: jax.make_array_from_process_local_data(spec, np.asarray(local[k])) for k in BATCH_KEYS}


def eval_sums(model, batch: dict[str, Array]) -> dict[str, Any]:
  """Sums over one batch in evaluation mode: "ce_sum", "correct", "tokens", and "counts" / "loss_sums" stacked over
  the MoE layers ([num_moe_layers, ...]; loss sums are each layer's losses times the batch's valid tokens)."""
  sums = lm_loss.lm_sums(model, batch, train=False)
  layers = sums.pop("layers")
  if layers:
    sums["counts"] = {k: jnp.stack([m["counts"][k] for m in layers]) for k in layers[0]["counts"]}
    sums["loss_sums"] = {k: jnp.stack([m["losses"][k] * m["counts"]["tokens"] for m in layers])
                         for k in layers[0]["losses"]}
  return sums


def _eval_step(graphdef, state, batch):
  return eval_sums(nnx.merge(graphdef, state), batch)


def _add(a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: np.asarray(x, np.float64) + np.asarray(y, np.float64), a, b)


class Evaluator:
  """A jitted evaluation of a model state (`nnx.split(model)`) over batches, on one mesh.

  Args:
    graphdef: the model's graphdef (another router config of the same parameters gives another graphdef).
    state_shardings: the NamedSharding of each leaf of the model state.
    mesh: the evaluation mesh.
  """

  def __init__(self, graphdef: Any, state_shardings: Any, mesh: jax.sharding.Mesh):
    self.mesh = mesh
    self.step_fn = jax.jit(functools.partial(_eval_step, graphdef),
                           in_shardings=(state_shardings, batch_shardings(mesh)),
                           out_shardings=NamedSharding(mesh, P()))

  def sums(self, state: Any, batches: Sequence[dict[str, np.ndarray]], *,
           progress: Optional[Callable[[int, int, float], None]] = None) -> dict[str, Any]:
    """The float64 totals over `batches` (one device-to-host transfer at the end)."""
    start, outs = time.time(), []
    with jax.set_mesh(self.mesh):
      for i, local in enumerate(batches):
        outs.append(self.step_fn(state, global_batch(local, self.mesh)))
        if progress is not None:
          jax.block_until_ready(outs[-1])
          progress(i + 1, len(batches), time.time() - start)
    host = jax.device_get(outs)
    totals = host[0]
    for out in host[1:]:
      totals = _add(totals, out)
    totals = jax.tree.map(lambda x: np.asarray(x, np.float64), totals)
    totals["batch_ce_sum"] = np.asarray([out["ce_sum"] for out in host], np.float64)
    totals["batch_tokens"] = np.asarray([out["tokens"] for out in host], np.float64)
    return totals

  def __call__(self, state: Any, batches: Sequence[dict[str, np.ndarray]], *, moe_layer_indices: Sequence[int] = (),
               capacity: Optional[int] = None, progress: Optional[Callable[[int, int, float], None]] = None
               ) -> dict[str, Any]:
    """Loss, perplexity, accuracy, valid tokens, and per MoE layer its routing statistics (see `summarize`)."""
    return summarize(self.sums(state, batches, progress=progress), moe_layer_indices, capacity)


def summarize(totals: dict[str, Any], moe_layer_indices: Sequence[int] = (),
              capacity: Optional[int] = None) -> dict[str, Any]:
  """The evaluation result from totals: "loss", "perplexity", "accuracy", "tokens", "loss_se" (the standard error
  of the loss over the batches), and for MoE models "layers"
  (one dict per MoE layer: its index, C, rates, counts, imbalance, per-expert load and demand, mean losses) and
  "mean" (`LAYER_MEAN_KEYS` averaged over the layers)."""
  result: dict[str, Any] = {**lm_loss.lm_metrics(totals), "tokens": int(totals["tokens"]), "layers": [],
                            "mean": {}}
  if "batch_ce_sum" in totals:
    result["loss_se"] = lm_loss.loss_standard_error(totals["batch_ce_sum"], totals["batch_tokens"])
  if "counts" not in totals:
    return result
  counts, loss_sums = totals["counts"], totals["loss_sums"]
  layers = []
  for i, layer in enumerate(moe_layer_indices):
    c = {k: v[i] for k, v in counts.items()}
    reference = {k: float(c.pop(k)) for k in DROPLESS_COUNTS if k in c}
    tokens = max(float(c["tokens"]), 1.0)
    load, demand = c["expert_load"], c["expert_demand"]
    layers.append({
        "layer": int(layer),
        "capacity": capacity,
        **{k: float(v) for k, v in metrics.rates(c).items()},
        **{k: int(round(float(v))) for k, v in c.items() if np.ndim(v) == 0},
        **metrics.imbalance(load, "load"),
        **metrics.imbalance(demand, "demand"),
        "expert_load": [int(round(v)) for v in load],
        "expert_demand": [int(round(v)) for v in demand],
        "a2a_filled_rows_per_token": float(c["filled_slots"]) / tokens,
        **{k: float(v[i]) / tokens for k, v in loss_sums.items()},
    })
    if reference:  # eval.py --dropless_reference: relative L2 distance of the output to the dropless one
      layers[-1]["dropless_rel_l2"] = float(np.sqrt(reference["dropless_sq_dist"]
                                                    / max(reference["dropless_sq_norm"], 1e-30)))
  result["layers"] = layers
  mean_keys = LAYER_MEAN_KEYS + (("dropless_rel_l2",) if layers and "dropless_rel_l2" in layers[0] else ())
  result["mean"] = {k: float(np.mean([layer[k] for layer in layers])) for k in mean_keys} if layers else {}
  return result
