"""Checkpoint evaluation: held-out loss, routing statistics per MoE layer, and test-time router swaps.

`evaluate_checkpoint(config, workdir, ...)` is the whole job behind `eval.py`:
  1. find the step (latest or given) in `workdir/checkpoints`, check that the config matches the run that
     wrote it (architecture fields, then every parameter shape in the checkpoint);
  2. restore only the model half of the saved `(model, optimizer)` state, straight into the shardings of
     a mesh of *this* machine (it may differ from the training mesh);
  3. evaluate the held-out split (the same batches as the training loop's eval) under the checkpoint's own
     router and under every requested router swap / evaluation capacity factor. A swap changes only routing
     fields of `moe` (the parameters are the same), so one restored state serves every router;
  4. write `results.json`, `results.md` (one comparison table + per-layer tables) and PNG plots to
     `workdir/eval/<step>/`.

Errors that a user can fix (missing workdir or checkpoint, unknown step, config / checkpoint mismatch, corrupt
checkpoint, bad swap) raise `EvalError` with a one-line message; `run_main` prints it and returns non-zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rectify_moe import data as data_lib
from rectify_moe import model as model_lib
from rectify_moe import moe as moe_lib
from rectify_moe import sharding
from rectify_moe import train_lib

Array = jax.Array
Log = Callable[[str], None]


class EvalError(Exception):
  """A problem the user can fix; the message is one line and says what to do."""


# ---------------------------------------------------------------------------------------------------------
# Which config fields a swap may change, and which ones fix the architecture.
# ---------------------------------------------------------------------------------------------------------
# Routing fields a test-time swap may change: name -> (python type, None allowed).
ROUTING_FIELDS: dict[str, tuple[type, bool]] = {
    "top_k": (int, False),
    "fill_in": (bool, False),
    "fill_in_priority": (str, False),
    "ir_mode": (str, True),
    "ir_capacity_factor": (float, True),
    "capacity_factor": (float, False),
    "eval_capacity_factor": (float, True),
    "min_capacity": (int, False),
    "priority": (str, False),
    "combine": (str, False),
    "straight_through": (bool, False),
    "dispatch": (str, False),
}
# Fields that define the parameters or the function they compute: a --config must agree with the run on them.
ARCHITECTURE_FIELDS = {
    "model": ("vocab_size", "num_layers", "d_model", "num_heads", "d_ff", "moe_every", "tie_embeddings",
              "rope_base"),
    "moe": ("num_experts", "expert_dim", "activation", "router", "stablemoe_routing_dim"),
}
PRESETS = ("vanilla", "ir", "fr", "ir_fr")
ALL_PRESETS = "presets"  # --swap=presets expands to the four presets

# Per-layer rates averaged over the MoE layers in the comparison table.
RATE_COLUMNS = (("drop_rate", "drop"), ("unrouted_rate", "unrouted"), ("padding_rate", "pad"),
                ("fill_in_rate", "fill-in"), ("ir_rate", "IR"))


def _print(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------------------
def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The full config a training run wrote to `workdir/config.json`, as a ConfigDict."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise EvalError(f"No config.json in workdir {workdir!r} (written by train.py); pass the run's config "
                    "with --config=<file>.")
  try:
    with open(path) as f:
      values = json.load(f)
  except (OSError, ValueError) as e:
    raise EvalError(f"Cannot read {path}: {_one_line(e)}") from None
  return ml_collections.ConfigDict(values)


def check_architecture(config: ml_collections.ConfigDict, run_config: ml_collections.ConfigDict,
                       run_config_path: str = "config.json") -> None:
  """Raises EvalError naming the first architecture field where `config` and the run's config differ."""
  for section, names in ARCHITECTURE_FIELDS.items():
    defaults = (model_lib.ModelConfig() if section == "model" else moe_lib.MoEConfig())
    for name in names:
      default = getattr(defaults, name, None)
      given = config[section].get(name, default) if section in config else default
      trained = run_config[section].get(name, default) if section in run_config else default
      if given != trained:
        raise EvalError(f"--config does not match the checkpoint: {section}.{name}={given!r} in --config but "
                        f"{trained!r} in the run that wrote it ({run_config_path}). Fix {section}.{name} or "
                        "omit --config to use the run's own config.")


def _moe_config(config: ml_collections.ConfigDict) -> Optional[moe_lib.MoEConfig]:
  model_cfg, moe_cfg = train_lib.model_configs(config)
  return moe_cfg if model_cfg.num_moe_layers else None


def _parse_value(text: str) -> Any:
  text = text.strip()
  low = text.lower()
  if low in ("none", "null"):
    return None
  if low in ("true", "false"):
    return low == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
    return text[1:-1]
  return text


def _coerce(name: str, value: Any) -> Any:
  """Checks and converts a swap value to the type of the MoE field."""
  kind, nullable = ROUTING_FIELDS[name]
  if value is None:
    if nullable:
      return None
    raise EvalError(f"Swap value moe.{name}=None is not allowed; give a {kind.__name__}.")
  if kind is bool:
    if isinstance(value, bool) or value in (0, 1):
      return bool(value)
  elif kind is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
  elif kind is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif isinstance(value, str):
    return value
  raise EvalError(f"Swap value moe.{name}={value!r} is not of type {kind.__name__}.")


