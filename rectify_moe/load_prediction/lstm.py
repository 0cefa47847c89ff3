"""The LSTM predictor and its Flax NNX module (jax, flax and optax are imported only when it trains)."""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Optional, Sequence

import numpy as np

from rectify_moe import log
from rectify_moe.load_prediction.predictors import Predictor, check_history, normalize_rows


class LSTMPredictor(Predictor):
  """A small Flax NNX LSTM that predicts next-step proportions, rolled forward for longer horizons.

  Model: one univariate LSTM (hidden size `hidden`) shared by every expert series of every MoE layer. Its
  input is the last `window` proportions of one expert, expressed as deviations from the latest one and
  divided by a fixed scale (the std of one-step changes in the training traces); its output is the next
  step's change. Per step the predicted changes of a layer are shifted to sum to zero (proportions keep
  summing to 1), then clipped so no proportion goes negative. The candidate gate has no bias and the output
  layer has none, so a constant history gives exactly zero change: constant loads are predicted exactly.

  Deviation from the paper: the paper feeds all experts of all layers as one input vector. Expert indices
  mean nothing across two independent runs (expert 3 of run A is unrelated to expert 3 of run B), so here
  one model is shared across experts and layers, which also lets it train on one run and test on another
  with a different number of experts or layers.

  Use: `train([props_run_a])` once (the training run's proportions, [T, E] or [T, layers, E] arrays), then
  `fit(history)` / `predict(horizon)` on the test run. `fit` on an untrained model trains on that history.
  """

  def __init__(self, *, window: int = 32, hidden: int = 32, train_steps: int = 300, batch_size: int = 256,
               learning_rate: float = 3e-3, seed: int = 0):
    self.window, self.hidden = int(window), int(hidden)
    self.train_steps, self.batch_size = int(train_steps), int(batch_size)
    self.learning_rate, self.seed = float(learning_rate), int(seed)
    self.name = "lstm"
    self.scale = 1.0
    self._model = None
    self._rollout = None
    self._anchor: Optional[np.ndarray] = None
    self._ctx: Optional[np.ndarray] = None
    self.train_info: dict[str, Any] = {}

  @property
  def trained(self) -> bool:
    return self._model is not None

  def _windows(self, series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (context deviations [n, W], next change [n]) pairs of one univariate series (edge-padded)."""
    W = self.window
    padded = np.concatenate([np.full(W - 1, series[0]), series])
    ctx = np.lib.stride_tricks.sliding_window_view(padded, W)[1:len(series) - 1]  # contexts ending at 1..T-2
    last = series[1:-1]
    return ctx - last[:, None], series[2:] - last

  def train(self, traces: Sequence[np.ndarray], *, source: str = "", verbose: bool = False) -> "LSTMPredictor":
    """Trains on every expert series of the given proportion arrays ([T, E] or [T, layers, E]).

    With `verbose`, one summary line goes to `log.info` (silent inside `log.quiet()`).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    series = []
    for arr in traces:
      arr = np.asarray(arr, dtype=np.float64)
      arr = arr.reshape(arr.shape[0], -1)
      series.extend(arr[:, j] for j in range(arr.shape[1]) if arr.shape[0] >= 3)
    if not series:
      raise ValueError("LSTM training needs at least one series of 3 or more steps.")
    pairs = [self._windows(s) for s in series]
    x = np.concatenate([p[0] for p in pairs])
    y = np.concatenate([p[1] for p in pairs])
    scale = float(np.std(y))
    self.scale = scale if scale > 1e-12 else 1.0
    x = (x / self.scale).astype(np.float32)
    y = (y / self.scale).astype(np.float32)

    start = time.time()
    model = _LoadLSTM(self.hidden, rngs=nnx.Rngs(self.seed))
    optimizer = nnx.Optimizer(model, optax.adam(self.learning_rate), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, xb, yb):
      def loss_fn(m):
        return jnp.mean((m(xb) - yb) ** 2)
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      return loss

    rng = np.random.default_rng(self.seed)
    batch = min(self.batch_size, len(x))
    losses = []
    for _ in range(self.train_steps):
      idx = rng.integers(0, len(x), size=batch)
      losses.append(float(train_step(model, optimizer, jnp.asarray(x[idx]), jnp.asarray(y[idx]))))
    # Reference: predicting "no change" (the last value) has loss mean(y^2).
    self.train_info = {"source": source, "series": len(series), "windows": int(len(x)),
                       "steps": self.train_steps, "scale": self.scale, "seconds": round(time.time() - start, 2),
                       "final_loss": float(np.mean(losses[-20:])), "no_change_loss": float(np.mean(y ** 2))}
    with log.quiet(not verbose):
      log.info(f"[lstm] trained on {len(x)} windows of {len(series)} series"
               f"{' from ' + source if source else ''} in {self.train_info['seconds']} s: loss "
               f"{self.train_info['final_loss']:.4f} (no-change baseline {self.train_info['no_change_loss']:.4f}, "
               f"scaled units).")

    graphdef, state = nnx.split(model)
    self._model = (graphdef, state)

    @functools.partial(jax.jit, static_argnums=(4,))
    def rollout(state, ctx, anchor, scale, horizon):
      m = nnx.merge(graphdef, state)

      def step(ctx, _):  # ctx [W, E]: proportions minus the anchor (the last observed row)
        change = m(((ctx - ctx[-1]) / scale).T) * scale  # [E]
        change = change - change.mean()
        new = jnp.maximum(ctx[-1] + change, -anchor)
        return jnp.concatenate([ctx[1:], new[None]]), new

      _, ys = jax.lax.scan(step, ctx, None, length=horizon)
      return ys

    self._rollout = rollout
    return self

  def fit(self, history):
    history = check_history(history)
    if not self.trained:
      self.train([history], source="the first history passed to fit()")
    W = self.window
    tail = history[-W:]
    if len(tail) < W:
      tail = np.concatenate([np.repeat(tail[:1], W - len(tail), axis=0), tail])
    self._anchor = tail[-1].copy()
    self._ctx = tail - self._anchor  # exact zeros for a constant history
    return self

  def predict(self, horizon):
    if self._ctx is None:
      raise RuntimeError("call fit(history) before predict().")
    import jax.numpy as jnp
    ys = self._rollout(self._model[1], jnp.asarray(self._ctx, jnp.float32), jnp.asarray(self._anchor, jnp.float32),
                       jnp.float32(self.scale), int(horizon))
    return normalize_rows(self._anchor[None, :] + np.asarray(ys, dtype=np.float64))

  def describe(self):
    return {"type": "lstm", "window": self.window, "hidden": self.hidden, "train_steps": self.train_steps,
            "batch_size": self.batch_size, "learning_rate": self.learning_rate, "seed": self.seed}

  def notes(self):
    return dict(self.train_info)


def _make_lstm_module():
  from flax import nnx
  import jax
  import jax.numpy as jnp

  class LoadLSTM(nnx.Module):
    """Univariate LSTM: [batch, window] deviations -> [batch] next change. No bias on the candidate gate or
    the output, so an all-zero input gives exactly zero output."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
      self.hidden = hidden
      self.w_x = nnx.Param(jax.random.normal(rngs.params(), (1, 4 * hidden)) * 0.5)
      self.w_h = nnx.Param(nnx.initializers.orthogonal()(rngs.params(), (hidden, 4 * hidden)))
      self.b_ifo = nnx.Param(jnp.zeros((3 * hidden,)).at[hidden:2 * hidden].set(1.0))  # forget-gate bias 1
      self.w_out = nnx.Param(jax.random.normal(rngs.params(), (hidden, 1)) * (0.1 / math.sqrt(hidden)))

    def __call__(self, x):
      H = self.hidden
      w_x, w_h, w_out = self.w_x[...], self.w_h[...], self.w_out[...]
      bias = jnp.concatenate([self.b_ifo[...], jnp.zeros((H,), w_h.dtype)])  # gates i, f, o | candidate g

      def step(carry, xt):
        h, c = carry
        z = xt[:, None] * w_x + h @ w_h + bias
        i, f, o = (jax.nn.sigmoid(z[:, k * H:(k + 1) * H]) for k in range(3))
        g = jnp.tanh(z[:, 3 * H:])
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), None

      zeros = jnp.zeros((x.shape[0], H), x.dtype)
      (h, _), _ = jax.lax.scan(step, (zeros, zeros), x.T)
      return (h @ w_out)[:, 0]

  return LoadLSTM


def _LoadLSTM(hidden: int, *, rngs):
  global _LOAD_LSTM_CLASS
  if _LOAD_LSTM_CLASS is None:
    _LOAD_LSTM_CLASS = _make_lstm_module()
  return _LOAD_LSTM_CLASS(hidden, rngs=rngs)


_LOAD_LSTM_CLASS = None
