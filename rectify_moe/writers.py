"""What a training run writes besides checkpoints: `metrics.jsonl`, TensorBoard events and per-step expert loads.

Only process 0 writes (every process holds the same global metrics). tensorboardX writes the event files (clu's
writers need TensorFlow).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from rectify_moe.workdir import Workdir


class MetricsWriter:
  """`metrics.jsonl` (one JSON object per logged step / eval), TensorBoard events, expert-load traces."""

  def __init__(self, workdir: Workdir, *, write_loads: bool):
    from tensorboardX import SummaryWriter  # local import: heavy
    self.is_main = jax.process_index() == 0
    self.tb = self.jsonl = self.loads = None
    if self.is_main:
      os.makedirs(workdir.loads_dir, exist_ok=True)
      self.tb = SummaryWriter(workdir.tensorboard)
      self.jsonl = open(workdir.metrics_jsonl, "a")
      self.loads = open(workdir.loads_jsonl, "a") if write_loads else None

  def scalars(self, step: int, kind: str, values: dict[str, Any]) -> None:
    """One metrics.jsonl row and TensorBoard scalars `kind/name` of the scalar entries of `values`."""
    if not self.is_main:
      return
    flat = {k: float(v) for k, v in values.items() if not isinstance(v, (dict, list)) and np.ndim(v) == 0}
    self.jsonl.write(json.dumps({"step": step, "kind": kind, **flat}) + "\n")
    for k, v in flat.items():
      self.tb.add_scalar(f"{kind}/{k}", v, step)

  def loads_trace(self, step: int, demand: np.ndarray, accepted: np.ndarray) -> None:
    """One line per step: demand (before capacity) and accepted load, [num_moe_layers, E] each."""
    if self.loads is not None:
      self.loads.write(json.dumps({"step": step, "demand": np.asarray(demand).tolist(),
                                   "accepted": np.asarray(accepted).tolist()}) + "\n")

  def flush(self) -> None:
    for f in (self.jsonl, self.tb, self.loads):
      if f is not None:
        f.flush()

  def close(self) -> None:
    self.flush()
    for f in (self.jsonl, self.tb, self.loads):
      if f is not None:
        f.close()
