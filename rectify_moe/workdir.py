"""The layout of a run's workdir: every path a run writes or reads, named once.

  WORKDIR/
    config.json                 the run's full config (the mesh resolved), written by process 0
    checkpoints/<step>/         Orbax checkpoints: items "model", "optimizer", "data", "integrity"
    checkpoints_rejected/       checkpoints that failed the integrity check or followed a divergence (integrity.py)
    train.lock                  the training process that holds the workdir (workdir_lock.py)
    metrics.jsonl               one JSON object per logged train step / evaluation
    tensorboard/                TensorBoard event files
    loads/loads.jsonl           per-step expert demand and accepted load, [num_moe_layers, E] each
    eval/<step>/                eval.py results: results.json, results.md, PNG plots
    load_prediction/            `python -m rectify_moe.load_prediction` report
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Workdir:
  """Paths of one run folder (nothing is created here)."""
  root: str

  def __post_init__(self):
    object.__setattr__(self, "root", os.path.abspath(os.path.expanduser(self.root)))

  @property
  def config_json(self) -> str:
    return os.path.join(self.root, "config.json")

  @property
  def checkpoints(self) -> str:
    return os.path.join(self.root, "checkpoints")

  def checkpoint(self, step: int) -> str:
    return os.path.join(self.checkpoints, str(step))

  @property
  def metrics_jsonl(self) -> str:
    return os.path.join(self.root, "metrics.jsonl")

  @property
  def tensorboard(self) -> str:
    return os.path.join(self.root, "tensorboard")

  @property
  def loads_dir(self) -> str:
    return os.path.join(self.root, "loads")

  @property
  def loads_jsonl(self) -> str:
    return os.path.join(self.loads_dir, "loads.jsonl")

  def eval_dir(self, step: int) -> str:
    return os.path.join(self.root, "eval", str(step))

  @property
  def load_prediction_dir(self) -> str:
    return os.path.join(self.root, "load_prediction")
