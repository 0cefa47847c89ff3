"""Checkpoint integrity: a checksum saved with every checkpoint, and a resume that never starts from a bad one.

Every training checkpoint holds an item "integrity": per leaf of the train state, the uint32 sum of its bits (exact
and independent of the mesh, the sharding and the process count: integer addition does not depend on the order)
and whether it is finite. Before resuming, `restore_latest_good` checks the newest checkpoint: its files (each
item's `_METADATA` readable, the OCDBT manifest present), a restore into the run's state, finite values and the
checksum. A bad checkpoint is reported in one line and moved to `WORKDIR/checkpoints_rejected/<step>`, and the next
newest is tried; with none left the run refuses to start (it never silently starts over).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rectify_moe import checkpoints, distributed, log
from rectify_moe.checkpoints import INTEGRITY
from rectify_moe.workdir import Workdir

REJECTED = "checkpoints_rejected"
ARRAY_ITEMS = (checkpoints.MODEL, checkpoints.OPTIMIZER)


class CorruptCheckpointError(Exception):
  """A checkpoint that fails a check; one line saying which file or leaf."""


def _leaf_sum(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
  bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  return jnp.sum(bits, dtype=jnp.uint32)


def _leaf_finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.asarray(True)


def _sums_and_finite(arrays: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
  return [_leaf_sum(x) for x in arrays], [_leaf_finite(x) for x in arrays]


@functools.lru_cache(maxsize=8)
def _jitted(mesh: Optional[jax.sharding.Mesh]):
  """One compiled checksum function per mesh (a new jit per call would compile at every save)."""
  return jax.jit(_sums_and_finite, out_shardings=NamedSharding(mesh, P()) if mesh is not None else None)


def checksums(state: Any) -> dict[str, Any]:
  """{leaf path: {"sum": uint32 bit sum, "finite": bool}} of a `(model, optimizer)` NNX state (a collective in a
  multi-process run: every process calls it)."""
  leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
  paths = [jax.tree_util.keystr(p) for p, _ in leaves]
  arrays = [x for _, x in leaves]
  mesh = next((x.sharding.mesh for x in arrays if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
  sums, finite = _jitted(mesh)(arrays)
  host = lambda v: np.asarray(v.addressable_data(0)) if hasattr(v, "addressable_data") else np.asarray(v)
  return {p: {"sum": int(host(s)), "finite": bool(host(f))} for p, s, f in zip(paths, sums, finite)}


def check_files(step_dir: str) -> None:
  """The files Orbax needs to read a step (CorruptCheckpointError naming the first missing or broken one)."""
  for item in ARRAY_ITEMS:
    folder = os.path.join(step_dir, item)
    if not os.path.isdir(folder):
      raise CorruptCheckpointError(f"item folder {item}/ is missing")
    metadata = os.path.join(folder, "_METADATA")
    try:
      with open(metadata) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      raise CorruptCheckpointError(f"{item}/_METADATA is missing, empty or not JSON ({type(e).__name__})") from None
    if not os.path.isfile(os.path.join(folder, "manifest.ocdbt")):
      raise CorruptCheckpointError(f"{item}/manifest.ocdbt is missing")


def compare(found: dict[str, Any], saved: Optional[dict[str, Any]]) -> None:
  """Raises CorruptCheckpointError at the first non-finite leaf or checksum mismatch (`saved` None: no checksum)."""
  for path, value in found.items():
    if not value["finite"]:
      raise CorruptCheckpointError(f"leaf {path} holds NaN or inf")
  if saved is None:
    return
  for path, value in found.items():
    if path not in saved:
      raise CorruptCheckpointError(f"leaf {path} has no stored checksum")
    if int(saved[path]["sum"]) != value["sum"]:
      raise CorruptCheckpointError(f"leaf {path} does not match its stored checksum (the data file was altered)")


def reject(workdir: Workdir, step: int) -> str:
  """Moves checkpoint `step` to WORKDIR/checkpoints_rejected/<step> (a numbered suffix if taken); returns it."""
  folder = os.path.join(workdir.root, REJECTED)
  os.makedirs(folder, exist_ok=True)
  target = os.path.join(folder, str(step))
  n = 1
  while os.path.exists(target):
    target, n = os.path.join(folder, f"{step}.{n}"), n + 1
  shutil.move(workdir.checkpoint(step), target)
  return target


def reject_steps(checkpointer: Any, steps: list[int]) -> list[str]:
  """Moves `steps` aside (process 0; every process calls it) and refreshes the checkpointer's list of steps."""
  moved = []
  distributed.barrier("rectify_moe_reject_start")
  if jax.process_index() == 0:
    moved = [reject(checkpointer.workdir, s) for s in steps if os.path.isdir(checkpointer.workdir.checkpoint(s))]
  distributed.barrier("rectify_moe_reject_done")
  checkpointer.manager.reload()
  return moved


