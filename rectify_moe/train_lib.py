"""Training: config checks, model and optimizer state, jitted train/eval steps, checkpoints, metrics.

`train_and_evaluate(config, workdir)` is the whole job behind `train.py`. Its pieces are importable:
- `validate_config`: every check that can run before data is read or anything compiles;
- `create_train_state`: the model + AdamW optimizer as one NNX state on the mesh;
- `train_step` / `eval_step`: pure functions of (graphdef, state, batch), jitted with explicit shardings;
- `Checkpointer`: Orbax CheckpointManager holding model, optimizer, step and the data iterator position.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rectify_moe import data as data_lib
from rectify_moe import hash_routing
from rectify_moe import model as model_lib
from rectify_moe import moe as moe_lib
from rectify_moe import sharding
from rectify_moe import stablemoe

Array = jax.Array
# Per-layer routing metrics averaged over MoE layers in the step metrics.
RATE_KEYS = ("drop_rate", "unrouted_rate", "padding_rate", "fill_in_rate", "ir_rate", "ir_overflow_rate")


# ---------------------------------------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------------------------------------
def model_configs(config: ml_collections.ConfigDict) -> tuple[model_lib.ModelConfig, moe_lib.MoEConfig]:
  """The typed model and MoE configs (unknown fields raise, naming them)."""
  return model_lib.ModelConfig.from_dict(config.model), moe_lib.MoEConfig.from_dict(config.moe)


def validate_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None,
                    process_count: Optional[int] = None) -> tuple[int, int]:
  """Checks the whole config against the devices before any data is read or anything compiles.

  Returns:
    The resolved (data, expert) mesh shape.

  Raises:
    ValueError: one line naming the field, the value and the fix.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  model_cfg, moe_cfg = model_configs(config)
  model_cfg.validate()
  if model_cfg.num_moe_layers:
    moe_cfg.validate()
  mesh_shape = sharding.resolve_mesh_shape(config.mesh.data, config.mesh.expert, num_devices)
  used = mesh_shape[0] * mesh_shape[1]
  train = config.train
  if train.steps < 1:
    raise ValueError(f"train.steps={train.steps} must be >= 1.")
  if train.seq_len < 1:
    raise ValueError(f"train.seq_len={train.seq_len} must be >= 1.")
  for name in ("batch_size", "eval_batch_size"):
    if getattr(train, name) % process_count:
      raise ValueError(f"train.{name}={getattr(train, name)} is not divisible by the {process_count} processes.")
  if model_cfg.num_moe_layers:
    for name in ("batch_size", "eval_batch_size"):
      sharding.validate_moe_layout(num_experts=moe_cfg.num_experts, expert_axis=mesh_shape[1],
                                   global_batch=getattr(train, name), seq_len=train.seq_len,
                                   group_size=moe_cfg.group_size, num_devices=used)
  else:
    for name in ("batch_size", "eval_batch_size"):
      if getattr(train, name) % used:
        raise ValueError(f"train.{name}={getattr(train, name)} is not divisible by the {used} devices of the mesh.")
  if model_cfg.vocab_size < data_lib.ByteTokenizer.vocab_size:
    raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                     f"{data_lib.ByteTokenizer.vocab_size}; set it to at least that.")
  for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    if getattr(train, name) < 1:
      raise ValueError(f"train.{name}={getattr(train, name)} must be >= 1.")
  data_lib.validate_data_config(config.data)
  return mesh_shape


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Starts JAX's multi-controller runtime when asked (True) or when a cluster launcher is detected ("auto").

  "auto" initialises when JAX_COORDINATOR_ADDRESS is set, or under SLURM / Open MPI with more than one
  task, or on a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several hosts). jax.distributed picks the
  coordinator, process count and index from those environments.
  """
  mode = config.train.get("distributed", "auto")
  if mode is False or mode == "off":
    return
  env = os.environ
  detected = bool(env.get("JAX_COORDINATOR_ADDRESS")) or int(env.get("SLURM_NTASKS", "1")) > 1 or int(
      env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", "")
  if mode is True or (mode == "auto" and detected):
    jax.distributed.initialize()


# ---------------------------------------------------------------------------------------------------------
# State.
# ---------------------------------------------------------------------------------------------------------
def make_optimizer(train: ml_collections.ConfigDict, moe_cfg: Optional[moe_lib.MoEConfig] = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup + cosine decay to end_lr_factor * lr, and global-norm clipping.

  For StableMoE the distilled router is frozen for real from moe.stablemoe_switch_step on: its updates
  are zeroed after AdamW, so weight decay and momentum leave it bit-identical.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=min(train.warmup_steps, train.steps),
      decay_steps=max(train.steps, train.warmup_steps + 1), end_value=train.learning_rate * train.end_lr_factor)
  tx = optax.chain(optax.clip_by_global_norm(train.grad_clip),
                   optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay))
  if moe_cfg is not None and moe_cfg.router == "stablemoe":
    tx = optax.chain(tx, stablemoe.freeze_after(moe_cfg.stablemoe_switch_step, stablemoe.is_distilled_param))
  return tx, schedule


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """Builds model and optimizer on the mesh.

  Returns:
    (graphdef, state, state_shardings): `nnx.split((model, optimizer))` and the NamedSharding of every leaf.
  """
  model_cfg, moe_cfg = model_configs(config)
  tx, _ = make_optimizer(config.train, moe_cfg)
  hash_table = None
  if model_cfg.num_moe_layers and moe_cfg.router == "hash" and moe_cfg.hash_table == "balanced":
    counts = train_token_counts(config, model_cfg.vocab_size)
    hash_table = hash_routing.frequency_balanced_table(counts, moe_cfg.num_experts)
  with jax.set_mesh(mesh):
    model = model_lib.TransformerLM(model_cfg, moe_cfg if model_cfg.num_moe_layers else None,
                                    rngs=nnx.Rngs(config.seed), hash_table=hash_table)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    state_shardings = jax.tree.map(lambda x: _leaf_sharding(x, mesh), state)
    state = jax.device_put(state, state_shardings)
  return graphdef, state, state_shardings


def train_token_counts(config: ml_collections.ConfigDict, vocab_size: int, max_tokens: int = 20_000_000
                       ) -> np.ndarray:
  """int64[V] token frequencies of the training split (its first max_tokens tokens), for hash tables."""
  windows = data_lib.make_packed_windows(config.data, config.data.train_split, seq_len=config.train.seq_len)
  stream = windows.stream_slice(0, min(windows.num_tokens, max_tokens))
  return np.bincount(stream, minlength=vocab_size)[:vocab_size].astype(np.int64)


def _leaf_sharding(x: Any, mesh: jax.sharding.Mesh) -> NamedSharding:
  spec = x.sharding.spec if isinstance(getattr(x, "sharding", None), NamedSharding) else P()
  return NamedSharding(mesh, spec)


def count_params(state) -> tuple[int, int]:
  """(total parameters, expert parameters) of the model half of a `(model, optimizer)` state."""
  total = expert = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state[0]):
    size = int(np.prod(leaf.shape))
    total += size
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    if leaf.ndim == 3 and names & {"w_gate", "w_up", "w_down"}:
      expert += size
  return total, expert


# ---------------------------------------------------------------------------------------------------------
# Steps.
# ---------------------------------------------------------------------------------------------------------
def _forward(model: model_lib.TransformerLM, batch: dict[str, Array], train: bool, step=None, rng=None):
  """Token-masked cross-entropy and routing metrics. Returns (ce_sum, correct, tokens, layer_metrics)."""
  mask = batch["token_mask"]
  logits, layer_metrics = model(batch["inputs"], mask, train=train, step=step, rng=rng)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
  maskf = mask.astype(jnp.float32)
  ce_sum = -jnp.sum(target_logp * maskf)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch["targets"]) * maskf)
  return ce_sum, correct, jnp.sum(maskf), layer_metrics


def _stack_layer_metrics(layer_metrics: list[dict[str, Array]]) -> dict[str, Array]:
  """{key: [num_moe_layers, ...]} (empty dict for a dense model)."""
  if not layer_metrics:
    return {}
  return {k: jnp.stack([m[k] for m in layer_metrics]) for k in layer_metrics[0]}


def loss_fn(model, batch, aux_weight: float, z_weight: float, step=None, rng=None):
  """CE + aux_weight * sum of load-balance losses + z_weight * sum of z-losses + distillation losses.

  The distillation loss (StableMoE) arrives already weighted by moe.stablemoe_distill_weight.
  """
  ce_sum, correct, tokens, layer_metrics = _forward(model, batch, train=True, step=step, rng=rng)
  ce = ce_sum / jnp.maximum(tokens, 1.0)
  layers = _stack_layer_metrics(layer_metrics)
  total = lambda key: jnp.sum(layers[key]) if layers else jnp.zeros(())
  aux, z, distill = total("aux_loss"), total("z_loss"), total("distill_loss")
  loss = ce + aux_weight * aux + z_weight * z + distill
  return loss, dict(ce=ce, aux_loss=aux, z_loss=z, distill_loss=distill,
                    accuracy=correct / jnp.maximum(tokens, 1.0), layers=layers)


def step_rng(seed: int, step: Array) -> Array:
  """The replicated PRNG key of a training step (a function of seed and step: resumes exactly)."""
  return jax.random.fold_in(jax.random.key(seed), step)


def train_step(graphdef, state, batch, *, aux_weight: float, z_weight: float, schedule, seed: int = 0):
  """One optimizer step. Pure: (state, batch) -> (new state, metrics)."""
  model, optimizer = nnx.merge(graphdef, state)
  step = optimizer.step[...]
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  (loss, aux), grads = grad_fn(model, batch, aux_weight, z_weight, step, step_rng(seed, step))
  optimizer.update(model, grads)
  layers = aux.pop("layers")
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(step), **aux)
  for key in RATE_KEYS + ("gating_dropped",):
    if key in layers:
      metrics[key] = jnp.mean(layers[key])
  if layers:
    metrics["expert_demand"] = layers["expert_demand"]  # [num_moe_layers, E]
    metrics["expert_load"] = layers["expert_load"]
  return nnx.state((model, optimizer)), metrics


def eval_sums(model: model_lib.TransformerLM, batch: dict[str, Array]) -> dict[str, Any]:
  """Sums over one batch in eval mode: ce_sum, correct, tokens and per-layer routing metrics [layers, ...]."""
  ce_sum, correct, tokens, layer_metrics = _forward(model, batch, train=False)
  return dict(ce_sum=ce_sum, correct=correct, tokens=tokens, layers=_stack_layer_metrics(layer_metrics))


def eval_step(graphdef, state, batch):
  """`eval_sums` of the model half of a (model, optimizer) state."""
  model, _ = nnx.merge(graphdef, state)
  return eval_sums(model, batch)


def jit_steps(config, graphdef, state_shardings, mesh, schedule):
  """jax.jit'd train and eval steps with explicit in/out shardings; the train state is donated."""
  batch_sharding = {k: NamedSharding(mesh, sharding.token_spec(2)) for k in ("inputs", "targets", "token_mask")}
  replicated = NamedSharding(mesh, P())
  train_fn = jax.jit(
      functools.partial(train_step, graphdef, aux_weight=config.train.aux_loss_weight,
                        z_weight=config.train.z_loss_weight, schedule=schedule, seed=config.seed),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, graphdef), in_shardings=(state_shardings, batch_sharding),
                    out_shardings=replicated)
  return train_fn, eval_fn


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, Array]:
  """Per-process numpy batch -> global arrays sharded over (data, expert)."""
  spec = NamedSharding(mesh, sharding.token_spec(2))
  return {k: jax.make_array_from_process_local_data(spec, np.asarray(local[k]))
          for k in ("inputs", "targets", "token_mask")}


