"""Reports of an analysis: JSON-safe results, the markdown table and the PNG plots."""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from rectify_moe.load_prediction.statistics import StableState, windowed_stats


def json_clean(x):
  """x with numpy values as Python numbers, tuples as lists, keys as strings and NaN/inf as None (strict JSON)."""
  if isinstance(x, dict):
    return {str(k): json_clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_clean(v) for v in x]
  if isinstance(x, np.ndarray):
    return json_clean(x.tolist())
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
