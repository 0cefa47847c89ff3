"""Checkpoint evaluation, the job behind `eval.py`: held-out loss, routing statistics per MoE layer, router swaps.

`evaluate_checkpoint(config, workdir, ...)`:
  1. find the step (latest or given), check that the config matches the run that wrote it (architecture fields,
     then every parameter shape in the checkpoint);
  2. restore only the model item of the checkpoint, straight into the shardings of a mesh of *this* machine (it may
     differ from the training mesh);
  3. evaluate the held-out split (the training loop's eval batches, `evaluator.Evaluator`) under the checkpoint's
     own router and under every requested swap / evaluation capacity factor (`swaps.py`). A swap changes only
     routing fields (the parameters are the same), so one restored state serves every router;
  4. write `results.json`, `results.md` and PNG plots (`report.py`) to `workdir/eval/<step>/`.

Errors a user can fix raise `EvalError` (or `CheckpointError`) with a one-line message; `run_main` prints it and
returns non-zero.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import ml_collections
from flax import nnx

from rectify_moe import checkpoints, distributed, sharding
from rectify_moe import dropless as dropless_lib
from rectify_moe import log as log_lib
from rectify_moe.log import one_line
from rectify_moe import data as data_lib
from rectify_moe import model as model_lib
from rectify_moe import moe as moe_lib
from rectify_moe.config import fields, saved, schema
from rectify_moe.evaluation import report
from rectify_moe.evaluation.evaluator import Evaluator
from rectify_moe.hf import config as hf_config
from rectify_moe.hf import weights as hf_weights
from rectify_moe.evaluation.swaps import ROUTING_FIELDS, EvalError, eval_capacity_factor, \
    router_specs
from rectify_moe.workdir import Workdir

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------
# Configs and mesh.
# ---------------------------------------------------------------------------------------------------------
def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The full config a training run wrote to `workdir/config.json`, as a ConfigDict."""
  path = Workdir(workdir).config_json
  if not os.path.isfile(path):
    raise EvalError(f"No config.json in workdir {workdir!r} (written by train.py); pass the run's config "
                    "with --config=<file>.")
  try:
    with open(path) as f:
      values = json.load(f)
  except (OSError, ValueError) as e:
    raise EvalError(f"Cannot read {path}: {one_line(e)}") from None
  return ml_collections.ConfigDict(values)


def check_architecture(config: schema.RunConfig, run_config: schema.RunConfig,
                       run_config_path: str = "config.json") -> None:
  """Raises EvalError naming the first architecture field where `config` and the run's config differ."""
  given, trained = saved.architecture_fields(config, True), saved.architecture_fields(run_config, True)
  name = saved.first_difference(given, trained)
  if name is not None:
    raise EvalError(f"--config does not match the checkpoint: {name}={given[name]!r} in --config but "
                    f"{trained[name]!r} in the run that wrote it ({run_config_path}). Fix {name} or "
                    "omit --config to use the run's own config.")


def _parse(config: Any) -> schema.RunConfig:
  try:
    cfg, _ = schema.resolve(config)
    cfg.model.validate()
    if cfg.model.num_moe_layers:
      cfg.moe.validate()
    data_lib.validate_data_config(cfg.data)
  except ValueError as e:
    raise EvalError(one_line(e)) from None
  return cfg


