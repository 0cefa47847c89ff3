"""Reading a run's per-step expert loads (`WORKDIR/loads/loads.jsonl`) and its config.json."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import numpy as np

from rectify_moe.load_prediction.statistics import load_proportions
from rectify_moe.workdir import Workdir

KINDS = ("demand", "accepted")


@dataclasses.dataclass(frozen=True)
class LoadTrace:
  """Per-step expert loads of one run.

  Attributes:
    steps: int64 [T], strictly increasing training steps (after de-duplication).
    loads: float64 [T, num_moe_layers, num_experts], token counts (`demand` or `accepted`).
    kind: which field was read.
    path: the loads.jsonl file.
    duplicates: lines replaced by a later line with the same step (a resumed run re-writes steps).
    skipped_lines: unreadable lines skipped (only a truncated last line is skipped; anything else raises).
  """
  steps: np.ndarray
  loads: np.ndarray
  kind: str = "demand"
  path: str = ""
  duplicates: int = 0
  skipped_lines: int = 0

  @property
  def num_steps(self) -> int:
    return int(self.loads.shape[0])

  @property
  def num_layers(self) -> int:
    return int(self.loads.shape[1])

  @property
  def num_experts(self) -> int:
    return int(self.loads.shape[2])

  def proportions(self) -> np.ndarray:
    return load_proportions(self.loads)


def trace_path(workdir: str) -> str:
  return Workdir(workdir).loads_jsonl


def read_traces(workdir: str, kind: str = "demand") -> LoadTrace:
  """Reads `workdir/loads/loads.jsonl` into a `LoadTrace`.

  One JSON object per line: {"step": int, "demand": [[E floats] per MoE layer], "accepted": [...]}.
  When a step appears more than once (a resumed run re-writes the steps after its last checkpoint) the LAST
  line wins; the result is sorted by step. A truncated final line (a run killed mid-write) is skipped with a
  warning; any other unreadable line raises.

  Raises:
    FileNotFoundError: the run folder or the trace file is missing (the message names the path).
    ValueError: unknown kind, empty file, bad line, missing field, or inconsistent shapes.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
  run = Workdir(workdir)
  if not os.path.isdir(run.root):
    raise FileNotFoundError(f"Run folder {workdir!r} does not exist.")
  path = run.loads_jsonl
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No load trace at {path!r}. Training writes it (one line per step) when train.write_loads=True "
        f"(the default); rerun training with --config.train.write_loads=True.")
  with open(path) as f:
    lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
  if not lines:
    raise ValueError(f"Load trace {path!r} is empty: no step was traced yet (did training reach step 1 "
                     f"with train.write_loads=True?).")
  by_step: dict[int, np.ndarray] = {}
  shape = None
  duplicates = skipped = 0
  for n, (lineno, line) in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if n == len(lines) - 1 and len(lines) > 1:
        warnings.warn(f"{path}, line {lineno}: skipping a truncated last line ({e}).")
        skipped += 1
        continue
      raise ValueError(f"{path}, line {lineno}: not valid JSON ({e}).") from None
    if not isinstance(record, dict) or "step" not in record or kind not in record:
      raise ValueError(f"{path}, line {lineno}: expected an object with 'step' and {kind!r}; got keys "
                       f"{sorted(record) if isinstance(record, dict) else type(record).__name__}.")
    try:
      value = np.asarray(record[kind], dtype=np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"{path}, line {lineno}: {kind!r} is not a rectangular [layers][experts] list.") from None
    if value.ndim != 2 or value.shape[0] < 1 or value.shape[1] < 1:
      raise ValueError(f"{path}, line {lineno}: {kind!r} must be [num_moe_layers][num_experts]; got shape "
                       f"{value.shape}.")
    if shape is None:
      shape = value.shape
    elif value.shape != shape:
      raise ValueError(f"{path}, line {lineno}: {kind!r} has shape {value.shape} (layers, experts) but "
                       f"earlier lines have {shape}: traces of different models are mixed in one file.")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{path}, line {lineno}: {kind!r} contains non-finite values.")
    step = int(record["step"])
    if step in by_step:
      duplicates += 1
    by_step[step] = value  # the last line wins
  if not by_step:
    raise ValueError(f"Load trace {path!r} has no readable step.")
  steps = np.asarray(sorted(by_step), dtype=np.int64)
  loads = np.stack([by_step[int(s)] for s in steps])
  return LoadTrace(steps=steps, loads=loads, kind=kind, path=path, duplicates=duplicates, skipped_lines=skipped)


def read_run_config(workdir: str) -> dict[str, Any]:
  """The run's config.json as a dict ({} when missing or unreadable)."""
  try:
    with open(Workdir(workdir).config_json) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}
