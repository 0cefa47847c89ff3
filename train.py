"""Train a rectify-moe language model.

  python train.py --config=configs/default.py --workdir=runs/default
  python train.py --config=configs/top2_ir_fr.py --workdir=runs/top2_ir_fr --config.moe.capacity_factor=0.5

Every field of docs/config_reference.md can be overridden (`--config.moe.ir_mode=None` for optional ones).
Rerunning with the same --workdir resumes from the latest checkpoint.
"""

import sys

from absl import app, flags, logging

from rectify_moe import train_lib
from rectify_moe.config import cli, entry

entry.define_config_flag("configs/default.py", "Path to a config file (get_config()).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, load traces and evaluations.")
flags.mark_flags_as_required(["workdir"])


def main(argv, none_paths):
  logging.set_verbosity(logging.WARNING)  # keep the progress lines readable (Orbax logs at INFO)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = cli.apply_none(flags.FLAGS.config, none_paths)
  sys.exit(train_lib.run_main(config, flags.FLAGS.workdir))


if __name__ == "__main__":
  entry.run(main)
