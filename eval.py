"""Evaluate a rectify-moe checkpoint: held-out loss / ppl / accuracy, routing statistics, router swaps.

  python eval.py --workdir=runs/top1                        # latest step, the run's own config.json
  python eval.py --workdir=runs/top1 --step=200 --mesh=1,8  # a given step on another mesh
  python eval.py --workdir=runs/top1 --swap=presets         # Top-1 vs +IR, +FR, +IR+FR at test time
  python eval.py --workdir=runs/top1 --swap=ir --swap="top_k=2,priority=position" \
      --eval_capacity_factors=0.5,1.0,2.0                   # every router at every capacity factor
  python eval.py --workdir=runs/top1 --config=configs/top1.py --config.train.eval_batches=32
  python eval.py --workdir=runs/top1 --swap=presets --swap=router=expert_choice,capacity_factor=2 \
      --eval_capacity_factors=0.5,1.0 --dropless_reference  # distance of every row to dropless routing
  python eval.py --init_from=hf:/models/SmolLM-135M --eval_batches=0     # an imported Hugging Face model

--swap takes a preset (vanilla, ir, fr, ir_fr; derived from the checkpoint's k), `key=value,...` routing
fields of `moe` (top_k, fill_in, ir_mode, ir_capacity_factor, capacity_factor, eval_capacity_factor,
min_capacity, priority, combine, straight_through, fill_in_priority, dispatch; `router` between routers with the
same parameters: top_k, expert_choice, base_layer), or a preset followed by fields (`ir,ir_capacity_factor=None`).
Outputs go to workdir/eval/<step>/: results.json, results.md, load_heatmap.png, rates_by_router.png (and
dropless_gap.png with --dropless_reference).
"""

import sys

from absl import app, flags, logging

from rectify_moe import evaluation
from rectify_moe.config import cli, entry

entry.define_config_flag(None, "Config file (get_config()); default: the run's workdir/config.json. It must match "
                         "the checkpoint's architecture.")
flags.DEFINE_string("workdir", None, "The training run's workdir (holds config.json and checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_multi_string("swap", [], "A test-time router swap (repeatable): a preset (vanilla, ir, fr, ir_fr, "
                          "or 'presets' for all four) and/or key=value routing fields, comma-separated.")
flags.DEFINE_list("eval_capacity_factors", [], "Also evaluate every router at each of these capacity factors.")
flags.DEFINE_string("mesh", None, "Evaluation mesh 'data,expert' (default: the run's mesh if it fits this machine).")
flags.DEFINE_integer("eval_batches", None, "Held-out batches (default: train.eval_batches of the config; 0 = the "
                     "whole held-out split).")
flags.DEFINE_integer("eval_batch_size", None, "Rows per eval batch (default: train.eval_batch_size).")
flags.DEFINE_string("output_dir", None, "Where to write results (default: workdir/eval/<step>).")
flags.DEFINE_bool("plots", True, "Write the PNG plots.")
flags.DEFINE_bool("dropless_reference", False, "Evaluate every router row also dropless on the same batches: the "
                  "held-out loss gap to dropless and, per MoE layer, the relative L2 distance of the output to the "
                  "dropless output.")
flags.DEFINE_string("init_from", None, "hf:DIR: evaluate the dense model of a local Hugging Face folder instead of a "
                    "checkpoint (--workdir optional: where results go).")
flags.DEFINE_bool("overwrite", False, "Replace the results of an earlier evaluation in the output folder.")


def main(argv, none_paths):
  logging.set_verbosity(logging.WARNING)  # Orbax logs at INFO
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.workdir and not f.init_from:
    raise app.UsageError("Pass --workdir (a training run) or --init_from=hf:DIR.")
  config = cli.apply_none(f.config, none_paths) if f.config is not None else None
  sys.exit(evaluation.run_main(config, f.workdir, step=f.step, swaps=f.swap,
                               eval_capacity_factors=f.eval_capacity_factors, mesh_shape=f.mesh,
                               eval_batches=f.eval_batches, eval_batch_size=f.eval_batch_size,
                               output_dir=f.output_dir, plots=f.plots, dropless_reference=f.dropless_reference,
                               init_from=f.init_from, overwrite=f.overwrite))


if __name__ == "__main__":
  entry.run(main)
