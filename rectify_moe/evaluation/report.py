"""Reports of a checkpoint evaluation: results.json, results.md (a comparison table of the routers and a per-layer
table of each), and PNG plots (per-expert load heatmap, routing rates by router)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

# Per-layer rates averaged over the MoE layers in the comparison table.
RATE_COLUMNS = (("drop_rate", "drop"), ("unrouted_rate", "unrouted"), ("padding_rate", "pad"),
                ("fill_in_rate", "fill-in"), ("ir_rate", "IR"))


def _fmt(value: Optional[float], digits: int = 4) -> str:
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def comparison_table(results: Mapping[str, Any]) -> str:
  """One markdown table: rows = routers; loss, ppl, accuracy, routing rates (mean over MoE layers), imbalance."""
  header = ["router", "cf", "loss", "ppl", "accuracy", *[label for _, label in RATE_COLUMNS], "IR overflow",
            "imbalance (max/mean)", "a2a rows/token"]
  reference = bool(results.get("dropless_reference"))
  if reference:
    header += ["loss - dropless", "rel. L2 to dropless"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in results["routers"]:
    mean = row.get("mean") or {}
    cells = [row["name"], _fmt(row.get("eval_capacity_factor"), 2) if row.get("eval_capacity_factor") else "-",
             _fmt(row["loss"]), _fmt(row["perplexity"], 2), _fmt(row["accuracy"]),
             *[_fmt(mean.get(key)) for key, _ in RATE_COLUMNS], _fmt(mean.get("ir_overflow_rate")),
             _fmt(mean.get("load_max_over_mean"), 3), _fmt(mean.get("a2a_rows_per_token"), 3)]
    if reference:
      cells += [_fmt(row.get("dropless_loss_gap")), _fmt(mean.get("dropless_rel_l2"))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def layer_table(row: Mapping[str, Any]) -> str:
  """Per-MoE-layer routing statistics of one router (markdown)."""
  header = ["layer", "C", "drop", "unrouted", "pad", "fill-in slots (rate)", "IR tokens", "IR overflow",
            "load max/mean", "load CV", "demand max/mean", "a2a rows/token", "expert load"]
  reference = bool(row["layers"]) and "dropless_rel_l2" in row["layers"][0]
  if reference:
    header.append("rel. L2 to dropless")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for layer in row["layers"]:
    cells = [str(layer["layer"]), str(layer["capacity"]), _fmt(layer["drop_rate"]), _fmt(layer["unrouted_rate"]),
             _fmt(layer["padding_rate"]), f"{layer['fill_in_slots']} ({_fmt(layer['fill_in_rate'])})",
             f"{layer['ir_rectified']} ({_fmt(layer['ir_rate'])})",
             f"{layer['ir_overflow']} ({_fmt(layer['ir_overflow_rate'])})",
             _fmt(layer["load_max_over_mean"], 3), _fmt(layer["load_cv"], 3), _fmt(layer["demand_max_over_mean"], 3),
             _fmt(layer["a2a_rows_per_token"], 3), " ".join(map(str, layer["expert_load"]))]
    if reference:
      cells.append(_fmt(layer["dropless_rel_l2"]))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown_report(results: Mapping[str, Any]) -> str:
  mesh, train_mesh = results["mesh"], results["train_mesh"]
  parts = [
      f"# Evaluation of step {results['step']}",
      "",
      f"- workdir: `{results['workdir']}`",
      f"- mesh: data={mesh['data']}, expert={mesh['expert']} ({results['devices']} device(s)); training mesh: "
      f"data={train_mesh['data']}, expert={train_mesh['expert']}",
      f"- held-out: {results['eval_batches']} batches x {results['eval_batch_size']} x {results['seq_len']} "
      f"({results['routers'][0]['tokens'] if results['routers'] else 0} target tokens)",
      "- rates are means over the MoE layers; imbalance = max / mean of the accepted per-expert load",
      *(["- dropless reference: every row also evaluated with the same router dropless (no capacity, no IR/FR; "
         "Expert Choice: token-choice top-k on its gate) on the same batches; `loss - dropless` is the held-out loss "
         "gap, `rel. L2 to dropless` the mean over MoE layers of ||y - y_dropless|| / ||y_dropless|| of each layer's "
         "output on the same input"] if results.get("dropless_reference") else []),
      "",
      "## Routers",
      "",
      comparison_table(results),
  ]
  for row in results["routers"]:
    if row["layers"]:
      swap = ", ".join(f"{k}={v}" for k, v in row["swap"].items()) or "none (the checkpoint's router)"
      parts += ["", f"## {row['name']}", "", f"Swap: {swap}.", "", layer_table(row)]
  return "\n".join(parts) + "\n"


MAX_HEATMAP_PANELS = 15


def plot_load_heatmap(results: Mapping[str, Any], path: str) -> None:
  """Per-layer x per-expert accepted load (relative to the layer's mean), one panel per distinct router."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows, seen = [], set()
  for row in results["routers"]:  # one panel per distinct router (reused rows have identical loads)
    key = json.dumps(row["moe"], sort_keys=True, default=str)
    if row["layers"] and key not in seen:
      seen.add(key)
      rows.append(row)
  total, rows = len(rows), rows[:MAX_HEATMAP_PANELS]
  cols = min(len(rows), 3)
  nrows = -(-len(rows) // cols)
  num_layers = len(rows[0]["layers"])
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, (0.4 * num_layers + 1.8) * nrows + 0.6),
                           squeeze=False, layout="constrained")
  for ax in axes.flat[len(rows):]:
    ax.axis("off")
  image = None
  for ax, row in zip(axes.flat, rows):
    load = np.asarray([layer["expert_load"] for layer in row["layers"]], np.float64)
    rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-9)
    image = ax.imshow(rel, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2.0, float(rel.max())))
    ax.set_title(row["name"], fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(load.shape[1]))
    ax.set_yticks(range(load.shape[0]), [str(layer["layer"]) for layer in row["layers"]])
  if image is not None:
    fig.colorbar(image, ax=axes.ravel().tolist(), label="accepted load / mean")
  shown = f" (first {len(rows)} of {total} routers)" if total > len(rows) else ""
  fig.suptitle(f"Per-expert accepted load, step {results['step']}{shown}")
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_rates(results: Mapping[str, Any], path: str) -> None:
  """Grouped bar chart: drop / unrouted / padding / fill-in / IR rates (mean over MoE layers) by router."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in results["routers"] if r["layers"]]
  keys = RATE_COLUMNS
  x = np.arange(len(rows))
  width = 0.8 / len(keys)
  fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
  for j, (key, label) in enumerate(keys):
    ax.bar(x + (j - (len(keys) - 1) / 2) * width, [r["mean"][key] for r in rows], width, label=label)
  ax.set_xticks(x, [r["name"] for r in rows], rotation=25, ha="right", fontsize=8)
  ax.set_ylabel("rate (mean over MoE layers)")
  ax.set_title(f"Routing rates by router, step {results['step']}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_dropless_gap(results: Mapping[str, Any], path: str) -> None:
  """Per router: relative L2 distance of each MoE layer's output to the dropless output (bars per layer), and the
  held-out loss gap to dropless (markers, right axis)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in results["routers"] if r["layers"] and "dropless_rel_l2" in r["layers"][0]]
  num_layers = len(rows[0]["layers"])
  x = np.arange(len(rows))
  width = 0.8 / num_layers
  fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
  for j in range(num_layers):
    ax.bar(x + (j - (num_layers - 1) / 2) * width, [r["layers"][j]["dropless_rel_l2"] for r in rows], width,
           label=f"layer {rows[0]['layers'][j]['layer']}")
  ax.set_ylabel("||y - y_dropless|| / ||y_dropless||")
  ax.set_xticks(x, [r["name"] for r in rows], rotation=25, ha="right", fontsize=8)
  gap = ax.twinx()
  gap.plot(x, [r["dropless_loss_gap"] for r in rows], "kD", label="loss - dropless loss")
  gap.axhline(0.0, color="k", lw=0.5)
  gap.set_ylabel("held-out loss - dropless loss")
  handles = ax.get_legend_handles_labels()[0] + gap.get_legend_handles_labels()[0]
  ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
  ax.set_title(f"Distance to dropless routing, step {results['step']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(results: Mapping[str, Any], out_dir: str, *, plots: bool = True) -> list[str]:
  """results.json, results.md and (for MoE models) load_heatmap.png and rates_by_router.png."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
  with open(paths[0], "w") as f:
    json.dump(results, f, indent=2, default=str)
  with open(paths[1], "w") as f:
    f.write(markdown_report(results))
  if plots and any(r["layers"] for r in results["routers"]):
    paths.append(os.path.join(out_dir, "load_heatmap.png"))
    plot_load_heatmap(results, paths[-1])
    paths.append(os.path.join(out_dir, "rates_by_router.png"))
    plot_rates(results, paths[-1])
    if results.get("dropless_reference"):
      paths.append(os.path.join(out_dir, "dropless_gap.png"))
      plot_dropless_gap(results, paths[-1])
  return paths