def preset_overrides(name: str, base: moe_lib.MoEConfig) -> dict[str, Any]:
  """The paper's router variants for the checkpoint's k (capacity, priority and combine are kept).

  vanilla: top-k; ir: top-k + IR ('all' for k=1, 'any' for k>=2, as the authors ran them); fr: top-k + FR;
  ir_fr: top-k + IR + FR (IR 'ignore_kth'). Straight-through combine only for K = 1.
  """
  k = base.top_k
  table = {
      "vanilla": dict(fill_in=False, ir_mode=None, straight_through=k == 1),
      "ir": dict(fill_in=False, ir_mode="all" if k == 1 else "any", straight_through=k == 1),
      "fr": dict(fill_in=True, ir_mode=None, straight_through=False),
      "ir_fr": dict(fill_in=True, ir_mode="ignore_kth", straight_through=False),
  }
  if name not in table:
    raise EvalError(f"Unknown router preset {name!r}; use one of {list(PRESETS)} (or {ALL_PRESETS!r} for all "
                    "four), or key=value swaps.")
  return dict(table[name])


def parse_swap(spec: str, base: moe_lib.MoEConfig) -> dict[str, Any]:
  """`"ir"`, `"top_k=2,fill_in=true"` or `"ir,eval_capacity_factor=0.5"` -> MoE field overrides.

  At most one preset name (applied first), then `key=value` routing fields. In a swap `capacity_factor`
  sets the evaluation capacity (it also sets `eval_capacity_factor`). Fields that define the parameters
  (num_experts, expert_dim, activation, ...) are rejected.
  """
  overrides: dict[str, Any] = {}
  explicit: dict[str, Any] = {}
  presets = []
  for token in (t.strip() for t in spec.split(",")):
    if not token:
      continue
    if "=" not in token:
      presets.append(token)
      continue
    key, value = (s.strip() for s in token.split("=", 1))
    key = key[len("moe."):] if key.startswith("moe.") else key
    if key not in ROUTING_FIELDS:
      known = {f.name for f in dataclasses.fields(moe_lib.MoEConfig)}
      for section, names in ARCHITECTURE_FIELDS.items():
        if key in names:
          raise EvalError(f"Swap {spec!r} changes {section}.{key}, which defines the model's parameters; a router "
                          f"swap may only change routing fields: {', '.join(ROUTING_FIELDS)}.")
      if key in known:
        raise EvalError(f"Swap {spec!r}: moe.{key} is not a routing field; a router swap may only change: "
                        f"{', '.join(ROUTING_FIELDS)}.")
      raise EvalError(f"Swap {spec!r}: unknown field {key!r}; a router swap may change: "
                      f"{', '.join(ROUTING_FIELDS)} (or name a preset: {', '.join(PRESETS)}).")
    explicit[key] = _coerce(key, _parse_value(value))
  if len(presets) > 1:
    raise EvalError(f"Swap {spec!r} names {len(presets)} presets ({', '.join(presets)}); use one per swap, "
                    f"e.g. 'ir_fr' for IR + FR.")
  if presets:
    overrides.update(preset_overrides(presets[0], base))
  if "capacity_factor" in explicit and "eval_capacity_factor" not in explicit:
    explicit["eval_capacity_factor"] = explicit["capacity_factor"]
  overrides.update(explicit)
  # K > 1 cannot use the top-1 straight-through combine: fall back to normalized unless asked explicitly.
  k = overrides.get("top_k", base.top_k) + int(overrides.get("fill_in", base.fill_in))
  if k != 1 and overrides.get("straight_through", base.straight_through) and "straight_through" not in explicit:
    overrides["straight_through"] = False
  return overrides


def router_name(cfg: moe_lib.MoEConfig) -> str:
  """'Top-1+IR(all)+FR' style description of a router."""
  kind = getattr(cfg, "router", "top_k")
  if kind != "top_k":
    return {"hash": "Hash", "stablemoe": "StableMoE"}.get(kind, kind)
  name = f"Top-{cfg.top_k}"
  if cfg.ir_mode is not None:
    name += f"+IR({cfg.ir_mode})"
  if cfg.fill_in:
    name += "+FR"
  return name


def eval_capacity_factor(cfg: moe_lib.MoEConfig) -> float:
  return cfg.capacity_factor if cfg.eval_capacity_factor is None else cfg.eval_capacity_factor


@dataclasses.dataclass
class RouterSpec:
  """One row of the comparison: a label, the overrides relative to the checkpoint's router, the config."""
  label: str
  overrides: dict[str, Any]
  moe: moe_lib.MoEConfig


