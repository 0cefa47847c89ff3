"""The whole analysis of one run (`analyze`), the default predictors and the command line."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from rectify_moe import log
from rectify_moe.load_prediction.evaluate import DEFAULT_HORIZONS, evaluate_predictors, scale_horizons
from rectify_moe.load_prediction.lstm import LSTMPredictor
from rectify_moe.load_prediction.predictors import ARIMAPredictor, Predictor, SlidingWindowAverage
from rectify_moe.load_prediction.report import json_clean, markdown_report, write_plots
from rectify_moe.load_prediction.statistics import (DEFAULT_STABLE_WINDOW, DEFAULT_WINDOWS, detect_stable_state,
                                                    variability_summary, window_sizes)
from rectify_moe.load_prediction.traces import KINDS, read_run_config, read_traces
from rectify_moe.workdir import Workdir


def analyze(workdir: str, *, kind: str = "demand", horizons: Sequence[int] = DEFAULT_HORIZONS,
            predictors: Optional[Mapping[str, Predictor]] = None, train_workdir: Optional[str] = None,
            out_dir: Optional[str] = None, max_points: int = 10, min_history: Optional[int] = None,
            stable_window: int = DEFAULT_STABLE_WINDOW, stable_threshold: Optional[float] = None,
            plots: bool = True, verbose: bool = True) -> dict[str, Any]:
  """Reads a run's trace, computes statistics, evaluates the predictors, writes results.json, results.md
  and the plots to out_dir (default WORKDIR/load_prediction). Returns the results dict.

  With `verbose` (the default) progress and the markdown table go to `log.info`; `verbose=False` or an
  enclosing `log.quiet()` silences them.
  """
  with log.quiet(not verbose):
    return _analyze(workdir, kind=kind, horizons=horizons, predictors=predictors, train_workdir=train_workdir,
                    out_dir=out_dir, max_points=max_points, min_history=min_history, stable_window=stable_window,
                    stable_threshold=stable_threshold, plots=plots)


def _analyze(workdir, *, kind, horizons, predictors, train_workdir, out_dir, max_points, min_history,
             stable_window, stable_threshold, plots):
  trace = read_traces(workdir, kind)
  props = trace.proportions()
  T, L, E = props.shape
  run_cfg = read_run_config(workdir)
  moe_cfg = run_cfg.get("moe", {}) if isinstance(run_cfg.get("moe"), dict) else {}
  if moe_cfg.get("num_experts") not in (None, E):
    log.warning(f"config.json says moe.num_experts={moe_cfg.get('num_experts')} but the trace has {E} experts.")
  log.info(f"Read {trace.path}: {T} steps ({trace.steps[0]}..{trace.steps[-1]}), {L} MoE layer(s) x {E} experts, "
           f"kind={kind}" + (f", {trace.duplicates} duplicate step(s) (last line kept)" if trace.duplicates else ""))
  if np.any(np.diff(trace.steps) > 1):
    log.info(f"note: {int(np.sum(np.diff(trace.steps) > 1))} gap(s) in the traced steps; rows are treated as "
             f"consecutive iterations.")
  windows = window_sizes(T)
  skipped = [w for w in DEFAULT_WINDOWS if w not in windows]
  stability = detect_stable_state(props, trace.steps, window=min(stable_window, T), std_threshold=stable_threshold)
  scaled, note = scale_horizons(T, horizons)
  log.info(f"Horizons: {note}.")

  if predictors is None:
    predictors = default_predictors()
  lstm = [p for p in predictors.values() if isinstance(p, LSTMPredictor)]
  if lstm and train_workdir:
    train_trace = read_traces(train_workdir, kind)
    for p in lstm:
      if not p.trained:
        p.train([train_trace.proportions()], source=train_workdir, verbose=True)
  evaluation = evaluate_predictors(props, predictors, scaled, steps=trace.steps, max_points=max_points,
                                   min_history=min_history, verbose=True)
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
  results = json_clean(results)
  out_dir = out_dir or Workdir(workdir).load_prediction_dir
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  table = markdown_report(results)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(table)
  if plots:
    results["plots"] = write_plots(out_dir, trace.steps, props, windows, stability, evaluation, kind)
  results["out_dir"] = out_dir
  log.info(table)
  log.info(f"Wrote {out_dir}/results.json, results.md" + (", " + ", ".join(os.path.basename(p) for p in
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
  from rectify_moe import load_prediction  # the package docstring's first paragraph describes the tool
  p = argparse.ArgumentParser(prog="python -m rectify_moe.load_prediction",
                              description=load_prediction.__doc__.split("\n\n")[0],
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