def lm_metrics(totals: dict[str, float]) -> dict[str, float]:
  """Loss, perplexity and token accuracy from summed "ce_sum", "correct" and "tokens"."""
  tokens = max(totals["tokens"], 1.0)
  loss = totals["ce_sum"] / tokens
  return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0))), "accuracy": totals["correct"] / tokens}


def evaluate(eval_fn, state, batches, mesh) -> dict[str, Any]:
  """Held-out loss, perplexity, token accuracy and per-layer routing metrics over `batches`."""
  totals, layer_sums, layer_weights = {"ce_sum": 0.0, "correct": 0.0, "tokens": 0.0}, None, 0.0
  for local in batches:
    out = jax.device_get(eval_fn(state, global_batch(local, mesh)))
    for k in totals:
      totals[k] += float(out[k])
    layers = out["layers"]
    if layers:
      # Token-weighted average of the per-layer rates; sums for per-expert counts.
      weight = float(out["tokens"])
      scaled = {k: (np.asarray(v) if k in ("expert_demand", "expert_load", "tokens") else np.asarray(v) * weight)
                for k, v in layers.items()}
      layer_sums = scaled if layer_sums is None else {k: layer_sums[k] + scaled[k] for k in scaled}
      layer_weights += weight
  result: dict[str, Any] = dict(lm_metrics(totals), tokens=totals["tokens"])
  if layer_sums is not None:
    per_layer = {}
    for k, v in layer_sums.items():
      per_layer[k] = (v if k in ("expert_demand", "expert_load", "tokens") else v / max(layer_weights, 1.0)).tolist()
    result["layers"] = per_layer
  return result


