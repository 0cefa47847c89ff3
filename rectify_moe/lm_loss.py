"""The language-model objective over a batch: token-masked cross-entropy sums, and the metrics derived from them.

Both the trainer (its loss) and the evaluator (its sums) read the batch through `lm_sums`, so a held-out loss and
a training loss mean the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def lm_sums(model, batch: Mapping[str, Array], *, train: bool, step: Optional[Array] = None,
            rng: Optional[Array] = None) -> dict[str, Any]:
  """Sums over one batch: "ce_sum" (cross-entropy of the valid targets), "correct" (argmax hits), "tokens" (valid
  targets) and "layers" (one {"losses", "counts"} dict per MoE layer, see `moe.MoEBlock`)."""
  mask = batch["token_mask"]
  logits, layer_metrics = model(batch["inputs"], mask, train=train, step=step, rng=rng)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
  maskf = mask.astype(jnp.float32)
  return {"ce_sum": -jnp.sum(target_logp * maskf),
          "correct": jnp.sum((jnp.argmax(logits, axis=-1) == batch["targets"]) * maskf),
          "tokens": jnp.sum(maskf), "layers": layer_metrics}


def lm_metrics(totals: Mapping[str, float]) -> dict[str, float]:
  """Loss, perplexity and token accuracy from summed "ce_sum", "correct" and "tokens"."""
  tokens = max(float(totals["tokens"]), 1.0)
  loss = float(totals["ce_sum"]) / tokens
  return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0))), "accuracy": float(totals["correct"]) / tokens}


def loss_standard_error(batch_ce_sums: Any, batch_tokens: Any) -> float:
  """Standard error of the held-out loss sum(ce) / sum(tokens) over n batches (the ratio estimator:
  sqrt(n / (n - 1) * sum_i (ce_i - loss * tokens_i)^2) / sum(tokens)); 0 for a single batch."""
  ce, tokens = np.asarray(batch_ce_sums, np.float64), np.asarray(batch_tokens, np.float64)
  n, total = len(ce), tokens.sum()
  if n < 2 or total <= 0:
    return 0.0
  loss = ce.sum() / total
  return float(math.sqrt(n / (n - 1) * np.sum((ce - loss * tokens) ** 2)) / total)
