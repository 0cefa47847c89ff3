"""Expert-load analysis and prediction from training traces (Cong et al. 2024, "Prediction Is All MoE Needs").

Reads the per-step expert loads that training writes (`WORKDIR/loads/loads.jsonl`, `train.write_loads=True`),
turns them into load proportions, measures how much they fluctuate (windowed variance and range), detects
where the transient state ends, and scores three predictors of future proportions:

- `SlidingWindowAverage` (the paper's SW_Avg): the mean of the last W proportions, rolled forward.
- `ARIMAPredictor`: statsmodels ARIMA per expert series, default order (5, 1, 5), with stated fallbacks.
- `LSTMPredictor`: a small Flax NNX LSTM trained on one run's traces and tested on another.

All predictors share one interface: `fit(history[t, E])` (the proportions of one MoE layer, one row per step)
then `predict(horizon) -> [horizon, E]` (rows are proportions: non-negative, summing to 1). Multi-step
horizons are produced by rolling forward (each prediction is appended to the history for the next one).

`evaluate_predictors` is the harness: at evaluation points t it fits on the history before t, predicts the
next H steps and reports the mean absolute error in percentage points of proportion (`mae_pp`) and the mean
relative error in percent (`rel_err_pct`), per layer and overall, plus the error curve over t.

CLI (writes JSON, a markdown table and PNG plots under RUN/load_prediction/):
  python -m rectify_moe.load_prediction --workdir RUN [--horizon H] [--train-workdir OTHER_RUN] [--out DIR]

It reads only the trace files, so it works for runs of any router. See docs/load_prediction.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

KINDS = ("demand", "accepted")
DEFAULT_WINDOWS = (10, 100, 200)
DEFAULT_HORIZONS = (1000, 2000)
# Transient/stable detector defaults (see `detect_stable_state`).
DEFAULT_STABLE_WINDOW = 10
DEFAULT_STABLE_THRESHOLD_FRACTION = 0.2  # threshold on the windowed std = 0.2 / E (20 % of the uniform share)

Log = Callable[[str], None]


def _print(message: str) -> None:
  print(message, flush=True)


def _quiet(message: str) -> None:
  del message


# ---------------------------------------------------------------------------------------------------------
# Reading traces.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoadTrace:
  """Per-step expert loads of one run.

  Attributes:
    steps: int64 [T], strictly increasing training steps (after de-duplication).
    loads: float64 [T, num_moe_layers, num_experts], token counts (`demand` or `accepted`).
    kind: which field was read.
    path: the loads.jsonl file.
    duplicates: lines replaced by a later line with the same step (a resumed run re-writes steps).
    skipped_lines: unreadable lines skipped (only a truncated last line is skipped; anything else raises).
  """
  steps: np.ndarray
  loads: np.ndarray
  kind: str = "demand"
  path: str = ""
  duplicates: int = 0
  skipped_lines: int = 0

  @property
  def num_steps(self) -> int:
    return int(self.loads.shape[0])

  @property
  def num_layers(self) -> int:
    return int(self.loads.shape[1])

  @property
  def num_experts(self) -> int:
    return int(self.loads.shape[2])

  def proportions(self) -> np.ndarray:
    return load_proportions(self.loads)


def trace_path(workdir: str) -> str:
  return os.path.join(workdir, "loads", "loads.jsonl")


def read_traces(workdir: str, kind: str = "demand") -> LoadTrace:
  """Reads `workdir/loads/loads.jsonl` into a `LoadTrace`.

  One JSON object per line: {"step": int, "demand": [[E floats] per MoE layer], "accepted": [...]}.
  When a step appears more than once (a resumed run re-writes the steps after its last checkpoint) the LAST
  line wins; the result is sorted by step. A truncated final line (a run killed mid-write) is skipped with a
  warning; any other unreadable line raises.

  Raises:
    FileNotFoundError: the run folder or the trace file is missing (the message names the path).
    ValueError: unknown kind, empty file, bad line, missing field, or inconsistent shapes.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"Run folder {workdir!r} does not exist.")
  path = trace_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No load trace at {path!r}. Training writes it (one line per step) when train.write_loads=True "
        f"(the default); rerun training with --config.train.write_loads=True.")
  with open(path) as f:
    lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
  if not lines:
    raise ValueError(f"Load trace {path!r} is empty: no step was traced yet (did training reach step 1 "
                     f"with train.write_loads=True?).")
  by_step: dict[int, np.ndarray] = {}
  shape = None
  duplicates = skipped = 0
  for n, (lineno, line) in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if n == len(lines) - 1 and len(lines) > 1:
        warnings.warn(f"{path}, line {lineno}: skipping a truncated last line ({e}).")
        skipped += 1
        continue
      raise ValueError(f"{path}, line {lineno}: not valid JSON ({e}).") from None
    if not isinstance(record, dict) or "step" not in record or kind not in record:
      raise ValueError(f"{path}, line {lineno}: expected an object with 'step' and {kind!r}; got keys "
                       f"{sorted(record) if isinstance(record, dict) else type(record).__name__}.")
    try:
      value = np.asarray(record[kind], dtype=np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"{path}, line {lineno}: {kind!r} is not a rectangular [layers][experts] list.") from None
    if value.ndim != 2 or value.shape[0] < 1 or value.shape[1] < 1:
      raise ValueError(f"{path}, line {lineno}: {kind!r} must be [num_moe_layers][num_experts]; got shape "
                       f"{value.shape}.")
    if shape is None:
      shape = value.shape
    elif value.shape != shape:
      raise ValueError(f"{path}, line {lineno}: {kind!r} has shape {value.shape} (layers, experts) but "
                       f"earlier lines have {shape}: traces of different models are mixed in one file.")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{path}, line {lineno}: {kind!r} contains non-finite values.")
    step = int(record["step"])
    if step in by_step:
      duplicates += 1
    by_step[step] = value  # the last line wins
  if not by_step:
    raise ValueError(f"Load trace {path!r} has no readable step.")
  steps = np.asarray(sorted(by_step), dtype=np.int64)
  loads = np.stack([by_step[int(s)] for s in steps])
  return LoadTrace(steps=steps, loads=loads, kind=kind, path=path, duplicates=duplicates, skipped_lines=skipped)


