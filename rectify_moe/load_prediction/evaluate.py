"""The evaluation harness: horizons, evaluation points, error metrics and `evaluate_predictors`."""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from rectify_moe import log
from rectify_moe.load_prediction.lstm import LSTMPredictor
from rectify_moe.load_prediction.predictors import Predictor

DEFAULT_HORIZONS = (1000, 2000)


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
                        verbose: bool = False) -> dict[str, Any]:
  """Scores each predictor: at each evaluation point t, per layer, fit(props[:t, layer]) and predict the
  next max(horizons) steps; each horizon H is scored on its first H predictions where t + H <= T.

  An untrained `LSTMPredictor` is first trained on the history before the first evaluation point (all
  layers); train it beforehand on another run to test across runs.

  Args:
    props: [T, layers, experts] proportions.
    predictors: name -> Predictor (reused across points and layers).
    horizons: horizons in steps (not scaled here; see `scale_horizons`).
    steps: [T] training steps for the curves (default 0..T-1).
    verbose: progress lines (LSTM training, each point of a slow predictor, each predictor's time) go to
      `log.info`; silent by default and inside `log.quiet()`.
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
  with log.quiet(not verbose):
    for name, predictor in predictors.items():
      start = time.time()
      if isinstance(predictor, LSTMPredictor) and not predictor.trained:
        predictor.train([props[:points[0]]], source=f"this run's first {points[0]} steps (before the first "
                        f"evaluation point)", verbose=verbose)
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
            log.info(f"[{name}] layer {l + 1}/{L}, point {i + 1}/{len(points)} (step {int(steps[t])}, {t} "
                     f"steps of history) fitted, {time.time() - start:.1f} s so far")
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
      log.info(f"[{name}] done in {entry['seconds']} s")
  return out
