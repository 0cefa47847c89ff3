"""Run a study: dense pretraining, then every router variant x capacity factor x seed, continued from it (upcycled)
and evaluated on the held-out split; one table, plots, seed statistics.

  python -m rectify_moe.study --study=configs/studies/paper.py --workdir=runs/study
  python -m rectify_moe.study --study=configs/studies/paper.py --workdir=runs/study_scratch --study.from_scratch=True
  python -m rectify_moe.study --study=configs/studies/tiny.py --workdir=/tmp/study --study.seeds=2   # any field

A rerun with the same --workdir skips the finished runs and resumes an interrupted one. On CPU the study sets up
`study.devices` fake devices (8: one expert per device, as the paper's one expert per GPU). Outputs in --workdir:
results.md, results.json, loss_vs_cf.png, rates_vs_cf.png (and one train.py workdir per run).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rectify_moe import log
from rectify_moe.config import cli, entry
from rectify_moe.study import config as study_config

config_flags.DEFINE_config_file("study", "configs/studies/paper.py", "A study config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The study's folder (resumable: rerun with the same one).")
flags.DEFINE_bool("plots", True, "Write the PNG plots.")
flags.mark_flags_as_required(["workdir"])


def set_device_count(devices: int) -> None:
  """`devices` fake CPU devices, before JAX starts its backends (no effect on GPU / TPU backends)."""
  if not devices:
    return
  import jax
  try:
    jax.config.update("jax_num_cpu_devices", devices)
  except RuntimeError:  # a backend already started (e.g. inside a test session): keep what it has
    pass


def main(argv, none_paths):
  logging.set_verbosity(logging.WARNING)  # Orbax logs at INFO
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    study = study_config.parse(cli.apply_none(flags.FLAGS.study, none_paths))
    study.validate()
    set_device_count(study.devices)
    from rectify_moe.study import report, runner  # JAX-heavy: after the device count is set
    results = runner.execute(study, flags.FLAGS.workdir)
  except (ValueError, FileNotFoundError) as e:
    log.error(log.one_line(e, 500))
    sys.exit(2)
  rows, paths = report.write(results, flags.FLAGS.workdir, plots=flags.FLAGS.plots)
  log.info("")
  log.info(report.markdown(results, rows))
  log.info(f"Wrote {', '.join(paths)}.")


if __name__ == "__main__":
  entry.run(main, root=study_config.StudyConfig, flag="study")