def verify_restore(checkpointer: Any, step: int, state: Any, state_shardings: Any) -> tuple[Any, dict]:
  """Restores `step` after checking its files, then checks finite values and the stored checksum."""
  step_dir = checkpointer.workdir.checkpoint(step)
  error = None
  try:
    check_files(step_dir)
    # A config that does not fit the checkpoint is the user's to fix, not a corrupt file: raise, move nothing.
    leaves, target = checkpointer.model_leaves(step), nnx.to_pure_dict(state)[0]
    checkpoints.check_shapes({k: shape for k, (shape, _) in leaves.items()}, target, step)
    checkpoints.check_dtypes(leaves, target, step)
    with checkpoints.quiet_orbax():
      restored, data_state = checkpointer.restore(step, state, state_shardings)
      jax.block_until_ready(restored)
  except CorruptCheckpointError as e:
    error = str(e)
  except checkpoints.ConfigMismatchError:
    raise
  except checkpoints.CheckpointError as e:
    error = str(e)
  except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt checkpoint
    error = f"cannot be restored ({type(e).__name__}: {log.one_line(str(e).split('See full')[0], 160)})"
  if distributed.any_process(error is not None):
    raise CorruptCheckpointError(error or "another process could not restore it")
  try:
    saved = checkpointer.restore_integrity(step)
  except Exception as e:  # noqa: BLE001
    raise CorruptCheckpointError(f"its {INTEGRITY} item cannot be read ({type(e).__name__})") from None
  compare(checksums(restored), saved)
  return restored, data_state


def restore_latest_good(checkpointer: Any, state: Any, state_shardings: Any
                        ) -> tuple[Optional[int], Any, dict]:
  """(step, state, data state) of the newest checkpoint that passes every check, bad ones moved aside.

  Returns (None, state, {}) when the workdir has no checkpoint.

  Raises:
    CorruptCheckpointError: there were checkpoints, and none passes.
  """
  checkpoints.drop_closed_loop_errors()
  steps = checkpointer.all_steps()
  rejected = []
  for step in reversed(steps):
    try:
      restored, data_state = verify_restore(checkpointer, step, state, state_shardings)
    except CorruptCheckpointError as e:
      log.warning(f"Checkpoint step {step} ({checkpointer.workdir.checkpoint(step)}) is bad: {e}; moving it to "
                  f"{os.path.join(checkpointer.workdir.root, REJECTED)}/.")
      reject_steps(checkpointer, [step])
      rejected.append(step)
      continue
    if rejected:
      log.warning(f"Resuming from step {step}, the newest good checkpoint (rejected: "
                  f"{', '.join(map(str, rejected))}).")
    return step, restored, data_state
  if rejected:
    raise CorruptCheckpointError(
        f"No good checkpoint in {checkpointer.directory}: every one failed its check (moved to "
        f"{os.path.join(checkpointer.workdir.root, REJECTED)}/); use a new --workdir to start over.")
  return None, state, {}
