"""Checkpoints: save, restore, and restore the model only, in `workdir/checkpoints/<step>/` (see `workdir.py`).

Each step holds three named Orbax items:
- "model": the pure dict of the model's NNX state (parameters and router state, e.g. a hash table or expert bias);
- "optimizer": the pure dict of the optimizer's state (AdamW moments, step counter, transforms' state);
- "data": JSON, the data iterator position (and the step);
- "integrity": JSON, per leaf a checksum and whether it is finite (`integrity.py`; checked before a resume).
Training restores all three into the shardings of its mesh; evaluation restores "model" alone onto any mesh whose
expert axis divides E, after checking every parameter's shape. A step that cannot be read raises
`CheckpointError` with one line.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rectify_moe import log
from rectify_moe.workdir import Workdir

MODEL, OPTIMIZER, DATA, INTEGRITY = "model", "optimizer", "data", "integrity"


class CheckpointError(Exception):
  """A checkpoint that is missing, does not match the model, or cannot be read; one line with the fix."""


class ConfigMismatchError(CheckpointError):
  """The config's parameters do not fit a checkpoint (names, shapes or dtypes): the user's to fix, the checkpoint is
  fine."""


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Orbax logs warnings (read-only manager, unregistered items) that are noise for users."""
  from absl import logging
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def drop_closed_loop_errors() -> None:
  """Hides tracebacks that TensorStore callbacks print after a failed (corrupt) restore.

  When Orbax gives up on a checkpoint, TensorStore still completes the other reads it started and calls back
  into an asyncio loop that is already closed; each callback reports "RuntimeError: Event loop is closed" as
  an unraisable exception (a bare traceback on stderr). They add nothing to the one-line error we report.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_rectify_moe_filter", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._rectify_moe_filter = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def _target(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with the given shardings: the restore target of a pure dict."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_target(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """The restore target of an abstract NNX state (from `nnx.eval_shape`) on `mesh`: each leaf keeps its spec."""
  def leaf(x):
    spec = x.sharding.spec if isinstance(getattr(x, "sharding", None), NamedSharding) else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  return jax.tree.map(leaf, nnx.to_pure_dict(abstract_state))


class Checkpointer:
  """The Orbax CheckpointManager of a workdir (read-only for evaluation)."""

  def __init__(self, workdir: str | Workdir, *, keep: Optional[int] = None, read_only: bool = False):
    self.workdir = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    self.directory = self.workdir.checkpoints
    handlers = {MODEL: ocp.StandardCheckpointHandler(), OPTIMIZER: ocp.StandardCheckpointHandler(),
                DATA: ocp.JsonCheckpointHandler(), INTEGRITY: ocp.JsonCheckpointHandler()}
    with quiet_orbax():  # the options of a read-only manager log warnings when they are made
      options = (ocp.CheckpointManagerOptions(read_only=True) if read_only
                 else ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
      self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: Optional[dict] = None,
           integrity: Optional[dict] = None) -> None:
    """Saves a `(model, optimizer)` NNX train state and the data position at `step` (and `integrity.checksums`)."""
    pure = nnx.to_pure_dict(state)
    items = {MODEL: ocp.args.StandardSave(pure[0]), OPTIMIZER: ocp.args.StandardSave(pure[1]),
             DATA: ocp.args.JsonSave(data_state or {})}
    if integrity is not None:
      items[INTEGRITY] = ocp.args.JsonSave(integrity)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_integrity(self, step: int) -> Optional[dict]:
    """The "integrity" item of `step` (None when the step has none: written before checksums existed)."""
    if not os.path.isdir(os.path.join(self.workdir.checkpoint(step), INTEGRITY)):
      return None
    with quiet_orbax():
      restored = self.manager.restore(step, args=ocp.args.Composite(**{INTEGRITY: ocp.args.JsonRestore()}))
    return dict(restored[INTEGRITY] or {})

  def restore(self, step: int, state: Any, state_shardings: Any) -> tuple[Any, dict]:
    """Restores `step` into the structure and shardings of a `(model, optimizer)` state; returns (state, data)."""
    pure, shardings = nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        MODEL: ocp.args.StandardRestore(_target(pure[0], shardings[0])),
        OPTIMIZER: ocp.args.StandardRestore(_target(pure[1], shardings[1])), DATA: ocp.args.JsonRestore()}))
    new_state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(new_state, {0: restored[MODEL], 1: restored[OPTIMIZER]})
    return new_state, dict(restored[DATA] or {})

  def select_step(self, step: Optional[int] = None) -> int:
    """The latest step, or `step` if it exists (else CheckpointError listing the steps that do)."""
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"No checkpoint in {self.directory!r}; train first: python train.py "
                            f"--workdir={self.workdir.root}")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise CheckpointError(f"Step {step} has no checkpoint in {self.directory!r}; available steps: "
                            f"{', '.join(map(str, steps))}.")
    return int(step)

  def model_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{'blocks/1/ffn/w_up': shape} of the model saved at `step` (CheckpointError if unreadable)."""
    return {k: shape for k, (shape, _) in self.model_leaves(step).items()}

  def model_leaves(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{'blocks/1/ffn/w_up': (shape, dtype name)} of the model saved at `step` (CheckpointError if unreadable)."""
    where = self.workdir.checkpoint(step)
    try:
      with quiet_orbax():
        metadata = self.manager.item_metadata(step)
      saved = metadata[MODEL] if metadata is not None and MODEL in metadata else None
    except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt checkpoint for the user
      raise CheckpointError(f"Checkpoint {where} is corrupt or incomplete (cannot read its metadata: "
                            f"{type(e).__name__}: {log.one_line(e)}). Pick another step with --step.") from None
    if not saved:
      raise CheckpointError(f"Checkpoint {where} is corrupt or incomplete: no item {MODEL!r} in it (or an older "
                            "rectify-moe wrote it). Pick another step with --step.")
    return {k: (tuple(getattr(v, "shape", ())), str(getattr(v, "dtype", ""))) for k, v in flatten(dict(saved)).items()}

  def restore_model(self, step: int, target: Any) -> Any:
    """The "model" item of `step` restored into `target` (ShapeDtypeStructs with shardings, `abstract_target`),
    after checking that every parameter exists with the same shape."""
    check_shapes(self.model_shapes(step), target, step)
    where = self.workdir.checkpoint(step)
    try:
      with quiet_orbax():
        restored = self.manager.restore(step, args=ocp.args.Composite(**{MODEL: ocp.args.StandardRestore(target)}))
      params = restored[MODEL]
      jax.block_until_ready(params)
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"Checkpoint {where} is corrupt or incomplete (restore failed: {type(e).__name__}: "
                            f"{log.one_line(e)}). Pick another step with --step.") from None
    return params

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'blocks/1/ffn/w_up': leaf} of nested mappings (keys as strings)."""
  out = {}
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
  else:
    out[prefix] = tree
  return out


def check_dtypes(saved: Mapping[str, tuple[tuple[int, ...], str]], target: Mapping, step: int) -> None:
  """Raises ConfigMismatchError at the first parameter stored in another dtype than the config's (model.param_dtype)."""
  for name, leaf in flatten(target).items():
    stored = saved.get(name, ((), ""))[1]
    if stored and stored != str(leaf.dtype):
      raise ConfigMismatchError(f"The config does not match checkpoint step {step}: parameter {name} is {stored} "
                                f"in the checkpoint but {leaf.dtype} from the config; resume with the "
                                "model.param_dtype the checkpoints were written with, or use a new --workdir.")


def check_shapes(saved: Mapping[str, tuple[int, ...]], target: Mapping, step: int) -> None:
  """Raises ConfigMismatchError at the first parameter that is missing or has another shape in the checkpoint."""
  wanted = {k: tuple(v.shape) for k, v in flatten(target).items()}
  for name, shape in wanted.items():
    if name not in saved:
      raise ConfigMismatchError(f"The config does not match checkpoint step {step}: parameter {name} {shape} is not in "
                              "the checkpoint (check model.tie_embeddings / num_layers / moe_every / moe.activation / "
                              "moe.router).")
    if saved[name] != shape:
      raise ConfigMismatchError(f"The config does not match checkpoint step {step}: parameter {name} has shape "
                              f"{saved[name]} in the checkpoint but {shape} from the config.")
  extra = sorted(set(saved) - set(wanted))
  if extra:
    raise ConfigMismatchError(f"The config does not match checkpoint step {step}: the checkpoint has parameter "
                          f"{extra[0]} {saved[extra[0]]}, which the config's model lacks.")


def exists(workdir: str | Workdir) -> bool:
  """True when the workdir has a checkpoints/ folder."""
  workdir = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
  return os.path.isdir(workdir.checkpoints)