def router_specs(base: Optional[moe_lib.MoEConfig], swaps: Sequence[str] = (),
                 eval_capacity_factors: Sequence[float] = ()) -> list[RouterSpec]:
  """The routers to evaluate: the checkpoint's own, each swap, then each of those at each capacity factor.

  Args:
    base: the checkpoint's MoE config (None for a dense model: no swaps possible).
    swaps: swap specs (see `parse_swap`); "presets" expands to vanilla, ir, fr, ir_fr.
    eval_capacity_factors: sweep every router (the checkpoint's and each swap) over these factors.

  Raises:
    EvalError: a bad swap, or one that gives an invalid MoE config.
  """
  expanded: list[str] = []
  for spec in swaps:
    expanded.extend(PRESETS if spec.strip() == ALL_PRESETS else [spec.strip()])
  if base is None:
    if expanded or eval_capacity_factors:
      raise EvalError("This model has no MoE layers (model.moe_every=0): there is no router to swap.")
    return [RouterSpec("checkpoint (dense)", {}, None)]  # type: ignore[arg-type]
  for cf in eval_capacity_factors:
    if not cf > 0:
      raise EvalError(f"--eval_capacity_factors: {cf} must be > 0.")

  def make(label: str, overrides: dict[str, Any]) -> RouterSpec:
    try:
      cfg = dataclasses.replace(base, **overrides)
      cfg.validate()
    except ValueError as e:
      raise EvalError(f"Router {label!r} is not a valid MoE config: {_one_line(e)}") from None
    return RouterSpec(label, overrides, cfg)

  rows = [make(f"checkpoint ({router_name(base)})", {})]
  for spec in expanded:
    overrides = parse_swap(spec, base)
    label = spec
    if spec in PRESETS:
      label = f"{spec} ({router_name(dataclasses.replace(base, **overrides))})"
    rows.append(make(label, overrides))
  base_rows = list(rows)
  for cf in eval_capacity_factors:
    for row in base_rows:
      swept = make(f"{row.label} @cf={cf:g}", {**row.overrides, "eval_capacity_factor": float(cf)})
      if swept.moe.capacity(False) != row.moe.capacity(False):  # else the row above says the same
        rows.append(swept)
  return rows


# ---------------------------------------------------------------------------------------------------------
# Mesh, steps, restore.
# ---------------------------------------------------------------------------------------------------------
def resolve_eval_mesh(config: ml_collections.ConfigDict, mesh_shape: Optional[Sequence[int]] = None,
                      num_devices: Optional[int] = None, log: Log = _print) -> tuple[int, int]:
  """The (data, expert) mesh to evaluate on.

  `mesh_shape` if given (-1 = remaining devices); else the run's mesh if it fits this machine and the eval
  batch; else (devices / e, e) with e = gcd(num_experts, devices).

  Raises:
    EvalError: the mesh does not fit the devices, the experts or the eval batch.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  moe_cfg = _moe_config(config)

  def check(shape):
    data, expert = sharding.resolve_mesh_shape(int(shape[0]), int(shape[1]), num_devices)
    used = data * expert
    batch = config.train.eval_batch_size
    if moe_cfg is not None:
      sharding.validate_moe_layout(num_experts=moe_cfg.num_experts, expert_axis=expert, global_batch=batch,
                                   seq_len=config.train.seq_len, group_size=moe_cfg.group_size, num_devices=used)
    elif batch % used:
      raise ValueError(f"eval_batch_size={batch} is not divisible by the {used} devices of the mesh.")
    return data, expert

  if mesh_shape is not None:
    try:
      return check(mesh_shape)
    except ValueError as e:
      raise EvalError(f"Mesh {tuple(mesh_shape)}: {_one_line(e)}") from None
  try:
    return check((config.mesh.data, config.mesh.expert))
  except ValueError as e:
    run_error = _one_line(e)
  experts = moe_cfg.num_experts if moe_cfg is not None else 1
  expert = math.gcd(experts, num_devices)
  fallback = (num_devices // expert, expert)
  try:
    shape = check(fallback)
  except ValueError as e:
    raise EvalError(f"The run's mesh ({config.mesh.data}, {config.mesh.expert}) does not fit here ({run_error}) "
                    f"and neither does {fallback}: {_one_line(e)} Pass --mesh=data,expert and/or "
                    "--eval_batch_size.") from None
  log(f"note: the run's mesh ({config.mesh.data}, {config.mesh.expert}) does not fit this machine "
      f"({num_devices} {jax.default_backend()} device(s)); evaluating on mesh {shape}.")
  return shape


@contextlib.contextmanager
def _quiet_absl():
  """Orbax logs warnings (read-only manager, unregistered items) that are noise for evaluation."""
  from absl import logging
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _one_line(error: BaseException, limit: int = 300) -> str:
  text = " ".join(str(error).split())
  return text if len(text) <= limit else text[:limit] + "..."


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def open_checkpoints(workdir: str):
  """A read-only Orbax CheckpointManager over `workdir/checkpoints`."""
  import orbax.checkpoint as ocp
  if not os.path.isdir(workdir):
    raise EvalError(f"Workdir {workdir!r} does not exist; pass the --workdir of a training run.")
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise EvalError(f"No checkpoint in {workdir!r} (no checkpoints/ folder); train first: "
                    f"python train.py --workdir={workdir}")
  with _quiet_absl():
    return ocp.CheckpointManager(
        directory, item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True))


def select_step(manager, workdir: str, step: Optional[int] = None) -> int:
  """The latest step, or `step` if it exists (else EvalError listing the steps that do)."""
  steps = sorted(manager.all_steps())
  if not steps:
    raise EvalError(f"No checkpoint in {checkpoint_dir(workdir)!r}; train first: python train.py "
                    f"--workdir={workdir}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise EvalError(f"Step {step} has no checkpoint in {checkpoint_dir(workdir)!r}; available steps: "
                    f"{', '.join(map(str, steps))}.")
  return int(step)


def abstract_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   moe_cfg: Optional[moe_lib.MoEConfig] = None):
  """(graphdef, abstract state) of the model, with no parameter materialised.

  `moe_cfg` replaces the config's MoE settings (a router swap: same parameters, other graphdef).
  """
  model_cfg, config_moe = train_lib.model_configs(config)
  moe_cfg = config_moe if moe_cfg is None else moe_cfg
  kwargs = {}
  if model_cfg.num_moe_layers and getattr(moe_cfg, "router", "top_k") == "hash":
    # The token -> expert table is part of the checkpoint; a placeholder of the right shape builds the graph.
    kwargs["hash_table"] = np.zeros((model_cfg.vocab_size,), np.int32)
  with jax.set_mesh(mesh):
    model = nnx.eval_shape(lambda: model_lib.TransformerLM(
        model_cfg, moe_cfg if model_cfg.num_moe_layers else None, rngs=nnx.Rngs(0), **kwargs))
  return nnx.split(model)


def _target_leaf(x, mesh: jax.sharding.Mesh) -> jax.ShapeDtypeStruct:
  spec = x.sharding.spec if isinstance(getattr(x, "sharding", None), NamedSharding) else P()
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'blocks/1/ffn/w_up': leaf} of nested mappings (keys as strings)."""
  out = {}
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}/{key}" if prefix else str(key)))
  else:
    out[prefix] = tree
  return out


