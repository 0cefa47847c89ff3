"""Load balancing on the default model: the Switch auxiliary loss, no balancing, and the auxiliary-loss-free
expert bias (DeepSeek-V3, `moe.expert_bias_update_rate`), over several seeds.

Each (mode, seed) trains `configs/default.py` (Top-1 + IR + FR, 300 steps, the offline stdlib corpus) and is then
evaluated on the held-out batches. Reported per mode: the drop rate of training (mean over the last 100 steps,
logged every step) and of evaluation, the per-expert load max / mean and CV of evaluation, the held-out loss; mean
and standard deviation over seeds. Results: benchmarks/results/balancing_<backend>.{md,json}.

  python benchmarks/balancing.py                          # 4 modes x 3 seeds, ~20 min on 2 CPU cores
  python benchmarks/balancing.py --seeds=1 --steps=20     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import common
from configs import default
from rectify_moe import evaluation, log, train_lib
from rectify_moe.workdir import Workdir

MODES = {
    "aux loss 0.01": dict(aux_loss_weight=0.01, expert_bias_update_rate=0.0),
    "no balancing": dict(aux_loss_weight=0.0, expert_bias_update_rate=0.0),
    "expert bias 1e-3": dict(aux_loss_weight=0.0, expert_bias_update_rate=1e-3),
    "expert bias 1e-2": dict(aux_loss_weight=0.0, expert_bias_update_rate=1e-2),
}
COLUMNS = ("mode", "seeds", "train_drop_rate", "eval_drop_rate", "eval_load_max_over_mean", "eval_load_cv",
           "eval_loss")


def run_one(mode: str, seed: int, *, steps: int, workdir: str) -> dict:
  config = default.get_config()
  config.seed = seed
  config.train.update(dict(steps=steps, log_every=1, eval_every=steps, checkpoint_every=steps,
                           aux_loss_weight=MODES[mode]["aux_loss_weight"]))
  config.moe.expert_bias_update_rate = MODES[mode]["expert_bias_update_rate"]
  train_lib.train_and_evaluate(config, workdir)
  with open(Workdir(workdir).metrics_jsonl) as f:
    rows = [r for r in map(json.loads, f) if r["kind"] == "train"]
  last = rows[-min(100, len(rows)):]
  result = evaluation.evaluate_checkpoint(None, workdir, write=False, log=lambda message: None)
  row = result["routers"][0]
  return {"mode": mode, "seed": seed, "train_drop_rate": float(np.mean([r["drop_rate"] for r in last])),
          "eval_drop_rate": row["mean"]["drop_rate"], "eval_load_max_over_mean": row["mean"]["load_max_over_mean"],
          "eval_load_cv": row["mean"]["load_cv"], "eval_loss": row["loss"]}


def summarize(runs: list[dict]) -> list[dict]:
  out = []
  for mode in MODES:
    mine = [r for r in runs if r["mode"] == mode]
    if not mine:
      continue
    row = {"mode": mode, "seeds": len(mine)}
    for key in COLUMNS[2:]:
      values = np.array([r[key] for r in mine])
      row[key] = f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.4f}"
    out.append(row)
  return out


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--workdir", default="runs/balancing", help="one run folder per mode and seed")
  parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
  parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
  args = parser.parse_args(argv)
  runs = []
  for mode in args.modes.split(","):
    for seed in range(args.seeds):
      name = f"{mode.replace(' ', '_')}_seed{seed}"
      run_dir = os.path.join(args.workdir, name)
      cached = os.path.join(run_dir, "balancing_result.json")
      if os.path.exists(cached):  # a rerun reuses finished runs
        with open(cached) as f:
          runs.append(json.load(f))
        continue
      with log.quiet():
        runs.append(run_one(mode, seed, steps=args.steps, workdir=run_dir))
      with open(cached, "w") as f:
        json.dump(runs[-1], f)
      log.info(f"{mode:18s} seed {seed}: train drop {runs[-1]['train_drop_rate']:.4f}  eval drop "
               f"{runs[-1]['eval_drop_rate']:.4f}  load max/mean {runs[-1]['eval_load_max_over_mean']:.3f}  "
               f"held-out loss {runs[-1]['eval_loss']:.4f}")
  rows = summarize(runs)
  notes = (f"configs/default.py (Top-1 + IR + FR, cf 1.0), {args.steps} steps, seeds 0..{args.seeds - 1}; mean ± std "
           "over seeds. train_drop_rate: mean over the last 100 steps; eval_*: the held-out eval batches, means over "
           "the MoE layers. Runs: " + ", ".join(f"{r['mode']} seed {r['seed']}: drop {r['eval_drop_rate']:.4f}"
                                               for r in runs))
  common.write_results(f"balancing_{common.machine()['backend']}", rows, COLUMNS, notes, out_dir=args.out)
  return rows


if __name__ == "__main__":
  main()
