"""Shared benchmark helpers: timing, machine description, result files, HLO parsing."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Dense bf16 peak FLOP/s per device kind, for MFU (published vendor numbers, no sparsity).
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def machine() -> dict[str, Any]:
  """Where and with what a benchmark ran."""
  device = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": device.device_kind, "device_count": jax.device_count(),
          "jax": jax.__version__, "python": platform.python_version(), "host": platform.machine(),
          "cpu_count": os.cpu_count(), "date": datetime.date.today().isoformat()}


def default_inner() -> int:
  """Back-to-back calls per timed sample: 5 on GPU (hides the host's dispatch), 1 on CPU (host and device
  are the same cores)."""
  return 5 if jax.default_backend() == "gpu" else 1


def time_fn(fn: Callable[[], Any], *, warmup: int, repeats: int, inner: int = 1) -> dict[str, float]:
  """Median / min / max seconds per call of `fn()` after `warmup` untimed calls.

  Each of the `repeats` samples times `inner` calls issued back to back and then synchronised with the
  device, divided by `inner`: with inner > 1 the host's dispatch of a call overlaps the device's work on
  the previous one, as in a training loop, instead of being added to every sample.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    results = [fn() for _ in range(inner)]
    jax.block_until_ready(results)
    times.append((time.perf_counter() - start) / inner)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats,
          "inner": inner}


def peak_memory_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return "" if v is None else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_results(name: str, rows: list[dict[str, Any]], columns: Sequence[str], notes: str,
                  out_dir: str | None = None) -> tuple[str, str]:
  """Writes `<out_dir>/<name>.json` and `.md` (machine, notes, table). Returns both paths."""
  out_dir = out_dir or RESULTS_DIR
  os.makedirs(out_dir, exist_ok=True)
  info = machine()
  json_path, md_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
  with open(json_path, "w") as f:
    json.dump({"machine": info, "notes": notes, "rows": rows}, f, indent=2, default=float)
  header = (f"# {name}\n\nMachine: {info['backend']} / {info['device_kind']} x{info['device_count']}, "
            f"jax {info['jax']}, Python {info['python']}, {info['date']}.\n\n{notes}\n\n")
  with open(md_path, "w") as f:
    f.write(header + markdown_table(rows, columns) + "\n")
  return json_path, md_path


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s8": 1, "u8": 1, "pred": 1, "s64": 8}
_ARRAY = re.compile(r"\b(f32|bf16|f16|s32|u32|f64|s8|u8|pred|s64)\[([0-9,]*)\]")


def _array_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(text):
    total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def collectives(hlo_text: str) -> dict[str, list[int]]:
  """Per collective kind, the result bytes of each op in a compiled HLO module (one device's view).

  An all-to-all's result holds what the device receives (its tuple form lists one chunk per peer), which
  equals what it sends: the payload of that all-to-all.
  """
  kinds = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")
  found: dict[str, list[int]] = {k: [] for k in kinds}
  for line in hlo_text.splitlines():
    line = line.strip()
    for kind in kinds:
      match = re.match(rf"^(?:ROOT )?%[\w.-]+ = (.*?) {kind}(?:-start)?\(", line)
      if match:
        found[kind].append(_array_bytes(match.group(1)))
  return found
