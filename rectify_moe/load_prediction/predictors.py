"""The predictor interface, the sliding-window average and ARIMA.

Every predictor: `fit(history[t, E])` (the proportions of one MoE layer, one row per step), then
`predict(horizon) -> [horizon, E]` (rows are proportions: non-negative, summing to 1), rolled forward for
horizons of more than one step. The LSTM predictor is in `lstm.py`.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import numpy as np
from threadpoolctl import threadpool_limits


def check_history(history: np.ndarray) -> np.ndarray:
  """The history as float64 [t >= 1, experts] (raises on any other shape)."""
  history = np.asarray(history, dtype=np.float64)
  if history.ndim != 2 or history.shape[0] < 1 or history.shape[1] < 1:
    raise ValueError(f"history must be [t >= 1, experts]; got shape {history.shape}.")
  return history


def normalize_rows(pred: np.ndarray) -> np.ndarray:
  """Clips at 0 and rescales rows to sum to 1 (rows that are all zero are left as they are)."""
  pred = np.maximum(pred, 0.0)
  total = pred.sum(axis=-1, keepdims=True)
  return np.where(total > 0, pred / np.where(total > 0, total, 1.0), pred)


class Predictor:
  """Interface: `fit(history[t, E])` then `predict(horizon) -> [horizon, E]` (rolled forward)."""
  name = "predictor"
  slow = False  # the harness prints progress per evaluation point for slow predictors

  def fit(self, history: np.ndarray) -> "Predictor":
    raise NotImplementedError

  def predict(self, horizon: int) -> np.ndarray:
    raise NotImplementedError

  def reset(self) -> None:
    """Forgets state carried between fits (called before each new series, e.g. each MoE layer)."""

  def describe(self) -> dict[str, Any]:
    return {}

  def notes(self) -> dict[str, Any]:
    return {}


class SlidingWindowAverage(Predictor):
  """SW_Avg: the next step is the mean of the last W proportions; for k steps, roll forward k times,
  appending each prediction to the window. With less than W rows of history, the mean of all of them."""

  def __init__(self, window: int = 100):
    if window < 1:
      raise ValueError(f"window must be >= 1, got {window}.")
    self.window = int(window)
    self.name = f"sw_avg(W={self.window})"
    self._tail: Optional[np.ndarray] = None

  def fit(self, history):
    self._tail = check_history(history)[-self.window:].copy()
    return self

  def predict(self, horizon):
    if self._tail is None:
      raise RuntimeError("call fit(history) before predict().")
    w, E = self._tail.shape
    buf = np.concatenate([self._tail, np.empty((horizon, E))])
    total = self._tail.sum(axis=0)
    for k in range(horizon):
      buf[w + k] = total / w
      total = total + buf[w + k] - buf[k]  # slide: add the prediction, drop the oldest row
    return buf[w:]

  def describe(self):
    return {"type": "sliding_window_average", "window": self.window}


class ARIMAPredictor(Predictor):
  """ARIMA(p, d, q) per expert series (statsmodels), default (5, 1, 5) as in the paper's 125M setup.

  Fitted on at most the last `max_history` steps (the paper fits on [t - H, t)). Fallbacks, counted in
  `notes()` and reported by the CLI:
    - constant series (max - min < 1e-12): the exact constant is predicted, no fit;
    - fewer than `min_obs` points (default 2 (p + d + q) + 10, e.g. 32 for (5,1,5)): the last value is
      predicted (the forecast of ARIMA(0,1,0)), since statsmodels cannot estimate starting values reliably;
    - the fit raises, or its forecast is not finite: the last value is predicted.
  Convergence warnings are silenced and counted. With `normalize` (default) each predicted row is clipped at
  0 and rescaled to sum to 1 (the per-expert fits do not know the proportions sum to 1). With `warm_start`,
  a column's fit starts from its previous fit's parameters (consecutive evaluation points of one layer are
  similar); `reset()` forgets them.
  """
  slow = True

  def __init__(self, order: Sequence[int] = (5, 1, 5), *, max_history: int = 1000, min_obs: Optional[int] = None,
               normalize: bool = True, warm_start: bool = True, maxiter: Optional[int] = None):
    self.order = tuple(int(o) for o in order)
    if len(self.order) != 3 or min(self.order) < 0:
      raise ValueError(f"order must be three non-negative ints (p, d, q), got {order}.")
    self.max_history = int(max_history)
    self.min_obs = int(min_obs) if min_obs is not None else 2 * sum(self.order) + 10
    self.normalize = normalize
    self.warm_start = warm_start
    self.maxiter = maxiter
    self.name = "arima({},{},{})".format(*self.order)
    self._counts = {"series": 0, "fitted": 0, "constant": 0, "too_short": 0, "fit_failed": 0,
                    "nonfinite_forecast": 0, "convergence_warnings": 0}
    self._errors: list[str] = []
    self._params: dict[int, np.ndarray] = {}
    self._models: list[tuple[str, Any]] = []

  def fit(self, history):
    from statsmodels.tsa.arima.model import ARIMA  # local import: heavy
    history = check_history(history)[-self.max_history:]
    # An ARIMA fit is thousands of tiny matrix operations: extra BLAS threads only contend for the cores, which
    # made statsmodels' ARIMA(5,1,5) fits 10-30x slower on a busy 2-core machine. One BLAS thread while fitting
    # and forecasting (the previous limits come back afterwards).
    with threadpool_limits(limits=1, user_api="blas"):
      self._fit(ARIMA, history)
    return self

  def _fit(self, ARIMA, history):
    self._models = []
    for e in range(history.shape[1]):
      y = history[:, e]
      self._counts["series"] += 1
      if np.ptp(y) < 1e-12:
        self._counts["constant"] += 1
        self._models.append(("constant", float(y[-1])))
        continue
      if len(y) < self.min_obs:
        self._counts["too_short"] += 1
        self._models.append(("last", float(y[-1])))
        continue
      kwargs: dict[str, Any] = {}
      if self.maxiter is not None:
        kwargs["method_kwargs"] = {"maxiter": self.maxiter}
      if self.warm_start and e in self._params:
        kwargs["start_params"] = self._params[e]
      try:
        with warnings.catch_warnings(record=True) as caught:
          warnings.simplefilter("always")
          result = ARIMA(y, order=self.order).fit(**kwargs)
        self._counts["convergence_warnings"] += sum(
            "converge" in str(w.message).lower() for w in caught)
        self._params[e] = np.asarray(result.params)
        self._counts["fitted"] += 1
        self._models.append(("arima", (result, float(y[-1]))))
      except Exception as err:  # noqa: BLE001 -- any statsmodels failure falls back, and is reported
        self._counts["fit_failed"] += 1
        if len(self._errors) < 5:
          self._errors.append(f"{type(err).__name__}: {err}"[:200])
        self._params.pop(e, None)
        self._models.append(("last", float(y[-1])))

  def reset(self):
    self._params = {}

  def predict(self, horizon):
    if not self._models:
      raise RuntimeError("call fit(history) before predict().")
    cols = []
    with threadpool_limits(limits=1, user_api="blas"):
      for kind, model in self._models:
        if kind == "arima":
          result, last = model
          with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
              f = np.asarray(result.forecast(horizon), dtype=np.float64)
            except Exception:  # noqa: BLE001
              f = np.full(horizon, np.nan)
          if not np.all(np.isfinite(f)):
            self._counts["nonfinite_forecast"] += 1
            f = np.full(horizon, last)
          cols.append(f)
        else:
          cols.append(np.full(horizon, model))
    pred = np.stack(cols, axis=1)
    if self.normalize and not all(kind == "constant" for kind, _ in self._models):
      pred = normalize_rows(pred)
    return pred

  def describe(self):
    return {"type": "arima", "order": list(self.order), "max_history": self.max_history,
            "min_obs": self.min_obs, "normalize": self.normalize, "warm_start": self.warm_start}

  def notes(self):
    out = dict(self._counts)
    if self._errors:
      out["fit_errors"] = list(self._errors)
    return out
