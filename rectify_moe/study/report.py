"""The study's tables and plots: per variant and capacity factor, the held-out loss and accuracy (mean and std over
seeds), the paired-seed difference to the vanilla router of the same k (95 % t-interval), and the routing rates.

Paired differences: for seed s, d_s = loss(variant, cf, s) - loss(vanilla, cf, s). The two runs share the dense
start, the seed's router init and data order and the held-out tokens, so much of the seed noise cancels; the
interval is mean(d) ± t(0.975, n-1) * std(d) / sqrt(n) over the n seeds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RATES = (("drop_rate", "drop"), ("padding_rate", "pad"), ("fill_in_rate", "fill-in"), ("ir_rate", "IR"))


def t_quantile(df: int) -> float:
  """The 0.975 quantile of Student's t with df degrees of freedom."""
  from scipy import stats
  return float(stats.t.ppf(0.975, df))


def _std(values: Sequence[float]) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per (variant, capacity factor), in the order the variants first appear."""
  order = list(dict.fromkeys(r["variant"] for r in runs))
  by_key = {(r["variant"], r["capacity_factor"], r["seed"]): r for r in runs}
  rows = []
  for variant in order:
    for cf in sorted({r["capacity_factor"] for r in runs if r["variant"] == variant}):
      mine = sorted((r for r in runs if r["variant"] == variant and r["capacity_factor"] == cf),
                    key=lambda r: r["seed"])
      losses = [r["loss"] for r in mine]
      row = {"variant": variant, "capacity_factor": cf, "seeds": len(mine), "loss_mean": float(np.mean(losses)),
             "loss_std": _std(losses), "loss_se_mean": float(np.mean([r["loss_se"] for r in mine])),
             "accuracy_mean": float(np.mean([r["accuracy"] for r in mine])),
             "accuracy_std": _std([r["accuracy"] for r in mine])}
      for key, _ in RATES:
        row[key] = float(np.mean([r["mean"][key] for r in mine]))
      vanilla = mine[0]["vanilla"]
      pairs = [(r["loss"], by_key[(vanilla, cf, r["seed"])]["loss"]) for r in mine
               if (vanilla, cf, r["seed"]) in by_key]
      if variant != vanilla and pairs:
        d = np.array([a - b for a, b in pairs])
        half = t_quantile(len(d) - 1) * _std(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        row.update(vs=vanilla, diff_mean=float(d.mean()), diff_ci_low=float(d.mean() - half),
                   diff_ci_high=float(d.mean() + half), diff_pairs=len(d))
      ablated = [r["ablated_loss"] for r in mine if "ablated_loss" in r]
      if ablated:
        row["ablated_loss_mean"] = float(np.mean(ablated))
      rows.append(row)
  return rows


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:.{digits}f}"


def _diff(row: Mapping[str, Any]) -> str:
  if "diff_mean" not in row:
    return "(reference)"
  mark = " *" if row["diff_ci_high"] < 0 or row["diff_ci_low"] > 0 else ""
  return f"{row['diff_mean']:+.4f} [{row['diff_ci_low']:+.4f}, {row['diff_ci_high']:+.4f}]{mark}"


def markdown(results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
  study, dense, runs = results["study"], results["dense"], results["runs"]
  model = study["run"]["model"]
  moe = study["run"]["moe"]
  start = "from scratch" if study["from_scratch"] else f"upcycled from one dense run of {study['dense_steps']} steps"
  if study.get("dense_from") and not study["from_scratch"]:
    start = f"upcycled from the imported model {study['dense_from']}"
  seeds = study["seeds"]
  noise = float(np.mean([r["loss_std"] for r in rows if r["seeds"] > 1])) if seeds > 1 else float("nan")
  pair_sds = [(r["diff_ci_high"] - r["diff_ci_low"]) / 2 / t_quantile(r["diff_pairs"] - 1) * math.sqrt(r["diff_pairs"])
              for r in rows if "diff_mean" in r and r["diff_pairs"] > 1]
  lines = [
      "# Study results", "",
      f"- Runs: {len(runs)} ({start}); {seeds} seeds; {results['machine']}, mesh "
      f"({study['run']['mesh']['data']}, {study['run']['mesh']['expert']}).",
      f"- Model: {model['num_layers']} layers, d_model {model['d_model']}, d_ff {model['d_ff']}, MoE every "
      f"{model['moe_every']} layer(s) with {moe['num_experts']} experts of width {model['d_ff']}, group size "
      f"{moe['group_size']}; continued runs: {study['steps']} steps at peak learning rate {study['learning_rate']}.",
      f"- Held-out evaluation: {runs[0]['tokens']:,} target tokens per run "
      f"({'the whole held-out split' if not study['eval_batches'] else str(study['eval_batches']) + ' batches'}); "
      f"loss standard error per run about {np.mean([r['loss_se'] for r in runs]):.4f}.",
      f"- Dense model: held-out loss {dense['loss']:.4f} ± {dense['loss_se']:.4f}.",
  ]
  ablated = [r for r in rows if "ablated_loss_mean" in r]
  if ablated:
    lines.append("- Do the experts carry weight? Held-out loss of the vanilla runs with every MoE layer's output "
                 "zeroed: " + ", ".join(f"{r['variant']} cf {r['capacity_factor']:g}: {r['ablated_loss_mean']:.3f} "
                                       f"(trained {r['loss_mean']:.3f})" for r in ablated) + ".")
  lines.append(f"- Seed noise: std of one run's held-out loss over seeds {_fmt(noise)} (mean over rows); std of a "
               f"paired difference {_fmt(float(np.mean(pair_sds)) if pair_sds else float('nan'))}.")
  lines += ["", "Δ vs vanilla: paired-seed difference of held-out loss to the vanilla router of the same k at the same "
            "capacity factor, mean [95 % t-interval]; * = the interval excludes 0. Rates: means over seeds and MoE "
            "layers, on the held-out split.", ""]
  header = ["variant", "cf", "held-out loss (mean ± std)", "accuracy", "Δ vs vanilla [95 % CI]",
            *[label for _, label in RATES]]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    lines.append("| " + " | ".join([
        r["variant"], f"{r['capacity_factor']:g}", f"{r['loss_mean']:.4f} ± {r['loss_std']:.4f}",
        f"{r['accuracy_mean']:.4f}", _diff(r), *[_fmt(r[key], 3) for key, _ in RATES]]) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], out_dir: str) -> list[str]:
  """loss_vs_cf.png (held-out loss and paired difference against capacity factor) and rates_vs_cf.png."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  style = lambda i, v: dict(color=f"C{i % 10}", ls="--" if "top2" in v else "-", marker="o", ms=3)
  paths = [os.path.join(out_dir, "loss_vs_cf.png"), os.path.join(out_dir, "rates_vs_cf.png")]
  fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, v in enumerate(variants):
    mine = [r for r in rows if r["variant"] == v]
    cfs = [r["capacity_factor"] for r in mine]
    ax_loss.errorbar(cfs, [r["loss_mean"] for r in mine], yerr=[r["loss_std"] for r in mine], label=v,
                     capsize=2, **style(i, v))
    if all("diff_mean" in r for r in mine):
      lo = [r["diff_mean"] - r["diff_ci_low"] for r in mine]
      hi = [r["diff_ci_high"] - r["diff_mean"] for r in mine]
      ax_diff.errorbar(cfs, [r["diff_mean"] for r in mine], yerr=[lo, hi], label=v, capsize=2, **style(i, v))
  ax_loss.set(xlabel="capacity factor", ylabel="held-out loss (mean ± std over seeds)")
  ax_diff.axhline(0.0, color="k", lw=0.8)
  ax_diff.set(xlabel="capacity factor", ylabel="Δ held-out loss vs vanilla (95 % CI)")
  ax_loss.legend(fontsize=7, ncol=2)
  ax_diff.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(paths[0], dpi=110)
  plt.close(fig)
  fig, axes = plt.subplots(1, len(RATES), figsize=(4 * len(RATES), 3.6), sharex=True)
  for ax, (key, label) in zip(axes, RATES):
    for i, v in enumerate(variants):
      mine = [r for r in rows if r["variant"] == v]
      ax.plot([r["capacity_factor"] for r in mine], [r[key] for r in mine], label=v, **style(i, v))
    ax.set(title=label, xlabel="capacity factor")
    ax.set_ylim(bottom=0)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(paths[1], dpi=110)
  plt.close(fig)
  return paths


def write(results: Mapping[str, Any], out_dir: str, *, plots: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
  """results.json (every run and the aggregate rows), results.md and the plots in `out_dir`."""
  rows = aggregate(results["runs"])
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
  with open(paths[0], "w") as f:
    json.dump({**results, "rows": rows}, f, indent=2)
  with open(paths[1], "w") as f:
    f.write(markdown(results, rows))
  if plots:
    paths += plot(rows, out_dir)
  return rows, paths