def check_checkpoint_shapes(saved_model: Mapping, target: Mapping, step: int) -> None:
  """Raises EvalError at the first parameter that is missing or has another shape in the checkpoint."""
  saved = {k: tuple(getattr(v, "shape", ())) for k, v in _flatten(saved_model).items()}
  wanted = {k: tuple(v.shape) for k, v in _flatten(target).items()}
  for name, shape in wanted.items():
    if name not in saved:
      raise EvalError(f"The config does not match checkpoint step {step}: parameter {name} {shape} is not in the "
                      "checkpoint (check model.tie_embeddings / num_layers / moe_every / moe.activation).")
    if saved[name] != shape:
      raise EvalError(f"The config does not match checkpoint step {step}: parameter {name} has shape "
                      f"{saved[name]} in the checkpoint but {shape} from the config.")
  extra = sorted(set(saved) - set(wanted))
  if extra:
    raise EvalError(f"The config does not match checkpoint step {step}: the checkpoint has parameter "
                    f"{extra[0]} {saved[extra[0]]}, which the config's model lacks.")


def restore_model(workdir: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  step: Optional[int] = None):
  """Restores the model half of a training checkpoint onto `mesh` (any mesh whose expert axis divides E).

  Only the model parameters are read (Orbax partial restore of item "state", key 0 of the saved
  `(model, optimizer)` pure dict), directly into the shardings the model has on `mesh`.

  Returns:
    (step, graphdef, state): the restored step and `nnx.split(model)` with concrete arrays.

  Raises:
    EvalError: no workdir / checkpoint, unknown step, parameter mismatch, corrupt checkpoint.
  """
  import orbax.checkpoint as ocp
  _drop_closed_loop_errors()
  manager = open_checkpoints(workdir)
  try:
    step = select_step(manager, workdir, step)
    graphdef, abstract = abstract_model(config, mesh)
    target = jax.tree.map(lambda x: _target_leaf(x, mesh), nnx.to_pure_dict(abstract))
    where = os.path.join(checkpoint_dir(workdir), str(step))
    try:
      with _quiet_absl():
        metadata = manager.item_metadata(step)
      saved = metadata["state"] if metadata is not None and "state" in metadata else None
      saved = dict(saved) if saved is not None else None
    except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt checkpoint for the user
      raise EvalError(f"Checkpoint {where} is corrupt or incomplete (cannot read its metadata: "
                      f"{type(e).__name__}: {_one_line(e)}). Pick another step with --step.") from None
    if not saved or "0" not in saved:
      raise EvalError(f"Checkpoint {where} is corrupt or incomplete: no model state in it. Pick another step "
                      "with --step.")
    check_checkpoint_shapes(saved["0"], target, step)
    item = {"0": target}
    try:
      with _quiet_absl():
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
      params = restored["state"]["0"]
      jax.block_until_ready(params)
    except Exception as e:  # noqa: BLE001
      raise EvalError(f"Checkpoint {where} is corrupt or incomplete (restore failed: {type(e).__name__}: "
                      f"{_one_line(e)}). Pick another step with --step.") from None
  finally:
    manager.close()
  nnx.replace_by_pure_dict(abstract, params)
  return step, graphdef, abstract


