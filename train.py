"""Train a rectify-moe language model.

  python train.py --config=configs/default.py --workdir=runs/default
  python train.py --config=configs/top2_ir_fr.py --workdir=runs/top2_ir_fr --config.moe.capacity_factor=0.5

Rerunning with the same --workdir resumes from the latest checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rectify_moe import train_lib

config_flags.DEFINE_config_file("config", "configs/default.py", "Path to a config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, load traces and evaluations.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  logging.set_verbosity(logging.WARNING)  # keep the progress lines readable (Orbax logs at INFO)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  sys.exit(train_lib.run_main(flags.FLAGS.config, flags.FLAGS.workdir))


if __name__ == "__main__":
  app.run(main)