def resolve_eval_mesh(cfg: schema.RunConfig, mesh_shape: Optional[Sequence[int]] = None,
                      num_devices: Optional[int] = None, log_fn: Log = log_lib.info) -> tuple[int, int]:
  """The (data, expert) mesh to evaluate on.

  `mesh_shape` if given (-1 = remaining devices); else the run's mesh if it fits this machine and the eval
  batch; else (devices / e, e) with e = gcd(num_experts, devices).

  Raises:
    EvalError: the mesh does not fit the devices, the experts or the eval batch.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  moe_cfg = cfg.moe if cfg.model.num_moe_layers else None

  def check(shape):
    data, expert = sharding.resolve_mesh_shape(int(shape[0]), int(shape[1]), num_devices)
    used = data * expert
    batch = cfg.train.eval_batch_size
    if moe_cfg is not None:
      sharding.validate_moe_layout(num_experts=moe_cfg.num_experts, expert_axis=expert, global_batch=batch,
                                   seq_len=cfg.train.seq_len, group_size=moe_cfg.group_size, num_devices=used)
    elif batch % used:
      raise ValueError(f"eval_batch_size={batch} is not divisible by the {used} devices of the mesh.")
    return data, expert

  if mesh_shape is not None:
    try:
      return check(mesh_shape)
    except ValueError as e:
      raise EvalError(f"Mesh {tuple(mesh_shape)}: {one_line(e)}") from None
  try:
    return check((cfg.mesh.data, cfg.mesh.expert))
  except ValueError as e:
    run_error = one_line(e)
  experts = moe_cfg.num_experts if moe_cfg is not None else 1
  expert = math.gcd(experts, num_devices)
  fallback = (num_devices // expert, expert)
  try:
    shape = check(fallback)
  except ValueError as e:
    raise EvalError(f"The run's mesh ({cfg.mesh.data}, {cfg.mesh.expert}) does not fit here ({run_error}) "
                    f"and neither does {fallback}: {one_line(e)} Pass --mesh=data,expert and/or "
                    "--eval_batch_size.") from None
  log_fn(f"note: the run's mesh ({cfg.mesh.data}, {cfg.mesh.expert}) does not fit this machine "
         f"({num_devices} {jax.default_backend()} device(s)); evaluating on mesh {shape}.")
  return shape


# ---------------------------------------------------------------------------------------------------------
# Restore.
# ---------------------------------------------------------------------------------------------------------
def restore_model(workdir: str, cfg: Any, mesh: jax.sharding.Mesh, step: Optional[int] = None):
  """Restores the model of a training checkpoint onto `mesh` (any mesh whose expert axis divides E).

  Returns:
    (step, graphdef, state): the restored step and `nnx.split(model)` with concrete arrays.

  Raises:
    EvalError: no workdir / checkpoint, unknown step, parameter mismatch, corrupt checkpoint.
  """
  checkpoints.drop_closed_loop_errors()
  if not os.path.isdir(workdir):
    raise EvalError(f"Workdir {workdir!r} does not exist; pass the --workdir of a training run.")
  if not checkpoints.exists(workdir):
    raise EvalError(f"No checkpoint in {workdir!r} (no checkpoints/ folder); train first: "
                    f"python train.py --workdir={workdir}")
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.select_step(step)
    graphdef, abstract = model_lib.abstract_model(cfg, mesh)
    params = ckpt.restore_model(step, checkpoints.abstract_target(abstract, mesh))
  except checkpoints.CheckpointError as e:
    raise EvalError(str(e)) from None
  finally:
    ckpt.close()
  nnx.replace_by_pure_dict(abstract, params)
  return step, graphdef, abstract


def import_model(cfg: schema.RunConfig, mesh: jax.sharding.Mesh):
  """(0, graphdef, state) of the dense model of `cfg.init_from=hf:DIR`, read straight onto `mesh`."""
  directory = hf_config.hf_dir(cfg.init_from)
  graphdef, abstract = model_lib.abstract_model(cfg, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, nnx.to_pure_dict(abstract))
  try:
    params = hf_weights.load(directory, cfg.model, mesh, shardings=shardings)
  except fields.ConfigError as e:
    raise EvalError(str(e)) from None
  nnx.replace_by_pure_dict(abstract, params)
  return 0, graphdef, abstract


def _import_config(config: Optional[Any], init_from: str) -> schema.RunConfig:
  """The dense config of evaluating `init_from=hf:DIR` (the given config's data and eval settings, or defaults)."""
  if hf_config.hf_dir(init_from) is None:
    raise EvalError(f"--init_from={init_from!r}: give hf:DIR, a local Hugging Face folder (a train.py run is "
                    "--workdir).")
  base = schema.parse(config if config is not None else schema.default_config())
  base = dataclasses.replace(base, init_from=init_from, model=dataclasses.replace(base.model, moe_every=0))
  try:
    hf_config.model_fields(hf_config.read(hf_config.hf_dir(init_from)))
  except fields.ConfigError as e:
    raise EvalError(str(e)) from None
  return _parse(base)


# ---------------------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------------------
def evaluate_checkpoint(config: Optional[Any], workdir: str, *, step: Optional[int] = None,
                        swaps: Sequence[str] = (), eval_capacity_factors: Sequence[float] = (),
                        mesh_shape: Optional[Sequence[int]] = None, eval_batches: Optional[int] = None,
                        eval_batch_size: Optional[int] = None, output_dir: Optional[str] = None,
                        write: bool = True, plots: bool = True, dropless_reference: bool = False,
                        log: Log = log_lib.info, init_from: Optional[str] = None,
                        overwrite: bool = False) -> dict[str, Any]:
  """Evaluates one checkpoint under its own router and every swap; writes results (see module doc).

  Args:
    config: the config to use (ConfigDict, mapping or RunConfig); None = the run's own `workdir/config.json`. A
      given config must match the run's architecture (EvalError otherwise); its data / eval settings / routing
      fields are used as given.
    workdir: the training run's workdir.
    step: checkpoint step (None = latest).
    swaps: router swap specs (see `swaps.parse_swap`, `swaps.router_specs`).
    eval_capacity_factors: evaluate every router also at each of these capacity factors.
    mesh_shape: (data, expert) of the evaluation mesh; None = the run's mesh if it fits, else a fitting one.
    eval_batches: held-out batches (None = train.eval_batches, as the training loop's eval; 0 = the whole split).
    eval_batch_size: rows per eval batch (None = train.eval_batch_size).
    output_dir: where to write (None = workdir/eval/<step>).
    write: write results.json, results.md and plots.
    plots: write the PNG plots.
    dropless_reference: evaluate every router row also dropless (`dropless.reference_config`) on the same batches:
      the row's "dropless_loss" and "dropless_loss_gap" (loss - dropless loss), and per MoE layer "dropless_rel_l2",
      the relative L2 distance of the layer's output to the dropless output of the same input.
    log: progress sink.
    init_from: 'hf:DIR' evaluates the dense model of a Hugging Face folder instead of a checkpoint (`workdir` may
      be None; results go to output_dir, else workdir/eval/0, else are only logged).
    overwrite: replace the results of an earlier evaluation in the output folder (else EvalError).

  Returns:
    The results dict that is written to results.json (`routers`: one entry per row, in order).
  """
  run_cfg = None
  if init_from:
    cfg = _import_config(config, init_from)
    paths = Workdir(workdir or hf_config.hf_dir(init_from))
    if write and not (output_dir or workdir):
      log("note: no --output_dir or --workdir, so the results are printed and not written.")
      write = False
  elif not os.path.isdir(workdir or ""):
    raise EvalError(f"Workdir {workdir!r} does not exist; pass the --workdir of a training run.")
  elif config is None:
    paths = Workdir(workdir)
    cfg = run_cfg = _parse(load_run_config(workdir))
  else:
    paths = Workdir(workdir)
    cfg = _parse(config)
    if os.path.isfile(paths.config_json):
      run_cfg = _parse(load_run_config(workdir))
      check_architecture(cfg, run_cfg, paths.config_json)
  for name, value, least in (("eval_batches", eval_batches, 0), ("eval_batch_size", eval_batch_size, 1)):
    if value is not None and value < least:
      raise EvalError(f"--{name}={value} must be >= {least}" + (" (0 = the whole held-out split)." if least == 0
                                                                 else "."))
  whole_split = eval_batches == 0
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(
      cfg.train, eval_batches=int(eval_batches or cfg.train.eval_batches),
      eval_batch_size=int(eval_batch_size or cfg.train.eval_batch_size)))
  base_moe = cfg.moe if cfg.model.num_moe_layers else None
  config_overrides = {}
  if base_moe is not None and run_cfg is not None and run_cfg is not cfg:
    # The "checkpoint" row is the checkpoint's own router; routing that --config changes is a swap row.
    config_overrides = {k: getattr(base_moe, k) for k in ROUTING_FIELDS
                        if getattr(base_moe, k) != getattr(run_cfg.moe, k)}
    if config_overrides:
      base_moe = dataclasses.replace(base_moe, **{k: getattr(run_cfg.moe, k) for k in config_overrides})
      cfg = dataclasses.replace(cfg, moe=base_moe)
  routers = router_specs(base_moe, swaps, eval_capacity_factors, config_overrides)

  distributed.maybe_initialize(cfg)
  mesh_dims = resolve_eval_mesh(cfg, mesh_shape, log_fn=log)
  mesh = sharding.make_mesh(*mesh_dims)
  if init_from:
    step, graphdef, state = import_model(cfg, mesh)
  else:
    step, graphdef, state = restore_model(workdir, cfg, mesh, step)
  out = output_dir or paths.eval_dir(step)
  if write and not overwrite and os.path.isfile(os.path.join(out, "results.json")):
    raise EvalError(f"{os.path.join(os.path.abspath(out), 'results.json')} holds an earlier evaluation; pass "
                    "--overwrite to replace it, or --output_dir=<another folder>.")
  mesh_source = run_cfg if run_cfg is not None else cfg
  train_mesh = (mesh_source.mesh.data, mesh_source.mesh.expert)
  log(f"Restored step {step} from {cfg.init_from if init_from else paths.checkpoints} onto mesh {dict(mesh.shape)} "
      f"({jax.device_count()} {jax.default_backend()} device(s); trained on mesh {train_mesh}).")
  uses_ir = base_moe is not None and any(r.moe.ir_mode for r in routers)
  if uses_ir and train_mesh[1] > 0 and mesh_dims[1] != train_mesh[1]:
    log(f"note: IR uses the experts local to each device; the expert axis is {mesh_dims[1]} here and "
        f"{train_mesh[1]} in training, so IR rows differ from an evaluation on the training mesh.")

  process_count = jax.process_count()
  try:
    batches = data_lib.make_eval_batches(
        cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.eval_batch_size // process_count,
        max_batches=None if whole_split else cfg.train.eval_batches, process_index=jax.process_index(),
        process_count=process_count)
  except (ValueError, FileNotFoundError) as e:
    raise EvalError(one_line(e)) from None
  moe_layers = cfg.model.moe_layer_indices
  state_shardings = jax.tree.map(lambda x: x.sharding, state)

  rows: list[dict[str, Any]] = []
  done: dict[Any, dict[str, Any]] = {}

  def evaluate(moe_cfg, label, *, reference=False):
    key = (moe_cfg, reference)
    if key in done:
      log(f"[eval] {label}: same router as an earlier row, reusing its results")
      return done[key]
    router_graphdef = graphdef if moe_cfg == base_moe else model_lib.abstract_model(cfg, mesh, moe_cfg)[0]
    if reference:
      router_graphdef = with_dropless_reference(router_graphdef, state)
    evaluator = Evaluator(router_graphdef, state_shardings, mesh)
    progress = lambda i, n, t: log(f"[eval] {label}: batch {i}/{n}  ({t:.1f}s)")
    done[key] = evaluator(state, batches, moe_layer_indices=moe_layers,
                          capacity=moe_cfg.capacity(False) if moe_cfg is not None else None, progress=progress)
    return done[key]

  for index, router in enumerate(routers, start=1):
    label = f"router {index}/{len(routers)} {router.label}"
    reference = dropless_reference and router.moe is not None
    result = dict(evaluate(router.moe, label, reference=reference))
    if reference:
      ref_cfg = dropless_lib.reference_config(router.moe)
      ref = evaluate(ref_cfg, f"{label} (dropless reference {moe_lib.describe(ref_cfg)})")
      result.update(dropless_loss=ref["loss"], dropless_loss_gap=result["loss"] - ref["loss"],
                    dropless_router=moe_lib.describe(ref_cfg))
    rows.append({
        "name": router.label,
        "router": moe_lib.describe(router.moe) if router.moe is not None else "dense",
        "swap": dict(router.overrides),
        "eval_capacity_factor": eval_capacity_factor(router.moe) if router.moe is not None else None,
        "moe": ({k: getattr(router.moe, k) for k in ROUTING_FIELDS} if router.moe is not None else {}),
        **result,
    })

  results = {
      "workdir": paths.root,
      "step": step,
      "created": time.strftime("%Y-%m-%d %H:%M:%S"),
      "mesh": {"data": mesh_dims[0], "expert": mesh_dims[1]},
      "train_mesh": {"data": train_mesh[0], "expert": train_mesh[1]},
      "devices": f"{jax.device_count()} {jax.default_backend()}",
      "eval_batches": len(batches),
      "eval_batch_size": int(cfg.train.eval_batch_size),
      "seq_len": int(cfg.train.seq_len),
      "moe_layers": moe_layers,
      "model": fields.as_dict(cfg.model),
      "checkpoint_moe": fields.as_dict(base_moe) if base_moe is not None else None,
      "dropless_reference": bool(dropless_reference),
      "routers": rows,
  }
  table = report.comparison_table(results)
  log("")
  log(table)
  if write and jax.process_index() == 0:
    written = report.write_outputs(results, out, plots=plots)
    results["outputs"] = written
    log(f"Wrote {', '.join(os.path.basename(p) for p in written)} to {os.path.abspath(out)}.")
  return results