# ---------------------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------------------
def model_eval_step(graphdef, state, batch):
  """The training loop's eval step (`train_lib.eval_step`) on a model-only state."""
  return train_lib.eval_sums(nnx.merge(graphdef, state), batch)


def jit_eval_step(graphdef, state, mesh: jax.sharding.Mesh):
  """jax.jit'd `model_eval_step` with explicit shardings (state as restored, batch over (data, expert))."""
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = {k: NamedSharding(mesh, sharding.token_spec(2)) for k in ("inputs", "targets", "token_mask")}
  return jax.jit(functools.partial(model_eval_step, graphdef), in_shardings=(state_shardings, batch_sharding),
                 out_shardings=NamedSharding(mesh, P()))


class _LayerTotals:
  """Exact global counts per MoE layer, accumulated over batches (the block reports rates + counts)."""

  def __init__(self, moe_cfg: moe_lib.MoEConfig):
    self.cfg = moe_cfg
    self.capacity = moe_cfg.capacity(False)
    self.sums: Optional[dict[str, np.ndarray]] = None

  def add(self, layers: Mapping[str, Any], global_rows: int, seq_len: int) -> None:
    get = lambda k: np.asarray(layers[k], np.float64)
    tokens = get("tokens")
    slots = global_rows * seq_len // self.cfg.group_size * self.cfg.num_experts * self.capacity
    demand, load = get("expert_demand"), get("expert_load")
    batch = {
        "tokens": tokens,
        "dropped_choices": np.rint(get("drop_rate") * demand.sum(-1)),
        "unrouted_tokens": np.rint(get("unrouted_rate") * tokens),
        "slots": np.full_like(tokens, float(slots)),
        "filled_slots": load.sum(-1),
        "fill_in_slots": np.rint(get("fill_in_rate") * slots),
        "ir_tokens": np.rint(get("ir_rate") * tokens),
        "ir_overflow_tokens": np.rint(get("ir_overflow_rate") * tokens),
        "ir_reused_tokens": np.rint(get("ir_reuse_rate") * tokens),
        "expert_demand": demand,
        "expert_load": load,
        "aux_loss": get("aux_loss") * tokens,
        "z_loss": get("z_loss") * tokens,
        "a2a_rows": get("a2a_rows_per_token") * tokens,
    }
    self.sums = batch if self.sums is None else {k: self.sums[k] + v for k, v in batch.items()}

  def result(self, moe_layer_indices: Sequence[int]) -> list[dict[str, Any]]:
    if self.sums is None:
      return []
    s = self.sums
    out = []
    for i, layer in enumerate(moe_layer_indices):
      tokens = max(float(s["tokens"][i]), 1.0)
      choices = max(float(s["expert_demand"][i].sum()), 1.0)
      slots = max(float(s["slots"][i]), 1.0)
      load, demand = s["expert_load"][i], s["expert_demand"][i]
      out.append({
          "layer": int(layer),
          "tokens": int(s["tokens"][i]),
          "capacity": self.capacity,
          "drop_rate": float(s["dropped_choices"][i]) / choices,
          "unrouted_rate": float(s["unrouted_tokens"][i]) / tokens,
          "padding_rate": 1.0 - float(s["filled_slots"][i]) / slots,
          "fill_in_rate": float(s["fill_in_slots"][i]) / slots,
          "ir_rate": float(s["ir_tokens"][i]) / tokens,
          "ir_overflow_rate": float(s["ir_overflow_tokens"][i]) / tokens,
          "ir_reuse_rate": float(s["ir_reused_tokens"][i]) / tokens,
          "dropped_choices": int(s["dropped_choices"][i]),
          "unrouted_tokens": int(s["unrouted_tokens"][i]),
          "slots": int(s["slots"][i]),
          "filled_slots": int(s["filled_slots"][i]),
          "fill_in_slots": int(s["fill_in_slots"][i]),
          "ir_tokens": int(s["ir_tokens"][i]),
          "ir_overflow_tokens": int(s["ir_overflow_tokens"][i]),
          **imbalance(load, "load"),
          **imbalance(demand, "demand"),
          "expert_load": [int(v) for v in load],
          "expert_demand": [int(v) for v in demand],
          "a2a_rows_per_token": float(s["a2a_rows"][i]) / tokens,
          "a2a_filled_rows_per_token": float(s["filled_slots"][i]) / tokens,
          "aux_loss": float(s["aux_loss"][i]) / tokens,
          "z_loss": float(s["z_loss"][i]) / tokens,
      })
    return out


def imbalance(counts: np.ndarray, name: str = "load") -> dict[str, float]:
  """`{name}_max_over_mean` and `{name}_cv` (std / mean) of per-expert counts (1.0 and 0.0 when balanced)."""
  counts = np.asarray(counts, np.float64)
  mean = counts.mean() if counts.size else 0.0
  if mean <= 0:
    return {f"{name}_max_over_mean": 0.0, f"{name}_cv": 0.0}
  return {f"{name}_max_over_mean": float(counts.max() / mean), f"{name}_cv": float(counts.std() / mean)}