# ---------------------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------------------
class Checkpointer:
  """Orbax CheckpointManager in `workdir/checkpoints`: train state (model + optimizer) and data position."""

  def __init__(self, workdir: str, *, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: Optional[dict] = None) -> None:
    args = {"state": ocp.args.StandardSave(nnx.to_pure_dict(state))}
    args["data"] = ocp.args.JsonSave(data_state or {})
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, state, state_shardings) -> tuple[Any, dict]:
    """Restores `step` into the structure (and shardings) of `state`; returns (state, data_state)."""
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    new_state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(new_state, restored["state"])
    return new_state, dict(restored["data"] or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---------------------------------------------------------------------------------------------------------
# Metrics output.
# ---------------------------------------------------------------------------------------------------------
class MetricsWriter:
  """`workdir/metrics.jsonl` (one JSON object per logged step / eval), TensorBoard events, load traces."""

  def __init__(self, workdir: str, *, write_loads: bool):
    from tensorboardX import SummaryWriter  # local import: heavy
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.write_loads = write_loads and self.is_main
    if self.is_main:
      os.makedirs(os.path.join(workdir, "loads"), exist_ok=True)
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self.loads = open(os.path.join(workdir, "loads", "loads.jsonl"), "a") if self.write_loads else None

  def scalars(self, step: int, kind: str, values: dict[str, Any]) -> None:
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
    if self.is_main:
      self.jsonl.flush()
      self.tb.flush()
      if self.loads is not None:
        self.loads.flush()

  def close(self) -> None:
    if self.is_main:
      self.flush()
      self.jsonl.close()
      self.tb.close()
      if self.loads is not None:
        self.loads.close()


class _StopRequest:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly after the current step."""

  def __init__(self):
    self.signal: Optional[int] = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


class NonFiniteLossError(FloatingPointError):
  pass


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint in workdir if any), evaluates periodically, saves.

  Returns:
    A summary: final step, last train metrics, last eval metrics, stop reason.
  """
  maybe_initialize_distributed(config)
  mesh_shape = validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  saved_config = ml_collections.ConfigDict(config.to_dict())
  saved_config.mesh.data, saved_config.mesh.expert = mesh_shape  # the mesh actually used (-1 resolved)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(saved_config.to_json_best_effort(indent=2))

  train_cfg = config.train
  mesh = sharding.make_mesh(*mesh_shape)
  _log(f"Mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} device(s), "
       f"{jax.process_count()} process(es).")
  graphdef, state, state_shardings = create_train_state(config, mesh)
  _, schedule = make_optimizer(train_cfg, model_configs(config)[1])
  train_fn, eval_fn = jit_steps(config, graphdef, state_shardings, mesh, schedule)
  total, expert = count_params(state)
  _log(f"Parameters: {total:,} total, {expert:,} in experts. Router: k={config.moe.top_k}, "
       f"fill_in={config.moe.fill_in}, ir_mode={config.moe.ir_mode}, priority={config.moe.priority}, "
       f"capacity_factor={config.moe.capacity_factor}.")

  process_index, process_count = jax.process_index(), jax.process_count()
  train_iter = data_lib.make_train_iterator(config.data, seq_len=train_cfg.seq_len,
                                            global_batch_size=train_cfg.batch_size, seed=config.seed,
                                            process_index=process_index, process_count=process_count)
  eval_batches = data_lib.make_eval_batches(config.data, seq_len=train_cfg.seq_len,
                                            batch_size=train_cfg.eval_batch_size // process_count,
                                            max_batches=train_cfg.eval_batches, process_index=process_index,
                                            process_count=process_count)

  checkpointer = Checkpointer(workdir, keep=train_cfg.keep_checkpoints)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    state, data_state = checkpointer.restore(start_step, state, state_shardings)
    if data_state.get("iterator") is not None:
      train_iter.set_state(data_state["iterator"])
    _log(f"Resumed from step {start_step} ({checkpointer.directory}).")
  if start_step >= train_cfg.steps:
    _log(f"Nothing to do: checkpoint step {start_step} >= train.steps={train_cfg.steps}.")

  writer = MetricsWriter(workdir, write_loads=train_cfg.write_loads)
  tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
  pending: list[tuple[int, dict[str, Array]]] = []
  last_good_step, last_train, last_eval, reason = start_step, {}, {}, "completed"
  window_start, window_steps = time.time(), 0

  def drain() -> None:
    """Fetches pending step metrics, checks them, writes them. Raises NonFiniteLossError on NaN/inf."""
    nonlocal last_train, last_good_step
    for step, metrics in jax.device_get(pending):
      if not np.isfinite(metrics["loss"]):
        raise NonFiniteLossError(
            f"Loss became {metrics['loss']} at step {step}. The last good checkpoint is step "
            f"{checkpointer.latest_step()} in {checkpointer.directory} (nothing after it was saved). Lower "
            f"train.learning_rate (now {train_cfg.learning_rate}) or raise train.warmup_steps, then rerun to resume.")
      if "expert_demand" in metrics:
        writer.loads_trace(step, metrics.pop("expert_demand"), metrics.pop("expert_load"))
      last_train = {k: float(v) for k, v in metrics.items()}
      last_good_step = step
    pending.clear()

  saved_steps = set(checkpointer.all_steps())

  def save(step: int) -> None:
    if step in saved_steps:  # e.g. a stop signal on a step that was just checkpointed
      return
    checkpointer.save(step, state, {"iterator": train_iter.get_state(), "step": step})
    saved_steps.add(step)

  step = start_step
  try:
    with jax.set_mesh(mesh), _StopRequest() as stop:
      stop_at = train_cfg.get("stop_at_step", 0) or train_cfg.steps
      while step < min(train_cfg.steps, stop_at):
        batch = global_batch(next(train_iter), mesh)
        state, metrics = train_fn(state, batch)
        step += 1
        window_steps += 1
        pending.append((step, metrics))
        if step % train_cfg.log_every == 0 or step in (train_cfg.steps, stop_at) or stop.signal is not None:
          drain()
          elapsed = time.time() - window_start
          rate = tokens_per_step * window_steps / max(elapsed, 1e-9)
          writer.scalars(step, "train", {**last_train, "tokens_per_second": rate})
          _log(_progress_line(step, train_cfg.steps, last_train, rate,
                              gating_dropout=config.moe.get("gating_dropout", 0.0) > 0))
          window_start, window_steps = time.time(), 0
        if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
          drain()
          last_eval = evaluate(eval_fn, state, eval_batches, mesh)
          writer.scalars(step, "eval", last_eval)
          _log(f"[eval] step {step}: loss {last_eval['loss']:.4f}  ppl {last_eval['perplexity']:.2f}  "
               f"accuracy {last_eval['accuracy']:.4f}  ({int(last_eval['tokens'])} tokens)")
        if step % train_cfg.checkpoint_every == 0 or step in (train_cfg.steps, stop_at):
          drain()
          save(step)
        writer.flush()
        if stop.signal is not None:
          drain()
          save(step)
          reason = f"stopped by {signal.Signals(stop.signal).name}"
          _log(f"Received {signal.Signals(stop.signal).name}: saved checkpoint at step {step}; rerun to resume.")
          break
  finally:
    writer.close()
    checkpointer.close()
  return dict(step=step, train=last_train, eval=last_eval, reason=reason, last_good_step=last_good_step)


def _progress_line(step: int, total: int, metrics: dict[str, float], tokens_per_second: float,
                   gating_dropout: bool = False) -> str:
  parts = [f"step {step}/{total}", f"loss {metrics.get('loss', float('nan')):.4f}",
           f"ce {metrics.get('ce', float('nan')):.4f}", f"lr {metrics.get('learning_rate', 0.0):.2e}",
           f"{tokens_per_second:,.0f} tok/s"]
  for key, label in (("drop_rate", "drop"), ("padding_rate", "pad"), ("fill_in_rate", "fill"), ("ir_rate", "ir"),
                     ("gating_dropped", "gd")):
    if key in metrics and (key != "gating_dropped" or gating_dropout):
      parts.append(f"{label} {metrics[key]:.3f}")
  return "  ".join(parts)


def run_main(config: ml_collections.ConfigDict, workdir: str) -> int:
  """train.py's body: clear one-line errors for bad configs and NaN losses; exit codes for scripts."""
  try:
    summary = train_and_evaluate(config, workdir)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except KeyboardInterrupt:
    print("Interrupted by a second Ctrl-C: stopped without saving; rerun to resume from the last checkpoint.",
          file=sys.stderr)
    return 130
  _log(f"Done: {summary['reason']} at step {summary['step']}. Outputs in {os.path.abspath(workdir)}.")
  return 0