def read_run_config(workdir: str) -> dict[str, Any]:
  """The run's config.json as a dict ({} when missing or unreadable)."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}


# ---------------------------------------------------------------------------------------------------------
# Proportions and fluctuation statistics.
# ---------------------------------------------------------------------------------------------------------
def load_proportions(loads: np.ndarray) -> np.ndarray:
  """x_e = n_e / sum_e' n_e' along the last axis; a row with no load at all becomes uniform (1/E)."""
  loads = np.asarray(loads, dtype=np.float64)
  total = loads.sum(axis=-1, keepdims=True)
  uniform = np.full_like(loads, 1.0 / loads.shape[-1])
  return np.where(total > 0, loads / np.where(total > 0, total, 1.0), uniform)


def window_sizes(num_steps: int, candidates: Sequence[int] = DEFAULT_WINDOWS) -> list[int]:
  """The candidate windows that fit in the trace (windows longer than the trace are skipped)."""
  return [int(w) for w in candidates if 1 <= w <= num_steps]


def windowed_stats(x: np.ndarray, window: int, *, chunk_elements: int = 4_000_000) -> dict[str, np.ndarray]:
  """Sliding-window variance (1/w, population) and range (max - min) along axis 0.

  Args:
    x: [T, ...] series (e.g. proportions [T, layers, experts]).
    window: w <= T.
  Returns:
    {"end": int[T-w+1] index of each window's last row, "variance": [T-w+1, ...], "range": [T-w+1, ...]}.
  """
  x = np.asarray(x, dtype=np.float64)
  T = x.shape[0]
  if not 1 <= window <= T:
    raise ValueError(f"window {window} must be in [1, {T}] (the trace length).")
  views = np.lib.stride_tricks.sliding_window_view(x, window, axis=0)  # [T-w+1, ..., w], no copy
  n = views.shape[0]
  per_row = max(1, int(np.prod(views.shape[1:])))
  rows = max(1, chunk_elements // per_row)  # bounded temporaries for long traces with many experts
  var = np.empty(views.shape[:-1])
  rng = np.empty(views.shape[:-1])
  for a in range(0, n, rows):
    block = views[a:a + rows]
    var[a:a + rows] = block.var(axis=-1)
    rng[a:a + rows] = block.max(axis=-1) - block.min(axis=-1)
  return {"end": np.arange(window - 1, T), "variance": var, "range": rng}


@dataclasses.dataclass
class StableState:
  """Result of `detect_stable_state`.

  stable_step is the training step where the stable state begins for all layers (the latest of the per-layer
  starts), or None when some layer never settles (the whole trace is transient).
  """
  window: int
  std_threshold: float
  min_stable_windows: int
  stable_step: Optional[int]
  stable_index: Optional[int]
  per_layer_step: list[Optional[int]]
  per_layer_index: list[Optional[int]]
  window_end: np.ndarray  # int [n_windows] index of each window's last row
  max_std: np.ndarray  # [n_windows, layers]: max over experts of the windowed std of proportions
  rule: str

  def to_json(self) -> dict[str, Any]:
    return {"window": self.window, "std_threshold": self.std_threshold,
            "min_stable_windows": self.min_stable_windows, "stable_step": self.stable_step,
            "per_layer_step": self.per_layer_step, "rule": self.rule}


def detect_stable_state(props: np.ndarray, steps: Optional[np.ndarray] = None, *,
                        window: int = DEFAULT_STABLE_WINDOW, std_threshold: Optional[float] = None,
                        min_stable_windows: Optional[int] = None) -> StableState:
  """Finds where the transient state ends (the paper identifies it only visually; this is a stated rule).

  Rule, per MoE layer: s(t) = max over experts of the std of the proportions in the window of `window` steps
  ending at t. The layer is stable from the FIRST step of the first window after which s stays below
  `std_threshold` for the rest of the run, provided that stable tail holds at least `min_stable_windows`
  windows; otherwise the layer never settles (None). The run is stable from the latest per-layer start.

  Defaults: window = 10 steps; std_threshold = 0.2 / E (20 % of the uniform share 1/E, e.g. 2.5 percentage
  points for E = 8, 1.25 pp for E = 16); min_stable_windows = window. For a trace with a sharp transition at
  step s0 the detected start lies within about `window` steps of s0 (windows straddling s0 mix both regimes).

  Args:
    props: [T, layers, experts] proportions.
    steps: [T] training steps (default 0..T-1).
  """
  props = np.asarray(props, dtype=np.float64)
  T, L, E = props.shape
  steps = np.arange(T) if steps is None else np.asarray(steps)
  if std_threshold is None:
    std_threshold = DEFAULT_STABLE_THRESHOLD_FRACTION / E
  if min_stable_windows is None:
    min_stable_windows = window
  rule = (f"stable from the first step of the first {window}-step window after which the max over experts "
          f"of the windowed std of proportions stays below {std_threshold:.4g} ({100 * std_threshold:.3g} pp) "
          f"to the end of the run, for at least {min_stable_windows} windows")
  if T < window:
    return StableState(window, std_threshold, min_stable_windows, None, None, [None] * L, [None] * L,
                       np.zeros(0, int), np.zeros((0, L)), rule + f" (trace of {T} steps is shorter than the "
                       f"window: not evaluated)")
  stats = windowed_stats(props, window)
  max_std = np.sqrt(stats["variance"]).max(axis=-1)  # [n, L]
  n = max_std.shape[0]
  per_index: list[Optional[int]] = []
  for l in range(L):
    above = np.nonzero(max_std[:, l] >= std_threshold)[0]
    first_ok = 0 if above.size == 0 else int(above[-1]) + 1  # first window of the all-below tail
    if n - first_ok >= min_stable_windows and first_ok < n:
      per_index.append(first_ok)  # window k covers rows k .. k + window - 1: its first row is k
    else:
      per_index.append(None)
  per_step = [None if i is None else int(steps[i]) for i in per_index]
  overall = None if any(i is None for i in per_index) else max(per_index)
  return StableState(window, float(std_threshold), int(min_stable_windows),
                     None if overall is None else int(steps[overall]), overall, per_step, per_index,
                     stats["end"], max_std, rule)


def variability_summary(props: np.ndarray, windows: Sequence[int]) -> dict[str, Any]:
  """Per window size and layer: the mean over experts and windows of the windowed variance and range,
  and the same at the first and the last window (what the variance/range plots show, in numbers)."""
  out: dict[str, Any] = {}
  for w in windows:
    st = windowed_stats(props, w)
    var, rng = st["variance"].mean(axis=-1), st["range"].mean(axis=-1)  # [n, L] mean over experts
    out[str(w)] = {"variance_mean": var.mean(0).tolist(), "variance_first": var[0].tolist(),
                   "variance_last": var[-1].tolist(), "range_mean": rng.mean(0).tolist(),
                   "range_first": rng[0].tolist(), "range_last": rng[-1].tolist()}
  return out


@contextlib.contextmanager
def single_threaded_blas():
  """Limits every loaded OpenBLAS library to one thread inside the block (restored afterwards).

  An ARIMA fit is thousands of tiny matrix operations; extra BLAS threads only contend for the cores, which
  made statsmodels' ARIMA(5,1,5) fits 10-30x slower on a busy 2-core machine. Does nothing where the
  libraries or their thread-count functions cannot be found.
  """
  restore = []
  try:
    with open("/proc/self/maps") as f:
      paths = {line.split()[-1] for line in f
               if "openblas" in os.path.basename(line.split()[-1]).lower() and line.split()[-1].startswith("/")}
  except OSError:
    paths = set()
  for path in sorted(paths):
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for prefix in ("scipy_openblas", "openblas"):
      for suffix in ("64_", "", "_"):
        getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
        setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
        if getter is not None and setter is not None:
          setter.argtypes = [ctypes.c_int]
          restore.append((setter, int(getter())))
          setter(1)
          break
      else:
        continue
      break
  try:
    yield
  finally:
    for setter, n in restore:
      setter(n)


# ---------------------------------------------------------------------------------------------------------
# Predictors: fit(history [t, E]) -> predict(horizon) -> [horizon, E].
# ---------------------------------------------------------------------------------------------------------
def _check_history(history: np.ndarray) -> np.ndarray:
  history = np.asarray(history, dtype=np.float64)
  if history.ndim != 2 or history.shape[0] < 1 or history.shape[1] < 1:
    raise ValueError(f"history must be [t >= 1, experts]; got shape {history.shape}.")
  return history


def _normalize_rows(pred: np.ndarray) -> np.ndarray:
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
    self._tail = _check_history(history)[-self.window:].copy()
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
    history = _check_history(history)[-self.max_history:]
    with single_threaded_blas():
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
    for kind, model in self._models:
      if kind == "arima":
        result, last = model
        with warnings.catch_warnings(), single_threaded_blas():
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
      pred = _normalize_rows(pred)
    return pred

  def describe(self):
    return {"type": "arima", "order": list(self.order), "max_history": self.max_history,
            "min_obs": self.min_obs, "normalize": self.normalize, "warm_start": self.warm_start}

  def notes(self):
    out = dict(self._counts)
    if self._errors:
      out["fit_errors"] = list(self._errors)
    return out


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

  def train(self, traces: Sequence[np.ndarray], *, source: str = "", log: Log = _quiet) -> "LSTMPredictor":
    """Trains on every expert series of the given proportion arrays ([T, E] or [T, layers, E])."""
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
    log(f"[lstm] trained on {len(x)} windows of {len(series)} series{' from ' + source if source else ''} in "
        f"{self.train_info['seconds']} s: loss {self.train_info['final_loss']:.4f} (no-change baseline "
        f"{self.train_info['no_change_loss']:.4f}, scaled units).")

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
    history = _check_history(history)
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
    return _normalize_rows(self._anchor[None, :] + np.asarray(ys, dtype=np.float64))

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


# ---------------------------------------------------------------------------------------------------------
# Evaluation harness.
# ---------------------------------------------------------------------------------------------------------
def scale_horizons(num_steps: int, horizons: Sequence[int] = DEFAULT_HORIZONS) -> tuple[list[int], str]:
  """Scales horizons down for short traces so the longest is at most a quarter of the trace.

  All horizons are multiplied by s = min(1, floor(T / 4) / max(horizons)) and rounded (at least 1, duplicates
  removed); e.g. (1000, 2000) -> (8, 15) for a 60-step trace, unchanged for T >= 8000. Returns the horizons
  and a note saying what was done.
  """
  horizons = [int(h) for h in horizons]
  if not horizons or min(horizons) < 1:
    raise ValueError(f"horizons must be positive ints, got {horizons}.")
  limit = num_steps // 4
  if limit < 1:
    raise ValueError(f"The trace has {num_steps} steps: too short to evaluate predictions (need >= 8).")
  s = min(1.0, limit / max(horizons))
  if s >= 1.0:
    return sorted(set(horizons)), "horizons as requested"
  scaled = sorted({max(1, int(round(h * s))) for h in horizons})
  return scaled, (f"horizons {sorted(set(horizons))} scaled by {s:.4g} to {scaled} so the longest is at most a "
                  f"quarter of the {num_steps}-step trace")


def default_eval_points(num_steps: int, horizons: Sequence[int], *, min_history: Optional[int] = None,
                        max_points: int = 10) -> list[int]:
  """Evaluation points t (row indices: history = rows [0, t), targets = rows [t, t + H)).

  Evenly spaced from `min_history` (default max(2, min(max(H), T // 4))) to T - min(H), at most `max_points`.
  Each horizon H is scored on the points with t + H <= T.
  """
  if min_history is None:
    min_history = max(2, min(max(horizons), num_steps // 4))
  last = num_steps - min(horizons)
  if last < min_history:
    raise ValueError(f"A {num_steps}-step trace leaves no evaluation point with {min_history} steps of history "
                     f"and a {min(horizons)}-step horizon.")
  return sorted({int(v) for v in np.round(np.linspace(min_history, last, max(1, max_points)))})


def _errors(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
  """(mean |pred - truth| in percentage points, mean |pred - truth| / truth in percent over truth > 0)."""
  err = np.abs(pred - truth)
  mae_pp = 100.0 * float(err.mean())
  mask = truth > 1e-12
  rel = 100.0 * float((err[mask] / truth[mask]).mean()) if mask.any() else float("nan")
  return mae_pp, rel


def evaluate_predictors(props: np.ndarray, predictors: Mapping[str, Predictor], horizons: Sequence[int], *,
                        steps: Optional[np.ndarray] = None, eval_points: Optional[Sequence[int]] = None,
                        min_history: Optional[int] = None, max_points: int = 10,
                        log: Log = _quiet) -> dict[str, Any]:
  """Scores each predictor: at each evaluation point t, per layer, fit(props[:t, layer]) and predict the
  next max(horizons) steps; each horizon H is scored on its first H predictions where t + H <= T.

  An untrained `LSTMPredictor` is first trained on the history before the first evaluation point (all
  layers); train it beforehand on another run to test across runs.

  Args:
    props: [T, layers, experts] proportions.
    predictors: name -> Predictor (reused across points and layers).
    horizons: horizons in steps (not scaled here; see `scale_horizons`).
    steps: [T] training steps for the curves (default 0..T-1).
  Returns:
    {"eval_index", "eval_steps", "horizons", "predictors": {name: {"config", "notes", "seconds",
     "horizons": {str(H): {"points", "mae_pp": {"overall", "per_layer"}, "rel_err_pct": {...},
     "curve": {"step", "mae_pp" [points][layers], "rel_err_pct" [points][layers]}}}}}}.
  """
  props = np.asarray(props, dtype=np.float64)
  if props.ndim != 3:
    raise ValueError(f"props must be [T, layers, experts]; got shape {props.shape}.")
  T, L, _ = props.shape
  steps = np.arange(T) if steps is None else np.asarray(steps)
  horizons = sorted({int(h) for h in horizons})
  points = list(eval_points) if eval_points is not None else default_eval_points(
      T, horizons, min_history=min_history, max_points=max_points)
  if not points or min(points) < 1 or max(points) + min(horizons) > T:
    raise ValueError(f"evaluation points must lie in [1, T - min(horizons)] = [1, {T - min(horizons)}].")
  hmax = max(horizons)
  out: dict[str, Any] = {"eval_index": points, "eval_steps": [int(steps[t]) for t in points],
                         "horizons": horizons, "predictors": {}}
  for name, predictor in predictors.items():
    start = time.time()
    if isinstance(predictor, LSTMPredictor) and not predictor.trained:
      predictor.train([props[:points[0]]], source=f"this run's first {points[0]} steps (before the first "
                      f"evaluation point)", log=log)
    mae = {h: np.full((len(points), L), np.nan) for h in horizons}
    rel = {h: np.full((len(points), L), np.nan) for h in horizons}
    for l in range(L):
      predictor.reset()  # e.g. ARIMA warm starts chain over the points of one layer only
      for i, t in enumerate(points):
        pred = predictor.fit(props[:t, l]).predict(hmax)
        for h in horizons:
          if t + h <= T:
            mae[h][i, l], rel[h][i, l] = _errors(pred[:h], props[t:t + h, l])
        if predictor.slow:
          log(f"[{name}] layer {l + 1}/{L}, point {i + 1}/{len(points)} (step {int(steps[t])}, {t} steps of "
              f"history) fitted, {time.time() - start:.1f} s so far")
    entry: dict[str, Any] = {"config": predictor.describe(), "notes": predictor.notes(),
                             "seconds": round(time.time() - start, 2), "horizons": {}}
    for h in horizons:
      ok = ~np.isnan(mae[h][:, 0])
      m, r = mae[h][ok], rel[h][ok]
      entry["horizons"][str(h)] = {
          "points": int(ok.sum()),
          "mae_pp": {"overall": float(m.mean()) if m.size else None,
                     "per_layer": m.mean(0).tolist() if m.size else [None] * L},
          "rel_err_pct": {"overall": float(np.nanmean(r)) if m.size else None,
                          "per_layer": np.nanmean(r, axis=0).tolist() if m.size else [None] * L},
          "curve": {"step": [int(steps[t]) for t, k in zip(points, ok) if k], "mae_pp": m.tolist(),
                    "rel_err_pct": r.tolist()}}
    out["predictors"][name] = entry
    log(f"[{name}] done in {entry['seconds']} s")
  return out


# ---------------------------------------------------------------------------------------------------------
# Reports: JSON, markdown, plots.
# ---------------------------------------------------------------------------------------------------------
def _json_clean(x):
  if isinstance(x, dict):
    return {str(k): _json_clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_clean(v) for v in x]
  if isinstance(x, np.ndarray):
    return _json_clean(x.tolist())
  if isinstance(x, (np.floating, float)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def _fmt(v: Optional[float], digits: int = 3) -> str:
  return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def markdown_report(results: dict[str, Any]) -> str:
  """The results as markdown: the error table, then the stability and variability summaries."""
  info, ev = results["trace"], results["evaluation"]
  L = info["num_layers"]
  lines = [f"# Load prediction: {results['workdir']}", "",
           f"Trace: `{info['kind']}` loads, {info['num_steps']} steps ({info['first_step']}..{info['last_step']}), "
           f"{L} MoE layer(s) x {info['num_experts']} experts"
           + (f", top_k={results['run_config'].get('top_k')}" if results["run_config"].get("top_k") else "")
           + f". {ev['horizon_note'].capitalize()}; {len(ev['eval_steps'])} evaluation points "
           f"(steps {ev['eval_steps'][0]}..{ev['eval_steps'][-1]}).", "",
           "Errors of predicted load proportions over the next H steps, mean over evaluation points: "
           "MAE in percentage points (pp) and mean relative error |pred - true| / true in %.", ""]
  header = "| predictor | H | points | MAE pp | rel. err % | " + " | ".join(f"MAE pp L{l}" for l in range(L)) + " |"
  lines += [header, "|" + "---|" * (5 + L)]
  for name, entry in ev["predictors"].items():
    for h, r in entry["horizons"].items():
      lines.append(f"| {name} | {h} | {r['points']} | {_fmt(r['mae_pp']['overall'])} | "
                   f"{_fmt(r['rel_err_pct']['overall'], 2)} | "
                   + " | ".join(_fmt(v) for v in r["mae_pp"]["per_layer"]) + " |")
  notes = []
  for name, entry in ev["predictors"].items():
    n = entry["notes"]
    if entry["config"].get("type") == "arima":
      notes.append(f"- {name}: {n.get('fitted', 0)} of {n.get('series', 0)} series fitted; fallbacks: "
                   f"{n.get('constant', 0)} constant (exact), {n.get('too_short', 0)} shorter than "
                   f"{entry['config']['min_obs']} steps and {n.get('fit_failed', 0)} failed fits (last value), "
                   f"{n.get('nonfinite_forecast', 0)} non-finite forecasts; "
                   f"{n.get('convergence_warnings', 0)} convergence warnings.")
    elif entry["config"].get("type") == "lstm":
      notes.append(f"- {name}: trained on {n.get('windows')} windows from {n.get('source')} "
                   f"({n.get('seconds')} s).")
  if notes:
    lines += ["", *notes]
  st = results["stability"]
  lines += ["", "## Transient / stable state", "",
            f"Rule: {st['rule']}.", "",
            f"Stable from step: **{st['stable_step'] if st['stable_step'] is not None else 'not reached'}** "
            f"(per layer: {', '.join(str(s) if s is not None else 'not reached' for s in st['per_layer_step'])})."]
  var = results["variability"]
  if var:
    lines += ["", "## Windowed variance and range of proportions (mean over experts)", "",
              "| w | layer | variance mean | variance first | variance last | range mean | range first "
              "| range last |",
              "|---|---|---|---|---|---|---|---|"]
    for w, v in var.items():
      for l in range(L):
        lines.append(f"| {w} | {l} | {v['variance_mean'][l]:.3g} | {v['variance_first'][l]:.3g} | "
                     f"{v['variance_last'][l]:.3g} | {v['range_mean'][l]:.3g} | {v['range_first'][l]:.3g} | "
                     f"{v['range_last'][l]:.3g} |")
  return "\n".join(lines) + "\n"


def write_plots(out_dir: str, steps: np.ndarray, props: np.ndarray, windows: Sequence[int],
                stability: StableState, evaluation: dict[str, Any], kind: str) -> list[str]:
  """proportions.png, variability.png and errors_H{H}.png; returns the paths."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  T, L, E = props.shape
  paths = []

  def save(fig, name):
    FigureCanvasAgg(fig)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=90)
    paths.append(path)

  def mark_stable(ax):
    if stability.stable_step is not None:
      ax.axvline(stability.stable_step, color="k", ls="--", lw=0.8)

  fig = Figure(figsize=(10, 2.6 * L))
  axes = np.atleast_1d(fig.subplots(L, 1, sharex=True, squeeze=False)[:, 0])
  for l, ax in enumerate(axes):
    for e in range(E):
      ax.plot(steps, 100 * props[:, l, e], lw=0.7)
    ax.axhline(100 / E, color="gray", ls=":", lw=0.8)
    mark_stable(ax)
    ax.set_ylabel(f"layer {l} %")
  axes[0].set_title(f"{kind} load proportion per expert (dotted: uniform; dashed: stable state)")
  axes[-1].set_xlabel("step")
  save(fig, "proportions.png")

  fig = Figure(figsize=(12, 2.6 * L))
  axes = fig.subplots(L, 2, sharex=True, squeeze=False)
  for l in range(L):
    for w in windows:
      st = windowed_stats(props[:, l], w)
      x = steps[st["end"]]
      axes[l, 0].plot(x, st["variance"].mean(-1), lw=0.9, label=f"w={w} mean")
      axes[l, 0].plot(x, st["variance"].max(-1), lw=0.6, ls="--", label=f"w={w} max")
      axes[l, 1].plot(x, st["range"].mean(-1), lw=0.9, label=f"w={w} mean")
      axes[l, 1].plot(x, st["range"].max(-1), lw=0.6, ls="--", label=f"w={w} max")
    for k in range(2):
      mark_stable(axes[l, k])
      if windows:
        axes[l, k].set_yscale("log")
    axes[l, 0].set_ylabel(f"layer {l}")
  axes[0, 0].set_title("windowed variance of proportions (over experts)")
  axes[0, 1].set_title("windowed range of proportions (over experts)")
  if windows:
    axes[0, 0].legend(fontsize=7)
  axes[-1, 0].set_xlabel("step (window end)")
  axes[-1, 1].set_xlabel("step (window end)")
  save(fig, "variability.png")

  for h in evaluation["horizons"]:
    fig = Figure(figsize=(10, 2.6 * (L + 1)))
    axes = np.atleast_1d(fig.subplots(L + 1, 1, sharex=True, squeeze=False)[:, 0])
    for name, entry in evaluation["predictors"].items():
      curve = entry["horizons"][str(h)]["curve"]
      if not curve["step"]:
        continue
      m = np.asarray(curve["mae_pp"])
      axes[0].plot(curve["step"], m.mean(1), marker=".", label=name)
      for l in range(L):
        axes[l + 1].plot(curve["step"], m[:, l], marker=".", label=name)
    axes[0].set_ylabel("all layers\nMAE pp")
    for l in range(L):
      axes[l + 1].set_ylabel(f"layer {l}\nMAE pp")
    for ax in axes:
      mark_stable(ax)
    axes[0].set_title(f"error of the next {h} steps' proportions vs. evaluation step")
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("evaluation step t (fit on steps before t)")
    save(fig, f"errors_H{h}.png")
  return paths


# ---------------------------------------------------------------------------------------------------------
# The whole analysis and the CLI.
# ---------------------------------------------------------------------------------------------------------
def analyze(workdir: str, *, kind: str = "demand", horizons: Sequence[int] = DEFAULT_HORIZONS,
            predictors: Optional[Mapping[str, Predictor]] = None, train_workdir: Optional[str] = None,
            out_dir: Optional[str] = None, max_points: int = 10, min_history: Optional[int] = None,
            stable_window: int = DEFAULT_STABLE_WINDOW, stable_threshold: Optional[float] = None,
            plots: bool = True, log: Log = _print) -> dict[str, Any]:
  """Reads a run's trace, computes statistics, evaluates the predictors, writes results.json, results.md
  and the plots to out_dir (default WORKDIR/load_prediction). Returns the results dict."""
  trace = read_traces(workdir, kind)
  props = trace.proportions()
  T, L, E = props.shape
  run_cfg = read_run_config(workdir)
  moe_cfg = run_cfg.get("moe", {}) if isinstance(run_cfg.get("moe"), dict) else {}
  if moe_cfg.get("num_experts") not in (None, E):
    log(f"warning: config.json says moe.num_experts={moe_cfg.get('num_experts')} but the trace has {E} experts.")
  log(f"Read {trace.path}: {T} steps ({trace.steps[0]}..{trace.steps[-1]}), {L} MoE layer(s) x {E} experts, "
      f"kind={kind}" + (f", {trace.duplicates} duplicate step(s) (last line kept)" if trace.duplicates else ""))
  if np.any(np.diff(trace.steps) > 1):
    log(f"note: {int(np.sum(np.diff(trace.steps) > 1))} gap(s) in the traced steps; rows are treated as "
        f"consecutive iterations.")
  windows = window_sizes(T)
  skipped = [w for w in DEFAULT_WINDOWS if w not in windows]
  stability = detect_stable_state(props, trace.steps, window=min(stable_window, T), std_threshold=stable_threshold)
  scaled, note = scale_horizons(T, horizons)
  log(f"Horizons: {note}.")

  if predictors is None:
    predictors = default_predictors()
  lstm = [p for p in predictors.values() if isinstance(p, LSTMPredictor)]
  if lstm and train_workdir:
    train_trace = read_traces(train_workdir, kind)
    for p in lstm:
      if not p.trained:
        p.train([train_trace.proportions()], source=train_workdir, log=log)
  evaluation = evaluate_predictors(props, predictors, scaled, steps=trace.steps, max_points=max_points,
                                   min_history=min_history, log=log)
  evaluation["horizon_note"] = note
  evaluation["requested_horizons"] = [int(h) for h in horizons]

  results = {
      "workdir": workdir, "train_workdir": train_workdir,
      "trace": {"path": trace.path, "kind": kind, "num_steps": T, "first_step": int(trace.steps[0]),
                "last_step": int(trace.steps[-1]), "num_layers": L, "num_experts": E,
                "duplicates": trace.duplicates, "skipped_lines": trace.skipped_lines,
                "gaps": int(np.sum(np.diff(trace.steps) > 1))},
      "run_config": {k: moe_cfg.get(k) for k in ("num_experts", "top_k", "capacity_factor", "fill_in", "ir_mode",
                                                 "priority") if k in moe_cfg},
      "windows": windows, "windows_skipped": skipped,
      "variability": variability_summary(props, windows),
      "stability": stability.to_json(),
      "evaluation": evaluation,
  }
  results = _json_clean(results)
  out_dir = out_dir or os.path.join(workdir, "load_prediction")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  table = markdown_report(results)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(table)
  if plots:
    results["plots"] = write_plots(out_dir, trace.steps, props, windows, stability, evaluation, kind)
  results["out_dir"] = out_dir
  log(table)
  log(f"Wrote {out_dir}/results.json, results.md" + (", " + ", ".join(os.path.basename(p) for p in
                                                                       results.get("plots", [])) if plots else ""))
  return results


def default_predictors(*, sw_windows: Sequence[int] = (1, 10, 100),
                       arima_order: Optional[Sequence[int]] = (5, 1, 5),
                       lstm: bool = True, lstm_kwargs: Optional[dict] = None,
                       arima_kwargs: Optional[dict] = None) -> dict[str, Predictor]:
  """sw_avg(W) for each W (W=1 is the last value), ARIMA (None: skipped) and the LSTM."""
  preds: dict[str, Predictor] = {}
  for w in sw_windows:
    p = SlidingWindowAverage(w)
    preds[p.name] = p
  if arima_order is not None:
    p = ARIMAPredictor(arima_order, **(arima_kwargs or {}))
    preds[p.name] = p
  if lstm:
    p = LSTMPredictor(**(lstm_kwargs or {}))
    preds[p.name] = p
  return preds


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.replace(" ", "").split(",") if v]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m rectify_moe.load_prediction", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--workdir", required=True, help="training run folder holding loads/loads.jsonl")
  p.add_argument("--kind", choices=KINDS, default="demand",
                 help="demand (before capacity) or accepted (slots filled after capacity)")
  p.add_argument("--horizon", type=int, action="append",
                 help="prediction horizon in steps (repeatable); default 1000 and 2000, scaled down for short "
                      "runs")
  p.add_argument("--train-workdir", default=None,
                 help="another run whose traces train the LSTM (default: this run's steps before the first "
                      "evaluation point)")
  p.add_argument("--out", default=None, help="output folder (default WORKDIR/load_prediction)")
  p.add_argument("--predictors", default="sw,arima,lstm", help="comma list of sw, arima, lstm")
  p.add_argument("--sw-windows", default="1,10,100", help="sliding-window averages to score (W=1: last value)")
  p.add_argument("--arima-order", default="5,1,5", help="p,d,q")
  p.add_argument("--arima-max-history", type=int, default=1000, help="ARIMA fits on at most this many steps")
  p.add_argument("--arima-maxiter", type=int, default=None, help="cap on the ARIMA optimiser's iterations")
  p.add_argument("--lstm-window", type=int, default=32)
  p.add_argument("--lstm-hidden", type=int, default=32)
  p.add_argument("--lstm-steps", type=int, default=300, help="LSTM training steps")
  p.add_argument("--max-points", type=int, default=10, help="evaluation points (evenly spaced)")
  p.add_argument("--min-history", type=int, default=None,
                 help="steps of history before the first evaluation point (default max(2, min(max H, T // 4)))")
  p.add_argument("--stable-window", type=int, default=DEFAULT_STABLE_WINDOW)
  p.add_argument("--stable-threshold", type=float, default=None,
                 help="std threshold on proportions for the stable state (default 0.2 / num_experts)")
  p.add_argument("--no-plots", action="store_true")
  return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = build_parser().parse_args(argv)
  names = {n.strip() for n in args.predictors.split(",") if n.strip()}
  unknown = names - {"sw", "arima", "lstm"}
  if unknown:
    raise SystemExit(f"--predictors: unknown {sorted(unknown)}; choose from sw, arima, lstm.")
  predictors = default_predictors(
      sw_windows=_ints(args.sw_windows) if "sw" in names else (),
      arima_order=_ints(args.arima_order) if "arima" in names else None, lstm="lstm" in names,
      lstm_kwargs=dict(window=args.lstm_window, hidden=args.lstm_hidden, train_steps=args.lstm_steps),
      arima_kwargs=dict(max_history=args.arima_max_history, maxiter=args.arima_maxiter))
  try:
    return analyze(args.workdir, kind=args.kind, horizons=args.horizon or DEFAULT_HORIZONS, predictors=predictors,
                   train_workdir=args.train_workdir, out_dir=args.out, max_points=args.max_points,
                   min_history=args.min_history, stable_window=args.stable_window,
                   stable_threshold=args.stable_threshold, plots=not args.no_plots)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