LAYER_MEAN_KEYS = ("drop_rate", "unrouted_rate", "padding_rate", "fill_in_rate", "ir_rate", "ir_overflow_rate",
                   "ir_reuse_rate", "load_max_over_mean", "load_cv", "demand_max_over_mean", "demand_cv",
                   "a2a_rows_per_token")


def evaluate_router(eval_fn, state, batches, mesh: jax.sharding.Mesh, *, moe_cfg: Optional[moe_lib.MoEConfig],
                    moe_layer_indices: Sequence[int], label: str = "", log: Optional[Log] = None
                    ) -> dict[str, Any]:
  """Loss, perplexity, token accuracy and exact per-layer routing statistics over `batches`."""
  totals = {"ce_sum": 0.0, "correct": 0.0, "tokens": 0.0}
  layers = _LayerTotals(moe_cfg) if moe_cfg is not None else None
  num_batches = len(batches)
  start = time.time()
  with jax.set_mesh(mesh):
    for i, local in enumerate(batches):
      out = jax.device_get(eval_fn(state, train_lib.global_batch(local, mesh)))
      for k in totals:
        totals[k] += float(out[k])
      if layers is not None and out["layers"]:
        rows, seq_len = np.asarray(local["inputs"]).shape
        layers.add(out["layers"], rows * jax.process_count(), seq_len)
      if log is not None:
        log(f"[eval] {label}: batch {i + 1}/{num_batches}  ({time.time() - start:.1f}s)")
  per_layer = layers.result(moe_layer_indices) if layers is not None else []
  result: dict[str, Any] = {
      **train_lib.lm_metrics(totals), "tokens": int(totals["tokens"]), "layers": per_layer,
      "mean": {k: float(np.mean([layer[k] for layer in per_layer])) for k in LAYER_MEAN_KEYS} if per_layer else {},
  }
  return result


def _config_for_eval(config: ml_collections.ConfigDict, eval_batches: Optional[int],
                     eval_batch_size: Optional[int]) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
  for name, value in (("eval_batches", eval_batches), ("eval_batch_size", eval_batch_size)):
    if value is not None and value < 1:
      raise EvalError(f"--{name}={value} must be >= 1.")
  if eval_batches is not None:
    config.train.eval_batches = int(eval_batches)
  if eval_batch_size is not None:
    config.train.eval_batch_size = int(eval_batch_size)
  return config


