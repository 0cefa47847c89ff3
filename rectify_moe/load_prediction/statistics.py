"""Load proportions and how much they fluctuate: windowed variance and range, the transient/stable detector and
the variability summary."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

DEFAULT_WINDOWS = (10, 100, 200)
# Transient/stable detector defaults (see `detect_stable_state`).
DEFAULT_STABLE_WINDOW = 10
DEFAULT_STABLE_THRESHOLD_FRACTION = 0.2  # threshold on the windowed std = 0.2 / E (20 % of the uniform share)


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