def with_dropless_reference(graphdef: Any, state: Any) -> Any:
  """The graphdef of the same model whose MoE blocks also compute their dropless output and its distance
  (`moe.dropless_distance`)."""
  model = nnx.merge(graphdef, state)
  for block in model.moe_blocks():
    block.dropless_reference = True
  return nnx.graphdef(model)


def log_line(error: BaseException) -> str:
  return one_line(error)


# ---------------------------------------------------------------------------------------------------------
# CLI body.
# ---------------------------------------------------------------------------------------------------------
def parse_mesh(text: Optional[str]) -> Optional[tuple[int, int]]:
  """'4,2' -> (4, 2); None / '' -> None."""
  if not text:
    return None
  parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
  try:
    values = tuple(int(p) for p in parts)
  except ValueError:
    values = ()
  if len(values) != 2:
    raise EvalError(f"--mesh={text!r}: give two integers data,expert (e.g. --mesh=4,2; -1 = remaining devices).")
  return values  # type: ignore[return-value]


def parse_factors(values: Sequence[str]) -> list[float]:
  out = []
  for value in values:
    try:
      out.append(float(value))
    except ValueError:
      raise EvalError(f"--eval_capacity_factors: {value!r} is not a number.") from None
  return out


def run_main(config: Optional[Any], workdir: str, **kwargs: Any) -> int:
  """eval.py's body: one-line errors (no traceback) and an exit code."""
  checkpoints.drop_closed_loop_errors()
  try:
    if isinstance(kwargs.get("mesh_shape"), str):
      kwargs["mesh_shape"] = parse_mesh(kwargs["mesh_shape"])
    if kwargs.get("eval_capacity_factors"):
      kwargs["eval_capacity_factors"] = parse_factors(kwargs["eval_capacity_factors"])
    evaluate_checkpoint(config, workdir, **kwargs)
  except EvalError as e:
    log_lib.error(str(e))
    return 2
  except (ValueError, FileNotFoundError) as e:
    log_lib.error(one_line(e, 500))
    return 2
  return 0