def evaluate_checkpoint(config: Optional[ml_collections.ConfigDict], workdir: str, *, step: Optional[int] = None,
                        swaps: Sequence[str] = (), eval_capacity_factors: Sequence[float] = (),
                        mesh_shape: Optional[Sequence[int]] = None, eval_batches: Optional[int] = None,
                        eval_batch_size: Optional[int] = None, output_dir: Optional[str] = None,
                        write: bool = True, plots: bool = True, log: Log = _print) -> dict[str, Any]:
  """Evaluates one checkpoint under its own router and every swap; writes results (see module doc).

  Args:
    config: the config to use; None = the run's own `workdir/config.json`. A given config must match the run's
      architecture (EvalError otherwise); its data / eval settings / routing fields are used as given.
    workdir: the training run's workdir.
    step: checkpoint step (None = latest).
    swaps: router swap specs (see `parse_swap`, `router_specs`).
    eval_capacity_factors: evaluate every router also at each of these capacity factors.
    mesh_shape: (data, expert) of the evaluation mesh; None = the run's mesh if it fits, else a fitting one.
    eval_batches: held-out batches (None = train.eval_batches, as the training loop's eval).
    eval_batch_size: rows per eval batch (None = train.eval_batch_size).
    output_dir: where to write (None = workdir/eval/<step>).
    write: write results.json, results.md and plots.
    plots: write the PNG plots.
    log: progress sink.

  Returns:
    The results dict that is written to results.json (`routers`: one entry per row, in order).
  """
  if not os.path.isdir(workdir):
    raise EvalError(f"Workdir {workdir!r} does not exist; pass the --workdir of a training run.")
  run_config_path = os.path.join(workdir, "config.json")
  run_config = None
  if config is None:
    config = run_config = load_run_config(workdir)
  elif os.path.isfile(run_config_path):
    run_config = load_run_config(workdir)
    check_architecture(config, run_config, run_config_path)
  config = _config_for_eval(config, eval_batches, eval_batch_size)
  try:
    model_cfg, _ = train_lib.model_configs(config)
    model_cfg.validate()
    base_moe = _moe_config(config)
    if base_moe is not None:
      base_moe.validate()
    data_lib.validate_data_config(config.data)
  except ValueError as e:
    raise EvalError(_one_line(e)) from None
  routers = router_specs(base_moe, swaps, eval_capacity_factors)

  train_lib.maybe_initialize_distributed(config)
  mesh_dims = resolve_eval_mesh(config, mesh_shape, log=log)
  mesh = sharding.make_mesh(*mesh_dims)
  step, graphdef, state = restore_model(workdir, config, mesh, step)
  mesh_source = run_config if run_config is not None else config
  train_mesh = (int(mesh_source.mesh.data), int(mesh_source.mesh.expert))
  log(f"Restored step {step} from {checkpoint_dir(workdir)} onto mesh {dict(mesh.shape)} "
      f"({jax.device_count()} {jax.default_backend()} device(s); trained on mesh {train_mesh}).")
  uses_ir = base_moe is not None and any(r.moe.ir_mode for r in routers)
  if uses_ir and train_mesh[1] > 0 and mesh_dims[1] != train_mesh[1]:
    log(f"note: IR uses the experts local to each device; the expert axis is {mesh_dims[1]} here and "
        f"{train_mesh[1]} in training, so IR rows differ from an evaluation on the training mesh.")

  process_count = jax.process_count()
  try:
    batches = data_lib.make_eval_batches(
        config.data, seq_len=config.train.seq_len, batch_size=config.train.eval_batch_size // process_count,
        max_batches=config.train.eval_batches, process_index=jax.process_index(), process_count=process_count)
  except (ValueError, FileNotFoundError) as e:
    raise EvalError(_one_line(e)) from None
  moe_layers = [i for i in range(model_cfg.num_layers) if model_cfg.is_moe_layer(i)]

  rows: list[dict[str, Any]] = []
  done: dict[Any, dict[str, Any]] = {}
  for index, router in enumerate(routers, start=1):
    key = router.moe
    label = f"router {index}/{len(routers)} {router.label}"
    if key in done:
      log(f"[eval] {label}: same router as an earlier row, reusing its results")
      metrics = done[key]
    else:
      router_graphdef = graphdef if not router.overrides else abstract_model(config, mesh, router.moe)[0]
      eval_fn = jit_eval_step(router_graphdef, state, mesh)
      metrics = evaluate_router(eval_fn, state, batches, mesh, moe_cfg=router.moe, moe_layer_indices=moe_layers,
                                label=label, log=log)
      done[key] = metrics
    rows.append({
        "name": router.label,
        "router": router_name(router.moe) if router.moe is not None else "dense",
        "swap": dict(router.overrides),
        "eval_capacity_factor": eval_capacity_factor(router.moe) if router.moe is not None else None,
        "moe": ({k: getattr(router.moe, k) for k in ROUTING_FIELDS} if router.moe is not None else {}),
        **metrics,
    })

  results = {
      "workdir": os.path.abspath(workdir),
      "step": step,
      "created": time.strftime("%Y-%m-%d %H:%M:%S"),
      "mesh": {"data": mesh_dims[0], "expert": mesh_dims[1]},
      "train_mesh": {"data": train_mesh[0], "expert": train_mesh[1]},
      "devices": f"{jax.device_count()} {jax.default_backend()}",
      "eval_batches": len(batches),
      "eval_batch_size": int(config.train.eval_batch_size),
      "seq_len": int(config.train.seq_len),
      "moe_layers": moe_layers,
      "model": dict(config.model.to_dict()),
      "checkpoint_moe": dataclasses.asdict(base_moe) if base_moe is not None else None,
      "routers": rows,
  }
  table = comparison_table(results)
  log("")
  log(table)
  if write and jax.process_index() == 0:
    out = output_dir or os.path.join(workdir, "eval", str(step))
    paths = write_outputs(results, out, plots=plots)
    results["outputs"] = paths
    log(f"Wrote {', '.join(os.path.basename(p) for p in paths)} to {os.path.abspath(out)}.")
  return results


# ---------------------------------------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------------------------------------
def _fmt(value: Optional[float], digits: int = 4) -> str:
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def comparison_table(results: Mapping[str, Any]) -> str:
  """One markdown table: rows = routers; loss, ppl, accuracy, routing rates (mean over MoE layers), imbalance."""
  header = ["router", "cf", "loss", "ppl", "accuracy", *[label for _, label in RATE_COLUMNS], "IR overflow",
            "imbalance (max/mean)", "a2a rows/token"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in results["routers"]:
    mean = row.get("mean") or {}
    cells = [row["name"], _fmt(row.get("eval_capacity_factor"), 2) if row.get("eval_capacity_factor") else "-",
             _fmt(row["loss"]), _fmt(row["perplexity"], 2), _fmt(row["accuracy"]),
             *[_fmt(mean.get(key)) for key, _ in RATE_COLUMNS], _fmt(mean.get("ir_overflow_rate")),
             _fmt(mean.get("load_max_over_mean"), 3), _fmt(mean.get("a2a_rows_per_token"), 3)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def layer_table(row: Mapping[str, Any]) -> str:
  """Per-MoE-layer routing statistics of one router (markdown)."""
  header = ["layer", "C", "drop", "unrouted", "pad", "fill-in slots (rate)", "IR tokens", "IR overflow",
            "load max/mean", "load CV", "demand max/mean", "a2a rows/token", "expert load"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for layer in row["layers"]:
    cells = [str(layer["layer"]), str(layer["capacity"]), _fmt(layer["drop_rate"]), _fmt(layer["unrouted_rate"]),
             _fmt(layer["padding_rate"]), f"{layer['fill_in_slots']} ({_fmt(layer['fill_in_rate'])})",
             f"{layer['ir_tokens']} ({_fmt(layer['ir_rate'])})",
             f"{layer['ir_overflow_tokens']} ({_fmt(layer['ir_overflow_rate'])})",
             _fmt(layer["load_max_over_mean"], 3), _fmt(layer["load_cv"], 3), _fmt(layer["demand_max_over_mean"], 3),
             _fmt(layer["a2a_rows_per_token"], 3), " ".join(map(str, layer["expert_load"]))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown_report(results: Mapping[str, Any]) -> str:
  mesh, train_mesh = results["mesh"], results["train_mesh"]
  parts = [
      f"# Evaluation of step {results['step']}",
      "",
      f"- workdir: `{results['workdir']}`",
      f"- mesh: data={mesh['data']}, expert={mesh['expert']} ({results['devices']} device(s)); training mesh: "
      f"data={train_mesh['data']}, expert={train_mesh['expert']}",
      f"- held-out: {results['eval_batches']} batches x {results['eval_batch_size']} x {results['seq_len']} "
      f"({results['routers'][0]['tokens'] if results['routers'] else 0} target tokens)",
      "- rates are means over the MoE layers; imbalance = max / mean of the accepted per-expert load",
      "",
      "## Routers",
      "",
      comparison_table(results),
  ]
  for row in results["routers"]:
    if row["layers"]:
      swap = ", ".join(f"{k}={v}" for k, v in row["swap"].items()) or "none (the checkpoint's router)"
      parts += ["", f"## {row['name']}", "", f"Swap: {swap}.", "", layer_table(row)]
  return "\n".join(parts) + "\n"


MAX_HEATMAP_PANELS = 15


def plot_load_heatmap(results: Mapping[str, Any], path: str) -> None:
  """Per-layer x per-expert accepted load (relative to the layer's mean), one panel per distinct router."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows, seen = [], set()
  for row in results["routers"]:  # one panel per distinct router (reused rows have identical loads)
    key = json.dumps(row["moe"], sort_keys=True, default=str)
    if row["layers"] and key not in seen:
      seen.add(key)
      rows.append(row)
  total, rows = len(rows), rows[:MAX_HEATMAP_PANELS]
  cols = min(len(rows), 3)
  nrows = -(-len(rows) // cols)
  num_layers = len(rows[0]["layers"])
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, (0.4 * num_layers + 1.8) * nrows + 0.6),
                           squeeze=False, layout="constrained")
  for ax in axes.flat[len(rows):]:
    ax.axis("off")
  image = None
  for ax, row in zip(axes.flat, rows):
    load = np.asarray([layer["expert_load"] for layer in row["layers"]], np.float64)
    rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-9)
    image = ax.imshow(rel, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2.0, float(rel.max())))
    ax.set_title(row["name"], fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(load.shape[1]))
    ax.set_yticks(range(load.shape[0]), [str(layer["layer"]) for layer in row["layers"]])
  if image is not None:
    fig.colorbar(image, ax=axes.ravel().tolist(), label="accepted load / mean")
  shown = f" (first {len(rows)} of {total} routers)" if total > len(rows) else ""
  fig.suptitle(f"Per-expert accepted load, step {results['step']}{shown}")
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_rates(results: Mapping[str, Any], path: str) -> None:
  """Grouped bar chart: drop / unrouted / padding / fill-in / IR rates (mean over MoE layers) by router."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in results["routers"] if r["layers"]]
  keys = RATE_COLUMNS
  x = np.arange(len(rows))
  width = 0.8 / len(keys)
  fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
  for j, (key, label) in enumerate(keys):
    ax.bar(x + (j - (len(keys) - 1) / 2) * width, [r["mean"][key] for r in rows], width, label=label)
  ax.set_xticks(x, [r["name"] for r in rows], rotation=25, ha="right", fontsize=8)
  ax.set_ylabel("rate (mean over MoE layers)")
  ax.set_title(f"Routing rates by router, step {results['step']}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(results: Mapping[str, Any], out_dir: str, *, plots: bool = True) -> list[str]:
  """results.json, results.md and (for MoE models) load_heatmap.png and rates_by_router.png."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
  with open(paths[0], "w") as f:
    json.dump(results, f, indent=2, default=str)
  with open(paths[1], "w") as f:
    f.write(markdown_report(results))
  if plots and any(r["layers"] for r in results["routers"]):
    paths.append(os.path.join(out_dir, "load_heatmap.png"))
    plot_load_heatmap(results, paths[-1])
    paths.append(os.path.join(out_dir, "rates_by_router.png"))
    plot_rates(results, paths[-1])
  return paths


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


def _drop_closed_loop_errors() -> None:
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


def run_main(config: Optional[ml_collections.ConfigDict], workdir: str, **kwargs: Any) -> int:
  """eval.py's body: one-line errors (no traceback) and an exit code."""
  _drop_closed_loop_errors()
  try:
    if isinstance(kwargs.get("mesh_shape"), str):
      kwargs["mesh_shape"] = parse_mesh(kwargs["mesh_shape"])
    if kwargs.get("eval_capacity_factors"):
      kwargs["eval_capacity_factors"] = parse_factors(kwargs["eval_capacity_factors"])
    evaluate_checkpoint(config, workdir, **kwargs)
  except EvalError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {_one_line(e, 500)}", file=sys.stderr)
    return 2
  return 0
